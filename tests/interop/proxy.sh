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
wait_for "frontend knows user.s3.Archive" frontend_has user.s3.Archive 'be2!default' || true
out=$(cyrus_mailboxes "$FE")
for l in 'user.alice be1!default' 'user.alice.Archive be2!default' 'user.bob be2!default' \
  'shared.team be2!default' 'user.s3.Archive be2!default'; do
  assert_line "frontend's mailboxes.db (from Corvid) has $l" "$l" "$out"
done

# ================================================================ 6. saslauthd (private)
phase "6. saslauthd (rimap to be1) for corvid-proxy's check = \"saslauthd\""
start_saslauthd "$WORK/saslauthd" "$BE1_IP/$IMAP_PORT"
out=$(timeout 20 testsaslauthd -f "$SASLAUTHD_SOCKET" -u alice -p "$ALICE_PASS" 2>&1 || true)
assert_match "6 saslauthd (private socket, rimap to be1) accepts alice's password" '^0: OK' "$out"
out=$(timeout 20 testsaslauthd -f "$SASLAUTHD_SOCKET" -u alice -p wrong-password 2>&1 || true)
assert_match "6 saslauthd refuses a wrong password" '^0: NO' "$out"

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
  CORVID_PROXY_IMAP=$main_proxy
fi

# ================================================================ 7. outages (corvid-proxy only)
# The registry stops (every master of this one-node cluster): the proxy's
# replica keeps answering; then be2 stops: only the session that had a be2
# mailbox selected ends.
if [[ ${#TARGETS[@]} -gt 1 ]]; then
  phase "7. every master stopped, then a backend stopped (corvid)"
  kill -KILL -- "-$CORVID_PGID" 2>/dev/null || kill -KILL "$CORVID_PGID"
  wait_for "the registry is down" sh -c "! kill -0 $CORVID_PGID 2>/dev/null" || true
  out=$(timeout 120 python3 "$HERE/imap_scenarios.py" mastersdown "$CORVID_PROXY_IMAP" alice "$ALICE_PASS" 2>&1 || true)
  checks corvid 7 "$out"
  out=$(timeout 120 python3 "$HERE/imap_scenarios.py" backendloss "$CORVID_PROXY_IMAP" alice "$ALICE_PASS" \
    INBOX INBOX.Archive -- kill -KILL -- "-$BE2_PGID" 2>&1 || true)
  checks corvid 7 "$out"
fi

phase "done"
