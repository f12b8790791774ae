#!/usr/bin/env bash
# Instructions per request, which are repeatable where wall-clock time on a shared VM is not:
# credgate (release, with debug info, --workers 1, request log on) under callgrind forwards N
# keep-alive GETs to an nginx upstream, adding two static headers; the count of a run with
# only the 200 warm-up requests is subtracted. Loopback only; every process is stopped.
#
#   bench/callgrind.sh            # N=3000
#   N=1000 bench/callgrind.sh
#   CREDGATE_BIN=/path/credgate bench/callgrind.sh   # another build (ideally with debug info)
#   RUST_LOG=warn bench/callgrind.sh                  # request log off
#   AUTH=token bench/callgrind.sh                     # an OAuth2 route (token from credgate's fake)
#   PIECE='*Svc*as*Service*call*' bench/callgrind.sh  # also: one piece of the path (everything run
#       inside the functions the pattern names: here the request path without hyper's server
#       side), per request, with its costliest functions
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUN=${BENCH_RUN_DIR:-/tmp/credgate-callgrind}
N=${N:-3000}
UP=${UP_PORT:-18200}
PORT=$((UP + 1))

need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v nginx >/dev/null || need+=(nginx-light)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ -z "${CREDGATE_BIN:-}" ]; then
  (cd "$ROOT" && CARGO_PROFILE_RELEASE_DEBUG=1 CARGO_TARGET_DIR=$RUN/target cargo build --release -q)
  CREDGATE_BIN=$RUN/target/release/credgate
fi

rm -rf "$RUN/work" && mkdir -p "$RUN/work"
W=$RUN/work
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

cat > "$W/upstream.conf" <<EOF
worker_processes 1; daemon off; pid $W/upstream.pid; error_log stderr warn;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000; client_body_temp_path $W;
  server { listen 127.0.0.1:$UP; location / { return 200 "ok"; } } }
EOF
nginx -p "$W" -e stderr -c "$W/upstream.conf" &
PIDS+=($!)
if [ "${AUTH:-headers}" = token ]; then
  # The token endpoint: credgate's embedded fake, outside valgrind.
  "$CREDGATE_BIN" fake --api-port $((UP + 2)) --gateway-port $((UP + 3)) >"$W/fake.log" 2>&1 &
  PIDS+=($!)
  AUTH_TABLE="type = \"oauth2_client_credentials\"
token_url = \"http://127.0.0.1:$((UP + 2))/oauth/token\"
client_id = { env = \"BENCH_OAUTH_ID\" }
client_secret = { env = \"BENCH_OAUTH_SECRET\" }"
else
  AUTH_TABLE='type = "headers"
headers = { "X-Client-ID" = { env = "BENCH_ID" }, "X-Client-Secret" = { env = "BENCH_SECRET" } }'
fi
mkdir -p "$W/conf"  # its own directory: credgate watches it, and the log is written in $W
cat > "$W/conf/credgate.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"
[[route]]
name = "bench"
prefix = "/"
upstream = "http://127.0.0.1:$UP"
[route.auth]
$AUTH_TABLE
EOF
export BENCH_ID=test-id BENCH_SECRET=test-secret BENCH_OAUTH_ID=demo-oauth-client BENCH_OAUTH_SECRET=demo-oauth-secret

drive() { # count: keep-alive GETs on one connection
  python3 - "$PORT" "$1" <<'PY'
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
for _ in range(n):
    c.request("GET", "/")
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
}

instructions() { # requests after warm-up [callgrind options] -> total instructions of the run
  local n=$1; shift
  rm -f "$W"/cg.out.*
  valgrind --tool=callgrind --callgrind-out-file="$W/cg.out.%p" "$@" \
    "$CREDGATE_BIN" --config "$W/conf/credgate.toml" --workers 1 >"$W/credgate.log" 2>&1 &
  local vg=$!
  for _ in $(seq 200); do curl -s -o /dev/null -m 1 "http://127.0.0.1:$PORT/" && break; sleep 0.1; done
  drive 200
  [ "$n" -gt 0 ] && drive "$n"
  kill -TERM "$vg"; wait "$vg" || true
  callgrind_annotate "$W"/cg.out.* 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
}

base=$(instructions 0)
total=$(instructions "$N")
echo "instructions per request: $(( (total - base) / N )) ($N requests; totals $total - $base)"
if [ -n "${PIECE:-}" ]; then
  # Collected only inside the piece, so warm-up and start-up barely count: divided by all requests.
  piece=$(instructions "$N" --toggle-collect="$PIECE")
  echo "inside $PIECE: $(( piece / (N + 200) )) per request; costliest functions (per request, own cost):"
  callgrind_annotate --auto=no --threshold=90 "$W"/cg.out.* 2>/dev/null |
    awk -v n=$((N + 200)) '/^ *[0-9,]+ +\( *[0-9.]+%\)/ && !/PROGRAM TOTALS/ {
      c = $1; gsub(",", "", c); sub(/^ *[0-9,]+ +\( *[0-9.]+%\) +/, ""); printf "%7.0f %s\n", c / n, $0 }' |
    sed -E 's#/root/.cargo/registry/src/[^/]+/##; s#/rustc/[0-9a-f]+/##' | head -n 25
fi
echo "profile of the last run: callgrind_annotate $W/cg.out.*"
