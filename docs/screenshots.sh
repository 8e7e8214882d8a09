#!/usr/bin/env bash
# Takes the screenshots of the search demo's page in docs/ with headless Chromium.
#
# Run as root from the repository's root: docs/screenshots.sh
# It installs Chromium from Debian's packages, builds and starts
# `example-search --serve` on a free port, and writes:
#   docs/search-page.png        /search?q=context&timeout=300ms  (a client's timeout)
#   docs/search-page-lucky.png  /lucky?q=rust                    (a route's timeout)
#   docs/live-view.png          /debug/requests under load       (the live view)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium fonts-dejavu-core
fi

cargo build -q -p example-search
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
./target/debug/example-search --serve "127.0.0.1:$port" >/dev/null &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$port/search" && break
    sleep 0.1
done

shot() { # shot OUTPUT PATH_AND_QUERY [WIDTH,HEIGHT]
    local profile
    profile=$(mktemp -d)
    # The virtual-time budget lets the live view's first fetch land before the shot.
    chromium --headless --no-sandbox --disable-gpu --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --hide-scrollbars --user-data-dir="$profile" --virtual-time-budget=3000 \
        --window-size="${3:-1000,720}" --screenshot="$1" "http://127.0.0.1:$port$2" 2>/dev/null
    rm -rf "$profile"
    echo "wrote $1"
}

shot docs/search-page.png "/search?q=context&timeout=300ms"
shot docs/search-page-lucky.png "/lucky?q=rust"

# The live view under load: quick requests, requests that run out of time (the query's
# 20 ms, /lucky's route timeout), clients that hang up, then requests parked on a slow
# backend, in flight with their budgets (the server's 2 s, a client's 1500ms) when the
# shot is taken.
base="http://127.0.0.1:$port"
for i in $(seq 20); do curl -s -o /dev/null "$base/search?q=context&n=$i"; done
for i in $(seq 6); do curl -s -o /dev/null "$base/search?q=golang&timeout=20ms&latency_ms=500&n=$i"; done
for i in $(seq 3); do curl -s -o /dev/null "$base/lucky?q=rust&latency_ms=500&n=$i"; done
for i in $(seq 4); do curl -s -o /dev/null --max-time 0.1 "$base/search?q=rust&latency_ms=2000&n=$i" || true; done
load=()
for i in $(seq 6); do
    curl -s -o /dev/null "$base/search?q=golang&latency_ms=30000&n=$i" & load+=($!)
done
sleep 0.4
for i in $(seq 4); do
    curl -s -o /dev/null "$base/search?q=rust&timeout=1500ms&latency_ms=30000&n=$i" & load+=($!)
done
sleep 0.2
shot docs/live-view.png "/debug/requests" 1200,1100
kill "${load[@]}" 2>/dev/null || true
