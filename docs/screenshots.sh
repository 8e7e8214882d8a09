#!/usr/bin/env bash
# Takes the screenshots of the search demo's page in docs/ with headless Chromium.
#
# Run as root from the repository's root: docs/screenshots.sh
# It installs Chromium from Debian's packages, builds and starts
# `example-search --serve` on a free port, and writes:
#   docs/search-page.png        /search?q=context&timeout=300ms  (a client's timeout)
#   docs/search-page-lucky.png  /lucky?q=rust                    (a route's timeout)
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

shot() { # shot OUTPUT PATH_AND_QUERY
    local profile
    profile=$(mktemp -d)
    chromium --headless --no-sandbox --disable-gpu --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --hide-scrollbars --user-data-dir="$profile" \
        --window-size=1000,720 --screenshot="$1" "http://127.0.0.1:$port$2" 2>/dev/null
    rm -rf "$profile"
    echo "wrote $1"
}

shot docs/search-page.png "/search?q=context&timeout=300ms"
shot docs/search-page-lucky.png "/lucky?q=rust"
