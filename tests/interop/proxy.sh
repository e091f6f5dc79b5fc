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
# 5 curl, 6 saslauthd, 8 POP3 (backends and the reference frontend run
# pop3d too; poplib and curl through each frontend against the backend).
# Whatever the reference cannot do (cross-backend MOVE in 3.6) is printed as
# "REFERENCE:" evidence, not counted as a failure; corvid-proxy must do it.
# UNIXSEP=1: the same murder with unixhierarchysep: yes on every Cyrus
# instance and [namespace] unixhierarchysep = true in corvid-proxy (clients
# see "/"; a "." in a folder name is "^" internally); each session user also
# has INBOX/v1.2 on be1. Only the differential session runs
# (proxy_session_unixsep.imap, its three runs concurrently), plus checks that
# Corvid, the frontend and be1 hold the dotted names with "^".
set -euo pipefail
UNIXSEP=${UNIXSEP:-0}
if [[ $UNIXSEP == 1 ]]; then
  export CYRUS_UNIXHIERARCHYSEP=1 PROXY_UNIXHIERARCHYSEP=1
fi
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

SERVER=corvid # the registry is always Corvid here; the frontend varies
if [[ $UNIXSEP == 1 ]]; then
  interop_init proxy-unixsep
  D=/ # what clients (and the admin) type between levels
else
  interop_init proxy
  D=.
fi
require_bin unshare mount curl mbsync cyradm saslauthd testsaslauthd sha256sum swaks
T0=$SECONDS
ADMIN=admin
PASS=interop-secret
ALICE_PASS=alice-secret
BOB_PASS=bob-secret
S_PASS=session-secret
PROXY_PASS=proxy-secret
SESSION_USERS=(s1 s2 s3)
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
phase "Corvid registry and backends be1, be2"
start_murder_backends "$WORK" "$ADMIN" "$PASS" "$PROXY_PASS"
phase "backends be1=$BE1_IP:$IMAP_PORT be2=$BE2_IP:$IMAP_PORT"
for be in "$BE1" "$BE2"; do
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
    echo "CREATE user$D$u"
    echo "CREATE user$D$u${D}Sent"
    echo "SETQUOTA user$D$u (STORAGE 102400)"
    if [[ $UNIXSEP == 1 ]]; then echo "CREATE user/$u/v1.2"; fi
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
  echo "CREATE user${D}bob"
  echo "CREATE shared${D}team"
  echo "SETACL shared${D}team $ADMIN lrswipkxtecda"
  for u in alice "${SESSION_USERS[@]}"; do
    echo "CREATE user$D$u${D}Archive"
    echo "SETACL shared${D}team $u lrswipkxtecda"
  done
} | setup_imap "be2: admin creates user.bob, shared.team and user.{alice,s1,s2,s3}.Archive (accounts over two backends)" \
  "$BE2_IP:$IMAP_PORT" "$ADMIN" "$PASS"
setup_imap "be2: alice seeds shared.team" "$BE2_IP:$IMAP_PORT" alice "$ALICE_PASS" <<<"APPEND shared${D}team () team-1"
setup_imap "be2: bob seeds his INBOX" "$BE2_IP:$IMAP_PORT" bob "$BOB_PASS" <<<"APPEND INBOX () bob-1"
for u in alice "${SESSION_USERS[@]}"; do
  p=$S_PASS
  [[ $u == alice ]] && p=$ALICE_PASS
  {
    printf '%s\n' 'APPEND INBOX (\Seen) inbox-1' 'APPEND INBOX () inbox-2' "APPEND INBOX${D}Sent (\\Seen) sent-1"
    if [[ $UNIXSEP == 1 ]]; then echo "APPEND INBOX/v1.2 () dot-1"; fi
  } | setup_imap "be1: $u seeds INBOX and INBOX.Sent" "$BE1_IP:$IMAP_PORT" "$u" "$p"
  setup_imap "be2: $u seeds INBOX.Archive" "$BE2_IP:$IMAP_PORT" "$u" "$p" <<<"APPEND INBOX${D}Archive () archive-1"
done

# ================================================================ reference frontend
FE=$WORK/fe
FE_PORT=$(free_port)
FE_SLAVE_PORT=$(free_port)
# The frontend's lmtpd listens on a UNIX socket (over TCP it would want the
# MTA to authenticate).
CYRUS_FRONTEND_LMTP_SOCKET=$WORK/fe-lmtp.sock
export CYRUS_FRONTEND_LMTP_SOCKET
phase "Cyrus frontend on 127.0.0.1:$FE_PORT"
# serverlist: where top-level CREATEs go. proxyd_disable_mailbox_referrals:
# without it the frontend answers cyradm's (an RLIST client's) CREATE with
# "NO [REFERRAL imap://;AUTH=*@be1/...]", and cyradm, even resolving be1,
# fails to follow it ("cyradm: cannot connect to be1").
cyrus_murder_frontend "$FE" fe "$FE_PORT" "$FE_SLAVE_PORT" "$MUPDATE" "$ADMIN" "$PASS" "$PROXY_PASS" "$IMAP_PORT" \
  "serverlist: be1 be2
proxyd_disable_mailbox_referrals: 1" "${PEERS[@]}"
cyrus_add_user "$FE" alice "$ALICE_PASS"
cyrus_add_user "$FE" bob "$BOB_PASS"
for u in "${SESSION_USERS[@]}"; do cyrus_add_user "$FE" "$u" "$S_PASS"; done

# frontend_has NAME LOCATION: the frontend's mailboxes.db has NAME at LOCATION.
frontend_has() {
  cyrus_mailboxes "$FE" | grep -qxF -- "$1 $2"
}
# frontend_on NAME SERVER: the frontend's mailboxes.db has NAME at SERVER!*
# (any partition, or none).
frontend_on() {
  cyrus_mailboxes "$FE" | awk -v n="$1" -v s="$2!" '$1 == n && index($2, s) == 1 { f = 1 } END { exit !f }'
}
wait_for "frontend knows user.s3.Archive" frontend_has user.s3.Archive 'be2!default' || true
out=$(cyrus_mailboxes "$FE")
for l in 'user.alice be1!default' 'user.alice.Archive be2!default' 'user.bob be2!default' \
  'shared.team be2!default' 'user.s3.Archive be2!default'; do
  assert_line "frontend's mailboxes.db (from Corvid) has $l" "$l" "$out"
done

# ================================================================ 6. saslauthd (private)
if [[ $UNIXSEP != 1 ]]; then
  phase "6. saslauthd (rimap to be1) for corvid-proxy's check = \"saslauthd\""
  start_saslauthd "$WORK/saslauthd" "$BE1_IP/$IMAP_PORT"
  out=$(timeout 20 testsaslauthd -f "$SASLAUTHD_SOCKET" -u alice -p "$ALICE_PASS" 2>&1 || true)
  assert_match "6 saslauthd (private socket, rimap to be1) accepts alice's password" '^0: OK' "$out"
  out=$(timeout 20 testsaslauthd -f "$SASLAUTHD_SOCKET" -u alice -p wrong-password 2>&1 || true)
  assert_match "6 saslauthd refuses a wrong password" '^0: NO' "$out"
fi

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
if [[ $UNIXSEP == 1 ]]; then SESSION=$HERE/proxy_session_unixsep.imap; fi
session_run() { # LABEL HOSTPORT USER -> $WORK/session-LABEL-USER.txt
  imap_script "$2" "$3" "$S_PASS" "$SESSION" >"$WORK/session-$1-$3.txt" 2>&1 || true
}
if [[ $UNIXSEP == 1 ]]; then
  phase "1. differential session (unixhierarchysep, concurrent runs)"
else
  phase "1. differential session"
fi
if [[ $UNIXSEP == 1 ]]; then
  # Separate users and mailboxes: the runs are independent, and running them
  # at once overlaps their waits for the frontend's MUPDATE slave.
  pids=()
  session_run cyrus "127.0.0.1:$FE_PORT" s1 &
  pids+=("$!")
  session_run cyrus "127.0.0.1:$FE_PORT" s2 &
  pids+=("$!")
  for t in "${TARGETS[@]:1}"; do
    session_run "${t%%=*}" "${t#*=}" s3 &
    pids+=("$!")
  done
  wait "${pids[@]}"
else
  session_run cyrus "127.0.0.1:$FE_PORT" s1
  session_run cyrus "127.0.0.1:$FE_PORT" s2
fi
REF=$(cat "$WORK/session-cyrus-s1.txt")
printf '%s\n' "$REF" | sed 's/^/    session(cyrus, s1): /'
assert_no_line "1 cyrus: the scripted session ran to the end" "E: " "$REF"
assert_eq "1 cyrus: two runs (fresh users s1, s2) give the same normalised transcript" \
  "$REF" "$(cat "$WORK/session-cyrus-s2.txt")"
for t in "${TARGETS[@]:1}"; do
  if [[ $UNIXSEP != 1 ]]; then session_run "${t%%=*}" "${t#*=}" s3; fi
  assert_eq "1 ${t%%=*}: normalised transcript equals the reference frontend's" \
    "$REF" "$(cat "$WORK/session-${t%%=*}-s3.txt")"
done

# ================================================================ UNIXSEP: internal names
# registry_find NAME...: Corvid's decoded answers to "Fi FIND NAME" (i = 1..).
registry_find() {
  local i=0 n cmds=()
  for n in "$@"; do
    i=$((i + 1))
    cmds+=("F$i FIND \"$n\"")
  done
  printf '%s\n' "${cmds[@]}" | mupdatetest_run "$MUPDATE" "$ADMIN" "$PASS" | mupdate_answers || true
}
if [[ $UNIXSEP == 1 ]]; then
  phase "unixhierarchysep: internal names in Corvid, the frontend and be1"
  # s1 ran against the Cyrus frontend, s3 against corvid-proxy (when there):
  # both sessions leave INBOX/r2.0 (renamed from INBOX/r1.0) and delete
  # INBOX/d.1; INBOX/v1.2 was created on be1 by the admin.
  users=(s1)
  if [[ ${#TARGETS[@]} -gt 1 ]]; then users+=(s3); fi
  for u in "${users[@]}"; do
    wait_for "frontend knows user.$u.r2^0" frontend_on "user.$u.r2^0" be1 || true
    out=$(registry_find "user.$u.v1^2" "user.$u.v1.2" "user.$u.r2^0" "user.$u.r1^0" "user.$u.d^1" "user.$u.r2.0")
    printf '%s\n' "$out" | sed "s/^/    corvid FIND ($u): /"
    assert_match "unixsep $u: Corvid holds INBOX/v1.2 as user.$u.v1^2 at be1" \
      "^F1 MAILBOX \"user\\.$u\\.v1\\^2\" \"be1!default\"" "$out"
    assert_answers "unixsep $u: Corvid has no user.$u.v1.2 (a '.' is never a level separator inside a name)" \
      F2 "F2 OK \"Search completed\"" "$out"
    # A Cyrus 3.6 backend ACTIVATEs a renamed mailbox at "be1!" (no
    # partition), whichever frontend sent the RENAME: either is accepted.
    assert_match "unixsep $u: Corvid holds INBOX/r2.0 (CREATE INBOX/r1.0 + RENAME) as user.$u.r2^0 at be1" \
      "^F3 MAILBOX \"user\\.$u\\.r2\\^0\" \"be1!(default)?\"" "$out"
    if grep -q '^F3 MAILBOX [^ ]* "be1!" ' <<<"$out"; then
      reference "unixsep $u" "be1 ACTIVATEd the renamed user.$u.r2^0 at \"be1!\" (empty partition; be1's own mailboxes.db says !default)"
    fi
    assert_answers "unixsep $u: Corvid no longer has user.$u.r1^0 (renamed away)" \
      F4 "F4 OK \"Search completed\"" "$out"
    assert_answers "unixsep $u: Corvid no longer has user.$u.d^1 (INBOX/d.1 deleted)" \
      F5 "F5 OK \"Search completed\"" "$out"
    assert_answers "unixsep $u: Corvid has no user.$u.r2.0" \
      F6 "F6 OK \"Search completed\"" "$out"
  done
  out=$(cyrus_mailboxes "$FE")
  for l in 'user.s1.v1^2 be1!default' 'user.s3.v1^2 be1!default' 'user.s3.Archive be2!default'; do
    assert_line "unixsep: the frontend's mailboxes.db (from Corvid) has $l" "$l" "$out"
  done
  out=$(cyrus_mailboxes "$BE1")
  for u in "${users[@]}"; do
    assert_line "unixsep: be1's mailboxes.db has user.$u.v1^2 (local)" "user.$u.v1^2 !default" "$out"
    assert_line "unixsep: be1's mailboxes.db has user.$u.r2^0 (local)" "user.$u.r2^0 !default" "$out"
  done
  phase "done"
  exit 0
fi

# ================================================================ 8. POP3
# Python's poplib logs in as alice (INBOX on be1) and bob (INBOX on be2)
# through each frontend; what it sees (STAT, LIST, UIDL, RETR 1, TOP 1 0)
# must equal what it sees directly on the backend's pop3d. Run before
# scenario 4, which moves bob.
POP3_TARGETS=("cyrus=127.0.0.1:$CYRUS_FE_POP3_PORT")
if [[ ${#TARGETS[@]} -gt 1 ]]; then POP3_TARGETS+=("corvid=$CORVID_PROXY_POP3"); fi
phase "8. POP3 (poplib, curl pop3://) through ${POP3_TARGETS[*]}"
for hp in "$BE1_IP:$CYRUS_POP3_PORT" "$BE2_IP:$CYRUS_POP3_PORT" "127.0.0.1:$CYRUS_FE_POP3_PORT"; do
  wait_for "pop3d greets on $hp" python3 "$HERE/pop3_scenarios.py" greeting "$hp" || true
done
pop3() { timeout 60 python3 "$HERE/pop3_scenarios.py" "$@" 2>&1 || true; }
for who in "alice:$ALICE_PASS:be1:$BE1_IP" "bob:$BOB_PASS:be2:$BE2_IP"; do
  IFS=: read -r u p be ip <<<"$who"
  direct=$(pop3 summary "$ip:$CYRUS_POP3_PORT" "$u" "$p")
  printf '%s\n' "$direct" | sed "s/^/    pop3(direct $be, $u): /"
  assert_match "8 direct: $u's maildrop on $be's pop3d has messages (poplib)" '^STAT [1-9]' "$direct"
  direct_pipe=$(pop3 pipelined "$ip:$CYRUS_POP3_PORT" "$u" "$p")
  for t in "${POP3_TARGETS[@]}"; do
    label=${t%%=*}
    hp=${t#*=}
    assert_eq "8 $label: poplib USER/PASS as $u: STAT, LIST, UIDL, RETR 1, TOP equal $be's pop3d directly" \
      "$direct" "$(pop3 summary "$hp" "$u" "$p" user)"
    assert_eq "8 $label: poplib AUTH PLAIN as $u: the same" "$direct" "$(pop3 summary "$hp" "$u" "$p" plain)"
    assert_eq "8 $label: USER, PASS, STAT, LIST 1, QUIT pipelined in one write as $u: the same answers as $be directly" \
      "$direct_pipe" "$(pop3 pipelined "$hp" "$u" "$p")"
  done
done
# Two sessions at once: Cyrus pop3d locks the maildrop; a frontend must
# relay the backend's refusal ([IN-USE]) rather than hide it.
direct=$(pop3 inuse "$BE1_IP:$CYRUS_POP3_PORT" alice "$ALICE_PASS")
printf '%s\n' "$direct" | sed "s/^/    pop3(direct be1, alice, two sessions): /"
for t in "${POP3_TARGETS[@]}"; do
  assert_eq "8 ${t%%=*}: two POP3 sessions at once as alice: both answers equal be1's directly" \
    "$direct" "$(pop3 inuse "${t#*=}" alice "$ALICE_PASS")"
done
want=$(timeout 30 curl -s --max-time 20 "pop3://alice:$ALICE_PASS@$BE1_IP:$CYRUS_POP3_PORT/1" | sha256sum)
for t in "${POP3_TARGETS[@]}"; do
  label=${t%%=*}
  hp=${t#*=}
  got=$(timeout 30 curl -s --max-time 20 "pop3://alice:$ALICE_PASS@$hp/1" | sha256sum)
  assert_eq "8 $label: curl pop3://alice@.../1 returns what be1's pop3d returns, byte for byte" "$want" "$got"
  out=$(pop3 refused "$hp" alice wrong-password)
  assert_match "8 $label: a wrong password is refused (-ERR)" '^REFUSED -ERR' "$out"
  if [[ $label == corvid ]]; then
    assert_match "8 corvid: ... with the [AUTH] response code" '^REFUSED -ERR \[AUTH\]' "$out"
    out=$(pop3 refused "$hp" nobody-here "$ALICE_PASS")
    assert_match "8 corvid: an unknown user is refused with [AUTH] too" '^REFUSED -ERR \[AUTH\]' "$out"
    out=$(timeout 20 curl -s --max-time 10 "http://$CORVID_PROXY_METRICS/metrics" || true)
    assert_match "8 corvid: metrics count POP3 logins (corvid_proxy_logins_total{protocol=pop3,result=ok})" \
      '^corvid_proxy_logins_total\{.*protocol="pop3".*\} [1-9]' "$(grep 'result="ok"' <<<"$out" || true)"
    assert_match "8 corvid: metrics show POP3 sessions (corvid_proxy_sessions_open{protocol=pop3})" \
      '^corvid_proxy_sessions_open\{protocol="pop3"\} ' "$out"
  fi
done

# ================================================================ 2-5 per target
# Checks that a real Cyrus 3.6 frontend is known to fail (evidence for the
# docs; corvid-proxy must pass them): a cross-backend MOVE degrades to COPY
# (cyrus-imapd #51, #6079). Subscriptions live on the INBOX backend, which
# keeps one for a folder it does not hold only with allowallsubscribe: yes
# (cyrus_murder_backend sets it), so both frontends must pass those checks.
CYRUS_DEFECTS=" move-absent-from-src "

# checks LABEL SCENARIO OUTPUT: CHECK/OBSERVE lines of imap_scenarios.py to
# assertions (a known Cyrus defect on the reference: evidence instead).
checks() {
  local label=$1 scen=$2 out=$3 tag name res detail
  while read -r tag name res detail; do
    case "$tag" in
      CHECK)
        if [[ $res == ok ]]; then
          pass "$scen $label: $name${detail:+ ($detail)}"
        elif [[ $label == cyrus && $CYRUS_DEFECTS == *" $name "* ]]; then
          reference "$scen $label" "$name fails, as known for Cyrus 3.6: $detail"
        else
          fail "$scen $label: $name: $detail"
        fi
        ;;
      OBSERVE) echo "    observed ($scen $label) $name $res $detail" ;;
      E:) fail "$scen $label: $name $res $detail" ;;
    esac
  done <<<"$out"
}

# scenario2 LABEL HOSTPORT: big APPEND, cross-backend COPY/MOVE, SUBSCRIBE.
scenario2() {
  local label=$1 hp=$2 out
  out=$(timeout 120 python3 "$HERE/imap_scenarios.py" big "$hp" alice "$ALICE_PASS" INBOX.Archive 5 2>&1 || true)
  checks "$label" 2 "$out"
  out=$(timeout 120 python3 "$HERE/imap_scenarios.py" crossmove "$hp" alice "$ALICE_PASS" INBOX INBOX.Archive 2>&1 || true)
  checks "$label" 2 "$out"
}

# scenario3 LABEL HOSTPORT: mbsync a multi-folder account both ways. mbsync
# takes the personal namespace ("INBOX.") as its path, so the personal
# folders are INBOX, Sent and Archive; shared.team needs a second store with
# Path "shared." (two channels, one group).
scenario3() {
  local label=$1 hp=$2 dir=$WORK/mbsync-$1 out rc subject f n_remote n_local box
  mkdir -p "$dir/mail/shared"
  cat >"$dir/mbsyncrc" <<EOC
IMAPAccount acct
Host ${hp%:*}
Port ${hp##*:}
User alice
Pass $ALICE_PASS
SSLType None
AuthMechs LOGIN
Timeout 20

IMAPStore remote
Account acct

IMAPStore remote-shared
Account acct
Path shared.

MaildirStore local
Path $dir/mail/
Inbox $dir/mail/INBOX
SubFolders Verbatim

MaildirStore local-shared
Path $dir/mail/shared/
SubFolders Verbatim

Channel personal
Far :remote:
Near :local:
Patterns INBOX Sent Archive
Create Near
Sync All
Expunge None
SyncState *

Channel shared
Far :remote-shared:
Near :local-shared:
Patterns team
Create Near
Sync All
Expunge None
SyncState *

Group all
Channel personal
Channel shared
EOC
  rc=0
  out=$(cd "$dir" && timeout 60 mbsync -c "$dir/mbsyncrc" all 2>&1) || rc=$?
  printf '%s\n' "$out" | tail -n 5 | sed "s/^/    mbsync($label, pull): /"
  assert_eq "3 $label: mbsync pulls INBOX, INBOX.Sent, INBOX.Archive, shared.team (exit 0)" 0 "$rc"
  for box in INBOX:INBOX INBOX.Sent:Sent INBOX.Archive:Archive shared.team:shared/team; do
    n_remote=$(timeout 30 python3 "$HERE/imap_scenarios.py" count "$hp" alice "$ALICE_PASS" "${box%%:*}" 2>&1 || true)
    f=$dir/mail/${box#*:}
    n_local=$( (find "$f/cur" "$f/new" -maxdepth 1 -type f 2>/dev/null || true) | wc -l)
    assert_eq "3 $label: local Maildir ${box#*:} holds as many messages as ${box%%:*} on the server" "$n_remote" "$n_local"
  done
  subject="mbsync-push-$label-$RANDOM"
  f=$dir/mail/Archive
  mkdir -p "$f/new"
  printf 'Date: Mon, 01 Jan 2024 12:00:00 +0000\nFrom: local@example.org\nSubject: %s\nMessage-ID: <%s@local>\n\npushed by mbsync\n' \
    "$subject" "$subject" >"$f/new/$(date +%s).$$.local"
  rc=0
  out=$(cd "$dir" && timeout 60 mbsync -c "$dir/mbsyncrc" all 2>&1) || rc=$?
  printf '%s\n' "$out" | tail -n 5 | sed "s/^/    mbsync($label, push): /"
  assert_eq "3 $label: mbsync pushes a new local Archive message (exit 0)" 0 "$rc"
  out=$(timeout 30 python3 "$HERE/imap_scenarios.py" count "$BE2_IP:$IMAP_PORT" alice "$ALICE_PASS" INBOX.Archive "$subject" 2>&1 || true)
  assert_eq "3 $label: the pushed message is in user.alice.Archive on be2 (checked on be2 directly)" 1 "$out"
}

# cyradm_run HOSTPORT CMD...: cyradm as the admin (commands on stdin). It runs
# in the frontend's mount namespace (its /etc/hosts): a Cyrus frontend
# advertises MAILBOX-REFERRALS and answers an admin's CREATE with a referral
# to the backend (be1/be2), which cyradm follows by name and the imap port.
cyradm_run() {
  local hp=$1
  shift
  printf '%s\n' "$@" | timeout 90 unshare --mount --propagation private -- \
    sh -c 'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/services && shift 2 && exec "$@"' \
    cyradm-namespace "$FE/hosts" "$FE/services" \
    cyradm --user "$ADMIN" -w "$PASS" --auth PLAIN --notls --port "${hp##*:}" "${hp%:*}" 2>&1
}

# mailbox_location NAME: NAME's location in the reference frontend's
# mailboxes.db (from Corvid), e.g. be2!default.
mailbox_location() {
  cyrus_mailboxes "$FE" | awk -v n="$1" '$1 == n { print $2 }'
}

# location_is NAME LOCATION: NAME is at LOCATION (any, when LOCATION is empty).
location_is() {
  local at
  at=$(mailbox_location "$1")
  [[ -n $at && ( -z $2 || $at == "$2" ) ]]
}

# reference_or_fail LABEL DESC: for the reference, evidence; else a failure.
reference_or_fail() {
  if [[ $1 == cyrus ]]; then reference "$2" "fails on the reference frontend"; else fail "$2"; fi
}

# scenario4 LABEL HOSTPORT: cyradm create/rename/setacl/delete, then move
# user.bob to the other backend (XFER at a Cyrus frontend).
scenario4() {
  local label=$1 hp=$2 out m=user.alice.cyradm-$1 top=shared.cyradm-$1 from to be
  out=$(cyradm_run "$hp" "cm $m" "renm $m $m-renamed" "sam $m-renamed bob lr" "lam $m-renamed" \
    "sam $m-renamed $ADMIN x" "dm $m-renamed" "lm user.alice.cyradm*" "cm $top" "lm shared.*")
  printf '%s\n' "$out" | sed "s/^/    cyradm($label): /"
  assert_no_line "4 $label: cyradm create/rename/setacl/delete report no error" "mailbox:" "$out"
  assert_no_line "4 $label: cyradm follows no referral it cannot resolve" "imclient_connect" "$out"
  assert_match "4 $label: cyradm lam shows the ACL it set on the renamed mailbox" '^bob lr$' "$out"
  assert_no_line "4 $label: the deleted mailbox is gone from lm" "user.alice.cyradm-$label" \
    "$(grep -v '^127\.0\.0\.1> ' <<<"$out" | grep -v "^localhost> " || true)"
  wait_for "$top in the frontend's mailboxes.db" location_is "$top" '' || true
  assert_match "4 $label: cyradm cm $top (top level) lands on be1 or be2" '^be[12]!default$' "$(mailbox_location "$top")"
  # --- the cross-backend move: RENAME user.bob user.bob <other>!default
  from=$(mailbox_location user.bob)
  from=${from%%!*}
  if [[ $from == be2 ]]; then to=be1; else to=be2; fi
  out=$(cyradm_run "$hp" "renm user.bob user.bob $to!default" "lm user.bob*")
  printf '%s\n' "$out" | sed "s/^/    cyradm($label, xfer $from -> $to): /"
  # Evidence: the XFER the source backend got, and the replication session
  # (SYNCAPPLY ..., MUPDATEPUSH) it opened to the destination as the proxy user.
  for be in "$BE1" "$BE2"; do
    grep -a -h -A2 ' XFER ' "$be"/conf/log/"$ADMIN"/* 2>/dev/null | tail -n 3 | cut -c1-160 |
      sed "s/^/    $(basename "$be") telemetry ($ADMIN): /" || true
    grep -a -h -E '<(S[0-9]+|MP[0-9]+) ' "$be"/conf/log/"$CYRUS_PROXY_USER"/* 2>/dev/null | tail -n 12 | cut -c1-120 |
      sed "s/^/    $(basename "$be") telemetry ($CYRUS_PROXY_USER): /" || true
  done
  # Seen on the reference (not every run): the destination refuses the
  # replicated mailbox ("S3 NO IMAP_MAILBOX_MOVED Mailbox exists with another
  # name or uniqueid"), the source answers "* NO USER bob (Mailbox has been
  # moved to another server)" and then a tagged OK: the client sees success,
  # nothing moved.
  if grep -a -h -q '^>[0-9]*>\* NO USER bob' "$BE1"/conf/log/"$ADMIN"/* "$BE2"/conf/log/"$ADMIN"/* 2>/dev/null; then
    echo "    XFER of user.bob: the source backend said '* NO USER bob' (then a tagged OK)"
  fi
  if [[ $out != *"mailbox:"* ]] && wait_for "user.bob at $to!default" location_is user.bob "$to!default"; then
    pass "4 $label: RENAME user.bob user.bob $to!default moves bob from $from to $to (location in MUPDATE)"
  else
    reference_or_fail "$label" "4 $label: RENAME user.bob user.bob $to!default moves bob from $from to $to (location in MUPDATE)"
  fi
  out=$(timeout 30 python3 "$HERE/imap_scenarios.py" count "$([[ $to == be1 ]] && echo "$BE1_IP" || echo "$BE2_IP"):$IMAP_PORT" bob "$BOB_PASS" INBOX bob-1 2>&1 || true)
  if [[ $out == 1 ]]; then
    pass "4 $label: bob's message is in his INBOX on $to afterwards (checked on $to directly)"
  else
    reference_or_fail "$label" "4 $label: bob's message is in his INBOX on $to afterwards (got: $out)"
  fi
  out=$(cyrus_mailboxes "$([[ $from == be1 ]] && echo "$BE1" || echo "$BE2")")
  if ! grep -q '^user\.bob ' <<<"$out"; then
    pass "4 $label: user.bob is gone from $from's mailboxes.db"
  else
    reference_or_fail "$label" "4 $label: user.bob is gone from $from's mailboxes.db"
  fi
}

# scenario5 LABEL HOSTPORT: curl fetches INBOX;UID=1; wrong password refused.
scenario5() {
  local label=$1 hp=$2 want got
  want=$(python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import imap_session; sys.stdout.buffer.write(imap_session.message("inbox-1"))' "$HERE" | sha256sum)
  got=$(timeout 30 curl -s --max-time 20 "imap://alice:$ALICE_PASS@$hp/INBOX;UID=1" | sha256sum)
  assert_eq "5 $label: curl imap://alice@.../INBOX;UID=1 returns alice's first message byte for byte" "$want" "$got"
  got=$(printf '%s\n' "NOOP" | imap_script "$hp" alice wrong-password - 2>&1 || true)
  assert_match "5 $label: LOGIN with a wrong password is refused (tagged NO)" '^S: c1 NO' "$got"
}

for t in "${TARGETS[@]}"; do
  label=${t%%=*}
  hp=${t#*=}
  phase "2. big message and cross-backend COPY/MOVE ($label)"
  scenario2 "$label" "$hp"
  phase "3. mbsync ($label)"
  scenario3 "$label" "$hp"
  phase "4. cyradm and XFER ($label)"
  scenario4 "$label" "$hp"
  phase "5. curl ($label)"
  scenario5 "$label" "$hp"
done

# ================================================================ 6. corvid-proxy with check = "saslauthd"
if [[ ${#TARGETS[@]} -gt 1 ]]; then
  phase "6. corvid-proxy with [login] check = \"saslauthd\""
  main_proxy=$CORVID_PROXY_IMAP
  main_proxy_pop3=$CORVID_PROXY_POP3
  if start_corvid_proxy "$WORK/proxy-sasl" "$PROXY_PASS" saslauthd "be1 be2" \
    "be1=$BE1_IP:$IMAP_PORT" "be2=$BE2_IP:$IMAP_PORT"; then
    out=$(printf '%s\n' "SELECT INBOX" | imap_script "$CORVID_PROXY_IMAP" alice "$ALICE_PASS" - 2>&1 || true)
    assert_match "6 corvid(saslauthd): alice logs in (password checked by saslauthd)" '^S: c1 OK' "$out"
    assert_match "6 corvid(saslauthd): ... and SELECTs her INBOX on be1" '^S: c2 OK \[READ-WRITE\]' "$out"
    out=$(printf '%s\n' "NOOP" | imap_script "$CORVID_PROXY_IMAP" alice wrong-password - 2>&1 || true)
    assert_match "6 corvid(saslauthd): a wrong password is refused" '^S: c1 NO' "$out"
  else
    fail "6 corvid-proxy starts with [login] check = \"saslauthd\""
  fi
  SASL_PROXY_POP3=$CORVID_PROXY_POP3
  CORVID_PROXY_IMAP=$main_proxy
  CORVID_PROXY_POP3=$main_proxy_pop3
fi

# ================================================================ 9. LMTP
# lmtp_send LABEL TARGET SUBJECT SIZE_KB RCPT...: one LMTP transaction; its
# RESULT/CLASSES lines, indented, and the CLASSES in $LMTP_CLASSES.
lmtp_send() {
  local label=$1 out
  shift
  out=$(timeout 180 python3 "$HERE/lmtp_scenarios.py" send "$@" 2>&1 || true)
  printf '%s\n' "$out" | sed "s/^/    lmtp($label): /"
  LMTP_CLASSES=$(sed -n 's/^CLASSES //p' <<<"$out")
}

# count_on BACKEND_IP USER PASS SUBJECT: messages in USER's INBOX with SUBJECT.
count_on() {
  timeout 30 python3 "$HERE/imap_scenarios.py" count "$1:$IMAP_PORT" "$2" "$3" INBOX "$4" 2>&1 || true
}

if [[ $UNIXSEP != 1 ]]; then
  D_A=alice@example.org
  D_B=bob@example.org
  D_X=nosuch@example.org
  for t in "cyrus=unix:$CYRUS_FRONTEND_LMTP_SOCKET" ${CORVID_PROXY_LMTP:+"corvid=$CORVID_PROXY_LMTP"}; do
    label=${t%%=*}
    phase "9. LMTP ($label)"
    # Two backends and an unknown user in one transaction: per-recipient
    # answers, the same classes from both frontends.
    lmtp_send "$label" "${t#*=}" "lmtp-mixed-$label" 4 "$D_A" "$D_B" "$D_X"
    assert_eq "9 $label: alice (be1), bob (be2), nosuch: per-recipient classes" "2 2 5" "$LMTP_CLASSES"
    assert_eq "9 $label: the message is in alice's INBOX on be1 (checked on be1)" 1 \
      "$(count_on "$BE1_IP" alice "$ALICE_PASS" "lmtp-mixed-$label")"
    assert_eq "9 $label: the message is in bob's INBOX on be2 (checked on be2)" 1 \
      "$(count_on "$BE2_IP" bob "$BOB_PASS" "lmtp-mixed-$label")"
  done
  if [[ -n ${CORVID_PROXY_LMTP:-} ]]; then
    # A real client: swaks, two recipients on two backends, over TCP.
    out=$(timeout 60 swaks --silent 1 --protocol LMTP --server "${CORVID_PROXY_LMTP%:*}" \
      --port "${CORVID_PROXY_LMTP##*:}" --from interop@example.org --to "$D_A,$D_B" \
      --header "Subject: lmtp-swaks" 2>&1)
    rc=$?
    assert_eq "9 corvid: swaks delivers to alice and bob over LMTP (exit status)" 0 "$rc"
    assert_eq "9 corvid: swaks's message reached alice on be1" 1 "$(count_on "$BE1_IP" alice "$ALICE_PASS" lmtp-swaks)"
    assert_eq "9 corvid: swaks's message reached bob on be2" 1 "$(count_on "$BE2_IP" bob "$BOB_PASS" lmtp-swaks)"
    # 20 MB through the UNIX socket (Postfix's lmtp:unix:), spooled to a file.
    lmtp_send corvid "unix:$CORVID_PROXY_LMTP_SOCKET" lmtp-big 20480 "$D_A"
    assert_eq "9 corvid: a 20 MB message over the UNIX socket is accepted" 2 "$LMTP_CLASSES"
    assert_eq "9 corvid: ... and is in alice's INBOX on be1" 1 "$(count_on "$BE1_IP" alice "$ALICE_PASS" lmtp-big)"
    # Debian's Postfix delivering through lmtp:unix: (virtual_transport), its
    # lmtp client running as user postfix.
    if start_postfix "$WORK/postfix" example.org "$CORVID_PROXY_LMTP_SOCKET"; then
      out=$(timeout 60 swaks --silent 1 --server 127.0.0.1 --port "$POSTFIX_SMTP_PORT" \
        --from interop@example.org --to "$D_A,$D_B" --header "Subject: lmtp-postfix" 2>&1)
      rc=$?
      assert_eq "9 corvid: Postfix takes a message for alice and bob by SMTP (swaks exit status)" 0 "$rc"
      postfix_sent_both() { [[ $(grep -c 'relay=.*lmtp.sock.*status=sent' "$WORK/postfix/maillog") -ge 2 ]]; }
      wait_for "Postfix's two LMTP deliveries through corvid-proxy" postfix_sent_both || true
      assert_eq "9 corvid: Postfix's lmtp:unix: deliveries through the proxy report status=sent" 2 \
        "$(grep -c 'relay=.*lmtp.sock.*status=sent' "$WORK/postfix/maillog")"
      assert_eq "9 corvid: ... Postfix's message is in alice's INBOX on be1" 1 "$(count_on "$BE1_IP" alice "$ALICE_PASS" lmtp-postfix)"
      assert_eq "9 corvid: ... and in bob's INBOX on be2" 1 "$(count_on "$BE2_IP" bob "$BOB_PASS" lmtp-postfix)"
    else
      fail "9 corvid: a private Postfix starts"
    fi
  fi
fi

# ================================================================ 7. outages (corvid-proxy only)
# The registry stops (every master of this one-node cluster): the proxy's
# replica keeps answering; then be2 stops: only the session that had a be2
# mailbox selected ends.
if [[ ${#TARGETS[@]} -gt 1 ]]; then
  phase "7. every master stopped, then a backend stopped (corvid)"
  corvid_cluster_stop
  out=$(timeout 120 python3 "$HERE/imap_scenarios.py" mastersdown "$CORVID_PROXY_IMAP" alice "$ALICE_PASS" 2>&1 || true)
  checks corvid 7 "$out"
  lmtp_send corvid "$CORVID_PROXY_LMTP" lmtp-outage 4 alice@example.org bob@example.org
  assert_eq "7 corvid: with every master stopped, LMTP delivers to users on both backends" "2 2" "$LMTP_CLASSES"
  assert_eq "7 corvid: ... the message is in bob's INBOX on be2" 1 "$(count_on "$BE2_IP" bob "$BOB_PASS" lmtp-outage)"
  # POP3 needs only the replica's INBOX location: it goes on too.
  assert_eq "7 corvid: with every master stopped, poplib as alice through corvid-proxy sees what be1's pop3d shows" \
    "$(pop3 summary "$BE1_IP:$CYRUS_POP3_PORT" alice "$ALICE_PASS")" "$(pop3 summary "$CORVID_PROXY_POP3" alice "$ALICE_PASS")"
  # The masters come back: a change made there reaches the proxy's replica
  # without restarting the proxy.
  corvid_cluster_restart
  setup_imap "be1: admin creates user.alice.after-outage (MUPDATE to the restarted masters)" \
    "$BE1_IP:$IMAP_PORT" "$ADMIN" "$PASS" <<<"CREATE user.alice.after-outage"
  proxy_lists() {
    printf '%s\n' 'LIST "" "INBOX.after-outage"' | imap_script "$CORVID_PROXY_IMAP" alice "$ALICE_PASS" - 2>&1 |
      grep -q 'INBOX.after-outage'
  }
  if wait_for "corvid-proxy lists INBOX.after-outage" proxy_lists; then
    pass "7 corvid: after the masters return, a mailbox created then is listed through the proxy (no restart)"
  else
    fail "7 corvid: after the masters return, a mailbox created then is listed through the proxy (no restart)"
  fi
  out=$(timeout 120 python3 "$HERE/imap_scenarios.py" backendloss "$CORVID_PROXY_IMAP" alice "$ALICE_PASS" \
    INBOX INBOX.Archive -- kill -KILL -- "-$BE2_PGID" 2>&1 || true)
  checks corvid 7 "$out"
  lmtp_send corvid "$CORVID_PROXY_LMTP" lmtp-be2-down 4 alice@example.org bob@example.org
  assert_eq "7 corvid: with be2 stopped, alice (be1) gets 2xx and bob (be2) 4xx" "2 4" "$LMTP_CLASSES"
  # be2 is down now. The saslauthd-checked proxy (passwords checked on be1)
  # accepts bob's password; if his INBOX is on be2 (where scenario 4 left
  # it), his POP3 login must end in [SYS/TEMP], not [AUTH].
  if [[ $(mailbox_location user.bob) == be2!* && -n ${SASL_PROXY_POP3:-} ]]; then
    out=$(pop3 refused "$SASL_PROXY_POP3" bob "$BOB_PASS")
    assert_match "7 corvid: bob's INBOX backend (be2) is down: POP3 login answers -ERR [SYS/TEMP]" '^REFUSED -ERR \[SYS/TEMP\]' "$out"
  else
    echo "    (7: user.bob is not on be2 now; the POP3 backend-down check is skipped)"
  fi
fi

phase "done"
