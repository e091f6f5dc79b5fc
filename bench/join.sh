#!/usr/bin/env bash
# make bench-join: how long a new node takes to join a 3-node cluster that
# holds JOIN_MAILBOXES mailboxes (default 1,000,000). The log behind the
# last snapshot is compacted, so the new node is sent the leader's snapshot.
# Then an empty replica follows the same cluster (cold sync by the log
# stream's snapshot), and classic UPDATE clients take the initial dump from
# a master node and from the replica. Writes the figures to
# bench/join-results.md, which docs/src/benchmarks.md includes.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export SERVER=corvid
# shellcheck source=../tests/interop/lib.sh
source "$ROOT/tests/interop/lib.sh"
interop_init bench-join
CTL=$CORVID_BIN_DIR/corvidctl
N=${JOIN_MAILBOXES:-1000000}
PASS=bench-secret

start_corvid_cluster 3 "$WORK/cluster" admin "$PASS"
read -r -a nodes <<<"$CORVID_CLUSTER_MUPDATE"
leader_id=$("$CTL" cluster --peer "$CORVID_CLUSTER_PEER" status | awk '$3 == "Leader" {print $1}')
leader=${nodes[$((leader_id - 1))]}
echo "== loading $N mailboxes through the leader ($leader)"
load_start=$(date +%s.%N)
"$CTL" bench --server "$leader" --user admin --password "$PASS" --workload activate \
  -C 32 -n "$N" --max-seconds 1800 --prefix user.load --label load --quiet | grep -v '^{'
load_end=$(date +%s.%N)

# Node 4 starts empty and joins as a learner; add-learner returns once it
# has caught up with the leader.
pport=$(free_port)
spawn "$WORK/node4.log" "$CORVID_BIN_DIR/corvid-registry" --data-dir "$WORK/node4" \
  --node-id 4 --no-bootstrap --listen 127.0.0.1:0 --peer-listen "127.0.0.1:$pport" \
  --metrics-listen 127.0.0.1:0 --users-file "$WORK/cluster/users.toml"
node4_pid=$SPAWNED_PID
wait_for "node 4 ready" _corvid_ready "$WORK/node4.log" "$node4_pid"
join_start=$(date +%s.%N)
"$CTL" cluster --peer "$CORVID_CLUSTER_PEER" add-learner 4 "127.0.0.1:$pport"
# add-learner returns once the learner is within openraft's lag threshold;
# the join is done when it has applied everything the leader has.
wait_for "learner caught up" corvid_cluster_caught_up 4
join_end=$(date +%s.%N)
"$CTL" cluster --peer "$CORVID_CLUSTER_PEER" status
rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$(pgrep -f -- "--data-dir $WORK/node4" | head -1)/status")
db_mb=$(du -sm "$WORK/node4" | cut -f1)
join_s=$(python3 -c "print(f'{$join_end - $join_start:.1f}')")
load_s=$(python3 -c "print(f'{$load_end - $load_start:.1f}')")
echo "join of a node to a cluster of $N mailboxes: ${join_s}s (peak RSS $((rss_kb / 1024)) MiB, data ${db_mb} MiB)"

target=$("$CTL" cluster --peer "$CORVID_CLUSTER_PEER" status | awk '$3 == "Leader" {print $8}')
echo "== cold sync of a replica to index $target"
sync_start=$(date +%s.%N)
start_corvid_replica "$WORK" "$CORVID_CLUSTER_PEER" "$WORK/cluster/users.toml"
replica_pid=$SPAWNED_PID
replica_mupdate=127.0.0.1:$CORVID_REPLICA_MUPDATE_PORT
replica_metrics=127.0.0.1:$CORVID_REPLICA_METRICS_PORT
INTEROP_TIMEOUT=300 wait_for "replica synced" corvid_replica_applied "$replica_metrics" "$target"
sync_end=$(date +%s.%N)
sync_s=$(python3 -c "print(f'{$sync_end - $sync_start:.1f}')")
replica_rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$replica_pid/status")
replica_mb=$(du -sm "$WORK/replica" | cut -f1)
echo "replica cold sync: ${sync_s}s (peak RSS $((replica_rss_kb / 1024)) MiB, data ${replica_mb} MiB)"

echo "== classic UPDATE initial dump of $N mailboxes"
dumps=$WORK/dumps.jsonl
"$CTL" bench --server "$leader" --user admin --password "$PASS" --workload update-dump \
  -C 1 -n 3 --max-seconds 600 --label "corvid master node" --json "$dumps" --quiet | grep -v '^{'
"$CTL" bench --server "$replica_mupdate" --user admin --password "$PASS" --workload update-dump \
  -C 1 -n 3 --max-seconds 600 --label "corvid replica" --json "$dumps" --quiet | grep -v '^{'

{
  echo "## A new node and a new replica join a cluster of $N mailboxes"
  echo
  echo "Measured by \`make bench-join\` ($(date -u '+%Y-%m-%d %H:%M UTC')): a 3-node cluster on 127.0.0.1"
  echo "is loaded with $N ACTIVATEs through the leader (32 connections: ${load_s} s), then an empty"
  echo "fourth node is added with \`corvidctl cluster add-learner\`; the join time runs until the"
  echo "learner has applied every entry the leader had applied. The log behind the leader's snapshot"
  echo "is compacted, so the learner receives the snapshot (one frame) and then the log after it."
  echo
  echo "| mailboxes | join time s | learner peak RSS MiB | learner data MiB |"
  echo "| ---: | ---: | ---: | ---: |"
  echo "| $N | $join_s | $((rss_kb / 1024)) | $db_mb |"
  echo
  echo "Then an empty replica (\`--role replica\`) follows the cluster: its log stream sends the"
  echo "state in chunks of 2,048 mailboxes, written as they arrive, then the log after it. The"
  echo "time runs from starting the process until it has applied the leader's index (target:"
  echo "under 10 s)."
  echo
  echo "| mailboxes | replica cold sync s | replica peak RSS MiB | replica data MiB |"
  echo "| ---: | ---: | ---: | ---: |"
  echo "| $N | $sync_s | $((replica_rss_kb / 1024)) | $replica_mb |"
  echo
  echo "A classic UPDATE client (what a Cyrus mupdate slave does on every (re)connect) takes the"
  echo "initial dump of the same list: a new connection, UPDATE, every mailbox read until the OK."
  echo
  echo "| server | mailboxes | dumps | p50 s | max s |"
  echo "| --- | ---: | ---: | ---: | ---: |"
  python3 - "$dumps" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    print("| %s | %d | %d | %.2f | %.2f |" % (r["label"], r["entries"], r["ops"], r["p50_ms"] / 1000, r["max_ms"] / 1000))
PY
} >"$ROOT/bench/join-results.md"
python3 "$ROOT/bench/report.py" "$ROOT/bench/last-results.jsonl" "make bench" >"$ROOT/docs/src/benchmarks.md"
echo "wrote bench/join-results.md and docs/src/benchmarks.md"
