#!/usr/bin/env bash
# make jepsen-short (in make test): one normal run that must be valid, and
# each test-only unsafe switch run twice, with and without the one fault
# that can expose it: anomalies expected with the fault, none without.
# Prints a table of the verdicts; exits non-zero if any run misses its
# expectation.
#
# --unsafe-stale-reads is run with its fault only: a follower answering
# from its own state is stale by its apply lag even without any fault (see
# docs/src/jepsen.md), so no "without" run can be valid.
set -uo pipefail
BIN=${CORVID_BIN_DIR:?set CORVID_BIN_DIR to the directory of corvid-registry and corvid-jepsen}
OUT=${JEPSEN_OUT:-${TMPDIR:-/tmp}/corvid-jepsen-short}
T=${JEPSEN_SHORT_SECONDS:-20}
mkdir -p "$OUT"
status=0
summary=()
run() {
  local label=$1 time=$2
  shift 2
  local log
  log=$(mktemp)
  echo "== $label: corvid-jepsen run $*"
  "$BIN/corvid-jepsen" run --bin-dir "$BIN" --out "$OUT" --quiet --time-limit "$time" "$@" >"$log" 2>&1
  local rc=$?
  grep -E '^(faults:|verdict:|as expected|FAILED|run directory:)' "$log"
  local verdict
  verdict=$(grep -E '^verdict:' "$log" | head -1)
  if [ "$rc" -ne 0 ]; then
    status=1
    tail -20 "$log"
    summary+=("FAIL  $label: ${verdict:-no verdict} (exit $rc)")
  else
    summary+=("ok    $label: $verdict")
  fi
  rm -f "$log"
}
run "normal, partition+kill" 45 --nemesis partition,kill --expect-valid
run "stale reads, with partitions" "$T" --workload registry --nemesis partition \
  --unsafe-stale-reads --expect-anomaly
run "leader-local reads, with leader partitions" "$T" --workload registry \
  --nemesis partition-leader --unsafe-leader-local-reads --expect-anomaly
run "leader-local reads, no fault" "$T" --workload registry --nemesis none \
  --unsafe-leader-local-reads --expect-valid
# Lease reads are not a test switch: a leader that is paused or cut off
# while its lease runs must still never serve a stale read.
run "lease reads, leader pauses and partitions" "$T" --workload registry \
  --nemesis pause,partition-leader --lease-reads --expect-valid
run "ack before fsync, with power loss" "$T" --workload registry --nemesis power-loss \
  --unsafe-ack-before-fsync --expect-anomaly
run "ack before fsync, no fault (same disks)" "$T" --workload registry --nemesis none \
  --power-disks --unsafe-ack-before-fsync --expect-valid
run "real code, with power loss" "$T" --workload registry --nemesis power-loss --expect-valid
# A replica whose master is cut off from the other masters moves to the
# majority and keeps up (the run fails otherwise).
run "replica failover, its master cut off" "$T" --workload registry,replicas \
  --nemesis replica-master --expect-valid
# Retried writes across small snapshots and leader partitions are applied
# once (a duplicate RESERVE would show as a resurrected reservation).
run "lifecycle, small snapshots, leader partitions" "$T" --workload lifecycle,registry \
  --snapshot-after 100 --keep-log 10 --mailboxes 3 --concurrency 8 \
  --nemesis partition-leader,kill --expect-valid
echo
printf '%s\n' "${summary[@]}"
exit $status
