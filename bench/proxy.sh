#!/usr/bin/env bash
# make bench-proxy: the same IMAP load (corvidctl imap-bench) through
# corvid-proxy, through a real Cyrus 3.6 murder frontend and directly to the
# Cyrus backend be1, in one run, on the murder of tests/interop/proxy.sh
# (one Corvid node, Cyrus backends be1 and be2); then idle sessions held
# open through corvid-proxy (and, fewer, through the Cyrus frontend) with
# the server's memory and CPU read from /proc. Writes the section "IMAP
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
#                        "corvid-proxy cyrus-frontend direct-be1")
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export SERVER=corvid CYRUS_TELEMETRY=0
SECS=${BENCH_SECONDS:-10}
APPENDS=${BENCH_APPEND_COUNT:-100}
IDLE=${BENCH_IDLE:-10000}
IDLE_SELECTED=${BENCH_IDLE_SELECTED:-500}
HOLD=${BENCH_HOLD:-20}
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

phase() {
  echo "--- [$((SECONDS - T0))s] $*"
}

phase "murder: Corvid node, backends be1 and be2 (telemetry off, maxchild $CYRUS_IMAP_MAXCHILD)"
start_murder_backends "$WORK" "$ADMIN" "$PASS" "$PROXY_PASS"
for be in "$BE1" "$BE2"; do
  for u in "${ALL_USERS[@]}"; do cyrus_add_user "$be" "$u" "$UPASS"; done
done
BE1_ADDR=$BE1_IP:$IMAP_PORT

phase "mailboxes on be1"
creates=()
for u in "${ALL_USERS[@]}"; do creates+=("CREATE user.$u"); done
imap_admin_cmd "$BE1_ADDR" "$ADMIN" "$PASS" "${creates[@]}" >/dev/null ||
  die "could not create the bench users' INBOXes on be1"
# Seeded with the load generator itself, straight on be1: ten 2 KiB
# messages per session user; twenty 256 KiB messages (5 MiB) for fetch-bodies.
seed() {
  "$CTL" imap-bench --server "$BE1_ADDR" --user "$1" --password "$UPASS" --workload append \
    -C 1 --count "$2" --size "$3" --duration 60 --quiet >/dev/null ||
    die "seeding $1 on be1 failed"
}
for u in "${SESSION_USERS[@]}"; do seed "$u" 10 2048; done
seed big 20 262144

phase "Cyrus frontend"
FE=$WORK/fe
FE_PORT=$(free_port)
FE_SLAVE_PORT=$(free_port)
cyrus_murder_frontend "$FE" fe "$FE_PORT" "$FE_SLAVE_PORT" "$MUPDATE" "$ADMIN" "$PASS" "$PROXY_PASS" "$IMAP_PORT" \
  "serverlist: be1 be2
proxyd_disable_mailbox_referrals: 1" "${PEERS[@]}"
FE_PID=$SPAWNED_PID
for u in "${ALL_USERS[@]}"; do cyrus_add_user "$FE" "$u" "$UPASS"; done
frontend_has() {
  cyrus_mailboxes "$FE" | grep -qxF -- "$1 be1!default"
}
wait_for "the Cyrus frontend knows user.big" frontend_has user.big ||
  die "the Cyrus frontend's mupdate slave did not get the bench mailboxes"

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
idle cyrus-frontend "127.0.0.1:$FE_PORT" "$FE_PID" "$IDLE_SELECTED" idle
idle corvid-proxy "$CORVID_PROXY_IMAP" "$PROXY_PID" "$IDLE_SELECTED" idle
idle corvid-proxy "$CORVID_PROXY_IMAP" "$PROXY_PID" "$IDLE" login


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

# The section goes into docs/src/benchmarks.md now and, as
# bench/proxy-results.md, into every page make bench writes later.
cp "$RESULTS" "$ROOT/bench/last-proxy-results.jsonl"
python3 "$ROOT/bench/proxy_report.py" "$ROOT/bench/last-proxy-results.jsonl" \
  --seconds "$SECS" --hold "$HOLD" >"$ROOT/bench/proxy-results.md"
python3 "$ROOT/bench/proxy_report.py" "$ROOT/bench/last-proxy-results.jsonl" \
  --splice "$ROOT/docs/src/benchmarks.md" --seconds "$SECS" --hold "$HOLD"
phase "wrote docs/src/benchmarks.md (section IMAP proxy), bench/proxy-results.md and bench/last-proxy-results.jsonl ($((SECONDS - T0)) s in all)"
