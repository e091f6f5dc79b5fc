#!/usr/bin/env bash
# make jepsen: JEPSEN_RUNS (default 10) runs of 60 s with every workload and
# every nemesis, one after the other. Writes the table of verdicts to
# docs/src/jepsen-runs.md and the plots of the first run to docs/src/jepsen/.
# Exits non-zero if any run found an anomaly or failed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${CORVID_BIN_DIR:?set CORVID_BIN_DIR to the directory of corvid-registry and corvid-jepsen}
N=${JEPSEN_RUNS:-10}
OUT=$ROOT/jepsen/runs/batch-$(date -u +%Y%m%dT%H%M%S)
mkdir -p "$OUT"
status=0
for i in $(seq 1 "$N"); do
  echo "== run $i of $N"
  "$BIN/corvid-jepsen" run --bin-dir "$BIN" --out "$OUT" --quiet --time-limit 60 "$@" || status=1
done
python3 - "$OUT" >"$ROOT/docs/src/jepsen-runs.md" <<'PY'
import json, os, sys
out = sys.argv[1]
runs = sorted(d for d in os.listdir(out) if d.startswith("run-"))
import datetime
print("Recorded by `make jepsen` on %s: %d runs of 60 s, 3 masters and 1 replica in a private "
      "network namespace, 5 clients per workload (registry, ownership, replicas), every nemesis "
      "(partition, kill, pause, membership). Operations counts completions.\n"
      % (datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), len(runs)))
print("| run | seed | operations | faults injected | anomalies | unknown | verdict |")
print("| --- | --- | ---: | --- | ---: | ---: | --- |")
for i, d in enumerate(runs, 1):
    try:
        v = json.load(open(os.path.join(out, d, "verdict.json")))
    except OSError:
        print("| %d | | | | | | no verdict (run failed) |" % i)
        continue
    faults = ", ".join("%s %d" % kv for kv in sorted(v["faults"].items()))
    print("| %d | `%016x` | %d | %s | %d | %d | %s |" % (
        i, v["seed"], v["operations"], faults, len(v["anomalies"]), len(v["unknown"]),
        "valid" if v["valid"] else "**INVALID**"))
PY
first=$(find "$OUT" -maxdepth 1 -name 'run-*' -type d | sort | head -1)
if [[ -n $first && -f $first/latency.svg ]]; then
  cp "$first/latency.svg" "$first/throughput.svg" "$ROOT/docs/src/jepsen/"
fi
echo "wrote docs/src/jepsen-runs.md"
exit "$status"
