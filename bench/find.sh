#!/usr/bin/env bash
# make bench-find: server CPU per FIND (user + system, from /proc/PID/stat)
# at 32 connections on a one-node registry (linearizable, it leads), a
# replica following it, and the leader and a follower of a 3-node cluster
# (linearizable: the follower asks the leader for a read index). Several
# short rounds per target, since CPU per FIND holds up on a shared machine
# where ops/s does not. Prints one line per round; touches no docs.
#
#   BENCH_FIND_KEYS     mailboxes created first (default 5000)
#   BENCH_FIND_OPS      FINDs per round (default 30000)
#   BENCH_FIND_ROUNDS   rounds per target (default 3)
#   BENCH_FIND_TARGETS  which of: node replica leader follower
#                       follower-self (default the first four;
#                       follower-self: the follower's own CPU only)
#   BENCH_FIND_CONFIG   a config file every master node reads (e.g. to try
#                       [raft] read settings)
#   BENCH_FIND_PERF     a directory: `perf record -g` the measured
#                       processes during each target's rounds into
#                       DIR/TARGET.data and print the top items
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export SERVER=corvid CYRUS_TELEMETRY=0
# shellcheck source=../tests/interop/lib.sh
source "$ROOT/tests/interop/lib.sh"
interop_init bench-find

CTL=$CORVID_BIN_DIR/corvidctl
KEYS=${BENCH_FIND_KEYS:-5000}
OPS=${BENCH_FIND_OPS:-30000}
ROUNDS=${BENCH_FIND_ROUNDS:-3}
TARGETS=" ${BENCH_FIND_TARGETS:-node replica leader follower} "
PASS=bench-secret
RESULTS=$WORK/results.jsonl

has() { printf 'S1 FIND "%s"\n' "$2" | mupdatetest_run "127.0.0.1:$1" admin "$PASS" | grep -q '^S1 MAILBOX'; }

bench() {
  "$CTL" bench --server "127.0.0.1:$2" --user admin --password "$PASS" --label "$1" \
    --json "$RESULTS" --quiet "${@:3}" >/dev/null
}

# find_rounds LABEL PORT PID...: ROUNDS rounds of FINDs, CPU of the PIDs.
find_rounds() {
  local label=$1 port=$2 pid pids=() r
  shift 2
  for pid in "$@"; do pids+=(--server-pid "$pid"); done
  local perf_pid=
  if [[ -n ${BENCH_FIND_PERF:-} ]]; then
    mkdir -p "$BENCH_FIND_PERF"
    perf record -q -g -F 999 -o "$BENCH_FIND_PERF/$label.data" -p "$(
      IFS=,
      echo "$*"
    )" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  for ((r = 1; r <= ROUNDS; r++)); do
    bench "$label" "$port" --workload find -C 32 -n "$OPS" --prefix k --keyspace "$KEYS" "${pids[@]}"
    python3 -c '
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])
u, s = r["server_user_us_per_op"], r["server_sys_us_per_op"]
print("%-13s round %s: %7.0f FIND/s  %5.1f us CPU per FIND (%4.1f user + %4.1f sys)  p50 %.2f ms"
      % (r["label"], sys.argv[2], r["ops_per_sec"], u + s, u, s, r["p50_ms"]))' "$RESULTS" "$r"
  done
  if [[ -n $perf_pid ]]; then
    kill -INT "$perf_pid"
    wait "$perf_pid" || true
    perf report -i "$BENCH_FIND_PERF/$label.data" --no-children --sort dso,symbol --stdio 2>/dev/null |
      grep -E '^ +[0-9]' | awk 'NR <= 25' >"$BENCH_FIND_PERF/$label.top"
    echo "perf top items of $label: $BENCH_FIND_PERF/$label.top"
  fi
}

# readers_per_request METRICS_HOSTPORT LABEL: how many linearizable reads
# shared each read-index request on that node so far.
readers_per_request() {
  local readers requests
  readers=$(corvid_metric "$1" corvid_raft_read_index_readers_total)
  requests=$(corvid_metric "$1" corvid_raft_read_index_requests_total)
  python3 -c 'import sys; r, q = float(sys.argv[1]), float(sys.argv[2]); print("%-13s %.0f reads over %.0f read-index requests: %.1f per request" % (sys.argv[3], r, q, r / max(q, 1)))' \
    "$readers" "$requests" "$2"
}

if [[ $TARGETS == *" node "* || $TARGETS == *" replica "* ]]; then
  start_corvid "$WORK/node" admin "$PASS"
  node_pid=$SPAWNED_PID
  bench load "$CORVID_MUPDATE_PORT" --workload reserve-activate -C 32 -n "$KEYS" --prefix k
  if [[ $TARGETS == *" node "* ]]; then
    find_rounds node "$CORVID_MUPDATE_PORT" "$node_pid"
    readers_per_request "127.0.0.1:$CORVID_METRICS_PORT" node
  fi
  if [[ $TARGETS == *" replica "* ]]; then
    start_corvid_replica "$WORK/replica" "127.0.0.1:$CORVID_PEER_PORT" "$CORVID_USERS_FILE"
    replica_pid=$SPAWNED_PID
    wait_for "the replica has k.$((KEYS - 1))" has "$CORVID_REPLICA_MUPDATE_PORT" "k.$((KEYS - 1))" ||
      die "the replica did not sync"
    find_rounds replica "$CORVID_REPLICA_MUPDATE_PORT" "$replica_pid"
  fi
fi

if [[ $TARGETS == *" leader "* || $TARGETS == *" follower"* ]]; then
  CORVID_CLUSTER_CONFIG=${BENCH_FIND_CONFIG:-} start_corvid_cluster 3 "$WORK/cluster" admin "$PASS"
  read -r -a nodes <<<"$CORVID_CLUSTER_MUPDATE"
  leader_id=$("$CTL" cluster --peer "$CORVID_CLUSTER_PEER" status | awk '$3 == "Leader" {print $1}')
  leader=${nodes[$((leader_id - 1))]}
  follower=${nodes[$((leader_id % 3))]}
  bench load "${leader##*:}" --workload reserve-activate -C 32 -n "$KEYS" --prefix k
  wait_for "the follower has k.$((KEYS - 1))" has "${follower##*:}" "k.$((KEYS - 1))" ||
    die "the follower did not catch up"
  # The CPU of all three nodes: a linearizable read costs the leader too.
  [[ $TARGETS != *" leader "* ]] || find_rounds leader "${leader##*:}" "${CORVID_CLUSTER_PGIDS[@]}"
  if [[ $TARGETS == *" follower "* ]]; then
    find_rounds follower "${follower##*:}" "${CORVID_CLUSTER_PGIDS[@]}"
    follower_log=${_CORVID_CLUSTER_LOGS[$((leader_id % 3))]}
    readers_per_request "$(sed -n 's/^corvid-registry ready .*metrics=\([^ ]*\).*/\1/p' "$follower_log" | tail -n 1)" follower
  fi
  [[ $TARGETS != *" follower-self "* ]] ||
    find_rounds follower-self "${follower##*:}" "${CORVID_CLUSTER_PGIDS[$((leader_id % 3))]}"
fi
echo "bench-find done (KEYS=$KEYS OPS=$OPS ROUNDS=$ROUNDS)"
