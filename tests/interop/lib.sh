# shellcheck shell=bash
# Helpers shared by the interop tests (sourced, not run). They start real
# Cyrus 3.6 instances and the server under test on 127.0.0.1 in a private
# temporary directory, count assertions, and clean everything up on exit.
#
# Environment:
#   SERVER           corvid (default) or cyrus: which MUPDATE master is tested
#   CORVID_BIN_DIR   where corvid-registry and corvidctl live
#                    (default ${CARGO_TARGET_DIR:-$HOME/.cache/corvid-target}/release)
#   CYRUS_BIN        Cyrus tools (default /usr/lib/cyrus/bin)
#   INTEROP_TIMEOUT  seconds any single wait may take (default 30)
#   INTEROP_KEEP=1   keep the temporary directory (printed on exit)
#   CYRUS_TELEMETRY  1 (default): Cyrus writes protocol transcripts under
#                    conf/log/<user>/; set 0 for benchmarks
#   CYRUS_IMAP_MAXCHILD  imapd processes a murder backend or frontend
#                    (cyrus_murder_backend, cyrus_murder_frontend) may fork,
#                    one per open connection (default 20)
#   CYRUS_LMTP_MAXCHILD, CYRUS_POP3_MAXCHILD  the same for lmtpd and pop3d
#                    (default 20 each)
#   CYRUS_CLIENT_MECH  SASL mechanism Cyrus backends use towards the master
#                    (default PLAIN; empty lets Cyrus pick)
#   CYRUS_UNIXHIERARCHYSEP  1: every Cyrus instance started from now on has
#                    unixhierarchysep: yes (clients see "/", a "." in a
#                    folder name is stored as "^"); default 0 (no)
#   PROXY_UNIXHIERARCHYSEP  1: start_corvid_proxy writes [namespace]
#                    unixhierarchysep = true; default 0 (false)

INTEROP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CYRUS_BIN=${CYRUS_BIN:-/usr/lib/cyrus/bin}
SERVER=${SERVER:-corvid}
CORVID_BIN_DIR=${CORVID_BIN_DIR:-${CARGO_TARGET_DIR:-$HOME/.cache/corvid-target}/release}
INTEROP_TIMEOUT=${INTEROP_TIMEOUT:-30}
CYRUS_TELEMETRY=${CYRUS_TELEMETRY:-1}
CYRUS_CLIENT_MECH=${CYRUS_CLIENT_MECH-PLAIN}
CYRUS_UNIXHIERARCHYSEP=${CYRUS_UNIXHIERARCHYSEP:-0}
PROXY_UNIXHIERARCHYSEP=${PROXY_UNIXHIERARCHYSEP:-0}
CYRUS_IMAP_MAXCHILD=${CYRUS_IMAP_MAXCHILD:-20}

INTEROP_PASSED=0
INTEROP_FAILED=0
INTEROP_NAME=interop
REQUIRE_HINT=
WORK=
_INTEROP_PGIDS=()
_INTEROP_LOGS=()

# ---------------------------------------------------------------- basics

## die MSG...: stop the script; the exit trap counts it as a failure.
die() {
  echo "FATAL: $*" >&2
  exit 1
}

## require_bin PATH|NAME...: fail loudly when a program is missing.
## REQUIRE_HINT says how to get it.
require_bin() {
  local b
  for b in "$@"; do
    if [[ $b == */* ]]; then
      [[ -x $b ]] || die "required program $b is missing; $REQUIRE_HINT"
    else
      command -v "$b" >/dev/null || die "required program $b is not in PATH; $REQUIRE_HINT"
    fi
  done
}

## interop_init NAME: check prerequisites, create $WORK, install the exit trap.
interop_init() {
  INTEROP_NAME=$1
  # Installed first so that even a missing prerequisite ends in a summary.
  trap _interop_exit EXIT
  trap 'exit 129' HUP
  trap 'exit 130' INT
  trap 'exit 143' TERM
  trap 'exit 141' PIPE
  case "$SERVER" in
    cyrus | corvid) ;;
    *) die "SERVER must be cyrus or corvid, not '$SERVER'" ;;
  esac
  [[ $(id -u) -eq 0 ]] || die "interop tests start Cyrus master, which must run as root (it drops to user cyrus)"
  id cyrus >/dev/null 2>&1 || die "user cyrus does not exist (is cyrus-common installed?)"
  REQUIRE_HINT="install the Debian packages with: bash scripts/install-deps.sh test"
  require_bin python3 timeout setsid mktemp diff awk saslpasswd2 \
    "$CYRUS_BIN/master" "$CYRUS_BIN/mupdate" "$CYRUS_BIN/imapd" \
    "$CYRUS_BIN/mupdatetest" "$CYRUS_BIN/ctl_mboxlist"
  if [[ $SERVER == corvid ]]; then
    REQUIRE_HINT="build Corvid (make build) or set CORVID_BIN_DIR; SERVER=cyrus tests the reference Cyrus master instead"
    require_bin "$CORVID_BIN_DIR/corvid-registry" "$CORVID_BIN_DIR/corvidctl"
  fi
  WORK=$(mktemp -d /tmp/corvid-interop.XXXXXX)
  chmod 755 "$WORK" # user cyrus must traverse it
  echo "== $INTEROP_NAME: SERVER=$SERVER, work dir $WORK"
}

## interop_log FILE...: dump these files if the script fails.
interop_log() {
  _INTEROP_LOGS+=("$@")
}

## spawn LOGFILE CMD...: start CMD in its own process group (killed on exit);
## sets SPAWNED_PID.
spawn() {
  local log=$1
  shift
  setsid "$@" >"$log" 2>&1 </dev/null &
  SPAWNED_PID=$!
  _INTEROP_PGIDS+=("$SPAWNED_PID")
  interop_log "$log"
}

_interop_kill_all() {
  local pg i
  for pg in "${_INTEROP_PGIDS[@]}"; do
    kill -TERM -- "-$pg" 2>/dev/null || kill -TERM "$pg" 2>/dev/null || true
  done
  for pg in "${_INTEROP_PGIDS[@]}"; do
    for ((i = 0; i < 50; i++)); do
      kill -0 -- "-$pg" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-$pg" 2>/dev/null || true
  done
  _INTEROP_PGIDS=()
}

_interop_dump_logs() {
  local f
  echo "---------- logs of $INTEROP_NAME ($WORK) ----------"
  for f in "${_INTEROP_LOGS[@]}"; do
    [[ -e $f ]] || continue
    echo "----- $f (last 100 lines)"
    tail -n 100 "$f" | cat -v
  done
  # Cyrus protocol transcripts (telemetry), oldest first.
  while read -r _ f; do
    echo "----- telemetry $f (last 60 lines)"
    tail -n 60 "$f" | cat -v
  done < <(find "$WORK" -path '*/conf/log/*' -type f -printf '%T@ %p\n' 2>/dev/null | sort -n)
  echo "---------- end of logs ----------"
}

_interop_exit() {
  local rc=$?
  trap - EXIT
  trap '' PIPE HUP INT TERM # output may be gone; clean up regardless
  set +e
  _interop_kill_all
  if [[ $rc -ne 0 && $INTEROP_FAILED -eq 0 ]]; then
    echo "FAIL: $INTEROP_NAME aborted (exit status $rc)"
    INTEROP_FAILED=$((INTEROP_FAILED + 1))
  fi
  if [[ $INTEROP_FAILED -ne 0 && -n $WORK ]]; then
    _interop_dump_logs
  fi
  if [[ -n $WORK ]]; then
    if [[ ${INTEROP_KEEP:-0} == 1 ]]; then
      echo "kept $WORK"
    else
      rm -rf "$WORK"
    fi
  fi
  echo "interop: $INTEROP_PASSED passed, $INTEROP_FAILED failed"
  if [[ $INTEROP_FAILED -ne 0 ]]; then exit 1; fi
  exit 0
}

# ---------------------------------------------------------------- assertions

## pass MSG / fail MSG: record one assertion.
pass() {
  INTEROP_PASSED=$((INTEROP_PASSED + 1))
  echo "PASS: $*"
}
fail() {
  INTEROP_FAILED=$((INTEROP_FAILED + 1))
  echo "FAIL: $*"
}

## assert_eq DESC EXPECTED ACTUAL
assert_eq() {
  if [[ $2 == "$3" ]]; then
    pass "$1"
  else
    fail "$1"
    _show_difference "$2" "$3"
  fi
}

# _show_difference EXPECTED ACTUAL: both texts, then a diff.
_show_difference() {
  echo "  expected:"
  printf '%s\n' "$1" | sed 's/^/    | /'
  echo "  actual:"
  printf '%s\n' "$2" | sed 's/^/    | /'
  echo "  diff (- expected, + actual):"
  diff <(printf '%s\n' "$1") <(printf '%s\n' "$2") | sed 's/^/    /' || true
}

## assert_line DESC LINE TEXT: TEXT holds LINE as a whole line.
assert_line() {
  if grep -qxF -- "$2" <<<"$3"; then
    pass "$1"
  else
    fail "$1"
    printf '  expected line: %s\n  in:\n' "$2"
    printf '%s\n' "$3" | sed 's/^/    | /'
  fi
}

## assert_match DESC ERE TEXT: some line of TEXT matches the extended regex.
assert_match() {
  if grep -qE -- "$2" <<<"$3"; then
    pass "$1"
  else
    fail "$1"
    printf '  expected a line matching: %s\n  in:\n' "$2"
    printf '%s\n' "$3" | sed 's/^/    | /'
  fi
}

## assert_no_line DESC STRING TEXT: no line of TEXT contains STRING.
assert_no_line() {
  if grep -qF -- "$2" <<<"$3"; then
    fail "$1"
    printf '  unexpected: %s\n  in:\n' "$2"
    printf '%s\n' "$3" | sed 's/^/    | /'
  else
    pass "$1"
  fi
}

## answers TAG TEXT: the lines of TEXT that answer TAG (start with "TAG ").
answers() {
  awk -v t="$1 " 'index($0, t) == 1' <<<"$2"
}

## assert_answers DESC TAG EXPECTED TEXT: the answers to TAG in TEXT (decoded
## mupdatetest output) are exactly EXPECTED (lines in order).
assert_answers() {
  local got
  got=$(answers "$2" "$4")
  assert_eq "$1" "$3" "$got"
}

# ---------------------------------------------------------------- waiting

## wait_for DESC CMD...: poll CMD (every 0.2 s, up to $INTEROP_TIMEOUT s)
## until it succeeds; returns 1 after printing DESC on timeout.
wait_for() {
  local desc=$1 deadline
  shift
  deadline=$((SECONDS + INTEROP_TIMEOUT))
  while ((SECONDS < deadline)); do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  echo "timed out after ${INTEROP_TIMEOUT}s waiting for: $desc" >&2
  return 1
}

## free_port: print a TCP port on 127.0.0.1 that is free right now.
free_port() {
  python3 "$INTEROP_DIR/helpers.py" free-port
}

## wait_greeting [HOST:]PORT: wait until PORT (on 127.0.0.1 unless HOST is
## given) sends a "* OK" greeting.
wait_greeting() {
  wait_for "greeting on $1" python3 "$INTEROP_DIR/helpers.py" greeting "$1" 2
}

# ---------------------------------------------------------------- Cyrus

# _cyrus_instance DIR SERVERNAME ADMINS: directories and the common imapd.conf
# (unixhierarchysep from $CYRUS_UNIXHIERARCHYSEP).
_cyrus_instance() {
  local dir=$1 name=$2 admins=$3 unixsep=no
  if [[ $CYRUS_UNIXHIERARCHYSEP == 1 ]]; then unixsep=yes; fi
  mkdir -p "$dir"/conf/{lock,proc,socket,log} "$dir"/spool
  cat >"$dir/imapd.conf" <<EOF
configdirectory: $dir/conf
partition-default: $dir/spool
servername: $name
admins: $admins
syslog_prefix: corvid-interop-$name
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: $dir/sasldb2
sasl_mech_list: PLAIN LOGIN
allowplaintext: yes
failedloginpause: 0
altnamespace: no
unixhierarchysep: $unixsep
idlemethod: poll
EOF
}

# _cyrus_user DIR REALM USER PASS: add a SASL user to the instance's sasldb
# (and a telemetry directory so Cyrus records that user's sessions).
_cyrus_user() {
  local dir=$1 realm=$2 user=$3 pass=$4
  printf '%s' "$pass" | saslpasswd2 -p -c -f "$dir/sasldb2" -u "$realm" "$user"
  if [[ $CYRUS_TELEMETRY == 1 ]]; then
    mkdir -p "$dir/conf/log/$user"
  fi
}

## cyrus_add_user DIR USER PASS: add a SASL user (realm: the instance's
## servername) to a Cyrus instance, before or after it started.
cyrus_add_user() {
  local dir=$1 user=$2 pass=$3 realm
  realm=$(awk '$1 == "servername:" { print $2 }' "$dir/imapd.conf")
  [[ -n $realm ]] || die "no servername in $dir/imapd.conf"
  _cyrus_user "$dir" "$realm" "$user" "$pass"
  chown -R cyrus:mail "$dir/sasldb2" "$dir/conf/log"
  chmod 0640 "$dir/sasldb2"
}

# _cyrus_start DIR SERVICES_BLOCK [HOST:]PORT [WRAPPER...]: write cyrus.conf,
# start master (as the last argument(s) of WRAPPER when given, which must
# exec it), wait for the greeting on [HOST:]PORT.
_cyrus_start() {
  local dir=$1 services=$2 port=$3
  shift 3
  cat >"$dir/cyrus.conf" <<EOF
START {
}
SERVICES {
$services
}
EVENTS {
}
EOF
  chown -R cyrus:mail "$dir"
  chmod 0640 "$dir/sasldb2"
  interop_log "$dir/master.err"
  # Kept for cyrus_restart.
  printf '%q ' "$@" "$CYRUS_BIN/master" -C "$dir/imapd.conf" -M "$dir/cyrus.conf" \
    -p "$dir/master.pid" -L "$dir/master.err" >"$dir/master.cmdline"
  echo "$port" >"$dir/master.port"
  spawn "$dir/master.out" "$@" "$CYRUS_BIN/master" -C "$dir/imapd.conf" -M "$dir/cyrus.conf" \
    -p "$dir/master.pid" -L "$dir/master.err"
  echo "$SPAWNED_PID" >"$dir/master.pgid"
  if ! wait_greeting "$port"; then
    die "Cyrus master in $dir did not greet on $port"
  fi
}

## cyrus_restart DIR: stop the Cyrus instance in DIR (SIGTERM to its
## master's process group; SIGKILL after CYRUS_STOP_TIMEOUT seconds, default
## 5, as a service manager's stop timeout would) and start it again exactly
## as it was started, e.g. after its imapd.conf was edited; waits for its
## greeting. Sets SPAWNED_PID.
## Under load a Cyrus 3.6 master sometimes never finishes a SIGTERM
## shutdown: it spins, its listeners still open and no child left, serving
## nobody (seen in migrate.sh, about 10 stops in 100).
cyrus_restart() {
  cyrus_stop "$1"
  cyrus_start_again "$1"
}

## cyrus_stop DIR: the stop half of cyrus_restart.
cyrus_stop() {
  local dir=$1 pg i
  pg=$(cat "$dir/master.pgid")
  kill -TERM -- "-$pg" 2>/dev/null || true
  for ((i = 0; i < ${CYRUS_STOP_TIMEOUT:-5} * 10; i++)); do
    kill -0 -- "-$pg" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 -- "-$pg" 2>/dev/null; then
    echo "Cyrus in $dir did not stop within ${CYRUS_STOP_TIMEOUT:-5} s of SIGTERM: SIGKILL"
    kill -KILL -- "-$pg" 2>/dev/null || true
  fi
  wait_for "Cyrus master of $dir gone" bash -c "! kill -0 -- -$pg 2>/dev/null" || die "Cyrus in $dir did not stop"
}

## cyrus_start_again DIR: the start half of cyrus_restart.
cyrus_start_again() {
  local dir=$1 port
  local -a cmd
  port=$(cat "$dir/master.port")
  rm -f "$dir/master.pid"
  eval "cmd=($(cat "$dir/master.cmdline"))"
  spawn "$dir/master.out" "${cmd[@]}"
  echo "$SPAWNED_PID" >"$dir/master.pgid"
  wait_greeting "$port" || die "Cyrus master in $dir did not greet on $port after a restart"
}

# _cyrus_mupdate_client DIR MASTER_HOSTPORT USER PASS: how an instance
# reaches and logs in to its MUPDATE master. With CYRUS_MUPDATE_RETRY_DELAY
# set, it reconnects that many seconds after losing it (mupdate_retry_delay;
# Cyrus's default otherwise).
_cyrus_mupdate_client() {
  local dir=$1 master=$2 user=$3 pass=$4
  cat >>"$dir/imapd.conf" <<EOF
mupdate_server: $master
mupdate_authname: $user
mupdate_password: $pass
EOF
  if [[ -n $CYRUS_CLIENT_MECH ]]; then
    echo "force_sasl_client_mech: $CYRUS_CLIENT_MECH" >>"$dir/imapd.conf"
  fi
  if [[ -n ${CYRUS_MUPDATE_RETRY_DELAY:-} ]]; then
    echo "mupdate_retry_delay: $CYRUS_MUPDATE_RETRY_DELAY" >>"$dir/imapd.conf"
  fi
}

## cyrus_mupdate_master DIR PORT ADMIN PASS: start a real Cyrus `mupdate -m`
## master on 127.0.0.1:PORT (servername mupdate-master) with ADMIN/PASS as
## its administrator.
cyrus_mupdate_master() {
  local dir=$1 port=$2 admin=$3 pass=$4 name=mupdate-master
  _cyrus_instance "$dir" "$name" "$admin"
  _cyrus_user "$dir" "$name" "$admin" "$pass"
  # Threaded service: exactly one process (see running-cyrus-3.6-locally.md).
  _cyrus_start "$dir" \
    "  mupdate cmd=\"$CYRUS_BIN/mupdate -C $dir/imapd.conf -m\" listen=\"127.0.0.1:$port\" prefork=1 maxchild=1" \
    "$port"
}

## cyrus_backend DIR NAME IMAP_PORT MUPDATE_HOSTPORT MUPDATE_USER MUPDATE_PASS
## [LISTEN_HOST]: start a real Cyrus backend imapd (servername NAME,
## partition default) on LISTEN_HOST:IMAP_PORT (default 127.0.0.1) that
## reports to the MUPDATE master at MUPDATE_HOSTPORT as MUPDATE_USER.
## MUPDATE_USER/MUPDATE_PASS is also the backend's IMAP admin; frontends
## proxy to it as $CYRUS_PROXY_USER (see cyrus_frontend).
CYRUS_PROXY_USER=murder-proxy
cyrus_backend() {
  local dir=$1 name=$2 imap_port=$3 mupdate=$4 user=$5 pass=$6 host=${7:-127.0.0.1}
  _cyrus_instance "$dir" "$name" "$user"
  echo "proxyservers: $CYRUS_PROXY_USER" >>"$dir/imapd.conf"
  _cyrus_mupdate_client "$dir" "$mupdate" "$user" "$pass"
  _cyrus_user "$dir" "$name" "$user" "$pass"
  _cyrus_start "$dir" \
    "  imap cmd=\"$CYRUS_BIN/imapd -C $dir/imapd.conf\" listen=\"$host:$imap_port\" prefork=0 maxchild=20" \
    "$host:$imap_port"
}

## cyrus_mupdate_slave DIR NAME PORT MASTER_HOSTPORT USER PASS: start the
## mupdate slave of a Cyrus frontend (servername NAME) on 127.0.0.1:PORT,
## following the MUPDATE master at MASTER_HOSTPORT as USER: it syncs the
## whole list, then streams UPDATE, exactly as a frontend's slave does.
cyrus_mupdate_slave() {
  local dir=$1 name=$2 port=$3 master=$4 user=$5 pass=$6
  _cyrus_instance "$dir" "$name" "$user"
  _cyrus_mupdate_client "$dir" "$master" "$user" "$pass"
  _cyrus_user "$dir" "$name" "$user" "$pass"
  _cyrus_start "$dir" \
    "  mupdate cmd=\"$CYRUS_BIN/mupdate -C $dir/imapd.conf\" listen=\"127.0.0.1:$port\" prefork=1 maxchild=1" \
    "$port"
}

## cyrus_frontend DIR NAME IMAP_PORT SLAVE_PORT MUPDATE_HOSTPORT USER PASS
## PROXY_PASS BACKEND_IMAP_PORT BACKEND=IP...: start a real Cyrus frontend
## (servername NAME): imapd on 127.0.0.1:IMAP_PORT (mupdate_server set, no
## proxyservers, so it proxies) and its local mupdate slave on
## 127.0.0.1:SLAVE_PORT, which follows MUPDATE_HOSTPORT as USER/PASS (USER is
## also the frontend's admin). It logs in to backends as $CYRUS_PROXY_USER
## with PROXY_PASS (add that user to each backend with cyrus_add_user). Its
## master runs in a private mount namespace whose /etc/hosts maps each
## BACKEND name to IP and whose /etc/services maps imap to BACKEND_IMAP_PORT,
## which is how the frontend reaches the server part of a location
## (getaddrinfo(server, "imap")).
cyrus_frontend() {
  local dir=$1 name=$2 imap_port=$3 slave_port=$4 mupdate=$5 user=$6 pass=$7
  local proxy_pass=$8 backend_port=$9 b
  shift 9
  _cyrus_instance "$dir" "$name" "$user"
  _cyrus_mupdate_client "$dir" "$mupdate" "$user" "$pass"
  cat >>"$dir/imapd.conf" <<EOF
proxy_authname: $CYRUS_PROXY_USER
proxy_password: $proxy_pass
EOF
  _cyrus_user "$dir" "$name" "$user" "$pass"
  {
    cat /etc/hosts
    for b in "$@"; do
      echo "${b#*=} ${b%%=*}"
    done
  } >"$dir/hosts"
  {
    # Every line naming imap (as a service or an alias) goes.
    awk '{ for (i = 1; i <= NF && $i !~ /^#/; i++) if (i != 2 && $i == "imap") next; print }' /etc/services
    echo "imap $backend_port/tcp"
  } >"$dir/services"
  # master is the namespace's only process: killing its process group (see
  # spawn) ends the namespace and its mounts.
  _cyrus_start "$dir" \
    "  imap cmd=\"$CYRUS_BIN/imapd -C $dir/imapd.conf\" listen=\"127.0.0.1:$imap_port\" prefork=0 maxchild=20
  mupdate cmd=\"$CYRUS_BIN/mupdate -C $dir/imapd.conf\" listen=\"127.0.0.1:$slave_port\" prefork=1 maxchild=1" \
    "$imap_port" \
    unshare --mount --propagation private -- \
    sh -c 'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/services && shift 2 && exec "$@"' \
    frontend-namespace "$dir/hosts" "$dir/services"
}

## cyrus_mailboxes DIR: the mailboxes.db of the Cyrus instance in DIR, one
## line per mailbox, sorted: "NAME SERVER!PARTITION" ("!PARTITION" for a
## local mailbox).
cyrus_mailboxes() {
  timeout 20 "$CYRUS_BIN/ctl_mboxlist" -C "$1/imapd.conf" -d | python3 "$INTEROP_DIR/helpers.py" mboxlist
}

## imap_admin_cmd [HOST:]PORT USER PASS CMD...: log in to 127.0.0.1:PORT (or
## HOST:PORT) and run each CMD ("CREATE name", "RENAME old new", "DELETE
## name", "SETACL name id rights", "SELECT name", "APPEND name subject",
## "SEARCH SUBJECT text", "LIST"; see helpers.py); fails on the first NO/BAD.
imap_admin_cmd() {
  timeout 60 python3 "$INTEROP_DIR/helpers.py" imap "$@"
}

## imap_assert [HOST:]PORT USER PASS DESC CMD...: imap_admin_cmd as one
## assertion named DESC, its output indented below.
imap_assert() {
  local hostport=$1 user=$2 pass=$3 desc=$4 out
  shift 4
  if out=$(imap_admin_cmd "$hostport" "$user" "$pass" "$@" 2>&1); then
    pass "$desc"
  else
    fail "$desc"
  fi
  printf '%s\n' "$out" | sed 's/^/    imap: /'
}

## mupdatetest_run HOSTPORT USER PASS: run Cyrus's mupdatetest against
## HOSTPORT with PLAIN, feeding it stdin (one command per line; at the end
## of input mupdatetest itself sends "Q01 LOGOUT" and reads until the server
## closes), and print what it printed with CRs removed.
mupdatetest_run() {
  local hostport=$1 user=$2 pass=$3 out rc=0
  local host=${hostport%:*} port=${hostport##*:}
  out=$(timeout 20 "$CYRUS_BIN/mupdatetest" -p "$port" -m PLAIN -a "$user" -w "$pass" "$host" 2>&1) || rc=$?
  printf '%s\n' "$out" | tr -d '\r'
  return "$rc"
}

## mupdate_answers: read mupdatetest output on stdin and print one line per
## server response with every {n+} literal turned into a "quoted" string and
## TABs shown as \t, e.g. A1 MAILBOX "user.alice" "be1!default" "alice\tlr\t".
mupdate_answers() {
  python3 "$INTEROP_DIR/helpers.py" decode
}

## sut_mupdate CMD...: run each CMD (one MUPDATE command line) in one
## mupdatetest session as the admin of the server under test and print the
## decoded answers (see mupdate_answers).
sut_mupdate() {
  local raw
  raw=$(printf '%s\n' "$@" | mupdatetest_run "$SUT_HOSTPORT" "$SUT_ADMIN" "$SUT_PASS")
  if ! grep -qx 'Authenticated.' <<<"$raw"; then
    printf '%s\n' "$raw" >&2
    die "mupdatetest could not authenticate to $SUT_HOSTPORT as $SUT_ADMIN"
  fi
  mupdate_answers <<<"$raw"
}

## start_capture_proxy TARGET_PORT LOGFILE: start a recording TCP proxy to
## 127.0.0.1:TARGET_PORT; sets CAPTURE_PROXY_PORT.
start_capture_proxy() {
  local target=$1 log=$2 dir
  dir=$(dirname "$log")
  CAPTURE_PROXY_PORT=$(free_port)
  spawn "$dir/proxy.out" python3 "$INTEROP_DIR/helpers.py" proxy "$CAPTURE_PROXY_PORT" "$target" "$log"
  wait_for "capture proxy on port $CAPTURE_PROXY_PORT" grep -q '^proxy ready' "$dir/proxy.out" ||
    die "capture proxy did not start"
  interop_log "$log"
}

# ---------------------------------------------------------------- Corvid

## start_corvid DIR ADMIN PASS: start corvid-registry with ADMIN as its only
## (admin) user in DIR/users.toml; exports CORVID_MUPDATE_PORT,
## CORVID_METRICS_PORT, CORVID_PEER_PORT and CORVID_USERS_FILE.
start_corvid() {
  local dir=$1 admin=$2 pass=$3 line rest
  mkdir -p "$dir/corvid"
  "$CORVID_BIN_DIR/corvidctl" user add --users-file "$dir/users.toml" --admin \
    --password-stdin "$admin" <<<"$pass" >"$dir/corvidctl.log" 2>&1 ||
    {
      cat "$dir/corvidctl.log"
      die "corvidctl user add failed"
    }
  spawn "$dir/corvid.log" "$CORVID_BIN_DIR/corvid-registry" --data-dir "$dir/corvid" \
    --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --peer-listen 127.0.0.1:0 \
    --server-name corvid-test \
    --users-file "$dir/users.toml"
  local pid=$SPAWNED_PID
  wait_for "corvid-registry ready line" _corvid_ready "$dir/corvid.log" "$pid" || true
  line=$(grep -m1 '^corvid-registry ready mupdate=' "$dir/corvid.log") ||
    die "corvid-registry (pid $pid) exited or did not print its ready line"
  CORVID_MUPDATE_PORT=$(_ready_port "$line" mupdate)
  CORVID_METRICS_PORT=$(_ready_port "$line" metrics)
  CORVID_PEER_PORT=$(_ready_port "$line" peer)
  CORVID_USERS_FILE=$dir/users.toml
  export CORVID_MUPDATE_PORT CORVID_METRICS_PORT CORVID_PEER_PORT CORVID_USERS_FILE
}

## corvid_replica_applied METRICS_HOSTPORT INDEX: done when the replica
## whose metrics are at METRICS_HOSTPORT has applied log index INDEX.
corvid_replica_applied() {
  local a
  a=$(corvid_metric "$1" corvid_replica_applied_index)
  python3 -c "import sys; sys.exit(0 if float('$a') >= $2 else 1)"
}

## start_corvid_replica DIR MASTER_PEER_HOSTPORT[,...] USERS_FILE: start a
## read-only corvid-registry replica (data in DIR/replica) that follows the
## node(s) at MASTER_PEER_HOSTPORT and authenticates MUPDATE clients from
## USERS_FILE (e.g. $CORVID_USERS_FILE); exports CORVID_REPLICA_MUPDATE_PORT
## and CORVID_REPLICA_METRICS_PORT.
start_corvid_replica() {
  local dir=$1 masters=$2 users=$3 line pid
  mkdir -p "$dir/replica"
  spawn "$dir/replica.log" "$CORVID_BIN_DIR/corvid-registry" --role replica --masters "$masters" \
    --data-dir "$dir/replica" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --server-name corvid-replica --users-file "$users"
  pid=$SPAWNED_PID
  wait_for "corvid-registry replica ready line" _corvid_ready "$dir/replica.log" "$pid" || true
  line=$(grep -m1 '^corvid-registry ready mupdate=' "$dir/replica.log") ||
    die "corvid-registry replica (pid $pid) exited or did not print its ready line"
  CORVID_REPLICA_MUPDATE_PORT=$(_ready_port "$line" mupdate)
  CORVID_REPLICA_METRICS_PORT=$(_ready_port "$line" metrics)
  export CORVID_REPLICA_MUPDATE_PORT CORVID_REPLICA_METRICS_PORT
}

# _ready_port LINE KEY: the port of KEY=127.0.0.1:PORT in a ready line.
_ready_port() {
  local rest=${1#*" $2=127.0.0.1:"}
  rest=${rest%% *}
  [[ $rest =~ ^[0-9]+$ ]] || die "no $2 port in the corvid-registry ready line: $1"
  printf '%s\n' "$rest"
}

# _corvid_ready LOG PID: done when LOG has the ready line or PID has exited.
_corvid_ready() {
  grep -q '^corvid-registry ready mupdate=' "$1" || ! kill -0 "$2" 2>/dev/null
}

## start_server_under_test DIR ADMIN PASS: start the MUPDATE master chosen by
## $SERVER; exports SUT_MUPDATE_PORT, SUT_HOSTPORT, SUT_ADMIN and SUT_PASS.
start_server_under_test() {
  local dir=$1 admin=$2 pass=$3
  mkdir -p "$dir"
  SUT_ADMIN=$admin
  SUT_PASS=$pass
  export SUT_ADMIN SUT_PASS
  if [[ $SERVER == cyrus ]]; then
    SUT_MUPDATE_PORT=$(free_port)
    cyrus_mupdate_master "$dir/cyrus-master" "$SUT_MUPDATE_PORT" "$admin" "$pass"
  else
    start_corvid "$dir" "$admin" "$pass"
    SUT_MUPDATE_PORT=$CORVID_MUPDATE_PORT
  fi
  SUT_HOSTPORT=127.0.0.1:$SUT_MUPDATE_PORT
  export SUT_MUPDATE_PORT SUT_HOSTPORT
  echo "server under test ($SERVER) listens on $SUT_HOSTPORT"
}

## start_corvid_cluster N DIR ADMIN PASS: start N corvid-registry nodes on
## 127.0.0.1 (ports from the OS, kept for the run), form a cluster with
## `corvidctl cluster init`, and wait for a leader. Exports
## CORVID_CLUSTER_MUPDATE (space-separated host:port per node, node 1 first),
## CORVID_CLUSTER_PEER (node 1's peer address) and CORVID_CLUSTER_PEERS
## (every node's peer address, comma-separated, as --masters takes them).
## With CORVID_CLUSTER_CONFIG set, every node reads that config file.
start_corvid_cluster() {
  local n=$1 dir=$2 admin=$3 pass=$4 i mport pport members=() mupdates=()
  mkdir -p "$dir"
  "$CORVID_BIN_DIR/corvidctl" user add --users-file "$dir/users.toml" --admin \
    --password-stdin "$admin" <<<"$pass" >"$dir/corvidctl.log" 2>&1 || die "corvidctl user add failed"
  CORVID_CLUSTER_DIR=$dir
  CORVID_CLUSTER_PGIDS=()
  _CORVID_CLUSTER_PORTS=()
  _CORVID_CLUSTER_LOGS=()
  for ((i = 1; i <= n; i++)); do
    mport=$(free_port)
    pport=$(free_port)
    _CORVID_CLUSTER_PORTS+=("$mport $pport")
    _corvid_cluster_node "$i" "$dir/node$i.log"
    members+=("$i=127.0.0.1:$pport")
    mupdates+=("127.0.0.1:$mport")
  done
  CORVID_CLUSTER_PEER=${members[0]#*=}
  CORVID_CLUSTER_PEERS=$(printf '%s\n' "${members[@]#*=}" | paste -sd,)
  "$CORVID_BIN_DIR/corvidctl" cluster --peer "$CORVID_CLUSTER_PEER" init "${members[@]}" >>"$dir/corvidctl.log" 2>&1 ||
    die "corvidctl cluster init failed: $(cat "$dir/corvidctl.log")"
  wait_for "cluster leader" _corvid_cluster_has_leader "$CORVID_CLUSTER_PEER" || die "no leader elected"
  CORVID_CLUSTER_MUPDATE="${mupdates[*]}"
  export CORVID_CLUSTER_MUPDATE CORVID_CLUSTER_PEER CORVID_CLUSTER_PEERS
}

# _corvid_cluster_node I LOG: start node I of the cluster (its ports and
# data directory from start_corvid_cluster) and wait for its ready line.
_corvid_cluster_node() {
  local i=$1 log=$2 mport pport
  read -r mport pport <<<"${_CORVID_CLUSTER_PORTS[i - 1]}"
  spawn "$log" "$CORVID_BIN_DIR/corvid-registry" --data-dir "$CORVID_CLUSTER_DIR/node$i" \
    --node-id "$i" --no-bootstrap --listen "127.0.0.1:$mport" --peer-listen "127.0.0.1:$pport" \
    --metrics-listen 127.0.0.1:0 --server-name "corvid-node$i" --users-file "$CORVID_CLUSTER_DIR/users.toml" \
    ${CORVID_CLUSTER_CONFIG:+--config "$CORVID_CLUSTER_CONFIG"}
  CORVID_CLUSTER_PGIDS[i - 1]=$SPAWNED_PID
  _CORVID_CLUSTER_LOGS[i - 1]=$log
  wait_for "node $i ready line" _corvid_ready "$log" "$SPAWNED_PID" || true
  grep -q '^corvid-registry ready' "$log" || die "cluster node $i did not start"
}

## corvid_metric HOSTPORT NAME: the value of an unlabelled metric on a
## node's metrics port (0 when absent).
corvid_metric() {
  python3 - "$1" "$2" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen("http://%s/metrics" % sys.argv[1], timeout=5).read().decode()
print(next((l.split()[-1] for l in text.splitlines() if l.split(" ")[0] == sys.argv[2]), "0"))
PY
}

## corvid_cluster_caught_up ID: whether node ID has applied everything the
## leader has (as `corvidctl cluster status` on CORVID_CLUSTER_PEER shows).
corvid_cluster_caught_up() {
  "$CORVID_BIN_DIR/corvidctl" cluster --peer "$CORVID_CLUSTER_PEER" status |
    awk -v id="$1" '$3 == "Leader" {l = $7} $1 == id {a = $8} END {exit !(l > 0 && a >= l)}'
}

## corvid_cluster_stop: SIGKILL every node of the cluster and wait until
## they are gone.
corvid_cluster_stop() {
  local pg
  for pg in "${CORVID_CLUSTER_PGIDS[@]}"; do
    kill -KILL -- "-$pg" 2>/dev/null || kill -KILL "$pg" 2>/dev/null || true
  done
  for pg in "${CORVID_CLUSTER_PGIDS[@]}"; do
    wait_for "cluster process $pg gone" sh -c "! kill -0 $pg 2>/dev/null" || true
  done
}

## corvid_cluster_restart: start every node again on its ports and data
## (logs in DIR/nodeI.restartN.log) and wait for a leader.
corvid_cluster_restart() {
  local i
  _CORVID_CLUSTER_RESTARTS=$((${_CORVID_CLUSTER_RESTARTS:-0} + 1))
  for ((i = 1; i <= ${#_CORVID_CLUSTER_PORTS[@]}; i++)); do
    _corvid_cluster_node "$i" "$CORVID_CLUSTER_DIR/node$i.restart$_CORVID_CLUSTER_RESTARTS.log"
  done
  wait_for "cluster leader after restart" _corvid_cluster_has_leader "$CORVID_CLUSTER_PEER" ||
    die "no leader after the restart"
}

# _corvid_cluster_has_leader PEER: done when exactly one node of the cluster
# is leader and every node has applied the first membership.
# Read from the nodes' own metrics, not `corvidctl cluster status`: a status
# call right after `cluster init` can block for many seconds (seen up to
# 30 s; see the session notes), longer than the whole wait.
_corvid_cluster_has_leader() {
  local log m leaders=0 text
  for log in "${_CORVID_CLUSTER_LOGS[@]}"; do
    m=$(sed -n 's/^corvid-registry ready .*metrics=\([^ ]*\).*/\1/p' "$log" | tail -n 1)
    [[ -n $m ]] || return 1
    text=$(curl -s --max-time 2 "http://$m/metrics") || return 1
    grep -Eq '^corvid_raft_applied_index [1-9]' <<<"$text" || return 1
    if grep -q '^corvid_server_is_leader 1' <<<"$text"; then leaders=$((leaders + 1)); fi
  done
  [[ $leaders -eq 1 ]]
}

# ---------------------------------------------------------------- murder (proxy.sh)

# _cyrus_name_files DIR IMAP_PORT NAME=IP...: DIR/hosts (the system's plus
# "IP NAME" per pair) and DIR/services (the system's without imap, plus
# "imap IMAP_PORT/tcp"; likewise pop3 on $CYRUS_POP3_PORT when set), for
# bind-mounting in a private mount namespace so that getaddrinfo(NAME,
# "imap") finds a loopback backend (see cyrus_frontend); a frontend's pop3d
# finds a backend's by getaddrinfo(NAME, "pop3").
_cyrus_name_files() {
  local dir=$1 port=$2 b
  shift 2
  {
    cat /etc/hosts
    for b in "$@"; do
      echo "${b#*=} ${b%%=*}"
    done
  } >"$dir/hosts"
  {
    awk '{ for (i = 1; i <= NF && $i !~ /^#/; i++) if (i != 2 && ($i == "imap" || $i == "lmtp" || $i == "pop3")) next; print }' /etc/services
    echo "imap $port/tcp"
    if [[ -n ${CYRUS_LMTP_PORT:-} ]]; then
      echo "lmtp $CYRUS_LMTP_PORT/tcp"
    fi
    if [[ -n ${CYRUS_POP3_PORT:-} ]]; then echo "pop3 $CYRUS_POP3_PORT/tcp"; fi
  } >"$dir/services"
}

# _cyrus_lmtp_service HOST DIR PORT: a cyrus.conf service line for lmtpd
# on HOST:PORT, or on the UNIX socket HOST when it is a path (nothing when
# both PORT and the path are empty). Over TCP Cyrus's lmtpd wants SASL
# authentication; on a socket it does not. At most $CYRUS_LMTP_MAXCHILD
# (default 20) processes: bench/proxy.sh holds 32 client connections.
_cyrus_lmtp_service() {
  local listen
  if [[ $1 == /* ]]; then
    listen=$1
  elif [[ -n $3 ]]; then
    listen=$1:$3
  else
    return 0
  fi
  printf '\n  lmtp cmd="%s" listen="%s" prefork=0 maxchild=%s' "$CYRUS_BIN/lmtpd -C $2/imapd.conf" "$listen" "${CYRUS_LMTP_MAXCHILD:-20}"
}

## cyrus_murder_backend DIR NAME IP IMAP_PORT MUPDATE_HOSTPORT USER PASS
## PROXY_PASS PEER=IP...: like cyrus_backend (listens on IP:IMAP_PORT,
## reports to MUPDATE_HOSTPORT as USER, USER is its admin), but ready for
## cross-backend work: $CYRUS_PROXY_USER is in proxyservers AND admins (XFER
## and LMTP log in with an empty authorization id), the backend itself logs
## in to other backends as $CYRUS_PROXY_USER/PROXY_PASS (XFER's outgoing
## connection), IDLE polls every second (imapidlepoll: 1), subscriptions to
## mailboxes held by another backend are kept (allowallsubscribe: yes; a
## user's subscriptions live on their INBOX backend), a CREATE without a
## partition never reseeds rand() from the clock (defaultpartition: default;
## without it Cyrus 3.6 re-runs srand(time(NULL)) in partlist_initialize, so
## two backends' first top-level CREATEs in one second get the same
## uniqueid, and an XFER between them fails with IMAP_MAILBOX_MOVED), and its
## master runs
## in a private mount namespace whose /etc/hosts maps each PEER name to its IP
## and /etc/services maps imap to IMAP_PORT (all backends share the port).
## With CYRUS_POP3_PORT set, it also runs pop3d on IP:CYRUS_POP3_PORT (the
## proxy logs in there with AUTH PLAIN as itself for the user; plaintext is
## allowed, see _cyrus_instance), at most ${CYRUS_POP3_MAXCHILD:-20} at once.
## Add $CYRUS_PROXY_USER with cyrus_add_user yourself.
cyrus_murder_backend() {
  local dir=$1 name=$2 ip=$3 imap_port=$4 mupdate=$5 user=$6 pass=$7 proxy_pass=$8
  shift 8
  _cyrus_instance "$dir" "$name" "$user $CYRUS_PROXY_USER"
  cat >>"$dir/imapd.conf" <<EOC
proxyservers: $CYRUS_PROXY_USER
lmtp_admins: $CYRUS_PROXY_USER
proxy_authname: $CYRUS_PROXY_USER
proxy_password: $proxy_pass
imapidlepoll: 1
allowusermoves: yes
allowallsubscribe: yes
defaultpartition: default
EOC
  _cyrus_mupdate_client "$dir" "$mupdate" "$user" "$pass"
  _cyrus_user "$dir" "$name" "$user" "$pass"
  _cyrus_name_files "$dir" "$imap_port" "$@"
  _cyrus_start "$dir" \
    "  imap cmd=\"$CYRUS_BIN/imapd -C $dir/imapd.conf\" listen=\"$ip:$imap_port\" prefork=0 maxchild=$CYRUS_IMAP_MAXCHILD$(_cyrus_lmtp_service "$ip" "$dir" "${CYRUS_LMTP_PORT:-}")${CYRUS_POP3_PORT:+
  pop3 cmd=\"$CYRUS_BIN/pop3d -C $dir/imapd.conf\" listen=\"$ip:$CYRUS_POP3_PORT\" prefork=0 maxchild=${CYRUS_POP3_MAXCHILD:-20}}" \
    "$ip:$imap_port" \
    unshare --mount --propagation private -- \
    sh -c 'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/services && shift 2 && exec "$@"' \
    backend-namespace "$dir/hosts" "$dir/services"
}

## start_murder_backends DIR ADMIN PASS PROXY_PASS: the murder of proxy.sh
## and bench/proxy.sh: a three-master Corvid cluster (start_corvid_cluster,
## in DIR/corvid) and two real Cyrus backends be1 (127.0.0.2) and be2
## (127.0.0.3) on the same IMAP, LMTP and POP3 ports, reporting to node 1 as
## ADMIN/PASS, each with $CYRUS_PROXY_USER/PROXY_PASS added. Sets MUPDATE
## (node 1's host:port), CORVID_PROXY_MASTERS, IMAP_PORT, CYRUS_LMTP_PORT,
## CYRUS_POP3_PORT, CYRUS_FE_POP3_PORT,
## BE1_IP, BE2_IP, BE1, BE2 (their directories), BE1_PGID, BE2_PGID and
## PEERS (be1=IP be2=IP, as cyrus_murder_frontend takes them).
start_murder_backends() {
  local dir=$1 admin=$2 pass=$3 proxy_pass=$4 be
  # Three masters (proxy.sh's outage phase stops them all). Backends and
  # the Cyrus frontend talk MUPDATE to node 1; corvid-proxy's replica
  # follows all three.
  start_corvid_cluster 3 "$dir/corvid" "$admin" "$pass"
  MUPDATE=${CORVID_CLUSTER_MUPDATE%% *}
  CORVID_PROXY_MASTERS=$CORVID_CLUSTER_PEERS
  IMAP_PORT=$(free_port)
  # Every backend's lmtpd and pop3d listen on these ports at its own
  # address, as imapd does on IMAP_PORT; the reference frontend's pop3d on
  # CYRUS_FE_POP3_PORT (read by cyrus_murder_* and start_corvid_proxy).
  CYRUS_LMTP_PORT=$(free_port)
  CYRUS_POP3_PORT=$(free_port)
  CYRUS_FE_POP3_PORT=$(free_port)
  export CORVID_PROXY_MASTERS CYRUS_LMTP_PORT CYRUS_POP3_PORT CYRUS_FE_POP3_PORT
  BE1_IP=127.0.0.2
  BE2_IP=127.0.0.3
  BE1=$dir/be1
  BE2=$dir/be2
  PEERS=("be1=$BE1_IP" "be2=$BE2_IP")
  cyrus_murder_backend "$BE1" be1 "$BE1_IP" "$IMAP_PORT" "$MUPDATE" "$admin" "$pass" "$proxy_pass" "${PEERS[@]}"
  BE1_PGID=$SPAWNED_PID
  cyrus_murder_backend "$BE2" be2 "$BE2_IP" "$IMAP_PORT" "$MUPDATE" "$admin" "$pass" "$proxy_pass" "${PEERS[@]}"
  BE2_PGID=$SPAWNED_PID
  for be in "$BE1" "$BE2"; do
    cyrus_add_user "$be" "$CYRUS_PROXY_USER" "$proxy_pass"
  done
}

## imap_script [--check] [HOST:]PORT USER PASS SCRIPT|-: run imap_session.py
## (scripted session, normalised transcript; see its docstring), bounded.
imap_script() {
  timeout 120 python3 "$INTEROP_DIR/imap_session.py" "$@"
}

## start_saslauthd DIR HOST/PORT: run Debian's saslauthd privately (no system
## file touched): mechanism rimap (it checks a password by an IMAP LOGIN at
## HOST/PORT, e.g. a backend), socket DIR/mux, one process, in the
## foreground under spawn. Exports SASLAUTHD_SOCKET (DIR/mux).
start_saslauthd() {
  local dir=$1 target=$2
  require_bin saslauthd testsaslauthd
  mkdir -p "$dir"
  spawn "$dir/saslauthd.log" saslauthd -d -a rimap -O "$target" -m "$dir" -n 1
  wait_for "saslauthd socket $dir/mux" test -S "$dir/mux" || die "saslauthd did not create $dir/mux"
  SASLAUTHD_SOCKET=$dir/mux
  export SASLAUTHD_SOCKET
}

## start_postfix DIR DOMAIN LMTP_SOCKET: a private Postfix (Debian's, run as
## `postfix start-fg` with its own config, queue and log in DIR) that takes
## mail for DOMAIN by SMTP on 127.0.0.1:$POSTFIX_SMTP_PORT and hands it to
## lmtp:unix:LMTP_SOCKET (virtual_transport), its lmtp client running as
## user postfix; nothing else is delivered or relayed. Log: DIR/maillog.
start_postfix() {
  local dir=$1 domain=$2 socket=$3
  require_bin postfix /usr/lib/postfix/sbin/master
  id postfix >/dev/null 2>&1 || die "user postfix does not exist (is postfix installed?)"
  POSTFIX_SMTP_PORT=$(free_port)
  mkdir -p "$dir/etc" "$dir/queue" "$dir/data"
  chmod 755 "$dir"
  chown postfix "$dir/data"
  cat >"$dir/etc/main.cf" <<EOC
compatibility_level = 3.6
queue_directory = $dir/queue
data_directory = $dir/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = $dir/maillog
maillog_file_prefixes = $dir
myhostname = mx.corvid.test
mydomain = corvid.test
myorigin = corvid.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains =
alias_maps =
alias_database =
smtputf8_enable = no
virtual_mailbox_domains = $domain
virtual_transport = lmtp:unix:$socket
smtpd_reject_unlisted_recipient = no
smtpd_recipient_restrictions = permit_mynetworks, reject
EOC
  # Only what SMTP in, the queue and LMTP out need; nothing chrooted.
  cat >"$dir/etc/master.cf" <<EOC
127.0.0.1:$POSTFIX_SMTP_PORT inet n - n - - smtpd
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
proxymap  unix - - n - - proxymap
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
lmtp      unix - - n - - lmtp
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
EOC
  postfix -c "$dir/etc" check >"$dir/check.log" 2>&1 || {
    cat "$dir/check.log" >&2
    return 1
  }
  spawn "$dir/postfix.log" postfix -c "$dir/etc" start-fg
  interop_log "$dir/maillog"
  wait_for "Postfix greeting on 127.0.0.1:$POSTFIX_SMTP_PORT" python3 -c \
    'import smtplib, sys; smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=2).quit()' \
    "$POSTFIX_SMTP_PORT"
}

## start_corvid_proxy DIR PROXY_PASS LOGIN_CHECK CREATE_SERVERS NAME=HOST:PORT...:
## start corvid-proxy (${CORVID_PROXY_BIN:-$CORVID_BIN_DIR/corvid-proxy}) with
## DIR/proxy.toml: its embedded replica follows the Corvid node at
## 127.0.0.1:$CORVID_PEER_PORT (start_corvid), or the comma-separated peer
## addresses in $CORVID_PROXY_MASTERS, it logs in to backends as
## $CYRUS_PROXY_USER/PROXY_PASS, checks client passwords by LOGIN_CHECK
## (backend or saslauthd; the latter uses $SASLAUTHD_SOCKET), creates new
## top-level mailboxes on CREATE_SERVERS (space-separated names), and knows
## each backend NAME at HOST:PORT. Waits for its ready line; exports
## CORVID_PROXY_IMAP and CORVID_PROXY_METRICS (host:port); with
## CYRUS_POP3_PORT set (the backends' pop3d port) POP3 listens too and
## CORVID_PROXY_POP3 is exported. Returns 1 (after
## saying why) when the binary is missing or does not become ready: callers
## decide whether that is a failure. Its administrator (who sees every
## mailbox and may move mailboxes) is $CORVID_PROXY_ADMIN (default admin).
## [namespace] unixhierarchysep is true when $PROXY_UNIXHIERARCHYSEP is 1.
start_corvid_proxy() {
  local dir=$1 proxy_pass=$2 check=$3 create=$4 bin=${CORVID_PROXY_BIN:-$CORVID_BIN_DIR/corvid-proxy}
  local b s servers="" line pid unixsep=false
  shift 4
  if [[ ! -x $bin ]]; then
    echo "corvid-proxy: $bin does not exist" >&2
    return 1
  fi
  for s in $create; do servers+="${servers:+, }\"$s\""; done
  if [[ $PROXY_UNIXHIERARCHYSEP == 1 ]]; then unixsep=true; fi
  mkdir -p "$dir/proxy-data"
  {
    cat <<EOC
[proxy]
data_dir = "$dir/proxy-data"
admins = ["${CORVID_PROXY_ADMIN:-admin}"]
[replica]
masters = [$(
      m=${CORVID_PROXY_MASTERS:-127.0.0.1:$CORVID_PEER_PORT}
      printf '"%s", ' ${m//,/ } | sed 's/, $//'
    )]
[imap]
listen = "127.0.0.1:0"
tls_listen = ""
[tls]
cert = ""
key = ""
[login]
check = "$check"
saslauthd_socket = "${SASLAUTHD_SOCKET:-/run/saslauthd/mux}"
[backend]
authname = "$CYRUS_PROXY_USER"
password = "$proxy_pass"
[backends]
EOC
    for b in "$@"; do
      echo "${b%%=*} = \"${b#*=}\""
    done
    cat <<EOC
[lmtp]
listen = "127.0.0.1:0"
unix_socket = "$dir/lmtp.sock"
# Postfix's lmtp client runs as user postfix (start_postfix).
unix_socket_mode = "0666"
backend_port = ${CYRUS_LMTP_PORT:-24}
[create]
servers = [$servers]
select_mode = "random"
[namespace]
unixhierarchysep = $unixsep
altnamespace = false
[metrics]
listen = "127.0.0.1:0"
EOC
    if [[ -n ${CYRUS_POP3_PORT:-} ]]; then
      printf '[pop3]\nlisten = "127.0.0.1:0"\nbackend_port = %s\n' "$CYRUS_POP3_PORT"
    fi
  } >"$dir/proxy.toml"
  spawn "$dir/proxy.log" "$bin" --config "$dir/proxy.toml"
  pid=$SPAWNED_PID
  wait_for "corvid-proxy ready line" _corvid_proxy_ready "$dir/proxy.log" "$pid" || true
  if ! line=$(grep -m1 '^corvid-proxy ready imap=' "$dir/proxy.log"); then
    echo "corvid-proxy (pid $pid) exited or printed no ready line; its output:" >&2
    tail -n 20 "$dir/proxy.log" >&2
    kill -TERM -- "-$pid" 2>/dev/null || true
    return 1
  fi
  CORVID_PROXY_IMAP=$(_ready_field "$line" imap)
  CORVID_PROXY_METRICS=$(_ready_field "$line" metrics)
  CORVID_PROXY_LMTP=$(_ready_field "$line" lmtp)
  CORVID_PROXY_LMTP_SOCKET=$dir/lmtp.sock
  export CORVID_PROXY_IMAP CORVID_PROXY_METRICS CORVID_PROXY_LMTP CORVID_PROXY_LMTP_SOCKET
  if [[ -n ${CYRUS_POP3_PORT:-} ]]; then
    CORVID_PROXY_POP3=$(_ready_field "$line" pop3)
    export CORVID_PROXY_POP3
  fi
}

# _ready_field LINE KEY: the value of KEY=VALUE in a ready line.
_ready_field() {
  local rest=${1#*" $2="}
  [[ $rest != "$1" ]] || die "no $2= in the ready line: $1"
  printf '%s\n' "${rest%% *}"
}

# _corvid_proxy_ready LOG PID: done when LOG has the ready line or PID exited.
_corvid_proxy_ready() {
  grep -q '^corvid-proxy ready imap=' "$1" || ! kill -0 "$2" 2>/dev/null
}

## cyrus_murder_frontend DIR NAME IMAP_PORT SLAVE_PORT MUPDATE_HOSTPORT USER
## PASS PROXY_PASS BACKEND_IMAP_PORT EXTRA_CONF BACKEND=IP...: cyrus_frontend
## with EXTRA_CONF (imapd.conf lines, e.g. serverlist) written before master
## starts: Cyrus service processes serve many connections, so lines appended
## later reach only processes forked after them. With CYRUS_FE_POP3_PORT
## (and CYRUS_POP3_PORT, the backends' pop3d port) set, it also runs a
## proxying pop3d on 127.0.0.1:CYRUS_FE_POP3_PORT.
cyrus_murder_frontend() {
  local dir=$1 name=$2 imap_port=$3 slave_port=$4 mupdate=$5 user=$6 pass=$7
  local proxy_pass=$8 backend_port=$9 extra=${10}
  shift 10
  _cyrus_instance "$dir" "$name" "$user"
  _cyrus_mupdate_client "$dir" "$mupdate" "$user" "$pass"
  cat >>"$dir/imapd.conf" <<EOC
proxy_authname: $CYRUS_PROXY_USER
proxy_password: $proxy_pass
$extra
EOC
  _cyrus_user "$dir" "$name" "$user" "$pass"
  _cyrus_name_files "$dir" "$backend_port" "$@"
  _cyrus_start "$dir" \
    "  imap cmd=\"$CYRUS_BIN/imapd -C $dir/imapd.conf\" listen=\"127.0.0.1:$imap_port\" prefork=0 maxchild=$CYRUS_IMAP_MAXCHILD
  mupdate cmd=\"$CYRUS_BIN/mupdate -C $dir/imapd.conf\" listen=\"127.0.0.1:$slave_port\" prefork=1 maxchild=1$(
      [[ -z ${CYRUS_FRONTEND_LMTP_SOCKET:-} ]] || _cyrus_lmtp_service "$CYRUS_FRONTEND_LMTP_SOCKET" "$dir" ""
    )${CYRUS_FE_POP3_PORT:+
  pop3 cmd=\"$CYRUS_BIN/pop3d -C $dir/imapd.conf\" listen=\"127.0.0.1:$CYRUS_FE_POP3_PORT\" prefork=0 maxchild=${CYRUS_POP3_MAXCHILD:-20}}" \
    "$imap_port" \
    unshare --mount --propagation private -- \
    sh -c 'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/services && shift 2 && exec "$@"' \
    frontend-namespace "$dir/hosts" "$dir/services"
}
