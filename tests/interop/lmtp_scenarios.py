#!/usr/bin/env python3
"""LMTP client for proxy.sh: one transaction, every reply printed.

    lmtp_scenarios.py send TARGET SUBJECT SIZE_KB RCPT...
        TARGET is HOST:PORT or unix:PATH. Sends LHLO, MAIL FROM:<interop@
        example.org>, each RCPT TO, and (if any recipient was accepted) DATA
        with a message of about SIZE_KB KiB whose Subject is SUBJECT.
        Prints one line per recipient, in RCPT order:
            RESULT <rcpt> <rcpt-reply-code> <data-reply-code or ->
        and "CLASSES <x> <x> ..." with the first digit of each recipient's
        final answer (the DATA reply, or the RCPT reply if refused there).

Python's smtplib.LMTP reads one reply after DATA, not one per recipient
(RFC 2033), so this is a small client of its own. Bounded: every read has a
timeout; lines over 4 KiB are an error.
"""

import socket
import sys

TIMEOUT = 120


def connect(target):
    if target.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        s.connect(target[5:])
    else:
        host, _, port = target.rpartition(":")
        s = socket.create_connection((host or "127.0.0.1", int(port)), timeout=TIMEOUT)
    return s


class Conn:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def line(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk
            if len(self.buf) > 4096 and b"\n" not in self.buf:
                raise ValueError("reply line too long")
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("utf-8", "replace").rstrip("\r")

    def reply(self):
        lines = [self.line()]
        while len(lines[-1]) > 3 and lines[-1][3] == "-":
            lines.append(self.line())
        return lines[-1]

    def send(self, data):
        self.sock.sendall(data)


def message(subject, size_kb):
    head = (
        "Date: Mon, 01 Jan 2024 12:00:00 +0000\r\nFrom: interop@example.org\r\n"
        f"To: undisclosed-recipients:;\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@interop.example.org>\r\n\r\n"
    )
    body_line = ("." + "x" * 70 + "\r\n")  # a leading dot: dot-stuffing is exercised
    lines = max(1, size_kb * 1024 // len(body_line))
    return head.encode() + (body_line * lines).encode()


def stuff(data):
    out = data.replace(b"\r\n.", b"\r\n..")
    if out.startswith(b"."):
        out = b"." + out
    return out


def send(target, subject, size_kb, rcpts):
    c = Conn(connect(target))
    c.reply()  # greeting
    c.send(b"LHLO interop.example.org\r\n")
    c.reply()
    c.send(b"MAIL FROM:<interop@example.org>\r\n")
    mail = c.reply()
    if not mail.startswith("2"):
        print(f"E: MAIL refused: {mail}")
        return 3
    rcpt_codes = []
    for r in rcpts:
        c.send(f"RCPT TO:<{r}>\r\n".encode())
        rcpt_codes.append(c.reply())
    accepted = [i for i, code in enumerate(rcpt_codes) if code.startswith("2")]
    data_codes = {}
    if accepted:
        c.send(b"DATA\r\n")
        go = c.reply()
        if not go.startswith("354"):
            print(f"E: DATA refused: {go}")
            return 3
        c.send(stuff(message(subject, size_kb)) + b"\r\n.\r\n")
        for i in accepted:
            data_codes[i] = c.reply()
    c.send(b"QUIT\r\n")
    classes = []
    for i, r in enumerate(rcpts):
        final = data_codes.get(i, rcpt_codes[i])
        classes.append(final[:1])
        print(f"RESULT {r} {rcpt_codes[i][:3]} {data_codes[i][:3] if i in data_codes else '-'}"
              f"  ({final})")
    print("CLASSES " + " ".join(classes))
    return 0


def main(argv):
    if len(argv) >= 5 and argv[0] == "send":
        try:
            return send(argv[1], argv[2], int(argv[3]), argv[4:])
        except (OSError, EOFError, ValueError) as e:
            print(f"E: {e}")
            return 3
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
