#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Interop: users managed with `corvidctl user` through one node of a
# 3-node Corvid cluster log in with Cyrus's own mupdatetest (PLAIN) on
# every node and on a replica; a password change and a deletion take
# effect everywhere; `corvidctl user import` copies a users file; the
# admin path refuses a wrong administrator password. Corvid only.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

interop_init users
if [[ $SERVER == cyrus ]]; then
  echo "SKIP: replicated users are Corvid's (SERVER=cyrus)"
  exit 0
fi
ADMIN=admin
PASS=interop-secret
start_corvid_cluster 3 "$WORK/cluster" "$ADMIN" "$PASS"
# The replica reads the cluster's users file too (for the admin): the users
# below are not in it, so only the replicated state can let them in.
start_corvid_replica "$WORK" "$CORVID_CLUSTER_PEERS" "$WORK/cluster/users.toml"
read -r -a NODES <<<"$CORVID_CLUSTER_MUPDATE"
SERVERS=("${NODES[@]}" "127.0.0.1:$CORVID_REPLICA_MUPDATE_PORT")
IFS=, read -r -a PEERS <<<"$CORVID_CLUSTER_PEERS"

# The administrator's login for corvidctl (the cluster's users file has it).
CRED=$WORK/admin-credential.txt
printf 'user = "%s"\npassword = "%s"\n' "$ADMIN" "$PASS" >"$CRED"
chmod 600 "$CRED"

ctl_user() {
  "$CORVID_BIN_DIR/corvidctl" user "$@" --credential-file "$CRED" 2>&1
}

# logs_in USER PASS HOSTPORT: whether mupdatetest authenticates.
logs_in() {
  mupdatetest_run "$3" "$1" "$2" </dev/null | grep -qx 'Authenticated.'
}

# refused USER PASS HOSTPORT: whether mupdatetest's login is refused.
refused() {
  ! logs_in "$@"
}

# everywhere WANT USER PASS: wait (bounded) until USER/PASS is accepted
# (WANT=yes) or refused (WANT=no) on every node and the replica.
everywhere() {
  local want=$1 user=$2 pass=$3 s
  for s in "${SERVERS[@]}"; do
    if [[ $want == yes ]]; then
      wait_for "$user accepted on $s" logs_in "$user" "$pass" "$s" || return 1
    else
      wait_for "$user refused on $s" refused "$user" "$pass" "$s" || return 1
    fi
  done
}

# The replica follows before any user change.
wait_for "replica synchronised" logs_in "$ADMIN" "$PASS" "${SERVERS[3]}" || die "replica did not answer"

out=$(ctl_user add --peer "${PEERS[1]}" --admin be-new --password-stdin <<<'new-secret')
assert_line "corvidctl user add through node 2" "added be-new (admin)" "$out"
if everywhere yes be-new new-secret; then pass "new user logs in on 3 nodes and the replica"; else fail "new user logs in on 3 nodes and the replica"; fi

out=$(ctl_user list --peer "${PEERS[2]}")
assert_line "corvidctl user list through node 3" "be-new"$'\t'"admin" "$out"

pwfile=$WORK/pw.txt
printf 'changed-secret\n' >"$pwfile"
out=$(ctl_user passwd --peer "${PEERS[0]}" be-new --password-file "$pwfile")
assert_line "corvidctl user passwd through node 1" "password of be-new changed" "$out"
if everywhere no be-new new-secret && everywhere yes be-new changed-secret; then
  pass "password change takes effect everywhere"
else
  fail "password change takes effect everywhere"
fi

out=$(ctl_user del --peer "${PEERS[1]}" be-new)
assert_line "corvidctl user del" "removed be-new" "$out"
if everywhere no be-new changed-secret; then pass "deleted user refused everywhere"; else fail "deleted user refused everywhere"; fi

# A users file imported into the registry: its users log in on the replica,
# which has no users file of its own.
"$CORVID_BIN_DIR/corvidctl" user add --users-file "$WORK/import.toml" --password-stdin be-imported \
  <<<'imported-secret' >/dev/null
out=$(ctl_user import --peer "${PEERS[0]}" "$WORK/import.toml")
assert_line "corvidctl user import" "imported 1 of 1 users" "$out"
if everywhere yes be-imported imported-secret; then pass "imported user logs in everywhere"; else fail "imported user logs in everywhere"; fi
out=$(ctl_user import --peer "${PEERS[0]}" "$WORK/import.toml")
assert_line "a second import leaves the user as it is" "be-imported: already in the registry, left as it is" "$out"

# The admin path is authenticated.
printf 'user = "%s"\npassword = "wrong"\n' "$ADMIN" >"$WORK/wrong.txt"
rc=0
out=$("$CORVID_BIN_DIR/corvidctl" user add --peer "${PEERS[0]}" --credential-file "$WORK/wrong.txt" \
  mallory --password-stdin <<<'x' 2>&1) || rc=$?
assert_match "a wrong administrator password is refused" "administrator's login" "$out"
if [[ $rc -ne 0 ]] && ! logs_in mallory x "${SERVERS[0]}"; then pass "refused request changed nothing"; else fail "refused request changed nothing"; fi
