#!/usr/bin/env bash
# Runs every interop test script against the server under test (SERVER=corvid
# by default, SERVER=cyrus for the reference Cyrus master) and sums their
# "interop: N passed, M failed" lines. Fails if any script fails or does not
# report.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# Each entry: [VAR=VALUE ...] SCRIPT.
scripts=(mupdatetest.sh backend.sh frontend.sh proxy.sh "UNIXSEP=1 proxy.sh")

total_passed=0
total_failed=0
status=0
out=$(mktemp /tmp/corvid-interop-run.XXXXXX)
trap 'rm -f "$out"' EXIT

# Corvid's replica under a master killed mid-snapshot (skips itself with
# SERVER=cyrus).
scripts+=(replica_snapshot.sh)

# Users managed through the cluster, checked with mupdatetest on every node
# and a replica (skips itself with SERVER=cyrus).
scripts+=(users.sh)

for script in "${scripts[@]}"; do
  echo "======== $script (SERVER=${SERVER:-corvid})"
  rc=0
  read -r -a words <<<"$script"
  CORVID_PROXY_REQUIRED=1 env "${words[@]:0:${#words[@]}-1}" bash "$here/${words[-1]}" 2>&1 | tee "$out" || rc=$?
  summary=$(grep -E '^interop: [0-9]+ passed, [0-9]+ failed$' "$out" | tail -n 1 || true)
  if [[ -z $summary ]]; then
    echo "FAIL: $script printed no summary line"
    total_failed=$((total_failed + 1))
    status=1
    continue
  fi
  read -r _ p _ f _ <<<"$summary"
  total_passed=$((total_passed + p))
  total_failed=$((total_failed + f))
  if [[ $rc -ne 0 || $f -ne 0 ]]; then
    if [[ $f -eq 0 ]]; then
      echo "FAIL: $script exited with status $rc"
      total_failed=$((total_failed + 1))
    fi
    status=1
  fi
done

echo "======== all interop scripts"
echo "interop: $total_passed passed, $total_failed failed"
exit "$status"
