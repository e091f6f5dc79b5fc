#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Interop (a): Cyrus's own MUPDATE client, mupdatetest, against the server
# under test (SERVER=corvid, the default, or SERVER=cyrus for the reference
# Cyrus `mupdate -m`). It authenticates with PLAIN, writes entries as admin
# (quoted strings and {n+} literals), and checks the exact FIND, LIST and
# UPDATE answers, then a failed login.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

interop_init mupdatetest
ADMIN="admin"
PASS=interop-secret
start_server_under_test "$WORK/sut" "$ADMIN" "$PASS"
T=$'\t'

# --- greeting and PLAIN login, as mupdatetest prints them
raw=$(mupdatetest_run "$SUT_HOSTPORT" "$ADMIN" "$PASS" </dev/null)
assert_match "greeting offers PLAIN" '^S: \* AUTH .*"PLAIN"' "$raw"
assert_match "greeting ends with * OK MUPDATE ... (master)" \
  '^S: \* OK MUPDATE "[^"]*" "[^"]*" "[^"]*" "\(master\)"$' "$raw"
assert_line "PLAIN login accepted" 'Authenticated.' "$raw"
assert_line "LOGOUT answered" 'Q01 OK "bye-bye"' "$raw"

# --- writes: quoted strings and non-synchronising literals, pipelined
out=$(sut_mupdate \
  "A1 ACTIVATE \"user.alice\" \"be1!default\" \"alice${T}lrswipkxtecdan${T}\"" \
  'A2 ACTIVATE {15+}' 'user.alice.Sent {11+}' 'be1!default {21+}' "alice${T}lrswipkxtecdan${T}" \
  'A3 RESERVE "user.bob" "be2!default"' \
  'A4 RESERVE {11+}' 'shared.news {11+}' 'be2!archive' \
  "A5 ACTIVATE \"shared.news\" \"be2!archive\" \"anyone${T}lrs${T}\"" \
  "A6 ACTIVATE \"example.com!user.fred\" \"be1!default\" \"fred@example.com${T}lrswipkxtecdan${T}\"" \
  "A7 ACTIVATE \"user.carol\" \"localhost:9143!default\" \"carol${T}lrs${T}\"" \
  'A8 RESERVE "user.alice" "be2!default"')
for tag in A1 A2 A3 A4 A5 A6 A7; do
  assert_answers "$tag write answered OK" "$tag" "$tag OK \"done\"" "$out"
done
assert_answers "RESERVE of a name active elsewhere is refused" A8 'A8 NO "mailbox already exists"' "$out"

# --- reads in a new session
out=$(sut_mupdate \
  'B1 FIND "user.alice"' \
  'B2 FIND "user.bob"' \
  'B3 FIND "user.nobody"' \
  'B4 FIND {21+}' 'example.com!user.fred' \
  'B5 FIND "user.carol"' \
  'B6 LIST' \
  'B7 LIST "be1!"' \
  'B8 LIST "be2!"' \
  'B9 LIST "be9!"')
assert_answers "FIND active entry" B1 "B1 MAILBOX \"user.alice\" \"be1!default\" \"alice\\tlrswipkxtecdan\\t\"
B1 OK \"Search completed\"" "$out"
assert_answers "FIND reserved entry" B2 'B2 RESERVE "user.bob" "be2!default"
B2 OK "Search completed"' "$out"
assert_answers "FIND missing name" B3 'B3 OK "Search completed"' "$out"
assert_answers "FIND (literal) name with a domain" B4 "B4 MAILBOX \"example.com!user.fred\" \"be1!default\" \"fred@example.com\\tlrswipkxtecdan\\t\"
B4 OK \"Search completed\"" "$out"
assert_answers "FIND entry whose server part has a port" B5 "B5 MAILBOX \"user.carol\" \"localhost:9143!default\" \"carol\\tlrs\\t\"
B5 OK \"Search completed\"" "$out"
assert_answers "LIST everything, in name order" B6 "B6 MAILBOX \"example.com!user.fred\" \"be1!default\" \"fred@example.com\\tlrswipkxtecdan\\t\"
B6 MAILBOX \"shared.news\" \"be2!archive\" \"anyone\\tlrs\\t\"
B6 MAILBOX \"user.alice\" \"be1!default\" \"alice\\tlrswipkxtecdan\\t\"
B6 MAILBOX \"user.alice.Sent\" \"be1!default\" \"alice\\tlrswipkxtecdan\\t\"
B6 RESERVE \"user.bob\" \"be2!default\"
B6 MAILBOX \"user.carol\" \"localhost:9143!default\" \"carol\\tlrs\\t\"
B6 OK \"list complete\"" "$out"
assert_answers "LIST with prefix be1!" B7 "B7 MAILBOX \"example.com!user.fred\" \"be1!default\" \"fred@example.com\\tlrswipkxtecdan\\t\"
B7 MAILBOX \"user.alice\" \"be1!default\" \"alice\\tlrswipkxtecdan\\t\"
B7 MAILBOX \"user.alice.Sent\" \"be1!default\" \"alice\\tlrswipkxtecdan\\t\"
B7 OK \"list complete\"" "$out"
assert_answers "LIST with prefix be2!" B8 "B8 MAILBOX \"shared.news\" \"be2!archive\" \"anyone\\tlrs\\t\"
B8 RESERVE \"user.bob\" \"be2!default\"
B8 OK \"list complete\"" "$out"
assert_answers "LIST with a prefix nothing has" B9 'B9 OK "list complete"' "$out"

# --- transitions (only those Cyrus 3.6.1 survives: no DELETE of unknown
# names, no DEACTIVATE of reservations)
out=$(sut_mupdate \
  'C1 DEACTIVATE "user.alice.Sent" "be1!default"' \
  'C2 FIND "user.alice.Sent"' \
  "C3 ACTIVATE \"user.bob\" \"be2!default\" \"bob${T}lrswipkxtecdan${T}\"" \
  'C4 FIND "user.bob"' \
  'C5 DELETE "user.alice.Sent"' \
  'C6 FIND "user.alice.Sent"' \
  "C7 ACTIVATE \"shared.news\" \"be3!default\" \"anyone${T}lr${T}\"" \
  'C8 FIND "shared.news"')
assert_answers "DEACTIVATE active entry" C1 'C1 OK "done"' "$out"
assert_answers "DEACTIVATE leaves a reservation" C2 'C2 RESERVE "user.alice.Sent" "be1!default"
C2 OK "Search completed"' "$out"
assert_answers "ACTIVATE a reservation" C3 'C3 OK "done"' "$out"
assert_answers "activated entry carries its ACL" C4 "C4 MAILBOX \"user.bob\" \"be2!default\" \"bob\\tlrswipkxtecdan\\t\"
C4 OK \"Search completed\"" "$out"
assert_answers "DELETE existing entry" C5 'C5 OK "done"' "$out"
assert_answers "deleted entry is gone" C6 'C6 OK "Search completed"' "$out"
assert_answers "ACTIVATE moves an entry" C7 'C7 OK "done"' "$out"
assert_answers "moved entry has the new location and ACL" C8 "C8 MAILBOX \"shared.news\" \"be3!default\" \"anyone\\tlr\\t\"
C8 OK \"Search completed\"" "$out"

# --- UPDATE: full dump, then changes pushed no later than the next NOOP
go=$WORK/stream.go
stream_input() {
  echo 'U1 UPDATE'
  wait_for "stream go signal" test -e "$go" || true
  echo 'U2 NOOP'
}
stream_input | timeout 60 "$CYRUS_BIN/mupdatetest" -p "$SUT_MUPDATE_PORT" -m PLAIN \
  -a "$ADMIN" -w "$PASS" 127.0.0.1 >"$WORK/stream.raw" 2>&1 &
stream_pid=$!
_INTEROP_PGIDS+=("$stream_pid")
interop_log "$WORK/stream.raw"
wait_for "UPDATE streaming starts" grep -q 'U1 OK "streaming starts"' "$WORK/stream.raw" ||
  die "UPDATE stream did not start"
out=$(sut_mupdate \
  "D1 ACTIVATE \"user.dave\" \"be1!default\" \"dave${T}lrs${T}\"" \
  'D2 DELETE "user.alice"' \
  'D3 RESERVE "user.erin" "be2!default"')
assert_eq "writes during UPDATE answered" \
  $'D1 OK "done"\nD2 OK "done"\nD3 OK "done"' "$(grep -E '^D[0-9] ' <<<"$out")"
touch "$go"
_gone() { ! kill -0 "$1" 2>/dev/null; }
wait_for "UPDATE session to end" _gone "$stream_pid" || die "UPDATE session did not end"
wait "$stream_pid" || true
stream=$(mupdate_answers <"$WORK/stream.raw" | grep -E '^U[12] ')
assert_eq "UPDATE dump, streaming, pushes before the NOOP answer" "U1 MAILBOX \"example.com!user.fred\" \"be1!default\" \"fred@example.com\\tlrswipkxtecdan\\t\"
U1 MAILBOX \"shared.news\" \"be3!default\" \"anyone\\tlr\\t\"
U1 MAILBOX \"user.alice\" \"be1!default\" \"alice\\tlrswipkxtecdan\\t\"
U1 MAILBOX \"user.bob\" \"be2!default\" \"bob\\tlrswipkxtecdan\\t\"
U1 MAILBOX \"user.carol\" \"localhost:9143!default\" \"carol\\tlrs\\t\"
U1 OK \"streaming starts\"
U1 MAILBOX \"user.dave\" \"be1!default\" \"dave\\tlrs\\t\"
U1 DELETE \"user.alice\"
U1 RESERVE \"user.erin\" \"be2!default\"
U2 OK \"Noop done\"" "$stream"

# --- partial UPDATE: only entries on the named server
out=$(sut_mupdate 'P1 UPDATE "be2"' 'P2 NOOP')
assert_answers "partial UPDATE dumps only be2's entries" P1 'P1 MAILBOX "user.bob" "be2!default" "bob\tlrswipkxtecdan\t"
P1 RESERVE "user.erin" "be2!default"
P1 OK "streaming starts"' "$out"

# --- a wrong password is refused, and nothing runs unauthenticated
raw=$(printf 'W1 FIND "user.bob"\n' | mupdatetest_run "$SUT_HOSTPORT" "$ADMIN" "wrong-$PASS")
assert_match "wrong password: authentication fails" '^Authentication failed' "$raw"
assert_no_line "wrong password: not authenticated" 'Authenticated.' "$raw"
assert_match "command before login is refused" '^W1 BAD ' "$raw"
assert_no_line "no data leaks before login" 'W1 MAILBOX' "$raw"

# --- the server is still healthy after all that
out=$(sut_mupdate 'Z1 FIND "user.bob"')
assert_answers "server still answers" Z1 "Z1 MAILBOX \"user.bob\" \"be2!default\" \"bob\\tlrswipkxtecdan\\t\"
Z1 OK \"Search completed\"" "$out"
