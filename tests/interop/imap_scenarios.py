#!/usr/bin/env python3
"""Client scenarios of proxy.sh that need more than a fixed script (imaplib).

    imap_scenarios.py big HOST:PORT USER PASS MAILBOX MEGABYTES
        APPEND a MEGABYTES MB message to MAILBOX, find it by Message-ID, FETCH
        BODY.PEEK[] back and compare sha256.
    imap_scenarios.py crossmove HOST:PORT USER PASS SRC DST
        with SRC and DST on different backends: UID COPY a fresh message from
        SRC to DST (present in both afterwards), then UID MOVE another one
        (present in DST, absent from SRC); SUBSCRIBE DST and LSUB.
    imap_scenarios.py mastersdown HOST:PORT USER PASS
        with every registry master stopped: LOGIN, LIST, SELECT INBOX, FETCH
        and APPEND work (answered from the proxy's replica and the backend);
        CREATE is refused with a NO that says why.
    imap_scenarios.py backendloss HOST:PORT USER PASS LOCAL REMOTE -- CMD...
        session A selects REMOTE, session B selects LOCAL (another backend);
        then CMD runs (it stops REMOTE's backend): A gets a BYE, B goes on
        (NOOP, FETCH), and STATUS REMOTE on B is NO [UNAVAILABLE].
    imap_scenarios.py count HOST:PORT USER PASS MAILBOX [SUBJECT]
        print the number of messages in MAILBOX (with SUBJECT, of those whose
        Subject contains it).

Output: one line per result,
    CHECK <name> ok [detail]      an expectation held
    CHECK <name> FAIL <detail>    it did not
    OBSERVE <name> <text>         what the server answered (evidence)
proxy.sh turns CHECK lines into assertions; for the reference frontend, the
checks listed there as known Cyrus 3.6 defects are evidence instead.
Exit status: 0 (even with FAIL checks), 3 on a connection failure.
"""

import hashlib
import imaplib
import random
import sys
import time

TIMEOUT = 60


def hostport(arg):
    host, _, port = arg.rpartition(":")
    return (host or "127.0.0.1"), int(port)


def connect(address, user, password):
    conn = imaplib.IMAP4(address[0], address[1], timeout=TIMEOUT)
    conn.login(user, password)
    return conn


def check(name, ok, detail=""):
    print(f"CHECK {name} {'ok' if ok else 'FAIL'}{' ' + detail if detail else ''}", flush=True)
    return ok


def observe(name, text):
    print(f"OBSERVE {name} {text}", flush=True)


def text_of(data):
    return " ".join(d.decode("utf-8", "replace") if isinstance(d, bytes) else repr(d)
                    for d in data if d is not None)


def small_message(subject):
    return (
        "Date: Mon, 01 Jan 2024 12:00:00 +0000\r\nFrom: interop@example.org\r\n"
        f"To: someone@example.org\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@interop.example.org>\r\n\r\nscenario message\r\n"
    ).encode()


def big_message(subject, megabytes):
    head = small_message(subject).split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    rng = random.Random(subject)
    line_count = megabytes * 1024 * 1024 // 78
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    body = b"".join(bytes(rng.choice(alphabet) for _ in range(76)) + b"\r\n"
                    for _ in range(min(line_count, 4096)))
    # Repeat a 4096-line block (fast) and make every line unique by its number.
    lines = body.split(b"\r\n")[:-1]
    out = [head]
    for i in range(line_count):
        out.append(b"%08d" % i + lines[i % len(lines)][8:] + b"\r\n")
    return b"".join(out)


def find_uids(conn, subject):
    typ, data = conn.uid("SEARCH", None, "HEADER", "Message-ID", f"<{subject}@interop.example.org>")
    if typ != "OK" or not data or data[0] is None:
        return []
    return data[0].split()


def big(address, user, password, mailbox, megabytes):
    conn = connect(address, user, password)
    subject = f"big-{int(time.time())}-{random.randrange(10**6)}"
    msg = big_message(subject, megabytes)
    want = hashlib.sha256(msg).hexdigest()
    t = time.monotonic()
    typ, data = conn.append(mailbox, None, None, msg)
    check("big-append", typ == "OK", f"{len(msg)} bytes in {time.monotonic() - t:.2f}s: {typ} {text_of(data)}")
    typ, data = conn.select(mailbox)
    uids = find_uids(conn, subject)
    if not check("big-found", len(uids) == 1, f"UIDs {uids}"):
        return 0
    t = time.monotonic()
    typ, data = conn.uid("FETCH", uids[0], "(BODY.PEEK[])")
    got = b""
    for item in data:
        if isinstance(item, tuple):
            got = item[1]
    check("big-fetch-sha256", hashlib.sha256(got).hexdigest() == want,
          f"{len(got)} bytes back in {time.monotonic() - t:.2f}s, sha256 {hashlib.sha256(got).hexdigest()[:16]} vs {want[:16]}")
    conn.logout()
    return 0


def crossmove(address, user, password, src, dst):
    conn = connect(address, user, password)
    stamp = f"{int(time.time())}-{random.randrange(10**6)}"
    caps = conn.capabilities
    observe("capabilities-move", "MOVE" in caps)

    # COPY
    subject = f"xcopy-{stamp}"
    typ, data = conn.append(src, None, None, small_message(subject))
    check("copy-append-src", typ == "OK", f"{typ} {text_of(data)}")
    conn.select(src)
    uids = find_uids(conn, subject)
    check("copy-found-src", len(uids) == 1, f"UIDs {uids}")
    typ, data = conn.uid("COPY", uids[0] if uids else b"0", dst)
    check("copy-ok", typ == "OK", f"{typ} {text_of(data)}")
    observe("copy-answer", f"{typ} {text_of(data)}")
    observe("copy-copyuid", "COPYUID" in text_of(data).upper())
    check("copy-still-in-src", len(find_uids(conn, subject)) == 1)
    conn.select(dst, readonly=True)
    check("copy-in-dst", len(find_uids(conn, subject)) == 1)

    # MOVE
    subject = f"xmove-{stamp}"
    typ, data = conn.append(src, None, None, small_message(subject))
    check("move-append-src", typ == "OK", f"{typ} {text_of(data)}")
    conn.select(src)
    uids = find_uids(conn, subject)
    try:
        typ, data = conn.uid("MOVE", uids[0] if uids else b"0", dst)
    except imaplib.IMAP4.error as e:
        typ, data = "BAD", [str(e).encode()]
    untagged = conn.untagged_responses
    observe("move-answer", f"{typ} {text_of(data)}; untagged EXPUNGE seen: {'EXPUNGE' in untagged}")
    check("move-ok", typ == "OK", f"{typ} {text_of(data)}")
    conn.noop()
    check("move-absent-from-src", len(find_uids(conn, subject)) == 0,
          f"UIDs still in {src}: {find_uids(conn, subject)}")
    conn.select(dst, readonly=True)
    check("move-in-dst", len(find_uids(conn, subject)) == 1)

    # SUBSCRIBE to the folder on the other backend (subscriptions live on the
    # INBOX backend)
    typ, data = conn.subscribe(dst)
    observe("subscribe-answer", f"{typ} {text_of(data)}")
    check("subscribe-other-backend-ok", typ == "OK", f"{typ} {text_of(data)}")
    typ, data = conn.lsub('""', '"*"')
    listed = dst.encode() in b" ".join(d for d in data if isinstance(d, bytes))
    check("subscribe-other-backend-in-lsub", listed, f"LSUB: {text_of(data)}")
    conn.unsubscribe(dst)
    conn.logout()
    return 0


def mastersdown(address, user, password):
    conn = connect(address, user, password)
    check("outage-login", True)
    typ, data = conn.list('""', "*")
    names = text_of(data)
    check("outage-list", typ == "OK" and "INBOX.Archive" in names, f"{typ} {names[:200]}")
    typ, data = conn.select("INBOX")
    check("outage-select", typ == "OK", f"{typ} {text_of(data)}")
    typ, data = conn.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    check("outage-fetch", typ == "OK" and b"Subject" in b"".join(
        d[1] for d in data if isinstance(d, tuple)), f"{typ}")
    typ, data = conn.append("INBOX", None, None, small_message("during-outage"))
    check("outage-append", typ == "OK", f"{typ} {text_of(data)}")
    name = f"INBOX.outage{random.randrange(10**6)}"
    typ, data = conn.create(name)
    text = text_of(data)
    check("outage-create-refused", typ == "NO" and "registry is unreachable" in text, f"{typ} {text}")
    observe("outage-create-answer", f"{typ} {text}")
    conn.logout()
    return 0


def backendloss(address, user, password, local, remote, command):
    import subprocess
    a = connect(address, user, password)
    b = connect(address, user, password)
    typ, _ = a.select(remote)
    check("loss-a-selects-remote", typ == "OK", typ)
    typ, _ = b.select(local)
    check("loss-b-selects-local", typ == "OK", typ)
    rc = subprocess.call(command)
    check("loss-backend-stopped", rc == 0, f"exit {rc}")
    try:
        typ, data = a.noop()
        bye = a.untagged_responses.get("BYE")
        check("loss-a-gets-bye", bool(bye) or typ != "OK", f"{typ} {text_of(data)} BYE={bye}")
    except imaplib.IMAP4.abort as e:
        # imaplib raises abort on an untagged BYE, with the BYE's text.
        check("loss-a-gets-bye", "UNAVAILABLE" in str(e), str(e))
    typ, data = b.noop()
    check("loss-b-noop", typ == "OK", f"{typ} {text_of(data)}")
    typ, data = b.fetch("1", "(FLAGS)")
    check("loss-b-fetch", typ == "OK", f"{typ} {text_of(data)}")
    typ, data = b.status(remote, "(MESSAGES)")
    text = text_of(data)
    check("loss-status-remote-unavailable", typ == "NO" and "UNAVAILABLE" in text, f"{typ} {text}")
    b.logout()
    return 0


def count(address, user, password, mailbox, subject=None):
    conn = connect(address, user, password)
    typ, data = conn.select(mailbox, readonly=True)
    if typ != "OK":
        print(f"E: SELECT {mailbox}: {typ} {text_of(data)}")
        return 3
    if subject:
        typ, data = conn.search(None, "SUBJECT", f'"{subject}"')
        print(len(data[0].split()) if data and data[0] else 0)
    else:
        print(int(data[0]))
    conn.logout()
    return 0


def main(argv):
    try:
        if len(argv) == 6 and argv[0] == "big":
            return big(hostport(argv[1]), argv[2], argv[3], argv[4], int(argv[5]))
        if len(argv) == 6 and argv[0] == "crossmove":
            return crossmove(hostport(argv[1]), argv[2], argv[3], argv[4], argv[5])
        if len(argv) == 4 and argv[0] == "mastersdown":
            return mastersdown(hostport(argv[1]), argv[2], argv[3])
        if len(argv) > 7 and argv[0] == "backendloss" and argv[6] == "--":
            return backendloss(hostport(argv[1]), argv[2], argv[3], argv[4], argv[5], argv[7:])
        if len(argv) in (5, 6) and argv[0] == "count":
            return count(hostport(argv[1]), argv[2], argv[3], argv[4], *argv[5:])
    except (OSError, imaplib.IMAP4.error) as e:
        print(f"E: {e}")
        return 3
    except Exception as e:  # a bug in a scenario must fail the run, not vanish
        print(f"E: {type(e).__name__}: {e}")
        return 3
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
