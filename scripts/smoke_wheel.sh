#!/usr/bin/env bash
# Wheel smoke test: build dgemma's wheel, install it into a clean venv (no editable checkout on the path), then run
# what a new user runs: `dgemma --version`, a generation with the bundled model, and `dgemma serve` answering an
# OpenAI-style chat request that sends temperature 0.7 and top_p 0.9. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'kill "${server:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
"${PYTHON:-python3}" -m pip wheel -q --no-deps . -w "$work/dist"
rm -rf build
"${PYTHON:-python3}" -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0
"$work/venv/bin/pip" install -q "$work"/dist/dgemma-*.whl
cd "$work"  # away from the checkout: only the installed wheel can be imported
bin="$work/venv/bin"
"$bin/dgemma" --version
"$bin/dgemma" generate "In the beginning" -n 8 -s 1 -q
port=$("$bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin/dgemma" serve --port "$port" --processes 1 --log-level warning &
server=$!
"$bin/python" - "$port" <<'EOF'
import json
import sys
import time
import urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.monotonic() + 120
while True:
    try:
        urllib.request.urlopen(base + "/health", timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("the server did not come up")
        time.sleep(0.5)
model = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]
body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "temperature": 0.7, "top_p": 0.9,
        "max_tokens": 16, "seed": 1}
req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                             {"content-type": "application/json"})
answer = json.load(urllib.request.urlopen(req, timeout=120))
assert answer["choices"][0]["finish_reason"] in ("stop", "length"), answer
print("wheel smoke test: ok,", repr(answer["choices"][0]["message"]["content"][:60]))
EOF
