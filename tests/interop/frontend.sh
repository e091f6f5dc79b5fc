#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Interop (c): real Cyrus 3.6 frontends (imapd proxying, plus the local
# `mupdate` slave that keeps their mailboxes.db) behind the server under test
# (SERVER=corvid, the default, or SERVER=cyrus). A real Cyrus backend be1
# (on 127.0.0.2) pushes its mailboxes to the server; the frontends reach be1
# through their own /etc/hosts and /etc/services (private mount namespaces).
# Run twice, once per MUPDATE server a frontend's slave follows:
#   master   the server under test itself (a Corvid node, or Cyrus `mupdate -m`)
#   replica  a read-only copy of it (a Corvid replica, or, for SERVER=cyrus,
#            a Cyrus mupdate slave)
# Each run checks that:
#  1. after the initial UPDATE the frontend's mailboxes.db holds exactly the
#     backend's mailboxes, at be1!default;
#  2. a mailbox the backend creates later appears and one it deletes vanishes
#     (streamed UPDATE, not only the initial dump);
#  3. alice logs in at the frontend, LISTs, SELECTs and APPENDs; the message
#     lands in her INBOX on be1 (checked by logging in to be1 directly), and a
#     CREATE through the frontend goes to be1 and comes back through MUPDATE.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

interop_init frontend
require_bin unshare mount
ADMIN="admin"
PASS=interop-secret
ALICE_PASS=alice-secret
PROXY_PASS=proxy-secret
start_server_under_test "$WORK/sut" "$ADMIN" "$PASS"

# be1 listens on 127.0.0.2 so that frontends can map the name be1 to it; the
# port is the one their /etc/services gives imap.
BE1_IP=127.0.0.2
BE1_PORT=$(free_port)
BE1=$WORK/be1
cyrus_backend "$BE1" be1 "$BE1_PORT" "$SUT_HOSTPORT" "$ADMIN" "$PASS" "$BE1_IP"
cyrus_add_user "$BE1" alice "$ALICE_PASS"
cyrus_add_user "$BE1" "$CYRUS_PROXY_USER" "$PROXY_PASS"
echo "Cyrus backend be1: IMAP on $BE1_IP:$BE1_PORT, mupdate_server $SUT_HOSTPORT"

# backend_imap DESC CMD...: run IMAP commands as be1's admin; one assertion
# (be1 answers OK only when its MUPDATE updates succeeded).
backend_imap() {
  imap_assert "$BE1_IP:$BE1_PORT" "$ADMIN" "$PASS" "$@"
}

# mailbox_view DIR: the mailboxes.db of the Cyrus instance in DIR, sorted,
# "NAME SERVER!PARTITION" per mailbox; delayed-delete names (whose location
# the backend sends as "be1!") as "NAME (deleted)".
mailbox_view() {
  local raw
  raw=$(cyrus_mailboxes "$1") || raw="(ctl_mboxlist -d failed for $1)"
  awk '$1 ~ /^DELETED\./ { print $1 " (deleted)"; next } { print }' <<<"$raw" | sort
}

# expected_view: what a frontend should hold: be1's own mailboxes, located
# at be1.
expected_view() {
  mailbox_view "$BE1" | awk '$2 ~ /^!/ { $2 = "be1" $2 } { print }'
}

# in_sync DIR: the frontend in DIR holds exactly the expected mailboxes.
in_sync() {
  local want
  want=$(expected_view)
  [[ -n $want && $(mailbox_view "$1") == "$want" ]]
}

# has_line DIR LINE / lacks_prefix DIR PREFIX: about DIR's mailbox_view.
has_line() {
  mailbox_view "$1" | grep -qxF -- "$2"
}
lacks_prefix() {
  local view
  view=$(mailbox_view "$1") && ! grep -qF -- "$2" <<<"$view"
}

# imap_session [HOST:]PORT USER PASS CMD...: like imap_admin_cmd, but prints
# the transcript (and any error) and never stops the script.
imap_session() {
  imap_admin_cmd "$@" 2>&1 || true
}

# frontend_suite LABEL MUPDATE_HOSTPORT: start Cyrus frontend fe-LABEL whose
# slave follows MUPDATE_HOSTPORT, and run checks 1-3 against it.
frontend_suite() {
  local label=$1 mupdate=$2 fe=$WORK/fe-$1 imap_port slave_port out subject
  imap_port=$(free_port)
  slave_port=$(free_port)
  echo "--- $label: Cyrus frontend fe-$label, its mupdate slave following $mupdate"

  # --- 1. initial UPDATE
  backend_imap "$label: be1 creates gone-$label before the frontend starts" "CREATE gone-$label"
  cyrus_frontend "$fe" "fe-$label" "$imap_port" "$slave_port" "$mupdate" "$ADMIN" "$PASS" \
    "$PROXY_PASS" "$BE1_PORT" "be1=$BE1_IP"
  cyrus_add_user "$fe" alice "$ALICE_PASS"
  echo "Cyrus frontend fe-$label: IMAP on 127.0.0.1:$imap_port, slave on 127.0.0.1:$slave_port"
  if wait_for "$label: frontend's slave connected to $mupdate" python3 "$INTEROP_DIR/helpers.py" \
    connected "${mupdate##*:}" "$CYRUS_BIN/mupdate" -C "$fe/imapd.conf"; then
    pass "$label: frontend's mupdate slave holds a connection to $mupdate"
  else
    fail "$label: frontend's mupdate slave holds a connection to $mupdate"
  fi
  wait_for "$label: frontend's mailboxes.db matches be1" in_sync "$fe" || true
  out=$(mailbox_view "$fe")
  assert_eq "$label: frontend's mailboxes.db holds exactly be1's mailboxes, at be1 (initial UPDATE)" \
    "$(expected_view)" "$out"
  assert_line "$label: frontend has user.alice at be1!default" 'user.alice be1!default' "$out"
  assert_line "$label: frontend has gone-$label at be1!default" "gone-$label be1!default" "$out"

  # --- 2. streamed UPDATE: a create and a delete after the initial sync
  backend_imap "$label: be1 creates user.alice.new-$label after the frontend synced" \
    "CREATE user.alice.new-$label"
  wait_for "$label: user.alice.new-$label on the frontend" \
    has_line "$fe" "user.alice.new-$label be1!default" || true
  assert_line "$label: mailbox created after the sync reaches the frontend at be1!default" \
    "user.alice.new-$label be1!default" "$(mailbox_view "$fe")"
  backend_imap "$label: be1 deletes gone-$label" "SETACL gone-$label $ADMIN x" "DELETE gone-$label"
  wait_for "$label: gone-$label leaves the frontend" lacks_prefix "$fe" "gone-$label " || true
  assert_no_line "$label: mailbox deleted on be1 vanishes from the frontend" \
    "gone-$label " "$(mailbox_view "$fe")"
  wait_for "$label: frontend's mailboxes.db matches be1" in_sync "$fe" || true
  assert_eq "$label: frontend still holds exactly be1's mailboxes after the streamed changes" \
    "$(expected_view)" "$(mailbox_view "$fe")"

  # --- 3. IMAP through the frontend reaches be1
  subject="via-fe-$label-$RANDOM"
  out=$(imap_session "$imap_port" alice "$ALICE_PASS" LIST "SELECT INBOX" \
    "APPEND INBOX $subject" "CREATE INBOX.fe-$label")
  printf '%s\n' "$out" | sed 's/^/    frontend imap: /'
  assert_line "$label: LIST at the frontend shows alice's INBOX" 'LIST-MAILBOX INBOX' "$out"
  assert_line "$label: LIST at the frontend shows the streamed INBOX.new-$label" \
    "LIST-MAILBOX INBOX.new-$label" "$out"
  assert_match "$label: alice logs in at the frontend and SELECTs INBOX (proxied to be1)" \
    '^SELECT INBOX -> OK [0-9]+$' "$out"
  assert_match "$label: APPEND to INBOX through the frontend succeeds" \
    "^APPEND INBOX $subject -> OK" "$out"
  assert_match "$label: CREATE INBOX.fe-$label through the frontend succeeds" \
    "^CREATE INBOX.fe-$label -> OK" "$out"
  out=$(imap_session "$BE1_IP:$BE1_PORT" alice "$ALICE_PASS" "SELECT INBOX" "SEARCH SUBJECT $subject")
  printf '%s\n' "$out" | sed 's/^/    be1 imap: /'
  assert_match "$label: the message APPENDed through the frontend is in alice's INBOX on be1" \
    "^SEARCH SUBJECT $subject -> OK [0-9]" "$out"
  assert_eq "$label: the frontend stored no message itself" "" \
    "$(find "$fe/spool" -type f 2>/dev/null)"
  assert_line "$label: the mailbox CREATEd through the frontend exists on be1" \
    "user.alice.fe-$label !default" "$(mailbox_view "$BE1")"
  wait_for "$label: user.alice.fe-$label on the frontend" \
    has_line "$fe" "user.alice.fe-$label be1!default" || true
  assert_line "$label: ... and comes back to the frontend through MUPDATE at be1!default" \
    "user.alice.fe-$label be1!default" "$(mailbox_view "$fe")"
}

# --- mailboxes on be1 before any frontend exists
backend_imap "be1 creates user and shared mailboxes" \
  "CREATE user.alice" "CREATE user.alice.Sent" "CREATE user.bob" "CREATE archive"

# --- the frontend follows the server under test
frontend_suite master "$SUT_HOSTPORT"

# --- a frontend follows a read-only replica of it
if [[ $SERVER == corvid ]]; then
  start_corvid_replica "$WORK/sut" "127.0.0.1:$CORVID_PEER_PORT" "$CORVID_USERS_FILE"
  REPLICA_HOSTPORT=127.0.0.1:$CORVID_REPLICA_MUPDATE_PORT
else
  # Cyrus's own read-only copy of a master is a mupdate slave.
  REPLICA_PORT=$(free_port)
  cyrus_mupdate_slave "$WORK/cyrus-replica" mupdate-replica "$REPLICA_PORT" "$SUT_HOSTPORT" "$ADMIN" "$PASS"
  REPLICA_HOSTPORT=127.0.0.1:$REPLICA_PORT
fi
echo "replica ($SERVER) listens on $REPLICA_HOSTPORT"
frontend_suite replica "$REPLICA_HOSTPORT"

# --- the first frontend kept following the master through the second run
wait_for "fe-master matches be1" in_sync "$WORK/fe-master" || true
assert_eq "fe-master also holds exactly be1's mailboxes after the replica run" \
  "$(expected_view)" "$(mailbox_view "$WORK/fe-master")"
