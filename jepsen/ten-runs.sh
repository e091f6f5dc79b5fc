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
# The rotation: each run takes the next configuration (then they repeat).
CONFIGS=(
  "--nemesis partition,kill,pause,membership"
  "--nodes 5 --nemesis partition,kill,pause,double"
  "--workload lifecycle,registry --snapshot-after 100 --keep-log 10 --mailboxes 3 --concurrency 8 --nemesis partition-leader,kill"
  "--nemesis replica-master,replica,partition"
  "--nemesis client-partition,partition,kill"
  "--nodes 5 --workload lifecycle,registry,replicas --snapshot-after 100 --keep-log 10 --mailboxes 3 --concurrency 8 --nemesis double,partition,replica-master"
  "--mailboxes 3 --concurrency 10 --nemesis partition,kill,pause,membership,power-loss"
  "--nodes 5 --nemesis partition,client-partition,replica,membership"
  "--workload lifecycle,ownership,replicas --snapshot-after 100 --keep-log 10 --mailboxes 3 --concurrency 8 --nemesis partition,pause,replica-master"
  "--nemesis partition,kill,pause,membership,replica,power-loss"
)
for i in $(seq 1 "$N"); do
  config=${CONFIGS[$(( (i - 1) % ${#CONFIGS[@]} ))]}
  echo "== run $i of $N: $config"
  # shellcheck disable=SC2086 # the configuration is a list of flags
  "$BIN/corvid-jepsen" run --bin-dir "$BIN" --out "$OUT" --quiet --time-limit 60 $config "$@" \
    >"$OUT/log-$i.txt" 2>&1 || status=1
  tail -3 "$OUT/log-$i.txt"
  echo "$config" >"$OUT/config-$i.txt"
done
python3 - "$OUT" >"$ROOT/docs/src/jepsen-runs.md" <<'PY'
import json, os, sys
out = sys.argv[1]
runs = sorted(d for d in os.listdir(out) if d.startswith("run-") and os.path.isdir(os.path.join(out, d)))
import datetime
print("Recorded by `make jepsen` on %s: %d runs of 60 s, each in its own network namespaces "
      "(one per node, so partitions cut every connection), 1 replica, 5 clients per workload "
      "unless the configuration says otherwise. Each run's configuration is its `corvid-jepsen "
      "run` flags. Operations counts completions; nemesis problems are faults that showed no "
      "effect (they fail the run).\n"
      % (datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), len(runs)))
print("| run | configuration | seed | operations | faults injected | anomalies | unknown | nemesis problems | verdict |")
print("| --- | --- | --- | ---: | --- | ---: | ---: | ---: | --- |")
for i, d in enumerate(runs, 1):
    try:
        config = open(os.path.join(out, "config-%d.txt" % i)).read().strip()
    except OSError:
        config = ""
    try:
        v = json.load(open(os.path.join(out, d, "verdict.json")))
    except OSError:
        print("| %d | `%s` | | | | | | | no verdict (run failed) |" % (i, config))
        continue
    faults = ", ".join("%s %d" % kv for kv in sorted(v["faults"].items()))
    print("| %d | `%s` | `%016x` | %d | %s | %d | %d | %d | %s |" % (
        i, config, v["seed"], v["operations"], faults, len(v["anomalies"]), len(v["unknown"]),
        len(v.get("nemesis_problems", [])), "valid" if v["valid"] else "**INVALID**"))
PY
first=$(find "$OUT" -maxdepth 1 -name 'run-*' -type d | sort | head -1)
if [[ -n $first && -f $first/latency.svg ]]; then
  cp "$first/latency.svg" "$first/throughput.svg" "$ROOT/docs/src/jepsen/"
fi
echo "wrote docs/src/jepsen-runs.md"
exit "$status"
