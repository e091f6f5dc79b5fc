#!/usr/bin/env python3
"""Checks that every Corvid metric the alert rules and the dashboard use is
documented, and (with --live) exported by the daemon it belongs to.

    check_metrics.py REFERENCE.md FILE... [--live KIND=HOST:PORT ...]

REFERENCE.md is docs/src/metrics.md (its table rows name the metrics).
FILEs are the alert rules and dashboard JSON; every `corvid_...` word in them
counts (a histogram's _bucket/_sum/_count series count as the histogram).
KIND is master, replica or proxy: corvid_proxy_* metrics must be at a proxy's
/metrics, corvid_replica_* at a replica's, the others at a master's; a name
counts as exported when any address of its kind serves a sample of it.
Prints each problem and exits 1 if there is any.
"""

import re
import sys
import urllib.request

WORD = re.compile(r"\bcorvid_[a-z0-9_]*[a-z0-9](?![a-z0-9_*])")
ROW = re.compile(r"^\| `(corvid_[a-z0-9_]+)")
SUFFIXES = ("_bucket", "_sum", "_count")


def documented(path):
    names = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = ROW.match(line)
            if m:
                names.add(m.group(1))
    return names


def used(paths, reference):
    names = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for word in WORD.findall(f.read()):
                for suffix in SUFFIXES:
                    if word.endswith(suffix) and word[: -len(suffix)] in reference:
                        word = word[: -len(suffix)]
                names.setdefault(word, set()).add(path)
    return names


def kind_of(name):
    if name.startswith("corvid_proxy_"):
        return "proxy"
    if name.startswith("corvid_replica_"):
        return "replica"
    return "master"


def exported(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        text = r.read().decode()
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            for suffix in SUFFIXES:
                if name.endswith(suffix):
                    names.add(name[: -len(suffix)])
            names.add(name)
    return names


def main(argv):
    args = argv[1:]
    live = []
    if "--live" in args:
        i = args.index("--live")
        live, args = args[i + 1 :], args[:i]
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    reference = documented(args[0])
    names = used(args[1:], reference)
    problems = []
    if not names:
        problems.append("no corvid_ metric found in " + " ".join(args[1:]))
    for name, where in sorted(names.items()):
        if name not in reference:
            problems.append(f"{name} (used in {', '.join(sorted(where))}) is not in {args[0]}")
    if live:
        serving = {}
        for spec in live:
            kind, _, addr = spec.partition("=")
            serving.setdefault(kind, set()).update(exported(addr))
        for name in sorted(names):
            kind = kind_of(name)
            if name not in serving.get(kind, set()):
                problems.append(f"{name} is not exported by any live {kind} ({', '.join(s for s in live if s.startswith(kind + '='))})")
    for p in problems:
        print("FAIL:", p)
    checked = "documented" + (" and exported" if live else "")
    print(f"check_metrics: {len(names)} metrics used, {len(problems)} problems ({checked})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
