#!/usr/bin/env python3
"""POP3 client checks for the interop scripts (Python's poplib, stdlib only).

    pop3_scenarios.py summary HOST:PORT USER PASS [user|plain]
        log in (USER/PASS, or AUTH PLAIN with an initial response), then
        print what the maildrop looks like: the +OK login line's first word,
        STAT, each LIST and UIDL line, the sha256 and first Subject of
        RETR 1 and of TOP 1 0, then QUIT; one line each, so two servers can
        be compared with a plain text diff
    pop3_scenarios.py refused HOST:PORT USER PASS
        print "REFUSED <answer>" when the login is refused, "ACCEPTED" if not
    pop3_scenarios.py pipelined HOST:PORT USER PASS
        send "USER, PASS, STAT, LIST 1, QUIT" in one write (RFC 2449
        PIPELINING) and print the answers' status words and STAT's numbers
    pop3_scenarios.py inuse HOST:PORT USER PASS
        log in twice at once; print "FIRST <status>" and "SECOND <status
        word> [response code]" (Cyrus pop3d locks the maildrop per session)
    pop3_scenarios.py greeting HOST:PORT
        succeed once HOST:PORT greets with "+OK" (for waiting)

Exit status 0 unless the connection or the protocol failed; refusals are
output, not errors.
"""

import base64
import hashlib
import poplib
import socket
import sys


def connect(hostport):
    host, port = hostport.rsplit(":", 1)
    return poplib.POP3(host, int(port), timeout=20)


def login(pop, user, password, how):
    if how == "plain":
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
        return pop._shortcmd("AUTH PLAIN " + token.decode())
    pop.user(user)
    return pop.pass_(password)


def subject(lines):
    for line in lines:
        if line == b"":
            break
        if line.lower().startswith(b"subject:"):
            return line[8:].strip().decode(errors="replace")
    return "-"


def summary(hostport, user, password, how="user"):
    pop = connect(hostport)
    answer = login(pop, user, password, how)
    print("LOGIN", answer.split()[0].decode())
    count, size = pop.stat()
    print("STAT", count, size)
    for line in pop.list()[1]:
        print("LIST", line.decode())
    for line in pop.uidl()[1]:
        print("UIDL", line.decode())
    if count:
        _, lines, octets = pop.retr(1)
        body = b"\r\n".join(lines) + b"\r\n"
        print("RETR1", octets, hashlib.sha256(body).hexdigest(), subject(lines))
        _, lines, _ = pop.top(1, 0)
        print("TOP1", len(lines), subject(lines))
    print("QUIT", pop.quit().split()[0].decode())


def refused(hostport, user, password):
    pop = connect(hostport)
    try:
        login(pop, user, password, "user")
    except poplib.error_proto as e:
        print("REFUSED", e.args[0].decode(errors="replace"))
        return
    finally:
        try:
            pop.quit()
        except Exception:
            pass
    print("ACCEPTED")


def pipelined(hostport, user, password):
    host, port = hostport.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as s:
        f = s.makefile("rb")
        print("GREETING", f.readline().split()[0].decode())
        s.sendall(
            f"USER {user}\r\nPASS {password}\r\nSTAT\r\nLIST 1\r\nQUIT\r\n".encode()
        )
        for name in ("USER", "PASS", "STAT", "LIST1", "QUIT"):
            line = f.readline().decode(errors="replace").rstrip("\r\n")
            words = line.split()
            if name in ("STAT", "LIST1"):
                print(name, " ".join(words[:3]))
            else:
                print(name, words[0] if words else "<EOF>")


def inuse(hostport, user, password):
    first = connect(hostport)
    print("FIRST", login(first, user, password, "user").split()[0].decode())
    second = connect(hostport)
    try:
        answer = login(second, user, password, "user")
        print("SECOND", answer.split()[0].decode())
        second.quit()
    except poplib.error_proto as e:
        words = e.args[0].decode(errors="replace").split()
        code = words[1] if len(words) > 1 and words[1].startswith("[") else ""
        print("SECOND", words[0], code)
    first.quit()


def greeting(hostport):
    pop = connect(hostport)
    ok = pop.getwelcome().startswith(b"+OK")
    pop.quit()
    sys.exit(0 if ok else 1)


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    try:
        {
            "summary": summary,
            "refused": refused,
            "pipelined": pipelined,
            "inuse": inuse,
            "greeting": greeting,
        }[
            mode
        ](*args)
    except (OSError, poplib.error_proto) as e:
        print("E:", mode, type(e).__name__, e)
        sys.exit(1)


if __name__ == "__main__":
    main()
