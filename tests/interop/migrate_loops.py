#!/usr/bin/env python3
"""Load loops for migrate.sh: they run while backends are cut over and log
every operation, so that the script can tell which failed and when.

    migrate_loops.py lmtp STOPFILE LOG MAX_SECONDS [LABEL=]TARGET RCPT...
        one LMTP transaction to TARGET (HOST:PORT or unix:PATH) per round,
        every RCPT in it; logs "<unix time> [LABEL/]<rcpt> <first digit of
        its final reply or E>"
    migrate_loops.py create STOPFILE LOG MAX_SECONDS USER PASS PREFIX NAME=HOST:PORT...
        per round, one IMAP CREATE of PREFIXNAMEx<round> (a top-level
        mailbox) on each backend
        NAME (a new connection each time, as USER); logs
        "<unix time> <NAME> ok|fail <mailbox> <reason>"

Both stop when STOPFILE exists or after MAX_SECONDS, pause 0.2 s between
rounds, and bound every socket operation by a timeout.
"""

import imaplib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lmtp_scenarios  # noqa: E402

TIMEOUT = 5


def lmtp_round(target, rcpts, subject):
    """Final reply class per recipient ('E' for a connection failure)."""
    try:
        sock = lmtp_scenarios.connect(target)
        sock.settimeout(TIMEOUT)
        c = lmtp_scenarios.Conn(sock)
        c.reply()
        c.send(b"LHLO migrate.example.org\r\n")
        c.reply()
        c.send(b"MAIL FROM:<migrate@example.org>\r\n")
        if not c.reply().startswith("2"):
            return {r: "E" for r in rcpts}
        codes = {}
        for r in rcpts:
            c.send(f"RCPT TO:<{r}>\r\n".encode())
            codes[r] = c.reply()
        accepted = [r for r in rcpts if codes[r].startswith("2")]
        if accepted:
            c.send(b"DATA\r\n")
            if not c.reply().startswith("354"):
                return {r: "E" for r in rcpts}
            data = lmtp_scenarios.message(subject, 1)
            c.send(lmtp_scenarios.stuff(data) + b"\r\n.\r\n")
            for r in accepted:
                codes[r] = c.reply()
        c.send(b"QUIT\r\n")
        sock.close()
        return {r: codes[r][:1] for r in rcpts}
    except (OSError, EOFError, ValueError):
        return {r: "E" for r in rcpts}


def create_one(hostport, user, password, name):
    host, _, port = hostport.rpartition(":")
    try:
        conn = imaplib.IMAP4(host, int(port), timeout=TIMEOUT)
        try:
            conn.login(user, password)
            typ, data = conn.create(name)
            text = b" ".join(d for d in data if isinstance(d, bytes)).decode("utf-8", "replace")
            return typ == "OK", text
        finally:
            try:
                conn.logout()
            except (imaplib.IMAP4.error, OSError):
                pass
    except (imaplib.IMAP4.error, OSError, EOFError) as e:
        return False, str(e)


def main(argv):
    if len(argv) < 5:
        print(__doc__, file=sys.stderr)
        return 2
    mode, stop, log, max_seconds = argv[0], argv[1], argv[2], float(argv[3])
    rest = argv[4:]
    deadline = time.time() + max_seconds
    n = 0
    with open(log, "a", encoding="utf-8") as out:
        while time.time() < deadline and not os.path.exists(stop):
            n += 1
            if mode == "lmtp" and len(rest) >= 2:
                label, _, target = rest[0].rpartition("=")
                prefix = f"{label}/" if label else ""
                for rcpt, cls in lmtp_round(target, rest[1:], f"migrate-{prefix}{n}").items():
                    out.write(f"{time.time():.3f} {prefix}{rcpt} {cls}\n")
            elif mode == "create" and len(rest) >= 4:
                user, password, prefix = rest[0], rest[1], rest[2]
                for spec in rest[3:]:
                    name, _, hostport = spec.partition("=")
                    mailbox = f"{prefix}{name}x{n}"
                    ok, text = create_one(hostport, user, password, mailbox)
                    reason = " ".join(text.split())[:120]
                    out.write(f"{time.time():.3f} {name} {'ok' if ok else 'fail'} {mailbox} {reason}\n")
            else:
                print(__doc__, file=sys.stderr)
                return 2
            out.flush()
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
