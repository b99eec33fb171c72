#!/bin/sh
# Every binary answers the same way (common/cli): --help prints "usage: NAME ..." on
# stdout and exits 0; --version prints "NAME VERSION" on stdout and exits 0; an unknown
# option prints the usage on stderr, nothing on stdout, and exits 2.
# Usage: help.sh VERSION BINARY...
set -u
version=$1
shift
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0

fail() {
    echo "FAIL $name: $1"
    fails=$((fails + 1))
}

for bin in "$@"; do
    name=$(basename "$bin")
    "$bin" --help >"$tmp/out" 2>"$tmp/err"
    rc=$?
    [ $rc -eq 0 ] || fail "--help: exit $rc"
    head -n 1 "$tmp/out" | grep -q "^usage: $name " || fail "--help: stdout starts '$(head -n 1 "$tmp/out")'"
    "$bin" --version >"$tmp/out" 2>"$tmp/err"
    rc=$?
    [ $rc -eq 0 ] || fail "--version: exit $rc"
    [ "$(cat "$tmp/out")" = "$name $version" ] || fail "--version: '$(cat "$tmp/out")'"
    "$bin" --no-such-option >"$tmp/out" 2>"$tmp/err"
    rc=$?
    [ $rc -eq 2 ] || fail "bad option: exit $rc"
    [ ! -s "$tmp/out" ] || fail "bad option: wrote to stdout"
    grep -q "^usage: $name " "$tmp/err" || fail "bad option: no usage on stderr"
    grep -q "no-such-option" "$tmp/err" || fail "bad option: not named on stderr"
    echo "ok   $name"
done
exit $fails
