#!/usr/bin/env bash
# make bench-proxy: the same IMAP load (corvidctl imap-bench) through
# corvid-proxy, through a real Cyrus 3.6 murder frontend and directly to the
# Cyrus backend be1, in one run, on the murder of tests/interop/proxy.sh
# (three Corvid masters, Cyrus backends be1 and be2); then idle sessions
# held open through corvid-proxy (and, fewer, through the Cyrus frontend)
# with the server's memory and CPU read from /proc; then LMTP deliveries
# (1 recipient on be1, 5 recipients on be1 and be2; 4 KiB and 100 KiB) and
# POP3 sessions through corvid-proxy, the Cyrus frontend's lmtpd (UNIX
# socket) and pop3d, and directly to the backends' lmtpd (TCP, AUTH PLAIN
# as the proxy user, as both frontends log in) and pop3d, with the masters'
# MUPDATE command counters read around every run. Writes the section "IMAP
# proxy (make bench-proxy)" of docs/src/benchmarks.md and
# bench/last-proxy-results.jsonl.
#
#   BENCH_SECONDS        length of each sessions/fetch/append run (default 10)
#   BENCH_APPEND_COUNT   1 MiB APPENDs per target at most (default 100; the
#                        disk holds them until the end of the run)
#   BENCH_IDLE           idle logged-in sessions (LOGIN only, no SELECT: no
#                        backend connection) through corvid-proxy (default 10000)
#   BENCH_IDLE_SELECTED  idle sessions in IDLE on INBOX (each holds a backend
#                        imapd on be1) through corvid-proxy and through the
#                        Cyrus frontend (default 500)
#   BENCH_HOLD           seconds the idle sessions are held (default 20)
#   BENCH_ORDER          the order of the load runs' targets (default
#                        "corvid-proxy cyrus-frontend direct-be1"; LMTP and
#                        POP3 rows follow it too, direct-be1 standing for
#                        "direct to the backend(s)")
#   BENCH_MAIL_SECONDS   length of each LMTP and POP3 run (default BENCH_SECONDS)
#   BENCH_LMTP_COUNT     deliveries per LMTP run at most (default 1000; the
#                        backends keep every message until the end)
#   BENCH_MAIL_ROUNDS    rounds of every LMTP and POP3 row (default 3; the
#                        report gives each target's median)
#   BENCH_MAIL_CONNS     connection counts of the LMTP and POP3 rows
#                        (default "1 8 32")
#   BENCH_PARTS          what to run (default "imap mail"; "mail" alone for
#                        a quick look at LMTP and POP3)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export SERVER=corvid CYRUS_TELEMETRY=0
SECS=${BENCH_SECONDS:-10}
APPENDS=${BENCH_APPEND_COUNT:-100}
IDLE=${BENCH_IDLE:-10000}
IDLE_SELECTED=${BENCH_IDLE_SELECTED:-500}
HOLD=${BENCH_HOLD:-20}
MAIL_SECS=${BENCH_MAIL_SECONDS:-$SECS}
LMTP_COUNT=${BENCH_LMTP_COUNT:-1000}
MAIL_ROUNDS=${BENCH_MAIL_ROUNDS:-3}
MAIL_CONNS=${BENCH_MAIL_CONNS:-1 8 32}
PARTS=" ${BENCH_PARTS:-imap mail} "
# 32 client connections to each lmtpd/pop3d, and a frontend's as many again
# to the backends: Cyrus's default maxchild (20) would queue them.
export CYRUS_LMTP_MAXCHILD=100 CYRUS_POP3_MAXCHILD=100
# Every selected session is one imapd on be1 (and, through the Cyrus
# frontend, one more on the frontend): both may fork that many.
export CYRUS_IMAP_MAXCHILD=$((IDLE_SELECTED + 200))
# shellcheck source=../tests/interop/lib.sh
source "$ROOT/tests/interop/lib.sh"
interop_init bench-proxy
require_bin unshare mount "$CORVID_BIN_DIR/corvid-proxy"
T0=$SECONDS

# The load client and corvid-proxy each hold one descriptor per idle
# session (plus the proxy's transient password checks on be1).
ulimit -n "$(ulimit -Hn)"
if (($(ulimit -n) < IDLE + 1000)); then
  echo "ulimit -n is $(ulimit -n): idle sessions lowered from $IDLE to $(($(ulimit -n) - 1000))"
  IDLE=$(($(ulimit -n) - 1000))
fi

CTL=$CORVID_BIN_DIR/corvidctl
RESULTS=$WORK/proxy-results.jsonl
ADMIN=admin
PASS=bench-secret
PROXY_PASS=proxy-secret
UPASS=user-secret
SESSION_USERS=(b0 b1 b2 b3 b4 b5 b6 b7)
APPEND_USERS=(ap0 ap1 ap2 ap3)
ALL_USERS=("${SESSION_USERS[@]}" "${APPEND_USERS[@]}" big)
# LMTP recipients (no SASL entry needed, only an INBOX): connection i of a
# run delivers to number i mod 32. One recipient: la{i} on be1. Five:
# ra{i}, rb{i}, rc{i} on be1 and rd{i}, re{i} on be2. POP3: p{i} on be1,
# four 4 KiB messages each (Cyrus's pop3d locks the maildrop: one
# connection per user).
MAIL_USERS=32
LMTP_BE1_NAMES=(la ra rb rc)
LMTP_BE2_NAMES=(rd re)
POP_USERS=()
for ((i = 0; i < MAIL_USERS; i++)); do POP_USERS+=("p$i"); done

phase() {
  echo "--- [$((SECONDS - T0))s] $*"
}

phase "murder: three Corvid masters, backends be1 and be2 (telemetry off, maxchild $CYRUS_IMAP_MAXCHILD)"
start_murder_backends "$WORK" "$ADMIN" "$PASS" "$PROXY_PASS"
for be in "$BE1" "$BE2"; do
  for u in "${ALL_USERS[@]}" "${POP_USERS[@]}"; do cyrus_add_user "$be" "$u" "$UPASS"; done
done
BE1_ADDR=$BE1_IP:$IMAP_PORT

phase "mailboxes on be1 (IMAP, LMTP, POP3 users) and be2 (LMTP users)"
creates=()
for u in "${ALL_USERS[@]}" "${POP_USERS[@]}"; do creates+=("CREATE user.$u"); done
for n in "${LMTP_BE1_NAMES[@]}"; do
  for ((i = 0; i < MAIL_USERS; i++)); do creates+=("CREATE user.$n$i"); done
done
imap_admin_cmd "$BE1_ADDR" "$ADMIN" "$PASS" "${creates[@]}" >/dev/null ||
  die "could not create the bench users' INBOXes on be1"
creates=()
for n in "${LMTP_BE2_NAMES[@]}"; do
  for ((i = 0; i < MAIL_USERS; i++)); do creates+=("CREATE user.$n$i"); done
done
imap_admin_cmd "$BE2_IP:$IMAP_PORT" "$ADMIN" "$PASS" "${creates[@]}" >/dev/null ||
  die "could not create the LMTP users' INBOXes on be2"
LAST_BE2=user.${LMTP_BE2_NAMES[-1]}$((MAIL_USERS - 1))
# Seeded with the load generator itself, straight on be1: ten 2 KiB
# messages per session user; twenty 256 KiB messages (5 MiB) for fetch-bodies.
seed() {
  "$CTL" imap-bench --server "$BE1_ADDR" --user "$1" --password "$UPASS" --workload append \
    -C 1 --count "$2" --size "$3" --duration 60 --quiet >/dev/null ||
    die "seeding $1 on be1 failed"
}
for u in "${SESSION_USERS[@]}"; do seed "$u" 10 2048; done
seed big 20 262144
for u in "${POP_USERS[@]}"; do seed "$u" 4 4096; done

phase "Cyrus frontend"
FE=$WORK/fe
# Its lmtpd on a UNIX socket (over TCP it would want SASL authentication).
CYRUS_FRONTEND_LMTP_SOCKET=$WORK/fe-lmtp.sock
export CYRUS_FRONTEND_LMTP_SOCKET
FE_PORT=$(free_port)
FE_SLAVE_PORT=$(free_port)
cyrus_murder_frontend "$FE" fe "$FE_PORT" "$FE_SLAVE_PORT" "$MUPDATE" "$ADMIN" "$PASS" "$PROXY_PASS" "$IMAP_PORT" \
  "serverlist: be1 be2
proxyd_disable_mailbox_referrals: 1" "${PEERS[@]}"
FE_PID=$SPAWNED_PID
for u in "${ALL_USERS[@]}" "${POP_USERS[@]}"; do cyrus_add_user "$FE" "$u" "$UPASS"; done
frontend_has() {
  cyrus_mailboxes "$FE" | grep -qxF -- "$1"
}
wait_for "the Cyrus frontend knows user.big" frontend_has "user.big be1!default" ||
  die "the Cyrus frontend's mupdate slave did not get the bench mailboxes"
wait_for "the Cyrus frontend knows $LAST_BE2" frontend_has "$LAST_BE2 be2!default" ||
  die "the Cyrus frontend's mupdate slave did not get the LMTP users' mailboxes on be2"

phase "corvid-proxy"
start_corvid_proxy "$WORK/proxy" "$PROXY_PASS" backend "be1 be2" \
  "be1=$BE1_ADDR" "be2=$BE2_IP:$IMAP_PORT" || die "corvid-proxy did not start"
PROXY_PID=$SPAWNED_PID
routes() {
  imap_admin_cmd "$CORVID_PROXY_IMAP" big "$UPASS" "SELECT INBOX"
}
wait_for "corvid-proxy routes user.big" routes || die "corvid-proxy cannot SELECT user.big's INBOX"

# Name=address=watched pid of each target; be1 is always watched as the backend.
TARGETS=(
  "corvid-proxy=$CORVID_PROXY_IMAP=$PROXY_PID"
  "cyrus-frontend=127.0.0.1:$FE_PORT=$FE_PID"
  "direct-be1=$BE1_ADDR=$BE1_PGID"
)

# load LABEL ADDR PID ARGS...: one imap-bench run, appended to $RESULTS.
load() {
  local label=$1 addr=$2 pid=$3 backend=()
  shift 3
  [[ $pid == "$BE1_PGID" ]] || backend=(--watch-backend-pid "$BE1_PGID")
  "$CTL" imap-bench --server "$addr" --password "$UPASS" --label "$label" --json "$RESULTS" \
    --watch-pid "$pid" "${backend[@]}" --quiet "$@" | grep -v '^{'
}

# The masters' metrics addresses (their ready lines), for the MUPDATE
# command counters read around each LMTP and POP3 run.
MASTER_METRICS=()
for log in "$WORK"/corvid/node*.log; do
  line=$(grep -m1 '^corvid-registry ready' "$log") || die "no ready line in $log"
  MASTER_METRICS+=(--master-metrics "$(_ready_field "$line" metrics)")
done

# Idle sessions first, while the servers are fresh: memory growth is read
# from before to after opening, and Cyrus keeps the imapd processes it
# forked for later connections (an earlier run's processes would hide the
# cost). Through the Cyrus frontend (one imapd process per client
# connection, and one on be1 per selected session) $IDLE_SELECTED sessions
# in IDLE on INBOX; through corvid-proxy the same, then $IDLE logged in but
# unselected (a LOGIN is checked on be1 and that connection closed: no
# backend connection stays).
idle() {
  local label=$1 addr=$2 pid=$3 n=$4 mode=$5 backend=()
  shift 5
  [[ $pid == "$BE1_PGID" ]] || backend=(--watch-backend-pid "$BE1_PGID")
  phase "$label: $n idle sessions ($mode), held ${HOLD}s"
  "$CTL" imap-bench --server "$addr" --password "$UPASS" --label "$label" --json "$RESULTS" \
    --watch-pid "$pid" "${backend[@]}" --quiet --workload idle -C "$n" --idle-mode "$mode" \
    --hold "$HOLD" --duration 180 --user-prefix b --users "${#SESSION_USERS[@]}" "$@" | grep -v '^{'
}
if [[ $PARTS == *" imap "* ]]; then
  idle cyrus-frontend "127.0.0.1:$FE_PORT" "$FE_PID" "$IDLE_SELECTED" idle
  idle corvid-proxy "$CORVID_PROXY_IMAP" "$PROXY_PID" "$IDLE_SELECTED" idle
  idle corvid-proxy "$CORVID_PROXY_IMAP" "$PROXY_PID" "$IDLE" login
fi


# Row by row, the targets back to back (in BENCH_ORDER), so that a drift of
# this shared machine over the run (other jobs, Cyrus's state) touches the
# three figures of a row alike.
ORDER=()
for name in ${BENCH_ORDER:-corvid-proxy cyrus-frontend direct-be1}; do
  t=
  for x in "${TARGETS[@]}"; do [[ ${x%%=*} == "$name" ]] && t=$x; done
  [[ -n $t ]] || die "BENCH_ORDER: no target $name"
  ORDER+=("$t")
done
# each_target ARGS...: load ARGS through every target.
each_target() {
  local t label addr pid
  for t in "${ORDER[@]}"; do
    IFS== read -r label addr pid <<<"$t"
    load "$label" "$addr" "$pid" "$@"
  done
}
if [[ $PARTS == *" imap "* ]]; then
  for c in 1 8 32; do
    phase "sessions, $c connections"
    each_target --workload sessions -C "$c" --duration "$SECS" --user-prefix b --users "${#SESSION_USERS[@]}"
  done
  for c in 1 4; do
    phase "fetch-bodies, $c connections"
    each_target --workload fetch-bodies -C "$c" --duration "$SECS" --user big
  done
  phase "append, 4 connections"
  each_target --workload append -C 4 --duration "$SECS" --count "$APPENDS" \
    --size 1048576 --user-prefix ap --users "${#APPEND_USERS[@]}"
fi

# LMTP and POP3, row by row like IMAP. Every run reads the three masters'
# corvid_mupdate_commands_total before and after (master lookups per
# delivery). corvid-proxy and the Cyrus frontend are reached on their lmtpd
# UNIX sockets (Postfix's lmtp:unix:); "direct" is the backends' TCP lmtpd
# with AUTH PLAIN as the proxy user once per connection (how both
# frontends log in there), one transaction per backend, be1 and be2 in
# parallel (as corvid-proxy does).
BE1_LMTP=$BE1_IP:$CYRUS_LMTP_PORT
BE2_LMTP=$BE2_IP:$CYRUS_LMTP_PORT
# mail_run NAME ARGS...: one LMTP or POP3 run through target NAME (of
# BENCH_ORDER); the caller's LMTP_RCPTS (bare addresses for the frontends),
# DIRECT_RCPTS (TARGET=ADDR for direct) and DIRECT_PIDS apply to LMTP.
mail_run() {
  local name=$1 pop3=0 server pids=() backend=() rcpts=() r
  shift
  [[ " $* " == *" pop3 "* ]] && pop3=1
  case $name in
  corvid-proxy)
    pids=("$PROXY_PID")
    if ((pop3)); then server=$CORVID_PROXY_POP3; else server=unix:$CORVID_PROXY_LMTP_SOCKET; fi
    ;;
  cyrus-frontend)
    pids=("$FE_PID")
    if ((pop3)); then server=127.0.0.1:$CYRUS_FE_POP3_PORT; else server=unix:$CYRUS_FRONTEND_LMTP_SOCKET; fi
    ;;
  direct-be1)
    if ((pop3)); then
      server=$BE1_IP:$CYRUS_POP3_PORT pids=("$BE1_PGID")
    else
      server=$BE1_LMTP pids=("${DIRECT_PIDS[@]}")
      rcpts=(--lmtp-auth "$CYRUS_PROXY_USER:$PROXY_PASS")
    fi
    ;;
  esac
  if ((!pop3)); then
    if [[ $name == direct-be1 ]]; then
      for r in "${DIRECT_RCPTS[@]}"; do rcpts+=(--rcpt "$r"); done
    else
      for r in "${LMTP_RCPTS[@]}"; do rcpts+=(--rcpt "$r"); done
    fi
  fi
  # be1 (and be2 for LMTP) behind a frontend.
  if [[ $name != direct-be1 ]]; then
    backend=(--watch-backend-pid "$BE1_PGID")
    ((pop3)) || backend+=(--watch-backend-pid "$BE2_PGID")
  fi
  local watch=()
  for r in "${pids[@]}"; do watch+=(--watch-pid "$r"); done
  # "direct" (the backends, not only be1, for 5 recipients) in the report.
  local label=$name
  [[ $name != direct-be1 ]] || label=direct
  "$CTL" imap-bench --server "$server" --label "$label" --json "$RESULTS" --quiet \
    "${watch[@]}" "${backend[@]}" "${MASTER_METRICS[@]}" "${rcpts[@]}" "$@" | grep -v '^{'
}
# each_mail_target ARGS...: the row's run through every target, in
# MAIL_ROUNDS rounds, the order reversed every other round, so that a drift
# of the shared machine's load reaches every target alike (the report gives
# each target's median).
each_mail_target() {
  local t round order
  for ((round = 1; round <= MAIL_ROUNDS; round++)); do
    order=("${ORDER[@]}")
    if ((round % 2 == 0)); then
      order=()
      for t in "${ORDER[@]}"; do order=("$t" "${order[@]}"); done
    fi
    for t in "${order[@]}"; do mail_run "${t%%=*}" "$@"; done
  done
}
if [[ $PARTS == *" mail "* ]]; then
  for n in 1 5; do
    if ((n == 1)); then
      LMTP_RCPTS=("la{}@example.org")
      DIRECT_RCPTS=("la{}@example.org")
      DIRECT_PIDS=("$BE1_PGID")
    else
      LMTP_RCPTS=()
      DIRECT_RCPTS=()
      for x in "${LMTP_BE1_NAMES[@]:1}"; do
        LMTP_RCPTS+=("$x{}@example.org")
        DIRECT_RCPTS+=("$x{}@example.org")
      done
      for x in "${LMTP_BE2_NAMES[@]}"; do
        LMTP_RCPTS+=("$x{}@example.org")
        DIRECT_RCPTS+=("$BE2_LMTP=$x{}@example.org")
      done
      DIRECT_PIDS=("$BE1_PGID" "$BE2_PGID")
    fi
    for size in 4096 102400; do
      for c in $MAIL_CONNS; do
        phase "LMTP, $n recipient(s), $((size / 1024)) KiB, $c connections (df: $(df -h --output=avail / | tail -1 | tr -d ' '))"
        each_mail_target --workload lmtp -C "$c" --duration "$MAIL_SECS" --count "$LMTP_COUNT" \
          --size "$size" --users "$MAIL_USERS"
      done
    done
  done
  for c in $MAIL_CONNS; do
    phase "POP3 sessions, $c connections"
    each_mail_target --workload pop3 -C "$c" --duration "$MAIL_SECS" --user-prefix p \
      --users "$MAIL_USERS" --password "$UPASS"
  done
fi

# corvid-proxy's own view of its LMTP and POP3 backend work (time per
# backend transaction and login), kept beside the results.
if [[ $PARTS == *" mail "* ]]; then
  curl -s --max-time 10 "http://$CORVID_PROXY_METRICS/metrics" |
    grep -E '^corvid_proxy_(lmtp_backend_seconds|lmtp_backend_logins_total|backend_connect_seconds|lmtp_recipients_total|lmtp_spool|logins_total|backend_errors_total)' |
    grep -E '_(sum|count)\{|_total' >"$ROOT/bench/last-proxy-mail-metrics.txt" || true
fi

# The section goes into docs/src/benchmarks.md now and, as
# bench/proxy-results.md, into every page make bench writes later.
cp "$RESULTS" "$ROOT/bench/last-proxy-results.jsonl"
python3 "$ROOT/bench/proxy_report.py" "$ROOT/bench/last-proxy-results.jsonl" \
  --seconds "$SECS" --hold "$HOLD" >"$ROOT/bench/proxy-results.md"
python3 "$ROOT/bench/proxy_report.py" "$ROOT/bench/last-proxy-results.jsonl" \
  --splice "$ROOT/docs/src/benchmarks.md" --seconds "$SECS" --hold "$HOLD"
phase "wrote docs/src/benchmarks.md (section IMAP proxy), bench/proxy-results.md and bench/last-proxy-results.jsonl ($((SECONDS - T0)) s in all)"
