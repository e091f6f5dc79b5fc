#!/usr/bin/env python3
"""Small stdlib-only helpers for the interop shell scripts.

    helpers.py free-port
        print a free TCP port on 127.0.0.1
    helpers.py greeting [HOST:]PORT TIMEOUT
        succeed once PORT answers with a line starting "* OK" (MUPDATE or IMAP)
    helpers.py imap [HOST:]PORT USER PASS COMMAND...
        log in (IMAP LOGIN) and run each COMMAND: "CREATE name", "RENAME old
        new", "DELETE name", "SETACL name id rights", "SELECT name" (prints
        the EXISTS count), "APPEND name subject" (a short message with that
        Subject), "SEARCH SUBJECT text" (in the selected mailbox; prints the
        matching sequence numbers), "LIST" (prints "LIST-MAILBOX name" per
        mailbox of LIST "" "*"); prints one line per command and fails on the
        first tagged NO/BAD
    helpers.py mboxlist
        read `ctl_mboxlist -d` output (JSON) on stdin; print one line per
        mailbox, in the database's order: "NAME SERVER!PARTITION" (SERVER is
        empty for a local mailbox); tombstones (mbtype with "d", which a
        backend keeps for a deleted name) are left out
    helpers.py connected PORT ARGV...
        succeed when a process whose command line is exactly ARGV has an
        established TCP connection to 127.0.0.1:PORT; print its pid
    helpers.py decode
        read mupdatetest output on stdin; print the server's answers after
        "Authenticated." one per line, every {n+} literal turned into a
        quoted string with TAB shown as \\t
    helpers.py proxy LISTEN_PORT TARGET_PORT LOGFILE
        forward 127.0.0.1:LISTEN_PORT to 127.0.0.1:TARGET_PORT and record
        every byte in LOGFILE (one line per chunk, Python bytes notation)
"""

import imaplib
import json
import os
import re
import shlex
import socket
import sys
import threading
import time

HOST = "127.0.0.1"


def hostport(arg):
    """PORT (on 127.0.0.1) or HOST:PORT -> (host, port)."""
    host, _, port = arg.rpartition(":")
    return (host or HOST), int(port)


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        print(s.getsockname()[1])


def greeting(address, timeout):
    """One attempt: connect, read lines until "* OK" or the timeout."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection(address, timeout=timeout) as s:
            buf = b""
            while time.monotonic() < deadline:
                s.settimeout(max(0.05, deadline - time.monotonic()))
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
                for line in buf.split(b"\n"):
                    if line.startswith(b"* OK"):
                        print(line.decode("utf-8", "replace").rstrip())
                        return 0
    except OSError as e:
        print(f"greeting: {e}", file=sys.stderr)
    return 1


LIST_LINE = re.compile(rb'^\((?P<flags>[^)]*)\) (?P<sep>NIL|"(?:[^"\\]|\\.)*") (?P<name>.*)$')


def list_names(data):
    """Mailbox names of LIST answers as imaplib returns them."""
    names = []
    for item in data:
        if item is None:
            continue
        if isinstance(item, tuple):  # name sent as a literal
            names.append(item[1].decode("utf-8", "replace"))
            continue
        m = LIST_LINE.match(item)
        if not m:
            names.append("?" + item.decode("utf-8", "replace"))
            continue
        name = m.group("name")
        if name.startswith(b'"') and name.endswith(b'"') and len(name) >= 2:
            name = re.sub(rb"\\(.)", rb"\1", name[1:-1])
        names.append(name.decode("utf-8", "replace"))
    return names


def message(subject):
    return (
        f"From: interop@example.org\r\nTo: someone@example.org\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{subject}@interop.example.org>\r\n"
        f"\r\nDelivered through the interop tests.\r\n"
    ).encode()


def imap(address, user, password, commands):
    conn = imaplib.IMAP4(address[0], address[1], timeout=20)
    typ, data = conn.login(user, password)
    if typ != "OK":
        print(f"LOGIN {typ} {data}")
        return 1
    status = 0
    for command in commands:
        words = shlex.split(command)
        verb = words[0].upper()
        args = words[1:]
        if verb == "CREATE" and len(args) == 1:
            typ, data = conn.create(args[0])
        elif verb == "RENAME" and len(args) == 2:
            typ, data = conn.rename(args[0], args[1])
        elif verb == "DELETE" and len(args) == 1:
            typ, data = conn.delete(args[0])
        elif verb == "SETACL" and len(args) == 3:
            typ, data = conn.setacl(args[0], args[1], args[2])
        elif verb == "SELECT" and len(args) == 1:
            typ, data = conn.select(args[0])
        elif verb == "APPEND" and len(args) == 2:
            typ, data = conn.append(args[0], None, None, message(args[1]))
        elif verb == "SEARCH" and len(args) == 2 and args[0].upper() == "SUBJECT":
            typ, data = conn.search(None, "SUBJECT", '"' + args[1] + '"')
        elif verb == "LIST" and not args:
            typ, data = conn.list('""', '"*"')
            print(f"{command} -> {typ}")
            if typ == "OK":
                for name in list_names(data):
                    print(f"LIST-MAILBOX {name}")
                continue
            status = 1
            break
        else:
            print(f"imap: unsupported command {command!r}", file=sys.stderr)
            return 2
        text = b" ".join(d for d in data if isinstance(d, bytes))
        print(f"{command} -> {typ} {text.decode('utf-8', 'replace')}")
        if typ != "OK":
            status = 1
            break
    try:
        conn.logout()
    except (imaplib.IMAP4.error, OSError):
        pass
    return status


def mboxlist(text):
    for name, entry in json.loads(text or "{}").items():
        if "d" in entry.get("mbtype", ""):
            continue
        print(f"{name} {entry.get('server', '')}!{entry.get('partition', '')}")


def tcp_peers(inodes, port):
    """Whether one of these socket inodes is connected to 127.0.0.1:port."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[2] == want and fields[3] == "01" and fields[9] in inodes:
                return True
    return False


def connected(port, argv):
    target = "\0".join(argv).encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().rstrip(b"\0") != target:
                    continue
            inodes = set()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
        if tcp_peers(inodes, port):
            print(pid)
            return 0
    return 1


LITERAL = re.compile(rb"\{(\d+)\+?\}$")


def quote(raw):
    text = raw.decode("utf-8", "replace")
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t")
    return '"' + text + '"'


def decode(data):
    """Rewrite literal-laden MUPDATE answers as one line per answer."""
    # mupdatetest announces the LOGOUT it sends at end of input whenever it
    # notices the end; that line may fall between answers.
    data = data.replace(b"\r", b"").replace(b"C: Q01 LOGOUT\n", b"")
    marker = b"\nAuthenticated.\n"
    at = data.find(marker)
    if at >= 0:
        data = data[at + len(marker):]
    out = []
    pos = 0
    while pos < len(data):
        logical = b""
        while True:
            end = data.find(b"\n", pos)
            if end < 0:
                end = len(data)
            line = data[pos:end]
            pos = end + 1
            m = LITERAL.search(line)
            if not m:
                logical += line
                break
            size = int(m.group(1))
            logical += line[: m.start()] + quote(data[pos:pos + size]).encode()
            pos += size
        text = logical.decode("utf-8", "replace")
        if text and not text.startswith("Security strength factor"):
            out.append(text)
    print("\n".join(out))


def proxy(listen_port, target_port, logfile):
    log = open(logfile, "a", buffering=1, encoding="utf-8")
    lock = threading.Lock()
    counter = [0]

    def pump(src, dst, cid, direction, alive):
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                with lock:
                    log.write(f"{cid} {direction} {chunk!r}\n")
                dst.sendall(chunk)
            # Pass the half-close on; the other direction ends by itself.
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        with lock:
            log.write(f"{cid} {direction} closed\n")
            alive[0] -= 1
            if alive[0] == 0:
                src.close()
                dst.close()

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, listen_port))
    listener.listen(64)
    print("proxy ready", flush=True)
    while True:
        client, _ = listener.accept()
        counter[0] += 1
        cid = f"c{counter[0]}"
        try:
            upstream = socket.create_connection((HOST, target_port), timeout=10)
            upstream.settimeout(None)
        except OSError as e:
            with lock:
                log.write(f"{cid} connect failed: {e}\n")
            client.close()
            continue
        with lock:
            log.write(f"{cid} open\n")
        alive = [2]
        for args in ((client, upstream, cid, "C:", alive), (upstream, client, cid, "S:", alive)):
            threading.Thread(target=pump, args=args, daemon=True).start()


def main(argv):
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "free-port" and not args:
        free_port()
        return 0
    if cmd == "greeting" and len(args) == 2:
        return greeting(hostport(args[0]), float(args[1]))
    if cmd == "imap" and len(args) >= 4:
        return imap(hostport(args[0]), args[1], args[2], args[3:])
    if cmd == "mboxlist" and not args:
        mboxlist(sys.stdin.read())
        return 0
    if cmd == "connected" and len(args) >= 2:
        return connected(int(args[0]), args[1:])
    if cmd == "decode" and not args:
        decode(sys.stdin.buffer.read())
        return 0
    if cmd == "proxy" and len(args) == 3:
        proxy(int(args[0]), int(args[1]), args[2])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
