#!/usr/bin/env python3
"""Turns `corvidctl imap-bench --json` lines (bench/proxy.sh) into the section
"IMAP proxy (make bench-proxy)" of docs/src/benchmarks.md.

    proxy_report.py RESULTS.jsonl [--splice DOC.md] [--seconds S] [--hold S]

Without --splice the section goes to standard output; with it, the section
replaces the one in DOC.md (or is appended). bench/report.py (make bench)
appends it too, from bench/last-proxy-results.jsonl, so that rewriting the
page keeps it."""
import argparse
import json
import os
import platform
from datetime import datetime, timezone

HEADING = "## IMAP proxy (make bench-proxy)"
PROXY, FRONTEND, DIRECT = "corvid-proxy", "cyrus-frontend", "direct-be1"
IMAP_LOADS = ("sessions", "fetch-bodies", "append")
# LMTP and POP3 rows: "direct" is be1, and be2 too for 5 recipients.
MAIL_DIRECT = "direct"


def fmt(v, digits=1):
    return "" if v is None else ("%.*f" % (digits, v))


def ratio(a, b):
    return "%.2fx" % (a / b) if a is not None and b else ""


def section(path, seconds=None, hold=None):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    loads = [r for r in rows if r["workload"] in IMAP_LOADS]
    lmtp = [r for r in rows if r["workload"] == "lmtp"]
    pop3 = [r for r in rows if r["workload"] == "pop3"]
    idles = [r for r in rows if r["workload"] == "idle"]
    when = datetime.fromtimestamp(os.path.getmtime(path), timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [HEADING, ""]
    out.append(
        "Measured by `make bench-proxy` on %s (%d cores, %s), %s. The load client "
        "(`corvidctl imap-bench`), corvid-proxy, the Cyrus 3.6.1 frontend, both Cyrus "
        "backends and the three Corvid masters all share these %d cores, so every figure is "
        "bounded by the whole murder's CPU, not by the proxy alone. The murder is the "
        "one of `tests/interop/proxy.sh` (three Corvid masters; real Cyrus 3.6 backends "
        "be1 and be2, Cyrus telemetry off); the same load goes, in one run, through "
        "corvid-proxy (LOGIN checked on be1), through a real Cyrus 3.6 murder frontend "
        "(imapd proxying, its mupdate slave following Corvid) and directly to be1, "
        "where every bench mailbox lives. One command in flight per connection."
        % (platform.node() or "this machine", os.cpu_count() or 0, platform.machine(), when,
           os.cpu_count() or 0)
    )
    out.append("")
    out.append(
        "Workloads: `sessions`: connect, LOGIN, SELECT INBOX (10 messages of 2 KiB), "
        "FETCH 1:10 (FLAGS), LOGOUT, over 8 users; `fetch-bodies`: one selected "
        "mailbox of 20 messages of 256 KiB, FETCH 1:* BODY.PEEK[] again and again; "
        "`append`: APPEND of 1 MiB messages (4 connections, 4 users). %s"
        % ("Each run lasts %s s (append: or until its count is reached)." % seconds if seconds else "")
    )
    out.append("")
    by = {}
    for r in loads:
        by.setdefault((r["workload"], r["connections"]), {})[r["label"]] = r
    out.append(
        "| workload | conns | unit | corvid-proxy | Cyrus frontend | direct to be1 | "
        "proxy / frontend | proxy / direct |"
    )
    out.append("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for (workload, conns), cell in by.items():
        mb = workload != "sessions"
        unit = "MB/s" if mb else "sessions/s"
        val = lambda l: (cell[l]["mb_per_sec"] if mb else cell[l]["ops_per_sec"]) if l in cell else None
        p, f, d = val(PROXY), val(FRONTEND), val(DIRECT)
        out.append(
            "| %s | %d | %s | %s | %s | %s | %s | %s |"
            % (workload, conns, unit, fmt(p), fmt(f), fmt(d), ratio(p, f), ratio(p, d))
        )
    out.append("")
    out.append(
        "Per run: latency of one operation (a whole session; one FETCH of the "
        "mailbox; one APPEND), errors, and the CPU time per operation of the server "
        "under test and of be1 behind it (utime+stime from /proc/PID/stat of the "
        "process and all its descendants, plus the cutime+cstime of reaped children: "
        "for Cyrus, the master and every imapd it forked; for direct-be1 the server "
        "under test is be1 itself)."
    )
    out.append("")
    out.append(
        "| target | workload | conns | ops | errors | ops/s | MB/s | p50 ms | p99 ms | "
        "server CPU ms/op | be1 CPU ms/op |"
    )
    out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in loads:
        out.append(
            "| %s | %s | %d | %d | %d | %.1f | %.1f | %.2f | %.2f | %s | %s |"
            % (r["label"], r["workload"], r["connections"], r["ops"], r["errors"], r["ops_per_sec"],
               r["mb_per_sec"], r["p50_ms"], r["p99_ms"], fmt(r.get("server_cpu_ms_per_op"), 3),
               fmt(r.get("backend_cpu_ms_per_op") if r["label"] != DIRECT else r.get("server_cpu_ms_per_op"), 3))
        )
    if idles:
        out.append("")
        out.append("### Idle sessions")
        out.append("")
        out.append(
            "`corvidctl imap-bench --workload idle` opens the sessions (64 at a time), "
            "waits 2 s, holds them %s s, then checks that each still answers (DONE or "
            "NOOP, then LOGOUT). `login`: LOGIN only, no SELECT (corvid-proxy checks the "
            "password on be1 and closes that connection: no backend connection stays); "
            "`idle`: LOGIN, SELECT INBOX, IDLE (each such session holds one imapd on be1 "
            "through either frontend; be1 polls every second, `imapidlepoll: 1`). Memory "
            "per session: growth of the server's VmRSS (and, summed over its processes, "
            "PSS, which splits shared pages; what matters for Cyrus's process per "
            "connection) from before opening to after, divided by the sessions open. "
            "CPU: the server's CPU time over the hold, in %% of one core (clock ticks of "
            "10 ms: 0.00 means under 0.05 %% over a 20 s hold). Cyrus keeps the processes "
            "it forked for later connections, so the be1 column is meaningful only for "
            "the first run that opened those sessions (the Cyrus frontend's)."
            % (hold if hold else "")
        )
        out.append("")
        out.append(
            "| target | mode | sessions | open | alive after hold | open s | RSS KiB/session | "
            "PSS KiB/session | server processes | server PSS MiB | hold CPU % | be1 PSS KiB/session | be1 hold CPU % |"
        )
        out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in idles:
            i = r["idle"]
            out.append(
                "| %s | %s | %d | %d | %d | %.1f | %s | %s | %s | %s | %s | %s | %s |"
                % (r["label"], i["mode"], i["requested"], i["open"], i["alive_after_hold"],
                   i["open_seconds"], fmt(i["rss_per_session_kib"]), fmt(i["pss_per_session_kib"]),
                   r.get("server_procs") or "",
                   fmt(i["pss_after_kib"] / 1024) if i.get("pss_after_kib") is not None else "",
                   fmt(i["hold_cpu_percent"], 2),
                   fmt(i["backend_pss_per_session_kib"]), fmt(i["backend_hold_cpu_percent"], 2))
            )
    if lmtp or pop3:
        out.extend(mail_sections(lmtp, pop3, seconds))
    out.append("")
    out.append(
        "Targets (issue): corvid-proxy at least as fast as the Cyrus frontend on every "
        "row (goal 2x), and at most 64 KiB per idle session; no LMTP delivery through "
        "corvid-proxy costs a lookup at a master. Raw results of the last "
        "run: `bench/last-proxy-results.jsonl`."
    )
    notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "proxy-notes.md")
    if os.path.exists(notes):
        out.append("")
        out.append(open(notes).read().rstrip())
    return "\n".join(out) + "\n"


def median_cell(rows):
    """Per target label: the median deliveries (sessions)/s over the rounds
    of one row, the mean master commands per operation, and the rounds."""
    by = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)
    out = {}
    for label, rs in by.items():
        v = sorted(r["ops_per_sec"] for r in rs)
        m = [r.get("master_commands_per_op") for r in rs if r.get("master_commands_per_op") is not None]
        out[label] = {
            "ops_per_sec": (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2,
            "master_commands_per_op": sum(m) / len(m) if m else None,
            "rounds": len(rs),
        }
    return out


def rounds_note(cells):
    n = max((c["rounds"] for cell in cells for c in cell.values()), default=1)
    if n <= 1:
        return ""
    return (
        "Each row ran %d rounds, the three targets back to back in each, the order "
        "reversed every other round; the table gives each target's median, the runs "
        "below list every round. " % n
    )


def mail_sections(lmtp, pop3, seconds):
    out = []
    if lmtp:
        out.append("")
        out.append("### LMTP deliveries")
        out.append("")
        out.append(
            "`corvidctl imap-bench --workload lmtp`: each connection says LHLO once, then "
            "repeats MAIL FROM, one RCPT TO per recipient, DATA, and reads one reply per "
            "recipient (one command in flight, no pipelining); a delivery with any non-2xx "
            "recipient reply counts as an error. Every message has a Message-ID of its own "
            "(Cyrus suppresses duplicates). 1 recipient: a user on be1; 5 recipients: three "
            "users on be1 and two on be2; connection i delivers to user number i mod 32. "
            "corvid-proxy and the Cyrus frontend's lmtpd are reached on their UNIX sockets "
            "(Postfix's `lmtp:unix:`); they deliver to the backends' lmtpd over TCP. "
            "*Direct* is the backends' lmtpd over TCP, authenticated once per connection "
            "with AUTH PLAIN as the proxy user (as both frontends log in there); with 5 "
            "recipients it is one transaction to be1 and one to be2 per delivery, the two "
            "in parallel (as corvid-proxy does; Cyrus's frontend goes one after the other). "
            "%s"
            "*Master lookups/delivery*: the sum of `corvid_mupdate_commands_total` on the "
            "three Corvid masters after the run minus before, divided by the deliveries."
            % ("Each run lasts %s s or until its count of deliveries is reached. " % seconds
               if seconds else "")
        )
        out.append("")
        out.append(
            "| recipients | size | conns | corvid-proxy | Cyrus frontend | direct | "
            "proxy / frontend | proxy / direct | master lookups/delivery: proxy | frontend |"
        )
        out.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        groups = {}
        for r in lmtp:
            groups.setdefault((r.get("recipients"), r.get("size"), r["connections"]), []).append(r)
        by = {k: median_cell(v) for k, v in groups.items()}
        for (n, size, conns), cell in by.items():
            val = lambda l: cell[l]["ops_per_sec"] if l in cell else None
            p, f, d = val(PROXY), val(FRONTEND), val(MAIL_DIRECT)
            ml = lambda l: fmt(cell[l].get("master_commands_per_op"), 2) if l in cell else ""
            out.append(
                "| %s | %s KiB | %d | %s | %s | %s | %s | %s | %s | %s |"
                % (n, (size or 0) // 1024, conns, fmt(p), fmt(f), fmt(d), ratio(p, f), ratio(p, d),
                   ml(PROXY), ml(FRONTEND))
            )
        out.append("")
        out.append(
            rounds_note(by.values()) +
            "Deliveries/s. Per run: latency of one delivery, errors (deliveries) and "
            "recipient replies that were not 2xx, the masters' MUPDATE commands during the "
            "run, and CPU per delivery of the server under test (corvid-proxy; the Cyrus "
            "frontend's master and its lmtpd processes; for direct, be1 and, with 5 "
            "recipients, be2) and of the backends behind a frontend (be1 and be2)."
        )
        out.append("")
        out.append(
            "| target | rcpts | size KiB | conns | deliveries | errors | rcpt non-2xx | "
            "deliveries/s | MB/s | p50 ms | p99 ms | master cmds | server CPU ms/op | "
            "backends CPU ms/op |"
        )
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in lmtp:
            out.append(
                "| %s | %s | %d | %d | %d | %d | %s | %.1f | %.1f | %.2f | %.2f | %s | %s | %s |"
                % (r["label"], r.get("recipients"), (r.get("size") or 0) // 1024, r["connections"],
                   r["ops"], r["errors"], r.get("rcpt_errors", ""), r["ops_per_sec"], r["mb_per_sec"],
                   r["p50_ms"], r["p99_ms"], r.get("master_commands", ""),
                   fmt(r.get("server_cpu_ms_per_op"), 3),
                   fmt(r.get("backend_cpu_ms_per_op") if r["label"] != MAIL_DIRECT else r.get("server_cpu_ms_per_op"), 3))
            )
    if pop3:
        out.append("")
        out.append("### POP3 sessions")
        out.append("")
        out.append(
            "`corvidctl imap-bench --workload pop3`: one operation is a whole session: "
            "connect, USER/PASS, STAT, RETR 1 (4 KiB; four messages in the maildrop), QUIT. "
            "Connection i logs in as user p{i} on be1 (Cyrus's pop3d locks the maildrop, so "
            "no two connections share one). Targets: corvid-proxy's POP3 port (password "
            "checked on be1, then AUTH PLAIN on be1's pop3d as the proxy user for the "
            "user), the Cyrus frontend's pop3d (proxying to be1's pop3d) and be1's pop3d "
            "directly."
        )
        out.append("")
        out.append(
            "| conns | corvid-proxy | Cyrus frontend | direct to be1 | proxy / frontend | "
            "proxy / direct | master lookups/session: proxy | frontend |"
        )
        out.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        groups = {}
        for r in pop3:
            groups.setdefault(r["connections"], []).append(r)
        by = {k: median_cell(v) for k, v in groups.items()}
        for conns, cell in by.items():
            val = lambda l: cell[l]["ops_per_sec"] if l in cell else None
            p, f, d = val(PROXY), val(FRONTEND), val(MAIL_DIRECT)
            ml = lambda l: fmt(cell[l].get("master_commands_per_op"), 2) if l in cell else ""
            out.append(
                "| %d | %s | %s | %s | %s | %s | %s | %s |"
                % (conns, fmt(p), fmt(f), fmt(d), ratio(p, f), ratio(p, d), ml(PROXY), ml(FRONTEND))
            )
        out.append("")
        out.append(rounds_note(by.values()) + "Sessions/s. Per run:")
        out.append("")
        out.append(
            "| target | conns | sessions | errors | sessions/s | p50 ms | p99 ms | master cmds | "
            "server CPU ms/op | be1 CPU ms/op |"
        )
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in pop3:
            out.append(
                "| %s | %d | %d | %d | %.1f | %.2f | %.2f | %s | %s | %s |"
                % (r["label"], r["connections"], r["ops"], r["errors"], r["ops_per_sec"],
                   r["p50_ms"], r["p99_ms"], r.get("master_commands", ""),
                   fmt(r.get("server_cpu_ms_per_op"), 3),
                   fmt(r.get("backend_cpu_ms_per_op") if r["label"] != MAIL_DIRECT else r.get("server_cpu_ms_per_op"), 3))
            )
    return out


def splice(doc, text):
    old = open(doc).read() if os.path.exists(doc) else "# Benchmarks\n"
    start = old.find(HEADING)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(HEADING))
        new = old[:start] + text + ("\n" + old[end + 1:] if end >= 0 else "")
    with open(doc, "w") as f:
        f.write(new)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--splice")
    ap.add_argument("--seconds")
    ap.add_argument("--hold")
    a = ap.parse_args()
    text = section(a.results, a.seconds, a.hold)
    if a.splice:
        splice(a.splice, text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
