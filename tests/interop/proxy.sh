#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Interop (d): IMAP clients through a murder frontend. The same client
# scenarios run against
#   cyrus   a real Cyrus 3.6 frontend (imapd proxying + its mupdate slave
#           following the Corvid registry): the reference;
#   corvid  corvid-proxy (embedded Corvid replica), only when
#           ${CORVID_PROXY_BIN:-$CORVID_BIN_DIR/corvid-proxy} starts and prints
#           its ready line (CORVID_PROXY_REQUIRED=1 makes its absence a failure).
# Murder: one Corvid node; real Cyrus backends be1 (127.0.0.2) and be2
# (127.0.0.3) on the same IMAP port, reporting to Corvid. alice: INBOX and
# INBOX.Sent on be1, INBOX.Archive on be2 (one account over two backends);
# bob: INBOX on be2; shared.team on be2 (alice: lrswipkxtecda); session users
# s1 s2 s3 laid out like alice (one per run of the differential session, so
# that every run starts from the same state).
# Scenarios (see the README table): 1 differential scripted session,
# 2 big APPEND and cross-backend COPY/MOVE, 3 mbsync, 4 cyradm and XFER,
# 5 curl, 6 saslauthd.
# Whatever the reference cannot do (cross-backend MOVE in 3.6) is printed as
# "REFERENCE:" evidence, not counted as a failure; corvid-proxy must do it.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

SERVER=corvid # the registry is always Corvid here; the frontend varies
interop_init proxy
require_bin unshare mount curl mbsync cyradm saslauthd testsaslauthd sha256sum
T0=$SECONDS
ADMIN=admin
PASS=interop-secret
ALICE_PASS=alice-secret
BOB_PASS=bob-secret
S_PASS=session-secret
PROXY_PASS=proxy-secret
SESSION_USERS=(s1 s2 s3)
BE1_IP=127.0.0.2
BE2_IP=127.0.0.3
HERE=$INTEROP_DIR

# reference LABEL TEXT: evidence about what a target does, not an assertion.
reference() {
  echo "REFERENCE: $1: $2"
  REFERENCE_NOTES+=("$1: $2")
}
REFERENCE_NOTES=()

# phase NAME: time stamp for the run-time budget.
phase() {
  echo "--- [$((SECONDS - T0))s] $*"
}

# ================================================================ murder
phase "Corvid registry"
start_corvid "$WORK/corvid" "$ADMIN" "$PASS"
MUPDATE=127.0.0.1:$CORVID_MUPDATE_PORT

IMAP_PORT=$(free_port)
BE1=$WORK/be1
BE2=$WORK/be2
PEERS=("be1=$BE1_IP" "be2=$BE2_IP")
phase "backends be1=$BE1_IP:$IMAP_PORT be2=$BE2_IP:$IMAP_PORT"
cyrus_murder_backend "$BE1" be1 "$BE1_IP" "$IMAP_PORT" "$MUPDATE" "$ADMIN" "$PASS" "$PROXY_PASS" "${PEERS[@]}"
cyrus_murder_backend "$BE2" be2 "$BE2_IP" "$IMAP_PORT" "$MUPDATE" "$ADMIN" "$PASS" "$PROXY_PASS" "${PEERS[@]}"
for be in "$BE1" "$BE2"; do
  cyrus_add_user "$be" "$CYRUS_PROXY_USER" "$PROXY_PASS"
  cyrus_add_user "$be" alice "$ALICE_PASS"
  cyrus_add_user "$be" bob "$BOB_PASS"
  for u in "${SESSION_USERS[@]}"; do cyrus_add_user "$be" "$u" "$S_PASS"; done
done

# setup_imap DESC HOST:PORT USER PASS: run the script on stdin; one assertion
# (any NO/BAD fails it), transcript shown on failure.
setup_imap() {
  local desc=$1 out
  shift
  if out=$(imap_script --check --keep-text "$@" - 2>&1); then
    pass "$desc"
  else
    fail "$desc"
    printf '%s\n' "$out" | sed 's/^/    /'
  fi
}

# account_script USER: admin commands laying out USER's mailboxes per backend.
phase "mailboxes"
{
  for u in alice "${SESSION_USERS[@]}"; do
    echo "CREATE user.$u"
    echo "CREATE user.$u.Sent"
    echo "SETQUOTA user.$u (STORAGE 102400)"
  done
} | setup_imap "be1: admin creates user.{alice,s1,s2,s3}{,.Sent} with quota" "$BE1_IP:$IMAP_PORT" "$ADMIN" "$PASS"
# A Cyrus 3.6 backend refuses to CREATE user.X.* without a local user.X
# ("Disallow creating user.X.* when no user.X" in mboxlist_create_namecheck:
# NO Permission denied, even for an admin), and XFER refuses a user's
# submailbox (cmd_xfer: "targeted a user submailbox", NO Operation is not
# supported): stock 3.6 keeps a user's folders on one backend. To build an
# account spanning two backends anyway, be2's mailboxes.db gets user.X as a
# remote entry at be1 (what a frontend stores; ctl_mboxlist -u, local only,
# nothing sent to MUPDATE); then be2's admin can CREATE user.X.Archive, which
# be2 RESERVEs and ACTIVATEs at Corvid as be2!default like any mailbox.
stub_parents() {
  timeout 20 "$CYRUS_BIN/ctl_mboxlist" -C "$BE1/imapd.conf" -d |
    python3 -c '
import json, sys
users = sys.argv[1:]
db = json.load(sys.stdin)
out = {}
for u in users:
    e = dict(db["user." + u])
    e["mbtype"] = "r"
    e["server"] = "be1"
    out["user." + u] = e
json.dump(out, sys.stdout)
' "$@" >"$WORK/be2-stubs.json"
  timeout 20 "$CYRUS_BIN/ctl_mboxlist" -C "$BE2/imapd.conf" -u <"$WORK/be2-stubs.json"
}
if out=$(stub_parents alice "${SESSION_USERS[@]}" 2>&1); then
  pass "be2: remote parent entries user.{alice,s1,s2,s3} -> be1 inserted (ctl_mboxlist -u)"
else
  fail "be2: remote parent entries user.{alice,s1,s2,s3} -> be1 inserted (ctl_mboxlist -u)"
  printf '%s\n' "$out" | sed 's/^/    /'
fi
{
  echo "CREATE user.bob"
  echo "CREATE shared.team"
  echo "SETACL shared.team $ADMIN lrswipkxtecda"
  for u in alice "${SESSION_USERS[@]}"; do
    echo "CREATE user.$u.Archive"
    echo "SETACL shared.team $u lrswipkxtecda"
  done
} | setup_imap "be2: admin creates user.bob, shared.team and user.{alice,s1,s2,s3}.Archive (accounts over two backends)" \
  "$BE2_IP:$IMAP_PORT" "$ADMIN" "$PASS"
setup_imap "be2: alice seeds shared.team" "$BE2_IP:$IMAP_PORT" alice "$ALICE_PASS" <<<"APPEND shared.team () team-1"
setup_imap "be2: bob seeds his INBOX" "$BE2_IP:$IMAP_PORT" bob "$BOB_PASS" <<<"APPEND INBOX () bob-1"
for u in alice "${SESSION_USERS[@]}"; do
  p=$S_PASS
  [[ $u == alice ]] && p=$ALICE_PASS
  printf '%s\n' 'APPEND INBOX (\Seen) inbox-1' 'APPEND INBOX () inbox-2' 'APPEND INBOX.Sent (\Seen) sent-1' |
    setup_imap "be1: $u seeds INBOX and INBOX.Sent" "$BE1_IP:$IMAP_PORT" "$u" "$p"
  setup_imap "be2: $u seeds INBOX.Archive" "$BE2_IP:$IMAP_PORT" "$u" "$p" <<<"APPEND INBOX.Archive () archive-1"
done

# ================================================================ reference frontend
FE=$WORK/fe
FE_PORT=$(free_port)
FE_SLAVE_PORT=$(free_port)
phase "Cyrus frontend on 127.0.0.1:$FE_PORT"
cyrus_frontend "$FE" fe "$FE_PORT" "$FE_SLAVE_PORT" "$MUPDATE" "$ADMIN" "$PASS" "$PROXY_PASS" "$IMAP_PORT" "${PEERS[@]}"
# Each connection execs a fresh imapd, which reads imapd.conf again.
echo "serverlist: be1 be2" >>"$FE/imapd.conf"
cyrus_add_user "$FE" alice "$ALICE_PASS"
cyrus_add_user "$FE" bob "$BOB_PASS"
for u in "${SESSION_USERS[@]}"; do cyrus_add_user "$FE" "$u" "$S_PASS"; done

# frontend_has NAME LOCATION: the frontend's mailboxes.db has NAME at LOCATION.
frontend_has() {
  cyrus_mailboxes "$FE" | grep -qxF -- "$1 $2"
}
wait_for "frontend knows user.s3.Archive" frontend_has user.s3.Archive 'be2!default' || true
out=$(cyrus_mailboxes "$FE")
for l in 'user.alice be1!default' 'user.alice.Archive be2!default' 'user.bob be2!default' \
  'shared.team be2!default' 'user.s3.Archive be2!default'; do
  assert_line "frontend's mailboxes.db (from Corvid) has $l" "$l" "$out"
done

# ================================================================ corvid-proxy
TARGETS=("cyrus=127.0.0.1:$FE_PORT")
phase "corvid-proxy"
if start_corvid_proxy "$WORK/proxy" "$PROXY_PASS" backend "be1 be2" \
  "be1=$BE1_IP:$IMAP_PORT" "be2=$BE2_IP:$IMAP_PORT"; then
  echo "corvid-proxy: IMAP on $CORVID_PROXY_IMAP, metrics on $CORVID_PROXY_METRICS"
  TARGETS+=("corvid=$CORVID_PROXY_IMAP")
elif [[ ${CORVID_PROXY_REQUIRED:-0} == 1 ]]; then
  fail "corvid-proxy starts and prints its ready line"
else
  echo "SKIP: corvid-proxy is not available; only the reference frontend is tested"
fi

# ================================================================ 1. differential session
SESSION=$HERE/proxy_session.imap
session_run() { # LABEL HOSTPORT USER -> $WORK/session-LABEL-USER.txt
  imap_script "$2" "$3" "$S_PASS" "$SESSION" >"$WORK/session-$1-$3.txt" 2>&1 || true
}
phase "1. differential session"
session_run cyrus "127.0.0.1:$FE_PORT" s1
session_run cyrus "127.0.0.1:$FE_PORT" s2
REF=$(cat "$WORK/session-cyrus-s1.txt")
printf '%s\n' "$REF" | sed 's/^/    session(cyrus, s1): /'
assert_no_line "1 cyrus: the scripted session ran to the end" "E: " "$REF"
assert_eq "1 cyrus: two runs (fresh users s1, s2) give the same normalised transcript" \
  "$REF" "$(cat "$WORK/session-cyrus-s2.txt")"
for t in "${TARGETS[@]:1}"; do
  session_run "${t%%=*}" "${t#*=}" s3
  assert_eq "1 ${t%%=*}: normalised transcript equals the reference frontend's" \
    "$REF" "$(cat "$WORK/session-${t%%=*}-s3.txt")"
done

phase "done"
