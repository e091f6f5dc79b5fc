#!/usr/bin/env bash
# Debian's real Prometheus (2.42) scrapes a 3-node Corvid cluster, a replica
# and a corvid-proxy every second, with docs/monitoring/alerts.yml loaded.
# Through its HTTP query API the test shows: every target up, one leader and
# has_leader everywhere, MUPDATE command rates by result (ok and no), replica
# lag (the replica and the proxy's embedded one catch up), LMTP deferrals
# and backend errors of a proxy whose backend is down (and the alert on
# it), and after kill -9 of the leader: a new leader, a higher term, leader
# changes counted, and the member-unreachable and quorum-at-risk alerts
# pending or firing for the dead node. Every metric the alert rules and the
# Grafana dashboard use must be in docs/src/metrics.md and at the live
# /metrics of the daemon it belongs to. Last, a second node is killed: the
# survivor's has_leader drops to 0, CorvidNoLeader goes pending, and its
# /readyz answers 503.
# Corvid only. About 55 s.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
interop_init prometheus
if [[ $SERVER != corvid ]]; then
  echo "SKIP: monitoring Corvid; nothing to test with SERVER=$SERVER"
  exit 0
fi
REQUIRE_HINT="install the Debian packages with: bash scripts/install-deps.sh test"
require_bin curl prometheus promtool
REPO=$(cd "$INTEROP_DIR/../.." && pwd)
PROMQ=$REPO/tests/monitoring/promq.py
ADMIN=admin
PASS=interop-secret
CTL=$CORVID_BIN_DIR/corvidctl

# ---------------------------------------------------------------- Corvid
start_corvid_cluster 3 "$WORK/cluster" "$ADMIN" "$PASS"
NODE_METRICS=()
for i in 1 2 3; do
  m=$(sed -n 's/^corvid-registry ready .*metrics=\([^ ]*\).*/\1/p' "$WORK/cluster/node$i.log" | head -n 1)
  [[ -n $m ]] || die "no metrics address for node $i"
  NODE_METRICS+=("$m")
done
read -r -a NODE_MUPDATE <<<"$CORVID_CLUSTER_MUPDATE"
start_corvid_replica "$WORK/replica" "$CORVID_CLUSTER_PEERS" "$WORK/cluster/users.toml"
REPLICA_METRICS=127.0.0.1:$CORVID_REPLICA_METRICS_PORT
# The proxy's one backend is down (nothing listens on its ports), so that
# its LMTP deliveries are deferred and its backend errors counted.
DEAD_PORT=$(free_port)
CORVID_PROXY_MASTERS=$CORVID_CLUSTER_PEERS CYRUS_LMTP_PORT=$DEAD_PORT \
  start_corvid_proxy "$WORK/proxy" unused backend "be1" "be1=127.0.0.1:$DEAD_PORT" ||
  die "corvid-proxy did not start"

# ---------------------------------------------------------------- Prometheus
PROM_DIR=$WORK/prometheus
mkdir -p "$PROM_DIR/data"
cp "$REPO/docs/monitoring/alerts.yml" "$PROM_DIR/alerts.yml"
cat >"$PROM_DIR/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 900ms
  evaluation_interval: 1s
rule_files:
  - alerts.yml
scrape_configs:
  - job_name: corvid-registry
    static_configs:
      - targets: ["${NODE_METRICS[0]}", "${NODE_METRICS[1]}", "${NODE_METRICS[2]}"]
  - job_name: corvid-replica
    static_configs:
      - targets: ["$REPLICA_METRICS"]
  - job_name: corvid-proxy
    static_configs:
      - targets: ["$CORVID_PROXY_METRICS"]
EOF
if promtool check config "$PROM_DIR/prometheus.yml" >"$PROM_DIR/check.log" 2>&1; then
  pass "promtool accepts the generated configuration with the alert rules"
else
  fail "promtool check config: $(cat "$PROM_DIR/check.log")"
fi
PROM_PORT=$(free_port)
PROM=http://127.0.0.1:$PROM_PORT
spawn "$PROM_DIR/prometheus.log" prometheus --config.file="$PROM_DIR/prometheus.yml" \
  --storage.tsdb.path="$PROM_DIR/data" --web.listen-address="127.0.0.1:$PROM_PORT" \
  --storage.tsdb.retention.time=1h
wait_for "prometheus ready" python3 "$PROMQ" ready "$PROM" || die "prometheus did not become ready"
pass "prometheus $(prometheus --version 2>&1 | awk 'NR==1 {print $3}') is up on 127.0.0.1:$PROM_PORT"

## q EXPR: the samples of EXPR now, one per line ("NAME{labels} VALUE").
q() { python3 "$PROMQ" query "$PROM" "$1"; }
## has EXPR: done when EXPR has at least one sample.
has() { [[ -n $(q "$1") ]]; }
## wait_expr DESC EXPR: wait until EXPR has a sample; pass or fail.
wait_expr() {
  if wait_for "$1" has "$2"; then
    pass "$1: $(q "$2" | head -n 3 | paste -sd' ')"
  else
    fail "$1: no sample of $2; now: $(q "$2" 2>&1 | head -n 3)"
  fi
}
## alert_state NAME STATE_RE [LABEL_RE]: done when an alert NAME is in a
## state matching STATE_RE with labels matching LABEL_RE.
alert_state() {
  python3 "$PROMQ" alerts "$PROM" | grep -E "^$1 ($2) .*${3:-}"
}

# Rules: all eleven loaded and evaluated without error.
rules_ok() {
  local rules
  rules=$(python3 "$PROMQ" rules "$PROM")
  [[ $(wc -l <<<"$rules") -eq 11 ]] && ! grep -qv ' ok$' <<<"$rules"
}
if wait_for "all rules evaluated" rules_ok; then
  pass "the alert rules file loads: 11 rules, all evaluated without error"
else
  fail "alert rules: $(python3 "$PROMQ" rules "$PROM" 2>&1)"
fi

wait_expr "all five targets scraped" 'count(up == 1) == 5'
wait_expr "every master has a fresh leader" 'sum(corvid_server_has_leader{job="corvid-registry"}) == 3'
wait_expr "exactly one master leads" 'sum(corvid_server_is_leader{job="corvid-registry"}) == 1'
wait_expr "three voters" 'min(corvid_raft_voters) == 3'

# ---------------------------------------------------------------- load
# Creations through a follower, then the same names again: RESERVE of a
# name that exists answers NO.
leader_instance=$(q 'corvid_server_is_leader{job="corvid-registry"} == 1' | sed -n 's/.*instance="\([^"]*\)".*/\1/p')
follower=0
for i in 0 1 2; do
  if [[ ${NODE_METRICS[i]} != "$leader_instance" ]]; then follower=$i; fi
done
# 100 creations (200 writes) in two rounds that Prometheus scrapes apart
# (a counter first seen at its final value has no rate), then a classic
# UPDATE dump as a Cyrus slave does it.
creations() {
  "$CTL" bench -s "${NODE_MUPDATE[follower]}" -u "$ADMIN" -w "$PASS" --workload reserve-activate \
    --prefix "$1" -n "$2" -C 2 --location 'be1!default' --max-seconds 60 --quiet >>"$WORK/bench.log" 2>&1 ||
    fail "corvidctl bench: $(tail -n 5 "$WORK/bench.log")"
}
creations user.prom 20
wait_for "first creations scraped" has 'sum(corvid_mupdate_commands_total{command="ACTIVATE"}) >= 20' ||
  fail "the first 20 creations never showed in Prometheus"
creations user.prom2 80
"$CTL" bench -s "${NODE_MUPDATE[follower]}" -u "$ADMIN" -w "$PASS" --workload update-dump \
  -n 1 -C 1 --max-seconds 30 --quiet >>"$WORK/bench.log" 2>&1 ||
  fail "corvidctl bench update-dump: $(tail -n 5 "$WORK/bench.log")"
# A mailbox for the LMTP delivery below, and a RESERVE of it once it
# exists, which the registry refuses (NO).
printf 'A1 ACTIVATE "user.promuser" "be1!default" "promuser\tlrswipkxtecda\t"\r\nA2 RESERVE "user.promuser" "be2!default"\r\nA3 LOGOUT\r\n' |
  "$CTL" shell -s "${NODE_MUPDATE[follower]}" -u "$ADMIN" -w "$PASS" >"$WORK/shell.log" 2>&1 || true
grep -q '^A1 OK' "$WORK/shell.log" || die "ACTIVATE user.promuser failed: $(cat "$WORK/shell.log")"
grep -q '^A2 NO' "$WORK/shell.log" || fail "RESERVE of an existing mailbox elsewhere: $(paste -sd' ' "$WORK/shell.log")"
# The index of that change, from the leader itself (Prometheus's copy may
# be a scrape old).
ACTIVATED=$(curl -s --max-time 5 "http://$leader_instance/metrics" | awk '$1 == "corvid_raft_applied_index" {print $2}')
[[ -n $ACTIVATED ]] || die "no corvid_raft_applied_index at the leader $leader_instance"
wait_expr "MUPDATE commands answered OK, per second" 'sum by (command) (rate(corvid_mupdate_commands_total{result="ok"}[1m])) > 0'
# (Refusals are rare here: the series appears at 1, so count, not rate.)
wait_expr "MUPDATE commands answered NO" 'sum by (command) (corvid_mupdate_commands_total{result="no"}) >= 1'
wait_expr "writes committed on the leader, per second" 'rate(corvid_raft_log_entries_appended_total[1m]) > 0 and on (instance) corvid_server_is_leader == 1'
wait_expr "WAL fsync p99 known" 'histogram_quantile(0.99, sum by (instance, le) (rate(corvid_disk_wal_fsync_duration_seconds_bucket[1m]))) > 0'
wait_expr "the replica caught up (lag 0 entries, 0 s)" "corvid_replica_lag_entries{job=\"corvid-replica\"} == 0 and on (instance) corvid_replica_lag_seconds == 0 and on (instance) corvid_replica_applied_index >= $ACTIVATED"
wait_expr "the proxy's embedded replica caught up" "corvid_replica_lag_entries{job=\"corvid-proxy\"} == 0 and on (instance) corvid_replica_applied_index >= $ACTIVATED"

wait_expr "the proxy's replica has user.promuser" "corvid_replica_applied_index{job=\"corvid-proxy\"} >= $ACTIVATED"
lmtp=$(python3 "$INTEROP_DIR/lmtp_scenarios.py" send "$CORVID_PROXY_LMTP" prometheus 1 promuser@example.org 2>&1 || true)
if grep -q '^CLASSES 4$' <<<"$lmtp" && grep -Eq '^RESULT \S+ 250 4[0-9][0-9]( |$)' <<<"$lmtp"; then
  pass "LMTP to a mailbox on a dead backend: recipient accepted, message deferred"
else
  fail "LMTP to a mailbox on a dead backend: $lmtp"
fi
# A login through the proxy: the backend that checks passwords is down.
python3 - "$CORVID_PROXY_IMAP" >"$WORK/imap-login.log" 2>&1 <<'EOP' || true
import imaplib, sys
host, port = sys.argv[1].rsplit(":", 1)
c = imaplib.IMAP4(host, int(port), timeout=30)
try:
    c.login("promuser", "secret")
except imaplib.IMAP4.error as e:
    print("refused:", e)
EOP
grep -q '^refused' "$WORK/imap-login.log" || fail "IMAP login via the proxy with its backend down: $(cat "$WORK/imap-login.log")"
wait_expr "the proxy counts the login" 'sum by (result) (corvid_proxy_logins_total) >= 1'
wait_expr "the proxy counts the deferral" 'corvid_proxy_lmtp_recipients_total{result="deferred"} >= 1'
wait_expr "the proxy counts the backend failure" 'sum by (server) (corvid_proxy_backend_errors_total{kind=~"connect|lmtp"}) >= 1'
if wait_for "backend-unreachable alert" alert_state CorvidProxyBackendUnreachable 'pending|firing' 'server="be1"'; then
  pass "CorvidProxyBackendUnreachable is $(alert_state CorvidProxyBackendUnreachable 'pending|firing' | awk '{print $2}') for be1"
else
  fail "CorvidProxyBackendUnreachable never went pending: $(python3 "$PROMQ" alerts "$PROM")"
fi
if alert_state 'Corvid(NoLeader|MemberUnreachable|QuorumAtRisk)' 'pending|firing' >/dev/null; then
  fail "a cluster alert is active on a healthy cluster: $(python3 "$PROMQ" alerts "$PROM")"
else
  pass "no cluster alert on a healthy cluster"
fi

# Every dashboard query is valid PromQL here and shows data.
if dash=$(python3 "$PROMQ" dashboard "$PROM" "$REPO/docs/monitoring/corvid-dashboard.json" 2>&1); then
  empty=$(grep -c '^0 samples' <<<"$dash" || true)
  pass "Prometheus runs all $(wc -l <<<"$dash") dashboard queries ($empty without data yet)"
else
  fail "dashboard queries: $(grep -v '^[0-9]* samples' <<<"$dash")"
fi

# ---------------------------------------------------------------- leader kill
old_term=$(q 'max(corvid_raft_term)' | awk '{print $NF}')
old_id=$(q "corvid_raft_leader_id{instance=\"$leader_instance\"}" | awk '{print $NF}')
for i in 0 1 2; do
  if [[ ${NODE_METRICS[i]} == "$leader_instance" ]]; then
    kill -KILL -- "-${CORVID_CLUSTER_PGIDS[i]}" 2>/dev/null || kill -KILL "${CORVID_CLUSTER_PGIDS[i]}"
  fi
done
echo "killed the leader, node $old_id ($leader_instance), in term $old_term"
wait_expr "the dead leader's target is down" "up{instance=\"$leader_instance\"} == 0"
wait_expr "a new leader among the survivors" "corvid_server_is_leader{job=\"corvid-registry\",instance!=\"$leader_instance\"} == 1"
wait_expr "the survivors agree on it, in a higher term" "corvid_raft_leader_id{instance!=\"$leader_instance\"} != $old_id and on (instance) corvid_raft_term > $old_term and on (instance) up == 1"
wait_expr "the survivors counted a leader change" "increase(corvid_server_leader_changes_seen_total{instance!=\"$leader_instance\"}[1m]) > 0"
wait_expr "both survivors have a fresh leader again" "sum(corvid_server_has_leader{instance!=\"$leader_instance\"}) == 2"
for alert in CorvidMemberUnreachable CorvidQuorumAtRisk; do
  if wait_for "$alert" alert_state "$alert" 'pending|firing'; then
    pass "$alert goes $(alert_state "$alert" 'pending|firing' | awk '{print $2; exit}') after the kill: $(alert_state "$alert" 'pending|firing' | head -n 1)"
  else
    fail "$alert never went pending: $(python3 "$PROMQ" alerts "$PROM")"
  fi
done
if alert_state CorvidMemberUnreachable 'pending|firing' "peer=\"$old_id\"" >/dev/null; then
  pass "the unreachable member is the dead leader, node $old_id"
else
  fail "CorvidMemberUnreachable names another peer: $(alert_state CorvidMemberUnreachable 'pending|firing')"
fi

# ---------------------------------------------------------------- metrics used
live=()
for m in "${NODE_METRICS[@]}"; do
  [[ $m == "$leader_instance" ]] || live+=("master=$m")
done
live+=("replica=$REPLICA_METRICS" "proxy=$CORVID_PROXY_METRICS")
if out=$(python3 "$REPO/tests/monitoring/check_metrics.py" "$REPO/docs/src/metrics.md" \
  "$REPO/docs/monitoring/alerts.yml" "$REPO"/docs/monitoring/*.json --live "${live[@]}" 2>&1); then
  pass "alerts and dashboard use only documented metrics the live daemons export: ${out##*$'\n'}"
else
  fail "metrics used by the alerts or the dashboard: $out"
fi

# ---------------------------------------------------------------- majority lost
# A second node killed: the survivor keeps its vote but hears from no
# leader, so has_leader drops to 0, CorvidNoLeader goes pending, and its
# /readyz answers 503 (while /healthz still answers 200).
new_leader=$(q "corvid_server_is_leader{instance!=\"$leader_instance\"} == 1" | sed -n 's/.*instance="\([^"]*\)".*/\1/p' | head -n 1)
survivor=
for i in 0 1 2; do
  case ${NODE_METRICS[i]} in
    "$new_leader") kill -KILL -- "-${CORVID_CLUSTER_PGIDS[i]}" 2>/dev/null || kill -KILL "${CORVID_CLUSTER_PGIDS[i]}" ;;
    "$leader_instance") ;;
    *) survivor=${NODE_METRICS[i]} ;;
  esac
done
[[ -n $new_leader && -n $survivor ]] || die "no new leader ($new_leader) or survivor ($survivor) to test a lost majority"
echo "killed the new leader $new_leader; $survivor is alone"
wait_expr "the lone survivor knows no fresh leader" "corvid_server_has_leader{instance=\"$survivor\"} == 0"
if wait_for "CorvidNoLeader" alert_state CorvidNoLeader 'pending|firing' "instance=\"$survivor\""; then
  pass "CorvidNoLeader goes $(alert_state CorvidNoLeader 'pending|firing' | awk '{print $2; exit}') for the survivor"
else
  fail "CorvidNoLeader never went pending: $(python3 "$PROMQ" alerts "$PROM")"
fi
ready=$(curl -s --max-time 5 -w ' %{http_code}' "http://$survivor/readyz")
health=$(curl -s --max-time 5 -w ' %{http_code}' "http://$survivor/healthz")
if [[ $ready == "not ready: "*" 503" && $health == *" 200" ]]; then
  pass "the survivor's /readyz: ${ready//$'\n'/ }; /healthz: ${health//$'\n'/ }"
else
  fail "the survivor's /readyz: $ready; /healthz: $health"
fi
