#!/usr/bin/env bash
# make bench-bulk-leader: a bulk load with many commands per log entry must
# not cost the cluster its leader. BULK_MAILBOXES (default 1,000,000) ACTIVATEs
# go through the peer port at 1,000 per log entry with 4 entries in flight
# into a 3-node cluster; the leader and its term must be the same at the end
# (AppendEntries are bounded by bytes, store::MAX_APPEND_BYTES, so the
# heartbeats are never stuck behind tens of megabytes of entries).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export SERVER=corvid
# shellcheck source=../tests/interop/lib.sh
source "$ROOT/tests/interop/lib.sh"
interop_init bench-bulk-leader
CTL=$CORVID_BIN_DIR/corvidctl
N=${BULK_MAILBOXES:-1000000}
export INTEROP_TIMEOUT=${BULK_TIMEOUT:-600}

start_corvid_cluster 3 "$WORK/cluster" admin bench-secret
# id and term of the leader, as the cluster reports them.
leader_and_term() {
  "$CTL" cluster --peer "$CORVID_CLUSTER_PEER" status | awk '$3 == "Leader" {print $1, $4}'
}
before=$(leader_and_term)
echo "leader and term before: $before"
locations=$(for i in $(seq -w 0 99); do printf 'be%s!default,' "$i"; done)
t0=$(date +%s.%N)
"$CTL" bench-load --peer "$CORVID_CLUSTER_PEER" -n "$N" --per-entry 1000 --in-flight 4 \
  --locations "${locations%,}" --prefix user.bulk
t1=$(date +%s.%N)
after=$(leader_and_term)
echo "leader and term after: $after"
python3 -c "print(f'loaded $N in {$t1 - $t0:.1f} s')"
assert_eq "the leader and its term are unchanged by the bulk load" "$before" "$after"
