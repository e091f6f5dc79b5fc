#!/usr/bin/env bash
# make bench-join: how long a new node takes to join a 3-node cluster that
# holds JOIN_MAILBOXES mailboxes (default 1,000,000). The log behind the
# last snapshot is compacted, so the new node is sent the leader's snapshot.
# Appends the figures to docs/src/benchmarks.md.
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
_learner_caught_up() {
  "$CTL" cluster --peer "$CORVID_CLUSTER_PEER" status |
    awk '$3 == "Leader" {l = $7} $1 == 4 {a = $8} END {exit !(l > 0 && a >= l)}'
}
wait_for "learner caught up" _learner_caught_up
join_end=$(date +%s.%N)
"$CTL" cluster --peer "$CORVID_CLUSTER_PEER" status
rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$(pgrep -f -- "--data-dir $WORK/node4" | head -1)/status")
db_mb=$(du -sm "$WORK/node4" | cut -f1)
join_s=$(python3 -c "print(f'{$join_end - $join_start:.1f}')")
load_s=$(python3 -c "print(f'{$load_end - $load_start:.1f}')")
echo "join of a node to a cluster of $N mailboxes: ${join_s}s (peak RSS $((rss_kb / 1024)) MiB, data ${db_mb} MiB)"
{
  echo
  echo "## A new node joins a cluster of $N mailboxes"
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
} >>"$ROOT/docs/src/benchmarks.md"
