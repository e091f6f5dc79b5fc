#!/usr/bin/env bash
# Installs the Debian packages Corvid needs on a fresh machine.
#   install-deps.sh build   compilers and headers for RocksDB's C++ (make run)
#   install-deps.sh test    the above plus real Cyrus 3.6 for interop and
#                           iptables/iproute2 for the Jepsen harness, isync (mbsync)
#                           and curl as IMAP clients and swaks and postfix as mail
#                           clients for tests/interop/proxy.sh (make test)
# As root it installs them; otherwise it prints the apt-get line and fails.
set -euo pipefail

group=${1:-build}
build_pkgs=(clang libclang-dev make python3)
test_pkgs=(cyrus-imapd cyrus-murder cyrus-clients cyrus-admin sasl2-bin libsasl2-modules iptables iproute2 isync curl swaks postfix)
case "$group" in
  build) want=("${build_pkgs[@]}") ;;
  test) want=("${build_pkgs[@]}" "${test_pkgs[@]}") ;;
  *) echo "usage: $0 build|test" >&2; exit 2 ;;
esac

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "Corvid needs these Debian packages: ${missing[*]}" >&2
  echo "Install them as root with:" >&2
  echo "  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y ${missing[*]}" >&2
  exit 1
fi

echo "installing: ${missing[*]}"
# Keep Debian from starting the system-wide Cyrus: tests run their own
# instances in temporary directories.
created_policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  created_policy=1
fi
trap 'if [ -n "$created_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
