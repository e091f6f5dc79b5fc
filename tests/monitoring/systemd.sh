#!/usr/bin/env bash
# Checks the systemd units in docs/deploy: `systemd-analyze verify` must
# accept each one without a word (ExecStart is pointed at the built binary,
# as verify wants it to exist), its offline security exposure must stay at
# or under 3.0 ("OK"), and the hardening the docs promise must be there.
# Needs systemd-analyze (Debian package systemd), not a running systemd.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
bin_dir=${CORVID_BIN_DIR:-${CARGO_TARGET_DIR:-$HOME/.cache/corvid-target}/release}
command -v systemd-analyze >/dev/null || {
  echo "FAIL: systemd-analyze is missing: bash scripts/install-deps.sh test"
  exit 1
}
tmp=$(mktemp -d /tmp/corvid-systemd.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
failed=0
checked=0
fail() {
  echo "FAIL: $*"
  failed=$((failed + 1))
}
for unit in "$repo"/docs/deploy/*.service; do
  name=$(basename "$unit")
  checked=$((checked + 1))
  bin=$(sed -n 's|^ExecStart=/usr/local/bin/\([^ ]*\).*|\1|p' "$unit")
  if [[ -z $bin ]]; then
    fail "$name: ExecStart does not start /usr/local/bin/<binary>"
    continue
  fi
  [[ -x $bin_dir/$bin ]] || {
    fail "$name: $bin_dir/$bin is not built"
    continue
  }
  sed "s|/usr/local/bin/|$bin_dir/|g" "$unit" >"$tmp/$name"
  # verify exits 0 on some complaints (unknown keys); any output is one.
  if ! out=$(cd "$tmp" && systemd-analyze verify --man=no "./$name" 2>&1) || [[ -n $out ]]; then
    fail "$name: systemd-analyze verify: $out"
  fi
  if ! score=$(cd "$tmp" && systemd-analyze security --offline=true --threshold=30 "./$name" 2>&1); then
    fail "$name: exposure above 3.0: $(tail -n 1 <<<"$score")"
  fi
  for want in '^(DynamicUser=yes|User=)' '^LimitNOFILE=[0-9]+$' '^ProtectSystem=strict$' \
    '^StateDirectory=' '^NoNewPrivileges=yes$' '^CapabilityBoundingSet=' '^SystemCallFilter=@system-service$'; do
    grep -Eq "$want" "$unit" || fail "$name: no line matching $want"
  done
  echo "ok: $name ($(tail -n 1 <<<"$score" | sed 's/^→ //'))"
done
[[ $checked -ge 3 ]] || fail "expected at least 3 units in docs/deploy, found $checked"
echo "systemd units: $checked checked, $failed problems"
[[ $failed -eq 0 ]]
