#!/usr/bin/env python3
"""Scripted IMAP session with a normalised transcript (stdlib only).

    imap_session.py [--check] [--raw] [--keep-text] HOST:PORT USER PASS SCRIPT

Logs in with LOGIN USER PASS (always the first command, tag c1), then sends
one command per line of SCRIPT (a file, or - for stdin), each with the next
tag c2, c3, ..., waits for its tagged answer, and prints the transcript:

    C: c5 SELECT INBOX
    S: * 2 EXISTS
    S: c5 OK [READ-WRITE]

Empty lines and lines starting with # are skipped. Directives (everything
else is sent verbatim):

    APPEND MAILBOX FLAGS SUBJECT
        APPEND a small fixed message (Subject SUBJECT, fixed Date and
        Message-ID derived from SUBJECT) with flag list FLAGS (e.g. "()" or
        "(\\Seen)") and the fixed internal date 01-Jan-2024 12:00:00 +0000,
        as a synchronizing literal (waits for the continuation request).
    IDLE-APPEND MAILBOX SUBJECT
        IDLE; once the server answers "+", a second connection (same
        HOST:PORT, USER, PASS) APPENDs a message to MAILBOX; wait (deadline)
        for an untagged EXISTS on the idling connection, then DONE and read
        the tagged answer. The second connection's outcome is printed as one
        line "X: second connection APPEND OK|NO...".
    SLEEP-UNTIL-LIST PATTERN NAME PRESENT|ABSENT
        (not printed) poll LIST "" PATTERN on a second connection until the
        mailbox NAME is present/absent (deadline); a frontend that learns of
        mailboxes through MUPDATE may lag its backends by a few seconds.

Normalisation (applied to every server line unless --raw; this is what makes
two runs against different servers or users comparable, and nothing else is
changed):

  N1  the logged-in USER name, as a whole word, becomes <user> (scripts run
      under different users so that each run starts from the same state);
  N2  the greeting becomes "* OK <greeting>";
  N3  a CAPABILITY list (untagged "* CAPABILITY ..." or a [CAPABILITY ...]
      response code) becomes "<caps>": capabilities legitimately differ;
  N4  the human-readable text after a status response (OK/NO/BAD/BYE/
      PREAUTH, tagged or untagged) and its optional [response code] is
      dropped (RFC 3501 7.1: clients must not depend on it; it also carries
      Cyrus's timings and SESSIONID); unless --keep-text;
  N5  the number after UIDVALIDITY, the UIDVALIDITY part of APPENDUID and
      COPYUID become <uidvalidity>;
  N6  HIGHESTMODSEQ n and MODSEQ (n) become <modseq>;
  N7  MAILBOXID (...), EMAILID (...), THREADID (...) become (<id>);
  N8  IMAP date-times ("dd-Mon-yyyy hh:mm:ss +zzzz") become <date>;
  N9  within one command's answer, a run of consecutive untagged LIST or
      LSUB lines is sorted (the order of LIST answers is not specified);
  N10 during IDLE, "* OK" keepalives (e.g. "* OK Still here") are dropped.
  Literals in server data are shown inline as {N}"escaped text" (or
  {N sha256=...} when longer than 200 bytes).

--check: exit 1 when a command gets a tagged NO or BAD (for setup scripts).
Exit status 2: usage, 3: connection/protocol failure or deadline (the
transcript so far is printed, then "E: ..." explaining).
"""

import hashlib
import re
import socket
import sys
import time

DEADLINE = 20.0  # seconds for any single answer
IDLE_DEADLINE = 20.0
FIXED_DATE = "01-Jan-2024 12:00:00 +0000"


class ProtocolError(Exception):
    pass


def hostport(arg):
    host, _, port = arg.rpartition(":")
    return (host or "127.0.0.1"), int(port)


def message(subject):
    return (
        "Date: Mon, 01 Jan 2024 12:00:00 +0000\r\n"
        "From: interop@example.org\r\nTo: someone@example.org\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{subject}@interop.example.org>\r\n"
        "\r\nDelivered through the interop tests.\r\n"
    ).encode()


class Conn:
    def __init__(self, address):
        self.sock = socket.create_connection(address, timeout=DEADLINE)
        self.buf = b""

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProtocolError("deadline waiting for the server")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout as e:
            raise ProtocolError("deadline waiting for the server") from e
        if not chunk:
            raise ProtocolError("server closed the connection")
        self.buf += chunk

    def _line(self, deadline):
        while b"\r\n" not in self.buf:
            self._fill(deadline)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read_response(self, timeout=DEADLINE):
        """One logical response line; literals shown inline."""
        deadline = time.monotonic() + timeout
        out = b""
        while True:
            line = self._line(deadline)
            m = re.search(rb"\{(\d+)\+?\}$", line)
            if not m:
                return (out + line).decode("utf-8", "replace")
            size = int(m.group(1))
            while len(self.buf) < size:
                self._fill(deadline)
            data, self.buf = self.buf[:size], self.buf[size:]
            if size <= 200:
                text = data.decode("utf-8", "replace")
                text = text.replace("\\", "\\\\").replace('"', '\\"')
                text = text.replace("\r", "\\r").replace("\n", "\\n")
                shown = f'{{{size}}}"{text}"'
            else:
                shown = f"{{{size} sha256={hashlib.sha256(data).hexdigest()[:16]}}}"
            out += line[: m.start()] + shown.encode()

    def send(self, data):
        self.sock.sendall(data)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Session:
    def __init__(self, address, user, password, raw=False, keep_text=False):
        self.address = address
        self.user = user
        self.password = password
        self.raw = raw
        self.keep_text = keep_text
        self.tagno = 0
        self.lines = []
        self.failed_commands = 0
        self.conn = None

    # ------------------------------------------------------------ output
    def out(self, text):
        self.lines.append(text)
        print(text, flush=True)

    def server_lines(self, lines):
        if not self.raw:
            lines = sort_list_runs([normalise(line, self.user, self.keep_text) for line in lines])
        for line in lines:
            self.out("S: " + line)

    # ------------------------------------------------------------ protocol
    def next_tag(self):
        self.tagno += 1
        return f"c{self.tagno}"

    def shown(self, text):
        return text if self.raw else user_word(self.user).sub("<user>", text)

    def read_until_tagged(self, conn, tag, timeout=DEADLINE):
        lines = []
        while True:
            line = conn.read_response(timeout)
            lines.append(line)
            if line.startswith(tag + " "):
                status = line[len(tag) + 1:].split(" ", 1)[0].upper()
                if status != "OK":
                    self.failed_commands += 1
                return lines, status

    def command(self, text, shown=None):
        tag = self.next_tag()
        self.out("C: " + self.shown(f"{tag} {shown or text}"))
        self.conn.send(f"{tag} {text}\r\n".encode())
        lines, status = self.read_until_tagged(self.conn, tag)
        self.server_lines(lines)
        return status

    def append(self, conn, mailbox, flags, subject, echo=True):
        tag = self.next_tag() if echo else "x1"
        body = message(subject)
        head = f'{tag} APPEND {mailbox} {flags} "{FIXED_DATE}" {{{len(body)}}}'
        if echo:
            self.out("C: " + self.shown(head))
        conn.send(head.encode() + b"\r\n")
        before = []
        while True:  # untagged data may precede the continuation request
            line = conn.read_response()
            if line.startswith("+"):
                break
            before.append(line)
            if line.startswith(tag + " "):  # refused before the literal
                self.failed_commands += 1
                if echo:
                    self.server_lines(before)
                return line[len(tag) + 1:].split(" ", 1)[0].upper()
        conn.send(body + b"\r\n")
        lines, status = self.read_until_tagged(conn, tag)
        if echo:
            self.server_lines(before + ["+ <continue>"] + lines)
        return status

    def second_login(self):
        conn = Conn(self.address)
        conn.read_response()
        conn.send(b"x0 LOGIN " + quote(self.user) + b" " + quote(self.password) + b"\r\n")
        lines, status = self.read_until_tagged(conn, "x0")
        if status != "OK":
            conn.close()
            raise ProtocolError(f"second connection LOGIN failed: {lines[-1]}")
        return conn

    def idle_append(self, mailbox, subject):
        tag = self.next_tag()
        self.out(f"C: {tag} IDLE")
        self.conn.send(f"{tag} IDLE\r\n".encode())
        got = []
        while True:
            line = self.conn.read_response()
            got.append(line)
            if line.startswith("+"):
                break
            if line.startswith(tag + " "):
                self.server_lines(got)
                self.failed_commands += 1
                return
        other = self.second_login()
        try:
            status = self.append(other, mailbox, "()", subject, echo=False)
            other.send(b"x2 LOGOUT\r\n")
        finally:
            other.close()
        deadline = time.monotonic() + IDLE_DEADLINE
        while not any(re.match(r"^\* \d+ EXISTS$", line) for line in got[1:]):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.server_lines(got)
                raise ProtocolError("no EXISTS during IDLE within the deadline")
            got.append(self.conn.read_response(remaining))
        self.conn.send(b"DONE\r\n")
        lines, _ = self.read_until_tagged(self.conn, tag)
        got += lines
        got = [got[0].split(" ", 1)[0] + " <continue>"] + got[1:]
        if not self.raw:
            got = [line for line in got if not re.match(r"^\* OK(?! \[)", line)]
        self.server_lines(got)
        self.out(f"X: second connection APPEND {status}")

    def wait_list(self, pattern, name, want_present):
        conn = Conn(self.address)
        try:
            conn.read_response()
            conn.send(b"y0 LOGIN " + quote(self.user) + b" " + quote(self.password) + b"\r\n")
            self.read_until_tagged(conn, "y0")
            deadline = time.monotonic() + IDLE_DEADLINE
            n = 0
            while True:
                n += 1
                conn.send(f'y{n} LIST "" {pattern}\r\n'.encode())
                lines, _ = self.read_until_tagged(conn, f"y{n}")
                present = any(re.search(r'"[./]?" "?' + re.escape(name) + r'"?$', line)
                              for line in lines if line.startswith("* LIST "))
                if present == want_present:
                    return
                if time.monotonic() > deadline:
                    raise ProtocolError(f"{name} still {'absent' if want_present else 'present'} in LIST")
                time.sleep(0.25)
        finally:
            conn.close()

    def run(self, script_lines):
        self.conn = Conn(self.address)
        greeting = self.conn.read_response()
        if self.raw or not greeting.startswith("* OK"):
            self.server_lines([greeting])
        else:
            self.out("S: * OK <greeting>")  # N2
        self.command(f"LOGIN {quote(self.user).decode()} {quote(self.password).decode()}",
                     shown=f"LOGIN {self.user} <password>")
        for raw_line in script_lines:
            line = raw_line.strip()
            if not line or line.startswith("#"):
                continue
            words = line.split(" ")
            verb = words[0].upper()
            if verb == "APPEND" and len(words) >= 4 and not words[-1].startswith("{"):
                self.append(self.conn, words[1], words[2], " ".join(words[3:]))
            elif verb == "IDLE-APPEND" and len(words) == 3:
                self.idle_append(words[1], words[2])
            elif verb == "SLEEP-UNTIL-LIST" and len(words) == 4:
                self.wait_list(words[1], words[2], words[3].upper() == "PRESENT")
            else:
                if verb == "LOGOUT":
                    tag = self.next_tag()
                    self.out(f"C: {tag} LOGOUT")
                    self.conn.send(f"{tag} LOGOUT\r\n".encode())
                    lines, _ = self.read_until_tagged(self.conn, tag)
                    self.server_lines(lines)
                    self.conn.close()
                    return
                self.command(line)
        self.conn.close()


def quote(text):
    return ('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"').encode()


def user_word(user):
    return re.compile(r"(?<![A-Za-z0-9_-])" + re.escape(user) + r"(?![A-Za-z0-9_-])")


STATUS = re.compile(r"^(?P<tag>\S+) (?P<status>OK|NO|BAD|BYE|PREAUTH)(?P<rest>( .*)?)$", re.I)


def normalise(line, user, keep_text):
    # N3 first: a capability list may contain anything.
    line = re.sub(r"^\* CAPABILITY .*$", "* CAPABILITY <caps>", line, flags=re.I)
    line = re.sub(r"\[CAPABILITY [^\]]*\]", "[CAPABILITY <caps>]", line, flags=re.I)
    m = STATUS.match(line)
    if m:
        rest = m.group("rest").strip()
        code = ""
        if rest.startswith("["):
            end = rest.find("]")
            code = rest[: end + 1] if end > 0 else rest
        if not keep_text:
            line = f"{m.group('tag')} {m.group('status').upper()}" + (f" {code}" if code else "")
    line = user_word(user).sub("<user>", line)  # N1
    line = re.sub(r"UIDVALIDITY \d+", "UIDVALIDITY <uidvalidity>", line, flags=re.I)  # N5
    line = re.sub(r"(APPENDUID|COPYUID) \d+", r"\1 <uidvalidity>", line, flags=re.I)
    line = re.sub(r"HIGHESTMODSEQ \d+", "HIGHESTMODSEQ <modseq>", line, flags=re.I)  # N6
    line = re.sub(r"MODSEQ \(\d+\)", "MODSEQ (<modseq>)", line, flags=re.I)
    line = re.sub(r"(MAILBOXID|EMAILID|THREADID) \([^)]*\)", r"\1 (<id>)", line, flags=re.I)  # N7
    line = re.sub(r'"?\d{1,2}-[A-Z][a-z]{2}-\d{4} \d\d:\d\d:\d\d [+-]\d{4}"?', "<date>", line)  # N8
    return line


def sort_list_runs(lines):
    """N9: sort each run of consecutive untagged LIST or LSUB lines."""
    out, run, kind = [], [], None
    for line in lines + [None]:
        k = None
        if line is not None:
            m = re.match(r"^\* (LIST|LSUB) ", line, re.I)
            k = m.group(1).upper() if m else None
        if k is not None and k == kind:
            run.append(line)
            continue
        out.extend(sorted(run))
        run, kind = ([line], k) if k is not None else ([], None)
        if k is None and line is not None:
            out.append(line)
    return out


def main(argv):
    flags = {"--check": False, "--raw": False, "--keep-text": False}
    while argv and argv[0] in flags:
        flags[argv.pop(0)] = True
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    address, user, password, script = hostport(argv[0]), argv[1], argv[2], argv[3]
    if script == "-":
        lines = sys.stdin.read().splitlines()
    else:
        with open(script, encoding="utf-8") as f:
            lines = f.read().splitlines()
    session = Session(address, user, password, raw=flags["--raw"], keep_text=flags["--keep-text"])
    try:
        session.run(lines)
    except (ProtocolError, OSError) as e:
        print(f"E: {e}", flush=True)
        return 3
    if flags["--check"] and session.failed_commands:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
