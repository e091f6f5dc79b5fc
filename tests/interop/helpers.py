#!/usr/bin/env python3
"""Small stdlib-only helpers for the interop shell scripts.

    helpers.py free-port
        print a free TCP port on 127.0.0.1
    helpers.py greeting PORT TIMEOUT
        succeed once PORT answers with a line starting "* OK" (MUPDATE or IMAP)
    helpers.py imap PORT USER PASS COMMAND...
        log in to an IMAP server and run each COMMAND ("CREATE user.alice",
        "RENAME old new", "DELETE name", "SETACL name id rights"); prints one
        line per command and fails on the first tagged NO/BAD
    helpers.py decode
        read mupdatetest output on stdin; print the server's answers after
        "Authenticated." one per line, every {n+} literal turned into a
        quoted string with TAB shown as \\t
    helpers.py proxy LISTEN_PORT TARGET_PORT LOGFILE
        forward 127.0.0.1:LISTEN_PORT to 127.0.0.1:TARGET_PORT and record
        every byte in LOGFILE (one line per chunk, Python bytes notation)
"""

import imaplib
import re
import shlex
import socket
import sys
import threading
import time

HOST = "127.0.0.1"


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        print(s.getsockname()[1])


def greeting(port, timeout):
    """One attempt: connect, read lines until "* OK" or the timeout."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
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


def imap(port, user, password, commands):
    conn = imaplib.IMAP4(HOST, port, timeout=20)
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
        return greeting(int(args[0]), float(args[1]))
    if cmd == "imap" and len(args) >= 4:
        return imap(int(args[0]), args[1], args[2], args[3:])
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
