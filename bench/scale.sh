#!/usr/bin/env bash
# make bench-scale: a registry of SCALE_MAILBOXES mailboxes (default
# 10,000,000; SCALE_MAILBOXES=100000 for a quick look), loaded in bulk
# (corvidctl bench-load: 500 ACTIVATEs per log entry) over 100 backends
# be00..be99 into a 3-node cluster that snapshots every 50 entries. Then:
# a 4th node joins by snapshot (time, learner peak RSS), an empty replica
# cold-syncs (time, peak RSS), a classic UPDATE client takes the whole list
# (time), LIST of one backend's 1% (time), and the leader's steady-state
# RSS. 1,000 entries (500,000 mailboxes) are kept behind each snapshot, so
# that a voter falling behind during the load catches up from the log
# instead of receiving snapshot after snapshot; the learner and the replica
# start empty, far behind that, and still receive one. Each run replaces its row in bench/scale-rows.tsv; the table of every
# size measured is bench/scale-results.md, which docs/src/benchmarks.md
# includes.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export SERVER=corvid
# shellcheck source=../tests/interop/lib.sh
source "$ROOT/tests/interop/lib.sh"
interop_init bench-scale
CTL=$CORVID_BIN_DIR/corvidctl
N=${SCALE_MAILBOXES:-10000000}
PASS=bench-secret
export INTEROP_TIMEOUT=${SCALE_TIMEOUT:-900}

cat >"$WORK/corvid.toml" <<TOML
[raft]
snapshot_after_entries = 50
keep_log_entries = 1000
TOML
export CORVID_CLUSTER_CONFIG=$WORK/corvid.toml
start_corvid_cluster 3 "$WORK/cluster" admin "$PASS"
read -r -a nodes <<<"$CORVID_CLUSTER_MUPDATE"
leader_id=$("$CTL" cluster --peer "$CORVID_CLUSTER_PEER" status | awk '$3 == "Leader" {print $1}')
leader=${nodes[$((leader_id - 1))]}
leader_pid=${CORVID_CLUSTER_PGIDS[$((leader_id - 1))]}
locations=$(for i in $(seq -w 0 99); do printf 'be%s!default,' "$i"; done)
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.1f}')"; }

free_gb=$(df -P -BG "$WORK" | awk 'NR == 2 {print int($4)}')
need_gb=$((N * 25 / 10000000 + 1))
[ "$free_gb" -ge "$need_gb" ] ||
  echo "warning: $free_gb GB free under $WORK; $N mailboxes need about $need_gb GB"
echo "== bulk-loading $N mailboxes"
t0=$(now)
"$CTL" bench-load --peer "$CORVID_CLUSTER_PEER" -n "$N" --per-entry 500 --in-flight 2 --locations "${locations%,}" --prefix user.scale
t1=$(now)
load_s=$(secs "$t0" "$t1")

# The leader, loaded, settled: its resident memory now.
leader_rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$leader_pid/status")

echo "== a 4th node joins by snapshot"
pport=$(free_port)
spawn "$WORK/node4.log" "$CORVID_BIN_DIR/corvid-registry" --data-dir "$WORK/node4" \
  --node-id 4 --no-bootstrap --listen 127.0.0.1:0 --peer-listen "127.0.0.1:$pport" \
  --metrics-listen 127.0.0.1:0 --users-file "$WORK/cluster/users.toml" --config "$WORK/corvid.toml"
node4_pid=$SPAWNED_PID
wait_for "node 4 ready" _corvid_ready "$WORK/node4.log" "$node4_pid"
t0=$(now)
"$CTL" cluster --peer "$CORVID_CLUSTER_PEER" add-learner 4 "127.0.0.1:$pport"
wait_for "learner caught up" corvid_cluster_caught_up 4
t1=$(now)
join_s=$(secs "$t0" "$t1")
join_rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$node4_pid/status")
grep -q "received a snapshot from the leader" "$WORK/node4.log" ||
  echo "note: node 4 caught up without a snapshot (log not compacted?)"

# The learner has been measured: remove it and its copy of the registry
# (at 10M, each copy is several GB and the run makes four more).
"$CTL" cluster --peer "$CORVID_CLUSTER_PEER" remove 4
kill "$node4_pid"
node4_gone() { ! kill -0 "$node4_pid" 2>/dev/null; }
wait_for "node 4 stopped" node4_gone
rm -rf "$WORK/node4"

target=$("$CTL" cluster --peer "$CORVID_CLUSTER_PEER" status | awk '$3 == "Leader" {print $8}')
echo "== a replica cold-syncs to index $target"
t0=$(now)
start_corvid_replica "$WORK" "$CORVID_CLUSTER_PEER" "$WORK/cluster/users.toml"
replica_pid=$SPAWNED_PID
replica_metrics=127.0.0.1:$CORVID_REPLICA_METRICS_PORT
wait_for "replica synced" corvid_replica_applied "$replica_metrics" "$target"
t1=$(now)
replica_s=$(secs "$t0" "$t1")
replica_rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$replica_pid/status")

echo "== classic UPDATE dump of the whole list from the leader"
dumps=$WORK/dumps.jsonl
"$CTL" bench --server "$leader" --user admin --password "$PASS" --workload update-dump \
  -C 1 -n 1 --max-seconds 600 --label dump --json "$dumps" --quiet | grep -v '^{'
dump_s=$(python3 -c "import json; r = json.loads(open('$dumps').readline()); print(f'{r[\"max_ms\"] / 1000:.1f}') if r['entries'] >= $N else exit('dump of ' + str(r['entries']) + ' entries')")

echo "== LIST of one backend (be07, 1%)"
t0=$(now)
listed=$("$CTL" list --server "$leader" --user admin --password "$PASS" 'be07!' | wc -l)
t1=$(now)
list_s=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
[ "$listed" -eq $((N / 100)) ] || die "LIST be07! gave $listed lines, expected $((N / 100))"
leader_rss_after_kb=$(awk '/VmRSS/ {print $2}' "/proc/$leader_pid/status")

mib() { echo $(($1 / 1024)); }
row="$N	$load_s	$join_s	$(mib "$join_rss_kb")	$replica_s	$(mib "$replica_rss_kb")	$dump_s	$list_s	$(mib "$leader_rss_kb")	$(mib "$leader_rss_after_kb")	$(date -u '+%Y-%m-%d %H:%M UTC')"
echo "$row"
rows=$ROOT/bench/scale-rows.tsv
{ [ -f "$rows" ] && awk -F'\t' -v n="$N" '$1 != n' "$rows"; echo "$row"; } | sort -n >"$rows.new"
mv "$rows.new" "$rows"
python3 - "$rows" >"$ROOT/bench/scale-results.md" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
heads = [
    ("bulk load (500 per log entry), s", 1, None),
    ("a 4th node joins by snapshot, s", 2, "< 60"),
    ("its peak RSS, MiB", 3, "< 300"),
    ("a new replica cold-syncs, s", 4, "< 60"),
    ("its peak RSS, MiB", 5, "< 300"),
    ("classic UPDATE dump of the whole list, s", 6, "< 15"),
    ("LIST of one backend's 1%, s", 7, "< 1"),
    ("leader RSS after the load, MiB", 8, "< 1024"),
    ("leader RSS after dump and LIST, MiB", 9, "< 1024"),
]
print("## Ten million mailboxes (`make bench-scale`)\n")
print("A 3-node cluster on 127.0.0.1 (snapshot every 50 entries, 1,000 kept behind it) is")
print("bulk-loaded through the peer port (`corvidctl bench-load`, 500 ACTIVATEs per log entry,")
print("2 entries in flight) with mailboxes spread over 100 backends. Then an empty 4th node")
print("joins as a learner and receives the leader's snapshot, streamed in chunks from a")
print("point-in-time view; an empty replica follows the cluster; a classic UPDATE client")
print("(`corvidctl bench --workload update-dump`) takes the whole list from the leader; and")
print("`corvidctl list 'be07!'` lists one backend's 1% through the location index.\n")
print("| measure | target | " + " | ".join("%s mailboxes" % format(int(r[0]), ",") for r in rows) + " |")
print("| --- | ---: | " + " | ".join("---:" for _ in rows) + " |")
for name, i, target in heads:
    print("| %s | %s | %s |" % (name, target or "", " | ".join(r[i] for r in rows)))
print("\nMeasured: " + "; ".join("%s at %s" % (format(int(r[0]), ","), r[10]) for r in rows) + ".")
PY
python3 "$ROOT/bench/report.py" "$ROOT/bench/last-results.jsonl" "make bench" >"$ROOT/docs/src/benchmarks.md"
echo "wrote bench/scale-results.md and docs/src/benchmarks.md"
