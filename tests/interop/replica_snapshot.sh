#!/usr/bin/env bash
# A real Cyrus 3.6 mupdate slave follows a Corvid replica whose master dies
# in the middle of a snapshot transfer (issue 9, section 3). The replica
# stages the snapshot aside, so the slave attached to it keeps its whole
# list, and a fresh slave that syncs from the replica while the master is
# dead gets the whole old list (a slave that resynced from a half-written
# state would delete the missing mailboxes from its mailboxes.db). Once the
# master is back the replica completes the snapshot and the slave follows
# it to the new list.
#
# The master runs with the test-only stream throttle
# (--unsafe-test-stream-frame-delay-ms) so that the transfer of 20,480
# mailboxes (ten chunks) lasts long enough to kill the master in its middle.
# Corvid only: with SERVER=cyrus there is no replica to test.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
interop_init replica_snapshot
if [[ $SERVER != corvid ]]; then
  echo "SKIP: replicas are Corvid's; nothing to test with SERVER=$SERVER"
  exit 0
fi
require_bin curl

ADMIN=admin
PASS=interop-secret
T=$'\t'
N=20480
# Long enough for a Cyrus slave to take the whole list before the second
# of ten chunks is sent.
CHUNK_DELAY_MS=2000
# The slave reconnects this many seconds after the replica's BYE.
export CYRUS_MUPDATE_RETRY_DELAY=1
CTL=$CORVID_BIN_DIR/corvidctl
SUT=$WORK/sut
mkdir -p "$SUT"
"$CTL" user add --users-file "$SUT/users.toml" --admin --password-stdin "$ADMIN" <<<"$PASS" \
  >"$SUT/corvidctl.log" 2>&1 || die "corvidctl user add failed"
cat >"$SUT/corvid.toml" <<EOF
[raft]
snapshot_after_entries = 50
keep_log_entries = 5
EOF
MASTER_PORT=$(free_port)
MASTER_PEER=127.0.0.1:$(free_port)
MASTER=127.0.0.1:$MASTER_PORT
MASTER_RUN=0

## start_master [FLAG...]: (re)start the master on its data and ports;
## sets MASTER_PID and MASTER_METRICS.
start_master() {
  local log line
  MASTER_RUN=$((MASTER_RUN + 1))
  log=$SUT/master$MASTER_RUN.log
  spawn "$log" "$CORVID_BIN_DIR/corvid-registry" --config "$SUT/corvid.toml" \
    --data-dir "$SUT/master" --listen "$MASTER" --peer-listen "$MASTER_PEER" \
    --metrics-listen 127.0.0.1:0 --server-name corvid-test --users-file "$SUT/users.toml" "$@"
  MASTER_PID=$SPAWNED_PID
  wait_for "master ready line" _corvid_ready "$log" "$MASTER_PID" || true
  line=$(grep -m1 '^corvid-registry ready mupdate=' "$log") || die "the master did not start"
  MASTER_METRICS=127.0.0.1:$(_ready_port "$line" metrics)
}

## kill9 PID: SIGKILL a spawned process group and reap it.
kill9() {
  kill -KILL -- "-$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

## metric HOSTPORT NAME: an unlabelled metric's value (0 if absent).
metric() {
  curl -sf "http://$1/metrics" | awk -v m="$2" '$1 == m { v = $NF } END { print v + 0 }'
}

## at_least HOSTPORT NAME VALUE: the metric is >= VALUE.
at_least() {
  awk -v a="$(metric "$1" "$2")" -v b="$3" 'BEGIN { exit !(a >= b) }'
}

## find_on HOSTPORT NAME: the MUPDATE answers to FIND NAME there.
find_on() {
  printf 'F1 FIND "%s"\n' "$2" | mupdatetest_run "$1" "$ADMIN" "$PASS" | mupdate_answers
}

## slave_list DIR: the slave's mailboxes.db, one "NAME LOCATION" a line.
slave_list() {
  cyrus_mailboxes "$1" | LC_ALL=C sort
}

## slave_has DIR COUNT: the slave holds exactly COUNT mailboxes.
slave_has() {
  [[ $(slave_list "$1" | wc -l) -eq $2 ]]
}

## list_on HOSTPORT: every mailbox (name and location) a MUPDATE server lists.
list_on() {
  printf 'L1 LIST\n' | mupdatetest_run "$1" "$ADMIN" "$PASS" | mupdate_answers |
    awk '$2 == "MAILBOX" || $2 == "RESERVE" { gsub(/"/, ""); print $3, $4 }' | LC_ALL=C sort
}

# --- a master with N mailboxes; a replica syncs them and stops
start_master
"$CTL" bench --server "$MASTER" --user "$ADMIN" --password "$PASS" --workload activate \
  -n "$N" -C 16 --prefix user.bulk --location 'be1!default' --quiet >"$SUT/bench.log" 2>&1 ||
  die "loading $N mailboxes failed: $(cat "$SUT/bench.log")"
start_corvid_replica "$SUT" "$MASTER_PEER" "$SUT/users.toml"
REPLICA_PID=$SPAWNED_PID
applied=$(metric "$MASTER_METRICS" corvid_raft_applied_index)
wait_for "the replica synced" at_least "127.0.0.1:$CORVID_REPLICA_METRICS_PORT" \
  corvid_replica_applied_index "$applied" || die "the replica did not sync"
kill9 "$REPLICA_PID"

# --- while it is away: a delete, a move and new mailboxes, past the kept log
sut_out=$(printf '%s\n' 'D1 DELETE "user.bulk.0"' \
  "A1 ACTIVATE \"user.bulk.10\" \"be2!default\" \"anyone${T}lrs${T}\"" |
  mupdatetest_run "$MASTER" "$ADMIN" "$PASS" | mupdate_answers)
assert_match "the master deletes and moves" '^A1 OK' "$sut_out"
"$CTL" bench --server "$MASTER" --user "$ADMIN" --password "$PASS" --workload activate \
  -n 200 -C 1 --prefix user.new --location 'be1!default' --quiet >>"$SUT/bench.log" 2>&1 ||
  die "writes on the master failed"
wait_for "the master compacted its log" at_least "$MASTER_METRICS" corvid_raft_log_purged_index \
  $((applied + 1)) || die "the master never compacted its log"
new_list=$(list_on "$MASTER")

# --- the master returns throttled; the replica returns and starts the
# snapshot; a Cyrus slave attaches to the replica and takes the old list
kill9 "$MASTER_PID"
start_master --unsafe-test-stream-frame-delay-ms "$CHUNK_DELAY_MS"
# A new log: the ready line of the first run must not be taken for this one's.
mv "$SUT/replica.log" "$SUT/replica-first.log"
interop_log "$SUT/replica-first.log"
start_corvid_replica "$SUT" "$MASTER_PEER" "$SUT/users.toml"
REPLICA=127.0.0.1:$CORVID_REPLICA_MUPDATE_PORT
REPLICA_METRICS=127.0.0.1:$CORVID_REPLICA_METRICS_PORT
old_list=$(list_on "$REPLICA")
assert_eq "the restarted replica serves its old list" "$N" "$(wc -l <<<"$old_list")"
SLAVE_PORT=$(free_port)
cyrus_mupdate_slave "$WORK/slave" mupdate-slave "$SLAVE_PORT" "$REPLICA" "$ADMIN" "$PASS"
wait_for "the Cyrus slave took the whole list" slave_has "$WORK/slave" "$N" || true
assert_eq "the Cyrus slave holds the replica's old list" "$old_list" "$(slave_list "$WORK/slave")"

# --- mid-snapshot, the master dies
wait_for "the replica is receiving the snapshot" at_least "$REPLICA_METRICS" \
  corvid_replica_snapshot_entries_received_total 1 || die "no snapshot started"
kill9 "$MASTER_PID"
received=$(metric "$REPLICA_METRICS" corvid_replica_snapshot_entries_received_total)
echo "killed the master with $received snapshot items received"
if ((received > 0 && received < N - 2048)); then
  pass "the master died in the middle of the snapshot ($received of about $N items)"
else
  fail "the master died in the middle of the snapshot ($received of about $N items)"
fi
replica_down() { [[ $(metric "$REPLICA_METRICS" corvid_replica_connected) == 0 ]]; }
wait_for "the replica lost its master" replica_down || true
assert_eq "no snapshot was completed" 0 "$(metric "$REPLICA_METRICS" corvid_replica_snapshots_received_total)"
assert_match "FIND on the replica gives the moved mailbox's old location" \
  'F1 MAILBOX "user.bulk.10" "be1!default"' "$(find_on "$REPLICA" user.bulk.10)"
assert_match "FIND on the replica still finds the deleted mailbox" \
  'F1 MAILBOX "user.bulk.0" "be1!default"' "$(find_on "$REPLICA" user.bulk.0)"
assert_eq "the replica lists its whole old list" "$old_list" "$(list_on "$REPLICA")"
assert_eq "the attached Cyrus slave keeps its whole list" "$old_list" "$(slave_list "$WORK/slave")"
# A slave that resyncs now (a fresh one, with an empty mailboxes.db).
SLAVE2_PORT=$(free_port)
cyrus_mupdate_slave "$WORK/slave2" mupdate-slave2 "$SLAVE2_PORT" "$REPLICA" "$ADMIN" "$PASS"
wait_for "a fresh Cyrus slave took the whole list" slave_has "$WORK/slave2" "$N" || true
assert_eq "a fresh Cyrus slave syncing from the replica gets the whole old list" \
  "$old_list" "$(slave_list "$WORK/slave2")"

# --- the master returns unthrottled: the replica completes the snapshot and
# the slave follows it to the new list
start_master
wait_for "the replica completed a snapshot" at_least "$REPLICA_METRICS" \
  corvid_replica_snapshots_received_total 1 || true
assert_eq "the replica installed the snapshot" 1 \
  "$(metric "$REPLICA_METRICS" corvid_replica_snapshots_received_total)"
assert_eq "the replica lists the master's new list" "$new_list" "$(list_on "$REPLICA")"
slave_is_new() { [[ $(slave_list "$WORK/slave") == "$new_list" ]]; }
wait_for "the Cyrus slave resynced to the new list" slave_is_new || true
assert_eq "the Cyrus slave holds the master's new list" "$new_list" "$(slave_list "$WORK/slave")"
