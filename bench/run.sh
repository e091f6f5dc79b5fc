#!/usr/bin/env bash
# make bench: the same MUPDATE load against a real Cyrus 3.6 `mupdate -m`
# master and a one-node Corvid registry (fsync on), in one run, then writes
# the table with Corvid/Cyrus ratios to docs/src/benchmarks.md.
#
#   BENCH_OPS   creations per reserve-activate run (default 10000)
#   BENCH_CYRUS_PROPAGATION  changes timed through a Cyrus master to its
#               slave (default 20; each takes up to 5 s)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export SERVER=corvid CYRUS_TELEMETRY=0
# shellcheck source=../tests/interop/lib.sh
source "$ROOT/tests/interop/lib.sh"
interop_init bench

CTL=$CORVID_BIN_DIR/corvidctl
OPS=${BENCH_OPS:-10000}
RESULTS=$WORK/results.jsonl
PASS=bench-secret

cyrus_port=$(free_port)
cyrus_mupdate_master "$WORK/cyrus" "$cyrus_port" admin "$PASS"
start_corvid "$WORK/corvid" admin "$PASS"
# Server CPU per operation is read from /proc/PID/stat of these processes
# (Cyrus's threaded mupdate is one process; so is corvid-registry).
corvid_pid=$SPAWNED_PID
cyrus_pid=$(pgrep -f -- "mupdate -C $WORK/cyrus/imapd.conf -m" | head -n 1)
[[ -n $cyrus_pid ]] || die "no Cyrus mupdate process to measure"
# Each master has a real Cyrus frontend's mupdate slave attached, as in a
# murder: it holds an UPDATE stream open and receives every change.
cyrus_slave_port=$(free_port)
cyrus_mupdate_slave "$WORK/cyrus-slave" frontend1 "$cyrus_slave_port" "127.0.0.1:$cyrus_port" admin "$PASS"
corvid_slave_port=$(free_port)
cyrus_mupdate_slave "$WORK/corvid-slave" frontend2 "$corvid_slave_port" "127.0.0.1:$CORVID_MUPDATE_PORT" admin "$PASS"

# slave_has SLAVE_PORT NAME: the slave answers FIND NAME with an entry.
slave_has() {
  printf 'S1 FIND "%s"\n' "$2" | mupdatetest_run "127.0.0.1:$1" admin "$PASS" | grep -q '^S1 MAILBOX'
}

bench() {
  local label=$1 port=$2
  shift 2
  "$CTL" bench --server "127.0.0.1:$port" --user admin --password "$PASS" \
    --label "$label" --json "$RESULTS" --quiet "$@" | grep -v '^{'
}

for target in "cyrus-3.6.1 $cyrus_port --server-pid $cyrus_pid" \
  "corvid-1-node $CORVID_MUPDATE_PORT --server-pid $corvid_pid --metrics 127.0.0.1:$CORVID_METRICS_PORT"; do
  read -r label port measure <<<"$target"
  read -r -a measure <<<"$measure"
  echo "== $label"
  for c in 1 8 32; do
    bench "$label" "$port" --workload reserve-activate -C "$c" -n "$OPS" --prefix "ra$c" "${measure[@]}"
  done
  bench "$label" "$port" --workload find -C 32 -n $((OPS * 3)) --prefix ra32 --keyspace "$OPS" "${measure[@]}"
  bench "$label" "$port" --workload backend -C 8 -n $((OPS / 4)) --prefix backend "${measure[@]}"
  bench "$label" "$port" --workload mix -C 32 -n "$OPS" --prefix ra32 --keyspace "$OPS" "${measure[@]}"
  bench "$label" "$port" --workload delete -C 32 -n "$OPS" --prefix ra8 "${measure[@]}"
done
# The slaves followed their masters through all of it.
wait_for "Cyrus slave has ra32.0" slave_has "$cyrus_slave_port" ra32.0 ||
  die "the slave of the Cyrus master fell behind"
wait_for "Corvid's Cyrus slave has ra32.0" slave_has "$corvid_slave_port" ra32.0 ||
  die "the Cyrus slave of Corvid fell behind"

# A 3-node cluster on this same machine (fsync on every node): writes and
# the backend pattern through the leader and through a follower, FINDs on a
# follower (linearizable: each asks the leader for its read index).
start_corvid_cluster 3 "$WORK/cluster" admin "$PASS"
read -r -a nodes <<<"$CORVID_CLUSTER_MUPDATE"
cluster_slave_port=$(free_port)
cyrus_mupdate_slave "$WORK/cluster-slave" frontend3 "$cluster_slave_port" "${nodes[0]}" admin "$PASS"
leader_id=$("$CTL" cluster --peer "$CORVID_CLUSTER_PEER" status | awk '$3 == "Leader" {print $1}')
leader=${nodes[$((leader_id - 1))]}
follower=${nodes[$((leader_id % 3))]}
# CPU of the whole cluster (all three nodes) per operation; WAL counters
# of the leader.
cluster_measure=(--metrics "$(sed -n 's/^corvid-registry ready .*metrics=\([^ ]*\).*/\1/p' \
  "${_CORVID_CLUSTER_LOGS[$((leader_id - 1))]}" | tail -n 1)")
for pid in "${CORVID_CLUSTER_PGIDS[@]}"; do cluster_measure+=(--server-pid "$pid"); done
echo "== corvid-3-node (leader ${leader}, follower ${follower})"
bench corvid-3-node "${leader##*:}" --workload reserve-activate -C 32 -n "$OPS" --prefix ra32 "${cluster_measure[@]}"
bench corvid-3-node-via-follower "${follower##*:}" --workload reserve-activate -C 32 -n "$OPS" --prefix raf32 "${cluster_measure[@]}"
bench corvid-3-node-follower "${follower##*:}" --workload find -C 32 -n $((OPS * 3)) --prefix ra32 --keyspace "$OPS" "${cluster_measure[@]}"
bench corvid-3-node-via-follower "${follower##*:}" --workload backend -C 8 -n $((OPS / 4)) --prefix backend "${cluster_measure[@]}"

wait_for "the cluster's Cyrus slave has raf32.0" slave_has "$cluster_slave_port" raf32.0 ||
  die "the Cyrus slave of the cluster fell behind"

# Propagation, commit to visible: a Corvid replica following the cluster
# (watched through an UPDATE subscription), the cluster's Cyrus slave and
# the Cyrus master's Cyrus slave (watched by FIND; Cyrus batches pushes to
# its slaves every 5 s, hence far fewer samples there, each after a random
# pause so that writes fall anywhere in its push cycle).
start_corvid_replica "$WORK/replica" "$CORVID_CLUSTER_PEERS" "$WORK/cluster/users.toml"
replica_pid=$SPAWNED_PID
wait_for "the replica has ra32.0" slave_has "$CORVID_REPLICA_MUPDATE_PORT" ra32.0 ||
  die "the replica did not sync"
echo "== corvid-replica"
bench corvid-replica "$CORVID_REPLICA_MUPDATE_PORT" --workload find -C 32 -n $((OPS * 3)) --prefix ra32 \
  --keyspace "$OPS" --server-pid "$replica_pid"
propagation() {
  local label=$1 server=$2 watch=$3 via=$4 n=$5
  shift 5
  "$CTL" propagation --server "$server" --watch "$watch" --via "$via" -n "$n" "$@" \
    --user admin --password "$PASS" --prefix "prop-$label" --label "$label" \
    --json "$RESULTS" --quiet | grep -v '^{'
}
echo "== propagation"
propagation corvid-replica "$leader" "127.0.0.1:$CORVID_REPLICA_MUPDATE_PORT" update 2000
propagation cyrus-slave-of-corvid-cluster "$leader" "127.0.0.1:$cluster_slave_port" find 300
propagation cyrus-slave-of-cyrus "127.0.0.1:$cyrus_port" "127.0.0.1:$cyrus_slave_port" find \
  "${BENCH_CYRUS_PROPAGATION:-20}" --jitter-ms 5000

python3 "$ROOT/bench/report.py" "$RESULTS" "make bench (BENCH_OPS=$OPS)" >"$ROOT/docs/src/benchmarks.md"
echo "wrote docs/src/benchmarks.md"
cp "$RESULTS" "$ROOT/bench/last-results.jsonl"
