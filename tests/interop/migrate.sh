#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Interop (e): migrating a live Cyrus 3.6 murder onto Corvid, following
# docs/src/migration.md end to end.
#  0. A real Cyrus `mupdate -m` master with two real backends be1 (127.0.0.2)
#     and be2 (127.0.0.3), holding mailboxes, and a real Cyrus frontend fe
#     following it; a three-node Corvid cluster.
#  1. dump/load/import: import reports created/unchanged/conflicting and is
#     idempotent; a Cyrus-format dump of Corvid reads as the master's own
#     `ctl_mboxlist -d`; a conflicting load changes nothing.
#  2. The shadow (`corvidctl migrate shadow`) follows the Cyrus master while
#     mailboxes are created and deleted; Corvid's list equals Cyrus's. The
#     registry's leader is SIGKILLed: the shadow goes on through the others.
#  3. The Cyrus frontend is repointed to Corvid (its slave resyncs from it).
#     It and corvid-proxy deliver by LMTP and a creation loop runs on both
#     backends while be1 and then be2 are cut over
#     (mupdate_server repointed to Corvid, backend restarted with
#     ctl_mboxlist -m in START).
#     Between the cut-overs a name written directly on Corvid (by be1) is
#     created on be2 through Cyrus: the shadow must not override it.
#  4. `migrate finish`; `check` finds the registry equal to what each backend
#     holds; a stray registry entry is found and repaired by `check --fix`.
#  5. No delivery or creation failed outside its backend's cut-over window;
#     the windows and the longest time between two successes per target
#     are measured and printed.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

SERVER=corvid
interop_init migrate
require_bin unshare mount curl
T0=$SECONDS
ADMIN="admin"
PASS=interop-secret
PROXY_PASS=proxy-secret
HERE=$INTEROP_DIR
CTL=$CORVID_BIN_DIR/corvidctl

phase() {
  echo "--- [$((SECONDS - T0))s] $*"
}

now() {
  date +%s.%N | cut -c1-14
}

# ================================================================ 0. murder on Cyrus
phase "0. Cyrus master, backends be1 and be2, Corvid"
CYRUS_PORT=$(free_port)
cyrus_mupdate_master "$WORK/cyrus-master" "$CYRUS_PORT" "$ADMIN" "$PASS"
CYRUS=127.0.0.1:$CYRUS_PORT
IMAP_PORT=$(free_port)
# Room for the load loops' connections and corvid-proxy's LMTP pool.
export CYRUS_IMAP_MAXCHILD=${CYRUS_IMAP_MAXCHILD:-50} CYRUS_LMTP_MAXCHILD=${CYRUS_LMTP_MAXCHILD:-50}
CYRUS_LMTP_PORT=$(free_port)
export CYRUS_LMTP_PORT
BE1=$WORK/be1
BE2=$WORK/be2
PEERS=("be1=127.0.0.2" "be2=127.0.0.3")
cyrus_murder_backend "$BE1" be1 127.0.0.2 "$IMAP_PORT" "$CYRUS" "$ADMIN" "$PASS" "$PROXY_PASS" "${PEERS[@]}"
cyrus_murder_backend "$BE2" be2 127.0.0.3 "$IMAP_PORT" "$CYRUS" "$ADMIN" "$PASS" "$PROXY_PASS" "${PEERS[@]}"
for be in "$BE1" "$BE2"; do cyrus_add_user "$be" "$CYRUS_PROXY_USER" "$PROXY_PASS"; done
# A Cyrus frontend (its mupdate slave follows the Cyrus master), delivering
# by LMTP on a UNIX socket.
FE=$WORK/fe
FE_PORT=$(free_port)
CYRUS_FRONTEND_LMTP_SOCKET=$WORK/fe-lmtp.sock
export CYRUS_FRONTEND_LMTP_SOCKET
cyrus_murder_frontend "$FE" fe "$FE_PORT" "$(free_port)" "$CYRUS" "$ADMIN" "$PASS" "$PROXY_PASS" "$IMAP_PORT" "" "${PEERS[@]}"

start_corvid_cluster 3 "$WORK/corvid" "$ADMIN" "$PASS"
read -r -a NODE_MUPDATE <<<"$CORVID_CLUSTER_MUPDATE"
CORVID=${NODE_MUPDATE[0]}
printf 'user = "%s"\npassword = "%s"\n' "$ADMIN" "$PASS" >"$WORK/corvid-credential.toml"
printf '%s\n' "$PASS" >"$WORK/cyrus-password"
REG=(--registry "$(IFS=,; echo "${NODE_MUPDATE[*]}")" --credential-file "$WORK/corvid-credential.toml" --peer "$CORVID_CLUSTER_PEERS")
SRC=(--from-mupdate "$CYRUS" --user "$ADMIN" --password-file "$WORK/cyrus-password")

# be_imap BE_IP DESC CMD...: IMAP commands as the admin on a backend, one assertion.
be_imap() {
  local ip=$1
  shift
  imap_assert "$ip:$IMAP_PORT" "$ADMIN" "$PASS" "$@"
}
be_imap 127.0.0.2 "be1 creates mailboxes (through the Cyrus master)" \
  "CREATE user.alice" "CREATE user.alice.Sent" "CREATE sharedone" "CREATE sharedgone"
be_imap 127.0.0.3 "be2 creates mailboxes (through the Cyrus master)" \
  "CREATE user.bob" "CREATE user.bob.Drafts" "CREATE sharedtwo"

# corvidctl ARGS...: run corvidctl; output in OUT, exit status in RC.
ctl() {
  RC=0
  OUT=$(timeout 120 "$CTL" "$@" 2>&1) || RC=$?
  printf '%s\n' "$OUT" | sed 's/^/    corvidctl: /'
}

# cyrus_list / corvid_list: "NAME SERVER!PARTITION" lines, sorted.
cyrus_list() { cyrus_mailboxes "$WORK/cyrus-master" | sort; }
corvid_list() {
  timeout 60 "$CTL" dump "${REG[@]}" --format cyrus 2>/dev/null | python3 "$HERE/helpers.py" mboxlist | sort
}

# ================================================================ 1. import, dump, load
phase "1. import, dump, load"
N=$(cyrus_list | wc -l)
ctl import "${REG[@]}" "${SRC[@]}" --dry-run
assert_line "import --dry-run plans every Cyrus mailbox" "(dry run) created $N, updated 0, unchanged 0, conflicting 0" "$OUT"
assert_eq "the dry run wrote nothing" "" "$(corvid_list)"
ctl import "${REG[@]}" "${SRC[@]}"
assert_line "import creates every Cyrus mailbox" "created $N, updated 0, unchanged 0, conflicting 0" "$OUT"
assert_eq "Corvid's list equals the Cyrus master's" "$(cyrus_list)" "$(corvid_list)"
ctl import "${REG[@]}" "${SRC[@]}"
assert_line "a second import changes nothing" "created 0, updated 0, unchanged $N, conflicting 0" "$OUT"
timeout 60 "$CTL" dump "${REG[@]}" --format cyrus -o "$WORK/corvid.dump" 2>/dev/null
ctl load "${REG[@]}" "$WORK/corvid.dump"
assert_line "loading Corvid's own ctl_mboxlist-format dump changes nothing" "created 0, updated 0, unchanged $N, conflicting 0" "$OUT"
timeout 60 "$CTL" dump "${REG[@]}" --format jsonl -o "$WORK/corvid.jsonl" 2>/dev/null
assert_eq "the JSON lines dump has one line per mailbox" "$N" "$(wc -l <"$WORK/corvid.jsonl")"
printf '{"name":"user.alice","location":"be2!default","acl":"","state":"active"}\n' >"$WORK/conflict.jsonl"
ctl load "${REG[@]}" "$WORK/conflict.jsonl"
assert_eq "a load with a conflicting entry exits 3" 3 "$RC"
assert_line "it reports the conflict" "created 0, updated 0, unchanged 0, conflicting 1" "$OUT"
assert_match "the conflict names both locations" $'^conflict\tuser.alice\tregistry be1!default\tinput be2!default$' "$OUT"
ctl find -s "$CORVID" -u "$ADMIN" -w "$PASS" user.alice
assert_match "user.alice stays at be1" $'^user.alice\tbe1!default\tactive' "$OUT"
# A stray entry for check (4.): a mailbox no backend holds.
printf '{"name":"loaded","location":"be1!default","acl":"anyone\\tlrs\\t","state":"active"}\n' >"$WORK/stray.jsonl"

# ================================================================ 2. shadow
phase "2. shadow follows the Cyrus master"
mkdir -p "$WORK/shadow"
spawn "$WORK/shadow/shadow.log" "$CTL" migrate shadow "${REG[@]}" "${SRC[@]}" --state-dir "$WORK/shadow" --sync-interval-ms 500
SHADOW_PID=$SPAWNED_PID
shadow_following() {
  timeout 10 "$CTL" migrate status --state-dir "$WORK/shadow" 2>/dev/null | grep -q $'^shadow\tfollowing$'
}
wait_for "shadow following" shadow_following || fail "the shadow follows the Cyrus master"
in_sync() {
  timeout 30 "$CTL" migrate status --state-dir "$WORK/shadow" "${REG[@]}" "${SRC[@]}" >/dev/null 2>&1
}
be_imap 127.0.0.2 "be1 creates, deletes (Cyrus master)" "CREATE user.alice.Trash" \
  "SETACL sharedgone $ADMIN lrswipkxtecdan" "DELETE sharedgone"
t=$(now)
be_imap 127.0.0.3 "be2 creates (Cyrus master)" "CREATE sharedthree"
wait_for "sharedthree on Corvid" timeout 10 "$CTL" find -s "$CORVID" -u "$ADMIN" -w "$PASS" sharedthree >/dev/null ||
  fail "a mailbox created through Cyrus reaches Corvid"
echo "shadow lag of one creation: $(python3 -c "print(round($(now) - $t, 2))") s (Cyrus answered the backend -> FIND on Corvid finds it)"
if wait_for "Corvid equals Cyrus" in_sync; then
  pass "2 after creations and deletions through Cyrus, migrate status finds no difference"
else
  fail "2 after creations and deletions through Cyrus, migrate status finds no difference"
fi
assert_eq "2 Corvid's list equals the Cyrus master's" "$(cyrus_list)" "$(corvid_list)"
ctl migrate status --state-dir "$WORK/shadow"
assert_line "2 nothing diverged" $'diverged\t0' "$OUT"

phase "2b. the registry's leader is killed; the shadow goes on"
# node_metric I NAME: NAME's value at node I's /metrics (empty if down).
node_metric() {
  local m
  m=$(sed -n 's/^corvid-registry ready .*metrics=\([^ ]*\).*/\1/p' "${_CORVID_CLUSTER_LOGS[$1]}" | tail -n 1)
  curl -s --max-time 2 "http://$m/metrics" | awk -v n="$2" '$1 == n { print $2 }'
}
LEADER=
for i in 0 1 2; do
  if [[ $(node_metric "$i" corvid_server_is_leader) == 1 ]]; then LEADER=$i; fi
done
[[ -n $LEADER ]] || die "no leader among the registry nodes"
kill -KILL -- "-${CORVID_CLUSTER_PGIDS[LEADER]}"
echo "killed registry node $((LEADER + 1)), the leader"
SURVIVOR=$(((LEADER + 1) % 3))
CORVID=${NODE_MUPDATE[SURVIVOR]}
new_leader() {
  local i
  for i in 0 1 2; do
    [[ $i != "$LEADER" && $(node_metric "$i" corvid_server_is_leader) == 1 ]] && return 0
  done
  return 1
}
wait_for "a new registry leader" new_leader || fail "2b the two other nodes elect a leader"
be_imap 127.0.0.3 "be2 creates (Cyrus master) after the registry leader died" "CREATE sharedfour"
if wait_for "sharedfour on Corvid" timeout 10 "$CTL" find -s "$CORVID" -u "$ADMIN" -w "$PASS" sharedfour >/dev/null; then
  pass "2b a mailbox created through Cyrus after the registry leader died reaches Corvid"
else
  fail "2b a mailbox created through Cyrus after the registry leader died reaches Corvid"
fi
ctl migrate status --state-dir "$WORK/shadow"
assert_line "2b the shadow still follows" $'shadow\tfollowing' "$OUT"

# ================================================================ 3. cut-over under load
phase "3. the Cyrus frontend follows Corvid; corvid-proxy, load loops, cut-over of be1 then be2"
# fe_has NAME LOCATION: the frontend's mailboxes.db places NAME at LOCATION.
fe_has() {
  cyrus_mailboxes "$FE" | awk -v n="$1" -v l="$2" '$1 == n && $2 == l { f = 1 } END { exit !f }'
}
sed -i "s/^mupdate_server: .*/mupdate_server: $CORVID/" "$FE/imapd.conf"
cyrus_restart "$FE"
if wait_for "frontend synced from Corvid" fe_has sharedfour 'be2!default'; then
  pass "3 the frontend, repointed to Corvid, holds Corvid's list"
else
  fail "3 the frontend, repointed to Corvid, holds Corvid's list"
fi
CORVID_PROXY_MASTERS=$CORVID_CLUSTER_PEERS
export CORVID_PROXY_MASTERS
start_corvid_proxy "$WORK/proxy" "$PROXY_PASS" backend "be1 be2" \
  "be1=127.0.0.2:$IMAP_PORT" "be2=127.0.0.3:$IMAP_PORT" || die "corvid-proxy did not start"
STOP=$WORK/loops.stop
LMTP_LOG=$WORK/lmtp.log
CREATE_LOG=$WORK/create.log
# One loop per recipient and per backend, so that a backend that hangs
# delays only its own operations. Under spawn: killed with everything else
# if the script stops early.
LOOPS=()
for rcpt in alice@example.org bob@example.org; do
  for target in "$CORVID_PROXY_LMTP" "fe=unix:$CYRUS_FRONTEND_LMTP_SOCKET"; do
    log=$LMTP_LOG.${target%%=*}-$rcpt
    spawn "$WORK/loop-${target%%=*}-$rcpt.out" python3 "$HERE/migrate_loops.py" lmtp "$STOP" "$log" 150 "$target" "$rcpt"
    interop_log "$log"
    LOOPS+=("$SPAWNED_PID")
  done
done
for b in be1=127.0.0.2 be2=127.0.0.3; do
  spawn "$WORK/create-loop-${b%%=*}.out" python3 "$HERE/migrate_loops.py" create "$STOP" "$CREATE_LOG.${b%%=*}" 150 \
    "$ADMIN" "$PASS" loop "$b:$IMAP_PORT"
  interop_log "$CREATE_LOG.${b%%=*}"
  LOOPS+=("$SPAWNED_PID")
done
# ok_since: over every loop's log.
merged_logs() {
  cat "$LMTP_LOG".* >"$LMTP_LOG"
  cat "$CREATE_LOG".* >"$CREATE_LOG"
}
# ok_since LOG WHO T: LOG (the loops' LOG.* files) has a success of WHO
# after time T.
ok_since() {
  cat "$1".* 2>/dev/null | awk -v who="$2" -v t="$3" '$1 > t && $2 == who && ($3 == "2" || $3 == "ok") { f = 1 } END { exit !f }'
}
t=$(now)
wait_for "loops running" bash -c "$(declare -f ok_since); ok_since $LMTP_LOG bob@example.org $t && ok_since $CREATE_LOG be2 $t" ||
  fail "the delivery and creation loops run"

# cut_over BE_DIR NAME: repoint the backend's mupdate_server to Corvid and
# restart it with `ctl_mboxlist -m` in START (run while the backend serves
# CREATEs, -m aborts with "mupdate said not us before it said us"). Appends
# "NAME START END" to WINDOWS.
WINDOWS=()
# shadow_synced_after MS: the shadow has mirrored every change Cyrus made
# before MS (milliseconds since the epoch).
shadow_synced_after() {
  local at
  at=$(timeout 10 "$CTL" migrate status --state-dir "$WORK/shadow" 2>/dev/null | awk '$1 == "synced_at_ms" { print $2 }')
  [[ -n $at && $at -gt $1 ]]
}
cut_over() {
  local dir=$1 name=$2 start end stopped_ms
  start=$(now)
  sed -i "s/^mupdate_server: .*/mupdate_server: $CORVID/" "$dir/imapd.conf"
  # As murder backends are set up: push the local list at start, before
  # the services accept clients (fixes, e.g., the empty partition Cyrus
  # 3.6.1 reports for a delayed-delete name).
  sed -i "s|^START {\$|START {\n  mupdatepush cmd=\"$CYRUS_BIN/ctl_mboxlist -C $dir/imapd.conf -m\"|" "$dir/cyrus.conf"
  cyrus_stop "$dir"
  # Everything the backend did through Cyrus must be in Corvid before it
  # talks to Corvid: its ctl_mboxlist -m aborts ("mupdate said not us
  # before it said us") on a name it holds that Corvid's LIST lacks but a
  # FIND a moment later finds.
  stopped_ms=$(date +%s%3N)
  wait_for "shadow synced after $name stopped" shadow_synced_after "$stopped_ms" ||
    fail "3 the shadow synchronises after $name stopped"
  cyrus_start_again "$dir"
  end=$(now)
  WINDOWS+=("$name $start $end")
  echo "cut-over of $name: $(python3 -c "print(round($end - $start, 2))") s from stop to the restarted backend's greeting"
}

cut_over "$BE1" be1
t=$(now)
wait_for "be1 serves again" bash -c "$(declare -f ok_since); ok_since $CREATE_LOG be1 $t && ok_since $LMTP_LOG alice@example.org $t && ok_since $LMTP_LOG fe/alice@example.org $t" ||
  fail "3 be1 creates and accepts deliveries after its cut-over"

phase "3b. a name written directly on Corvid wins over the shadow feed"
be_imap 127.0.0.2 "be1 (on Corvid) creates overlap" "CREATE overlap"
be_imap 127.0.0.3 "be2 (on Cyrus, which lacks it) creates overlap too" "CREATE overlap"
diverged() {
  timeout 10 "$CTL" migrate status --state-dir "$WORK/shadow" 2>/dev/null | grep -q $'^diverged\toverlap$'
}
wait_for "shadow reports overlap" diverged || fail "3b the shadow reports overlap as diverged"
ctl find -s "$CORVID" -u "$ADMIN" -w "$PASS" overlap
assert_match "3b overlap stays where the direct write put it (be1)" $'^overlap\tbe1!default\t' "$OUT"
if wait_for "frontend knows overlap at be1" fe_has overlap 'be1!default'; then
  pass "3b the frontend (following Corvid) knows a mailbox only Corvid has"
else
  fail "3b the frontend (following Corvid) knows a mailbox only Corvid has"
fi
be_imap 127.0.0.3 "be2 deletes its copy (through Cyrus), then creates a marker" \
  "SETACL overlap $ADMIN lrswipkxtecdan" "DELETE overlap" "CREATE marker"
wait_for "marker on Corvid" timeout 10 "$CTL" find -s "$CORVID" -u "$ADMIN" -w "$PASS" marker >/dev/null ||
  fail "3b the marker created after the delete reaches Corvid"
ctl find -s "$CORVID" -u "$ADMIN" -w "$PASS" overlap
assert_match "3b Cyrus's delete of be2's copy does not delete be1's" $'^overlap\tbe1!default\t' "$OUT"

cut_over "$BE2" be2
t=$(now)
wait_for "be2 serves again" bash -c "$(declare -f ok_since); ok_since $CREATE_LOG be2 $t && ok_since $LMTP_LOG bob@example.org $t && ok_since $LMTP_LOG fe/bob@example.org $t" ||
  fail "3 be2 creates and accepts deliveries after its cut-over"
touch "$STOP"
wait "${LOOPS[@]}" || fail "the load loops ended cleanly"
merged_logs

# ================================================================ 4. finish, check
phase "4. finish, check"
ctl migrate finish --state-dir "$WORK/shadow"
assert_match "migrate finish stops the shadow" '^shadow stopped' "$OUT"
wait_for "shadow exited" sh -c "! kill -0 $SHADOW_PID 2>/dev/null" || fail "the shadow process exits"
for b in be1 be2; do
  dir=$WORK/$b
  timeout 20 "$CYRUS_BIN/ctl_mboxlist" -C "$dir/imapd.conf" -d >"$WORK/$b.dump"
  ctl check "${REG[@]}" --backend "$b" --input "$WORK/$b.dump"
  assert_eq "4 check --backend $b is clean (exit 0)" 0 "$RC"
done
printf '%s\n' "$PASS" >"$WORK/backend-password"
for b in be1:127.0.0.2 be2:127.0.0.3; do
  ctl check "${REG[@]}" --backend "${b%%:*}" --imap "${b#*:}:$IMAP_PORT" --imap-user "$ADMIN" --imap-password-file "$WORK/backend-password"
  assert_eq "4 check --backend ${b%%:*} by an admin's IMAP LIST is clean (exit 0)" 0 "$RC"
done
# A stray entry: check finds it, --fix repairs it, check is clean again.
ctl load "${REG[@]}" "$WORK/stray.jsonl"
ctl check "${REG[@]}" --backend be1 --input "$WORK/be1.dump"
assert_eq "4 check finds a registry entry be1 lacks (exit 3)" 3 "$RC"
assert_match "4 it names it" $'^registry-only\tloaded\tbe1!default' "$OUT"
ctl check "${REG[@]}" --backend be1 --imap "127.0.0.2:$IMAP_PORT" --imap-user "$ADMIN" --imap-password-file "$WORK/backend-password"
assert_match "4 check by IMAP LIST finds it too" $'^registry-only\tloaded\tbe1!default' "$OUT"
ctl check "${REG[@]}" --backend be1 --input "$WORK/be1.dump" --fix
assert_line "4 check --fix deletes it" "fixed 1, left 0" "$OUT"
ctl check "${REG[@]}" --backend be1 --input "$WORK/be1.dump"
assert_eq "4 check is clean after the fix" 0 "$RC"

# ================================================================ 5. failures and windows
phase "5. failures during the cut-overs"
WINDOW_FILE=$WORK/windows
printf '%s\n' "${WINDOWS[@]}" >"$WINDOW_FILE"
out=$(python3 - "$WINDOW_FILE" "$LMTP_LOG" "$CREATE_LOG" <<'EOF'
import sys
windows = {}
for line in open(sys.argv[1]):
    name, start, end = line.split()
    windows[name] = (float(start), float(end))
backend = {"alice@example.org": "be1", "bob@example.org": "be2", "be1": "be1", "be2": "be2"}
backend.update({f"fe/{k}": v for k, v in backend.items()})
for kind, path in (("lmtp", sys.argv[2]), ("create", sys.argv[3])):
    total = outside = 0
    failed = {}
    last_ok = {}
    gap = {}
    for line in open(path):
        f = line.split()
        t, who, result = float(f[0]), f[1], f[2]
        total += 1
        if result in ("2", "ok"):
            # The longest time between two successes: what a client of
            # this backend saw as the outage.
            if who in last_ok:
                gap[who] = max(gap.get(who, 0.0), t - last_ok[who])
            last_ok[who] = t
            continue
        be = backend[who]
        start, end = windows[be]
        if start <= t <= end:
            failed.setdefault(be, []).append(t)
        else:
            outside += 1
            print(f"OUTSIDE {kind} {line.strip()}")
    print(f"TOTAL {kind} {total}")
    print(f"OUTSIDE-COUNT {kind} {outside}")
    for be, ts in sorted(failed.items()):
        print(f"WINDOW {kind} {be} failures {len(ts)} first-to-last {max(ts) - min(ts):.2f} s")
    for who, g in sorted(gap.items()):
        print(f"GAP {kind} {who} longest time between two successes {g:.2f} s")
EOF
)
printf '%s\n' "$out" | sed 's/^/    /'
assert_line "5 no delivery failed outside a cut-over window" "OUTSIDE-COUNT lmtp 0" "$out"
assert_line "5 no creation failed outside a cut-over window" "OUTSIDE-COUNT create 0" "$out"
assert_match "5 deliveries ran throughout" '^TOTAL lmtp [0-9]{2,}$' "$out"
phase "done"
