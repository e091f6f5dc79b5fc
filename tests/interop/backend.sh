#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Interop (b): a real Cyrus 3.6 backend imapd whose mupdate_server is the
# server under test (SERVER=corvid, the default, or SERVER=cyrus).
#  1. Mailboxes created, renamed, re-ACLed and deleted over IMAP by the
#     backend's admin show up, move and vanish in the server (checked with
#     mupdatetest FIND/LIST).
#  2. ctl_mboxlist -m: after the server's view is made to differ from the
#     backend's (an entry deleted, a stray one added, an ACL changed), the
#     dry run (-w) prints the plan and changes nothing, the real run makes the
#     server match the backend again, and a second dry run plans nothing.
# With INTEROP_CAPTURE=1 (the default) the backend talks to the server through
# a recording proxy; the bytes are in the logs printed on failure, and with
# INTEROP_SHOW_CAPTURE=1 always.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

interop_init backend
ADMIN="admin"
PASS=interop-secret
T=$'\t'
start_server_under_test "$WORK/sut" "$ADMIN" "$PASS"

MUPDATE_HOSTPORT=$SUT_HOSTPORT
CAPTURE=
if [[ ${INTEROP_CAPTURE:-1} == 1 ]]; then
  mkdir -p "$WORK/capture"
  CAPTURE=$WORK/capture/mupdate-wire.log
  start_capture_proxy "$SUT_MUPDATE_PORT" "$CAPTURE"
  MUPDATE_HOSTPORT=127.0.0.1:$CAPTURE_PROXY_PORT
fi

IMAP_PORT=$(free_port)
cyrus_backend "$WORK/be1" be1 "$IMAP_PORT" "$MUPDATE_HOSTPORT" "$ADMIN" "$PASS"
CONF=$WORK/be1/imapd.conf
echo "Cyrus backend be1: IMAP on 127.0.0.1:$IMAP_PORT, mupdate_server $MUPDATE_HOSTPORT"

# backend_imap DESC CMD...: run IMAP commands as the backend's admin; one
# assertion (the backend answers OK only when its MUPDATE updates succeeded).
backend_imap() {
  imap_assert "$IMAP_PORT" "$ADMIN" "$PASS" "$@"
}

# ctl_mboxlist_m ARGS...: run the backend's ctl_mboxlist -m; sets CTL_OUT
# (stdout and stderr) and CTL_RC. As root it switches to user cyrus itself.
ctl_mboxlist_m() {
  CTL_RC=0
  CTL_OUT=$(timeout 60 "$CYRUS_BIN/ctl_mboxlist" -C "$CONF" -m "$@" 2>&1) || CTL_RC=$?
  if [[ -n $CTL_OUT ]]; then printf '%s\n' "$CTL_OUT" | sed 's/^/    ctl_mboxlist: /'; fi
}

# be1_list TAG: the server's LIST "be1!" with delayed-delete suffixes masked.
be1_list() {
  sut_mupdate "$1 LIST \"be1!\"" | sed -E 's/^(.*"DELETED\.[^"]*\.)[0-9A-F]{8}"/\1HEX"/'
}

# --- 1. IMAP CREATE -> RESERVE + ACTIVATE
backend_imap "backend CREATEs mailboxes (its MUPDATE reservations succeed)" \
  "CREATE user.alice" "CREATE user.alice.Sent" "CREATE user.alice.Drafts" \
  "CREATE user.alice-work" "CREATE user.bob" "CREATE archive"
out=$(sut_mupdate 'F1 FIND "user.alice"' 'F2 FIND "archive"')
assert_answers "created user mailbox is active at be1!default with its ACL" F1 \
  "F1 MAILBOX \"user.alice\" \"be1!default\" \"alice\\tlrswipkxtecdan\\t\"
F1 OK \"Search completed\"" "$out"
assert_answers "created shared mailbox is active at be1!default" F2 \
  "F2 MAILBOX \"archive\" \"be1!default\" \"anyone\\tlrs\\t\"
F2 OK \"Search completed\"" "$out"
out=$(be1_list L1)
expected="L1 MAILBOX \"archive\" \"be1!default\" \"anyone\\tlrs\\t\"
L1 MAILBOX \"user.alice\" \"be1!default\" \"alice\\tlrswipkxtecdan\\t\"
L1 MAILBOX \"user.alice.Drafts\" \"be1!default\" \"alice\\tlrswipkxtecdan\\t\"
L1 MAILBOX \"user.alice.Sent\" \"be1!default\" \"alice\\tlrswipkxtecdan\\t\"
L1 MAILBOX \"user.alice-work\" \"be1!default\" \"alice-work\\tlrswipkxtecdan\\t\"
L1 MAILBOX \"user.bob\" \"be1!default\" \"bob\\tlrswipkxtecdan\\t\"
L1 OK \"list complete\""
assert_eq "LIST be1! holds exactly the created mailboxes" \
  "$(sort <<<"$expected")" "$(answers L1 "$out" | sort)"
# Cyrus orders names with the hierarchy separator first (user.alice.Drafts
# before user.alice-work); ctl_mboxlist -m walks LIST and its own
# mailboxes.db side by side and aborts if the orders differ.
assert_answers "LIST order is Cyrus's mailbox order ('.' sorts first)" L1 "$expected" "$out"

# --- 2. IMAP RENAME -> DELETE old, RESERVE + ACTIVATE new; SETACL -> ACTIVATE
backend_imap "backend RENAMEs mailboxes and changes an ACL" \
  "RENAME user.alice.Sent user.alice.Archive" "RENAME archive archive2" \
  "SETACL user.bob anyone lr"
out=$(sut_mupdate 'R1 FIND "user.alice.Sent"' 'R2 FIND "user.alice.Archive"' \
  'R3 FIND "archive"' 'R4 FIND "archive2"' 'R5 FIND "user.bob"')
assert_answers "renamed mailbox: old name gone" R1 'R1 OK "Search completed"' "$out"
# Cyrus 3.6.1 sends "be1!" (empty partition) for the new name of a RENAME.
assert_answers "renamed mailbox: new name active (location as the backend sent it)" R2 \
  "R2 MAILBOX \"user.alice.Archive\" \"be1!\" \"alice\\tlrswipkxtecdan\\t\"
R2 OK \"Search completed\"" "$out"
assert_answers "renamed shared mailbox: old name gone" R3 'R3 OK "Search completed"' "$out"
assert_answers "renamed shared mailbox: new name active" R4 \
  "R4 MAILBOX \"archive2\" \"be1!\" \"anyone\\tlrs\\t\"
R4 OK \"Search completed\"" "$out"
assert_answers "SETACL reaches the server" R5 \
  "R5 MAILBOX \"user.bob\" \"be1!default\" \"bob\\tlrswipkxtecdan\\tanyone\\tlr\\t\"
R5 OK \"Search completed\"" "$out"

# --- 3. IMAP DELETE (delete_mode: delayed) -> DELETE name, then
# RESERVE + ACTIVATE DELETED.<name>.<hex>. Admins need the x right.
backend_imap "backend DELETEs mailboxes" \
  "SETACL user.alice.Archive $ADMIN x" "DELETE user.alice.Archive" \
  "SETACL user.bob $ADMIN x" "DELETE user.bob"
out=$(sut_mupdate 'D1 FIND "user.alice.Archive"' 'D2 FIND "user.bob"')
assert_answers "deleted mailbox is gone" D1 'D1 OK "Search completed"' "$out"
assert_answers "deleted user is gone" D2 'D2 OK "Search completed"' "$out"
out=$(be1_list D3)
assert_eq "LIST be1! after rename and delete (delayed-delete names included)" \
  "D3 MAILBOX \"DELETED.user.alice.Archive.HEX\" \"be1!\" \"alice\\tlrswipkxtecdan\\t$ADMIN\\txc\\t\"
D3 MAILBOX \"DELETED.user.bob.HEX\" \"be1!\" \"bob\\tlrswipkxtecdan\\tanyone\\tlr\\t$ADMIN\\txc\\t\"
D3 MAILBOX \"archive2\" \"be1!\" \"anyone\\tlrs\\t\"
D3 MAILBOX \"user.alice\" \"be1!default\" \"alice\\tlrswipkxtecdan\\t\"
D3 MAILBOX \"user.alice.Drafts\" \"be1!default\" \"alice\\tlrswipkxtecdan\\t\"
D3 MAILBOX \"user.alice-work\" \"be1!default\" \"alice-work\\tlrswipkxtecdan\\t\"
D3 OK \"list complete\"" "$(answers D3 "$out")"

# --- 4. ctl_mboxlist -m: make the server differ from the backend
out=$(sut_mupdate \
  'T1 DELETE "user.alice"' \
  "T2 ACTIVATE \"user.stray\" \"be1!default\" \"stray${T}lrs${T}\"" \
  "T3 ACTIVATE \"user.other\" \"be2!default\" \"other${T}lrs${T}\"" \
  "T4 ACTIVATE \"user.alice.Drafts\" \"be1!default\" \"anyone${T}lrswipkxtecdan${T}\"")
assert_eq "server view altered (entry deleted, stray added, ACL changed)" \
  $'T1 OK "done"\nT2 OK "done"\nT3 OK "done"\nT4 OK "done"' "$(grep -E '^T[0-9] ' <<<"$out")"
before=$(sut_mupdate 'S1 LIST')

ctl_mboxlist_m -w
assert_eq "ctl_mboxlist -m -w exits 0" 0 "$CTL_RC"
assert_line "dry run plans to remove the stray entry" 'Remove from MUPDATE: user.stray' "$CTL_OUT"
assert_line "dry run plans to restore the deleted entry" 'Force Activate: user.alice' "$CTL_OUT"
assert_line "dry run plans to fix the changed ACL" 'Force Activate: user.alice.Drafts' "$CTL_OUT"
assert_no_line "dry run leaves other backends' entries alone" 'user.other' "$CTL_OUT"
assert_no_line "dry run plans no local deletion" 'Remove Local Mailbox' "$CTL_OUT"
assert_eq "dry run changed nothing in the server" "$before" "$(sut_mupdate 'S1 LIST')"

ctl_mboxlist_m
assert_eq "ctl_mboxlist -m exits 0" 0 "$CTL_RC"
assert_eq "ctl_mboxlist -m reports no errors" "" "$CTL_OUT"
out=$(sut_mupdate 'M1 FIND "user.alice"' 'M2 FIND "user.stray"' 'M3 FIND "user.other"' \
  'M4 FIND "user.alice.Drafts"')
assert_answers "deleted entry restored" M1 \
  "M1 MAILBOX \"user.alice\" \"be1!default\" \"alice\\tlrswipkxtecdan\\t\"
M1 OK \"Search completed\"" "$out"
assert_answers "stray entry deleted" M2 'M2 OK "Search completed"' "$out"
assert_answers "other backend's entry untouched" M3 \
  "M3 MAILBOX \"user.other\" \"be2!default\" \"other\\tlrs\\t\"
M3 OK \"Search completed\"" "$out"
assert_answers "changed ACL restored" M4 \
  "M4 MAILBOX \"user.alice.Drafts\" \"be1!default\" \"alice\\tlrswipkxtecdan\\t\"
M4 OK \"Search completed\"" "$out"
out=$(be1_list M5)
assert_eq "server's be1! entries now match the backend's mailboxes" \
  "M5 MAILBOX \"DELETED.user.alice.Archive.HEX\" \"be1!default\" \"alice\\tlrswipkxtecdan\\t$ADMIN\\txc\\t\"
M5 MAILBOX \"DELETED.user.bob.HEX\" \"be1!default\" \"bob\\tlrswipkxtecdan\\tanyone\\tlr\\t$ADMIN\\txc\\t\"
M5 MAILBOX \"archive2\" \"be1!default\" \"anyone\\tlrs\\t\"
M5 MAILBOX \"user.alice\" \"be1!default\" \"alice\\tlrswipkxtecdan\\t\"
M5 MAILBOX \"user.alice.Drafts\" \"be1!default\" \"alice\\tlrswipkxtecdan\\t\"
M5 MAILBOX \"user.alice-work\" \"be1!default\" \"alice-work\\tlrswipkxtecdan\\t\"
M5 OK \"list complete\"" "$(answers M5 "$out")"

ctl_mboxlist_m -w
assert_eq "second dry run exits 0" 0 "$CTL_RC"
assert_eq "second dry run plans nothing (server matches backend)" "" "$CTL_OUT"

if [[ -n $CAPTURE && ${INTEROP_SHOW_CAPTURE:-0} == 1 ]]; then
  echo "---------- bytes between the Cyrus backend and the server ----------"
  cat "$CAPTURE"
fi
