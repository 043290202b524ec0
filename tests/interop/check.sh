#!/usr/bin/env bash
# Interoperability with the original Python 3 scripts, both directions, on
# 127.0.0.1:9999 as the originals use it. Run from .ci/run after the examples
# are built; needs python3 and a free UDP port 9999.
set -euo pipefail
cd "$(dirname "$0")/../.."

profile_dir=${CARGO_TARGET_DIR:-target}/debug/examples
rust_server=$profile_dir/udp_server
rust_client=$profile_dir/udp_client
expected_client=$'Hello, Michael!\nHello, Tracy!\nHello, Sarah!'
work=$(mktemp -d)
server_pid=
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

if ! command -v python3 >/dev/null; then
    echo "interop: python3 is not installed; the interop check cannot run" >&2
    exit 1
fi

# Starts a server command in the background; waits (bounded) for its first line.
start_server() {
    "$@" >"$work/server.out" 2>"$work/server.err" &
    server_pid=$!
    for _ in $(seq 1 200); do
        [ -s "$work/server.out" ] && return 0
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.05
    done
    echo "interop: server '$*' did not start:" >&2
    cat "$work/server.err" >&2
    exit 1
}

stop_server() {
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
}

# Checks the server's output: the bind line, then one line per name, all from
# one client port.
check_server_output() {
    local who=$1
    local out
    out=$(cat "$work/server.out")
    if ! printf '%s\n' "$out" | python3 -c '
import re, sys
lines = sys.stdin.read().splitlines()
assert lines[0] == "Bind UDP on 9999...", lines
assert len(lines) == 4, lines
ports = {re.fullmatch(r"Received from 127\.0\.0\.1:(\d+)\.", l).group(1) for l in lines[1:]}
assert len(ports) == 1, lines
'; then
        echo "interop: $who printed:" >&2
        printf '%s\n' "$out" >&2
        exit 1
    fi
}

# 1. Rust server, Python client.
start_server "$rust_server"
got=$(timeout 20 python3 tests/interop/udp_client.py)
stop_server
if [ "$got" != "$expected_client" ]; then
    printf 'interop: Python client against the Rust server printed:\n%s\n' "$got" >&2
    exit 1
fi
check_server_output "the Rust server"
echo "interop: Rust server <- Python client: ok"

# 2. Python server, Rust client.
start_server python3 -u tests/interop/udp_server.py
got=$(timeout 20 "$rust_client")
stop_server
if [ "$got" != "$expected_client" ]; then
    printf 'interop: Rust client against the Python server printed:\n%s\n' "$got" >&2
    exit 1
fi
check_server_output "the Python server"
echo "interop: Python server <- Rust client: ok"
