#!/bin/sh
# The README's two commands on a machine without the test packages, in either order
# (issue 13): a clean clone of HEAD, cmocka hidden from the build (pkg-config sees
# every package but it, as on a machine where tools/up installed only the run-time
# ones), then
#   A: tools/up (one request, then stop) and afterwards tools/test (it must configure
#      the tests into the build tools/up made);
#   B: tools/test first, then tools/up.
# tools/test runs one quick suite here (cli): what is checked is the set-up, not the
# suites, which the enclosing tools/test runs. Node modules are linked from this tree
# (no network needed).
#   tests/setup/either_order.sh [SCRATCH_DIR]
set -eu
src=$(cd "$(dirname "$0")/../.." && pwd)
tmp=${1:-$(mktemp -d /tmp/cpm-either-order-XXXXXX)}
hidden=$tmp/pkgconfig-without-cmocka
mkdir -p "$hidden"
for d in $(pkg-config --variable pc_path pkg-config | tr : ' ') /usr/lib/x86_64-linux-gnu/pkgconfig \
         /usr/share/pkgconfig /usr/lib/pkgconfig; do
    [ -d "$d" ] || continue
    for f in "$d"/*.pc; do
        [ -e "$f" ] && [ "$(basename "$f")" != cmocka.pc ] && ln -sf "$f" "$hidden/"
    done
done
port() { # a free TCP port on loopback
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
clone() {
    rm -rf "$tmp/$1"
    git clone -q "$src" "$tmp/$1"
    for nm in $(cd "$src" && find tests -name node_modules -prune -type d); do
        ln -s "$src/$nm" "$tmp/$1/$nm"
    done
}
up() { # tools/up in one-shot mode with cmocka hidden; the answer must be a chat completion
    (cd "$tmp/$1" && PKG_CONFIG_LIBDIR="$hidden" CPM_UP_ONESHOT=1 PORT=$(port) tools/up) >"$tmp/$1.up.out" 2>"$tmp/$1.up.err" || {
        tail -n 30 "$tmp/$1.up.err"; echo "either-order $1: tools/up failed" >&2; exit 1; }
    grep -q '"chat.completion"' "$tmp/$1.up.out" || {
        cat "$tmp/$1.up.out"; echo "either-order $1: tools/up gave no chat completion" >&2; exit 1; }
}
run_test() {
    (cd "$tmp/$1" && tools/test --suite cli) >"$tmp/$1.test.out" 2>&1 || {
        tail -n 30 "$tmp/$1.test.out"; echo "either-order $1: tools/test failed" >&2; exit 1; }
    grep -Eq '^Ok: +[1-9]' "$tmp/$1.test.out" || {
        tail -n 30 "$tmp/$1.test.out"; echo "either-order $1: tools/test ran no test" >&2; exit 1; }
}

clone a
up a
if [ -e "$tmp/a/build/tests/unit/test_config" ]; then
    echo "either-order a: cmocka was hidden, yet the tests were configured" >&2
    exit 1
fi
echo "ok 1 - tools/up on a build without cmocka serves a chat completion (tests not configured)"
run_test a
echo "ok 2 - tools/test afterwards configures the tests into that build and runs them"

clone b
run_test b
up b
echo "ok 3 - the other order: tools/test, then tools/up"
rm -rf "$tmp"
