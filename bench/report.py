#!/usr/bin/env python3
"""Turns `corvidctl bench --json` lines into docs/src/benchmarks.md."""
import json
import os
import platform
import sys
from datetime import datetime, timezone

all_rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
SPECIAL = ("propagation", "update-dump")
rows = [r for r in all_rows if r["workload"] not in SPECIAL]
propagation = [r for r in all_rows if r["workload"] == "propagation"]
dumps = [r for r in all_rows if r["workload"] == "update-dump"]
command = sys.argv[2] if len(sys.argv) > 2 else "make bench"

out = []
out.append("# Benchmarks\n")
out.append(
    "Measured by `%s` on %s (%d cores, %s), %s. The same `corvidctl bench` load "
    "runs against a real Cyrus 3.6.1 `mupdate -m` master and a one-node Corvid "
    "registry (RocksDB, every write fsynced before it is acknowledged), one after "
    "the other in the same run, on 127.0.0.1. Each connection keeps one command "
    "in flight, as Cyrus clients do. Each master (Cyrus, the Corvid node, the "
    "Corvid cluster) has a real Cyrus frontend's mupdate slave attached that follows "
    "every change through UPDATE; the run checks at the end that each slave has the data.\n"
    % (command, platform.node() or "this machine", os.cpu_count() or 0, platform.machine(),
       datetime.fromtimestamp(os.path.getmtime(sys.argv[1]), timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
)
out.append(
    "Workloads: `reserve-activate` creates a mailbox (RESERVE then ACTIVATE: two "
    "writes); `find` looks up existing names; `backend` is what a Cyrus backend "
    "does for each mailbox it creates (new connection, greeting, AUTHENTICATE "
    "PLAIN, RESERVE, ACTIVATE, LOGOUT); `mix` is 70% FIND, 20% creations and 10% ACL changes; "
    "`delete` removes the created names.\n"
)
out.append(
    "Server CPU is the measured servers' user and system time (from `/proc/PID/stat` "
    "before and after each round; 10 ms ticks) divided by the operations of the round: "
    "per write where the workload writes, per FIND otherwise (`mix`: per operation). "
    "It does not depend on how fast the load client is, so it is the figure to compare. "
    "Cyrus's `mupdate -m` and a Corvid node are one process each; the 3-node rows "
    "sum all three nodes. Entries per fsync: Corvid's log entries made durable over its "
    "WAL fsyncs in the round (the leader's, for the cluster).\n"
)
out.append("| server | workload | conns | ops | errors | ops/s | writes/s | p50 ms | p99 ms | max ms "
           "| CPU µs per | user µs | sys µs | entries/fsync |")
out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")


def cpu(r):
    """(unit, user µs, system µs) per write, FIND or operation; None if not measured."""
    if r.get("server_user_us_per_op") is None:
        return None
    per = {"reserve-activate": 2, "backend": 2, "activate": 1, "delete": 1}.get(r["workload"])
    unit = "write" if per else ("FIND" if r["workload"] == "find" else "op")
    per = per or 1
    return unit, r["server_user_us_per_op"] / per, r["server_sys_us_per_op"] / per


def per_fsync(r):
    if not r.get("wal_fsyncs"):
        return ""
    return "%.1f" % (r["log_entries"] / r["wal_fsyncs"])


for r in rows:
    c = cpu(r)
    out.append(
        "| %s | %s | %d | %d | %d | %.0f | %.0f | %.2f | %.2f | %.2f | %s | %s | %s | %s |"
        % (r["label"], r["workload"], r["connections"], r["ops"], r["errors"], r["ops_per_sec"],
           r["writes_per_sec"], r["p50_ms"], r["p99_ms"], r["max_ms"],
           c[0] if c else "", "%.1f" % c[1] if c else "", "%.1f" % c[2] if c else "", per_fsync(r))
    )

by = {}
labels = []
for r in rows:
    by.setdefault((r["workload"], r["connections"]), {})[r["label"]] = r
    if not r["label"].startswith("cyrus") and r["label"] not in labels:
        labels.append(r["label"])
out.append("\n## Against Cyrus, same run\n")
out.append("Each cell: ops/s, and in brackets the ratio to Cyrus's ops/s for the same workload and connections.\n")
out.append("| workload | conns | Cyrus ops/s | " + " | ".join(labels) + " |")
out.append("| --- | ---: | ---: | " + " | ".join("---:" for _ in labels) + " |")
for (workload, conns), cell in by.items():
    cy = next((r for l, r in cell.items() if l.startswith("cyrus")), None)
    if not cy:
        continue
    row = "| %s | %d | %.0f |" % (workload, conns, cy["ops_per_sec"])
    for l in labels:
        r = cell.get(l)
        row += (" %.0f (%.2fx) |" % (r["ops_per_sec"], r["ops_per_sec"] / cy["ops_per_sec"])) if r and cy["ops_per_sec"] else " |"
    out.append(row)
out.append("\n## Server CPU, same run\n")
out.append("Each cell: server CPU in µs (user + system) per write (creations, deletes, the backend "
           "pattern) or per FIND, and in brackets the ratio of Cyrus's to it.\n")
out.append("| workload | conns | Cyrus µs | " + " | ".join(labels) + " |")
out.append("| --- | ---: | ---: | " + " | ".join("---:" for _ in labels) + " |")
for (workload, conns), cell in by.items():
    cy = next((r for l, r in cell.items() if l.startswith("cyrus")), None)
    cyc = cpu(cy) if cy else None
    if not cyc:
        continue
    cy_us = cyc[1] + cyc[2]
    row = "| %s | %d | %.1f |" % (workload, conns, cy_us)
    for l in labels:
        c = cpu(cell[l]) if l in cell else None
        row += (" %.1f (%.1fx) |" % (c[1] + c[2], cy_us / (c[1] + c[2]))) if c and c[1] + c[2] > 0 else " |"
    out.append(row)
out.append(
    "\nTargets: one Corvid node at least 5x Cyrus's writes at 32 connections, "
    "at least 2x its FINDs, and the backend pattern at least as fast as Cyrus's; "
    "the 3-node cluster (all three on this 2-core machine, fsync on each) at least "
    "3x Cyrus's writes at 32 connections. Issue 12 raises the first to 10x, with at most "
    "30 µs of server CPU per write, at least 16 log entries per fsync at 32 connections, "
    "and at most 4 µs per FIND on a replica. "
    "Raw results of the last run: `bench/last-results.jsonl`.\n"
)
if propagation:
    out.append("\n## Propagation: commit to visible\n")
    out.append(
        "`corvidctl propagation` ACTIVATEs new names on a master one at a time and times, "
        "for each, from the master's OK to the moment the watched server shows the name: "
        "a Corvid replica by an UPDATE push on a subscription to the replica, a Cyrus "
        "mupdate slave by FINDs repeated back to back (a Cyrus slave's own UPDATE cannot be "
        "watched). Target for a Corvid replica: p99 under 5 ms on loopback.\n"
    )
    out.append("| watched server | writes on | changes | p50 ms | p99 ms | max ms |")
    out.append("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in propagation:
        out.append("| %s | %s | %d | %.2f | %.2f | %.2f |" % (
            r["label"], r["server"].split(" -> ")[0], r["ops"], r["p50_ms"], r["p99_ms"], r["max_ms"]))
if dumps:
    out.append("\n## Classic UPDATE: the initial dump\n")
    out.append("| server | mailboxes | dumps | p50 s | max s |")
    out.append("| --- | ---: | ---: | ---: | ---: |")
    for r in dumps:
        out.append("| %s | %d | %d | %.2f | %.2f |" % (
            r["label"], r["entries"], r["ops"], r["p50_ms"] / 1000, r["max_ms"] / 1000))
# Figures from `make bench-join` and `make bench-proxy` (its section, rendered
# by proxy_report.py) and the hand-written analysis live beside
# this script, so a new run of `make bench` keeps them.
here = os.path.dirname(os.path.abspath(__file__))
for extra in ("join-results.md", "scale-results.md", "scale-notes.md", "proxy-results.md", "perf-notes.md", "notes.md"):
    path = os.path.join(here, extra)
    if os.path.exists(path):
        out.append("")
        out.append(open(path).read().rstrip())
print("\n".join(out))
