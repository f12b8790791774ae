#!/usr/bin/env bash
# credgate vs nginx doing the same job (add X-Client-ID/X-Client-Secret, keep-alive upstream),
# measured side by side in one run, rounds interleaved. Loopback only; every phase is bounded.
#
#   bench/run.sh                          # 3 rounds x 10 s, one worker each
#   ROUNDS=1 DURATION=5 bench/run.sh      # a quick look
#   WORKERS=2 bench/run.sh                # two workers each (credgate --workers 2, nginx 2 processes)
#   BASELINE_BIN=/tmp/credgate-old bench/run.sh   # also an older build, as target "baseline"
#   CREDGATE_BIN=/path/credgate bench/run.sh      # measure this binary instead of building one
#   PEERS="hyperfast=18130 other=18131" bench/run.sh
#       # also proxies you started yourself, listening on those ports and forwarding to this
#       # run's upstream (127.0.0.1:18100) with the same two headers: in the load rounds and the
#       # fixed-rate phase, CPU read from the process listening on the port
#
# Targets (all forwarding to one nginx upstream answering `return 200 "ok"`):
#   nginx          nginx proxy, access_log off
#   nginx-log      nginx proxy, access_log on (to a file)
#   credgate       static headers, per-request logging on (the default), logs to a file
#   credgate-nolog static headers, RUST_LOG=warn
#   credgate-token an OAuth2 client-credentials route (token fetched from the embedded fake)
#   direct         wrk straight at the upstream (for reference)
# Each load round also reads the proxy's CPU time (user + system, from /proc) per request: what
# an optimisation changes, whatever share of the cores the load generator and upstream take.
# Then, each on its own:
#   - start-up: credgate's spawn to first answered request
#   - fixed rate (RATE=5000 req/s, 0 to skip; needs oha, installed with cargo if missing):
#     p50/p99 of direct, nginx and credgate, and what each proxy adds to direct's
#   - where the time goes at that rate (TRACE=1, off by default; needs perf, installed with apt
#     as linux-perf if missing, and root): one second of every process's recvfrom, writev,
#     sendto and epoll_wait (`perf record -a`) per proxy, each request followed through the
#     proxy and the upstream by bench/trace.py
#   - one request per connection (CLOSE=1, 0 to skip): wrk with `Connection: close` at nginx and
#     credgate, rounds interleaved: what accepting costs (at WORKERS=2, spreading new connections)
#   - large bodies (BIG_MIB=1024, 0 to skip): one upload and one download of that size through
#     nginx (proxy_request_buffering/proxy_buffering off, so it streams too) and credgate, with
#     each proxy's peak RSS during the transfer
#   - RSS with IDLE=10000 idle keep-alive connections (0 to skip), credgate and nginx (all its
#     workers): opened by one loop as fast as it can, each answered once, measured 3 s later,
#     with the peak while they opened, and again 3 s after they all closed
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
RUN=${BENCH_RUN_DIR:-/tmp/credgate-bench}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64}
WORKERS=${WORKERS:-1}
IDLE=${IDLE:-10000}
RATE=${RATE:-5000}
RATE_CONNS=${RATE_CONNS:-16}
BIG_MIB=${BIG_MIB:-1024}
CLOSE=${CLOSE:-1}
TRACE=${TRACE:-0}
BASE=${BASE_PORT:-18100}

log() { printf '[bench] %s\n' "$*" >&2; }

# ---------------------------------------------------------------- tools
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ "$TRACE" != 0 ] && ! command -v perf >/dev/null; then
  log "installing linux-perf"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-perf >/dev/null
fi
OHA=$(command -v oha || echo "$HOME/.cargo/bin/oha")
if [ "$RATE" != 0 ] && [ ! -x "$OHA" ]; then
  log "installing oha with cargo (not packaged for Debian; about 5 minutes on 2 cores)"
  cargo install oha --locked -q
fi
if [ -z "${CREDGATE_BIN:-}" ]; then
  log "building credgate (release)"
  (cd "$ROOT" && cargo build --release -q)
fi
BIN=${CREDGATE_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/credgate}

# ---------------------------------------------------------------- processes
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true  # for IDLE connections, inherited by every process
rm -rf "$RUN" && mkdir -p "$RUN/tmp"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM
start() { # name cmd...: own process group, output to $RUN/name.log
  local name=$1; shift
  setsid "$@" >"$RUN/$name.log" 2>&1 </dev/null &
  PIDS+=($!)
  eval "PID_${name//-/_}=$!"
}
wait_ok() { # url
  for _ in $(seq 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' -m 1 "$1" || true)" = 200 ] && return 0
    sleep 0.05
  done
  log "no 200 from $1"; return 1
}

UP=$BASE
cat > "$RUN/upstream.conf" <<EOF
worker_processes 1; worker_rlimit_nofile 65536; daemon off; pid $RUN/upstream.pid; error_log stderr warn;
events { worker_connections 16384; multi_accept on; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 75s; client_body_temp_path $RUN/tmp;
  server { listen 127.0.0.1:$UP reuseport backlog=4096; default_type text/plain;
    location / { return 200 "ok"; }
    location = /big { alias $RUN/big.bin; default_type application/octet-stream; }
    # Reads the whole body before answering (a bare return would answer first, and a proxy
    # seeing the early answer may skip forwarding the rest), into memory: written to a temp file
    # instead, the upload ran at the disk's pace (300 - 1600 MiB/s from one transfer to the next).
    location = /sink { client_max_body_size 0; client_body_buffer_size $((BIG_MIB + 1))m;
      proxy_pass_request_body off; proxy_set_header Content-Length ""; proxy_pass http://127.0.0.1:$UP/; }
    location = /__check { return 200 "id=\$http_x_client_id secret=\$http_x_client_secret auth=\$http_authorization"; } } }
EOF
[ "$BIG_MIB" -gt 0 ] && truncate -s "${BIG_MIB}M" "$RUN/big.bin"
start upstream nginx -p "$RUN" -e stderr -c "$RUN/upstream.conf"

nginx_conf() { # port access_log
  cat <<EOF
worker_processes $WORKERS; worker_rlimit_nofile 65536; daemon off; pid $RUN/nginx-$1.pid; error_log stderr warn;
# Room for IDLE callers plus an upstream connection each: their requests arrive together.
events { worker_connections 32768; multi_accept on; }
http { access_log $2; keepalive_requests 1000000; keepalive_timeout 75s;
  client_body_temp_path $RUN/tmp; proxy_temp_path $RUN/tmp;
  upstream origin { server 127.0.0.1:$UP; keepalive 128; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$1 reuseport backlog=4096;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header X-Client-ID "test-id"; proxy_set_header X-Client-Secret "test-secret"; }
    location ~ ^/(big|sink)\$ { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection "";
      client_max_body_size 0; proxy_request_buffering off; proxy_buffering off;
      proxy_set_header X-Client-ID "test-id"; proxy_set_header X-Client-Secret "test-secret"; } } }
EOF
}
nginx_conf $((BASE + 1)) off > "$RUN/nginx.conf"
nginx_conf $((BASE + 2)) "$RUN/access.log" > "$RUN/nginx-log.conf"
start nginx nginx -p "$RUN" -e stderr -c "$RUN/nginx.conf"
start nginx-log nginx -p "$RUN" -e stderr -c "$RUN/nginx-log.conf"

start fake "$BIN" fake --api-port $((BASE + 10)) --gateway-port $((BASE + 11))
cg_conf() { # port auth-table
  cat <<EOF
[server]
listen = "127.0.0.1:$1"
[[route]]
name = "bench"
prefix = "/"
upstream = "http://127.0.0.1:$UP"
[route.auth]
$2
EOF
}
# Each config in a directory of its own: credgate watches the directory of its config, and the
# logs written in $RUN would wake every watcher on every write.
for n in credgate credgate-nolog credgate-token baseline; do mkdir -p "$RUN/conf-$n"; done
STATIC='type = "headers"
headers = { "X-Client-ID" = { env = "BENCH_ID" }, "X-Client-Secret" = { env = "BENCH_SECRET" } }'
TOKEN="type = \"oauth2_client_credentials\"
token_url = \"http://127.0.0.1:$((BASE + 10))/oauth/token\"
client_id = { env = \"BENCH_OAUTH_ID\" }
client_secret = { env = \"BENCH_OAUTH_SECRET\" }"
cg_conf $((BASE + 3)) "$STATIC" > "$RUN/conf-credgate/credgate.toml"
cg_conf $((BASE + 4)) "$STATIC" > "$RUN/conf-credgate-nolog/credgate.toml"
cg_conf $((BASE + 5)) "$TOKEN" > "$RUN/conf-credgate-token/credgate.toml"
cg_conf $((BASE + 6)) "$STATIC" > "$RUN/conf-baseline/credgate.toml"
export BENCH_ID=test-id BENCH_SECRET=test-secret BENCH_OAUTH_ID=demo-oauth-client BENCH_OAUTH_SECRET=demo-oauth-secret
wait_ok "http://127.0.0.1:$UP/"

# Start-up: spawn to first answered request (static credentials), best of 5.
best=999999
for _ in 1 2 3 4 5; do
  t0=$(date +%s%N)
  setsid "$BIN" --config "$RUN/conf-credgate/credgate.toml" --workers "$WORKERS" >/dev/null 2>&1 </dev/null &
  p=$!
  until curl -s -o /dev/null -m 1 "http://127.0.0.1:$((BASE + 3))/"; do sleep 0.001; done
  t=$(( ($(date +%s%N) - t0) / 1000000 ))
  [ "$t" -lt "$best" ] && best=$t
  kill -TERM "$p"; wait "$p" 2>/dev/null || true
done
STARTUP_MS=$best

start credgate env RUST_LOG=info "$BIN" --config "$RUN/conf-credgate/credgate.toml" --workers "$WORKERS"
start credgate-nolog env RUST_LOG=warn "$BIN" --config "$RUN/conf-credgate-nolog/credgate.toml" --workers "$WORKERS"
start credgate-token env RUST_LOG=info "$BIN" --config "$RUN/conf-credgate-token/credgate.toml" --workers "$WORKERS"
NAMES=(nginx nginx-log credgate credgate-nolog credgate-token direct)
PORTS=($((BASE + 1)) $((BASE + 2)) $((BASE + 3)) $((BASE + 4)) $((BASE + 5)) $UP)
PEER_NAMES=()
for peer in ${PEERS:-}; do
  name=${peer%%=*}; port=${peer#*=}
  [[ $name =~ ^[A-Za-z][A-Za-z0-9_]*$ && $port =~ ^[0-9]+$ ]] || { log "PEERS wants name=port, not $peer"; exit 1; }
  NAMES+=("$name"); PORTS+=("$port"); PEER_NAMES+=("$name")
  pid=$(ss -Hltnp "sport = :$port" | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2)
  [ -n "$pid" ] || { log "no process listens on $port (peer $name)"; exit 1; }
  eval "PID_${name//-/_}=$pid"
done
if [ -n "${BASELINE_BIN:-}" ]; then
  start baseline env RUST_LOG=info "$BASELINE_BIN" --config "$RUN/conf-baseline/credgate.toml" --workers "$WORKERS"
  NAMES+=(baseline); PORTS+=($((BASE + 6)))
fi
for i in "${!NAMES[@]}"; do
  wait_ok "http://127.0.0.1:${PORTS[$i]}/"
  got=$(curl -s "http://127.0.0.1:${PORTS[$i]}/__check")
  [ "${NAMES[$i]}" = direct ] && continue
  case $got in *"id=test-id secret=test-secret"*|*"auth=Bearer "?*) ;; *) log "${NAMES[$i]} does not inject: $got"; exit 1 ;; esac
done

# ---------------------------------------------------------------- load
RES=$RUN/results.tsv
: > "$RES"
# CPU time (user + system, clock ticks) of a target's serving processes: an nginx master's
# workers, credgate's process (all its threads: workers and the log writer); none for direct.
cpu_ticks() { # name
  local var="PID_${1//-/_}" pids=()
  case $1 in
    direct) echo 0; return ;;
    nginx*) pids=($(pgrep -P "${!var}")) ;;
    *) pids=("${!var}") ;;
  esac
  for p in "${pids[@]}"; do awk '{print $14 + $15}' "/proc/$p/stat"; done | awk '{s += $1} END {print s + 0}'
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))
to_us() { awk '{v=$1; if (v ~ /us$/) {sub(/us/,"",v); print v} else if (v ~ /ms$/) {sub(/ms/,"",v); print v*1000} else {sub(/s$/,"",v); print v*1000000}}'; }
for round in $(seq "$ROUNDS"); do
  order=("${!NAMES[@]}")
  [ $((round % 2)) = 0 ] && order=($(printf '%s\n' "${order[@]}" | tac))
  for i in "${order[@]}"; do
    url="http://127.0.0.1:${PORTS[$i]}/"
    wrk -t1 -c"$CONNS" -d"${WARMUP}s" "$url" >/dev/null 2>&1 || true
    t0=$(cpu_ticks "${NAMES[$i]}")
    out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$url")
    t1=$(cpu_ticks "${NAMES[$i]}")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    cpu=$(awk -v d=$((t1 - t0)) -v n="$n" -v t="$TICK_US" 'BEGIN {printf "%.2f", n ? d * t / n : 0}')
    p50=$(awk '$1=="50%" {print $2}' <<<"$out" | to_us)
    p99=$(awk '$1=="99%" {print $2}' <<<"$out" | to_us)
    errs=$(awk '/Socket errors|Non-2xx/ {s=s $0 " "} END {print s}' <<<"$out")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "${NAMES[$i]}" "$rps" "$p50" "$p99" "$cpu" "${errs:-0}" >> "$RES"
    log "round $round $(printf '%-15s' "${NAMES[$i]}") $rps req/s  p50 ${p50}us  p99 ${p99}us  cpu ${cpu}us/req ${errs}"
  done
done

# ---------------------------------------------------------------- fixed-rate latency
RATE_RES=$RUN/rate.tsv
: > "$RATE_RES"
port_of() { for i in "${!NAMES[@]}"; do if [ "${NAMES[$i]}" = "$1" ]; then echo "${PORTS[$i]}"; fi; done; }
if [ "$RATE" != 0 ]; then
  log "fixed rate: oha -q $RATE -c $RATE_CONNS -z ${DURATION}s"
  for round in $(seq "$ROUNDS"); do
    for name in direct nginx credgate "${PEER_NAMES[@]}"; do
      out=$RUN/oha-$name-$round.json
      timeout $((DURATION + 30)) "$OHA" --no-tui --output-format json --latency-correction \
        -q "$RATE" -c "$RATE_CONNS" -z "${DURATION}s" "http://127.0.0.1:$(port_of $name)/" > "$out" 2>/dev/null || true
      python3 - "$out" "$round" "$name" >> "$RATE_RES" <<'PY' || true
import json, sys
d = json.load(open(sys.argv[1]))
p = d["latencyPercentiles"]
print(f"{sys.argv[2]}\t{sys.argv[3]}\t{d['summary']['requestsPerSec']:.0f}\t{p['p50']*1e6:.0f}\t{p['p99']*1e6:.0f}")
PY
      log "rate round $round $(printf '%-9s' "$name") $(tail -n 1 "$RATE_RES" | awk -F'\t' '{print $3 " req/s, p50 " $4 "us, p99 " $5 "us"}')"
    done
  done
fi

# ---------------------------------------------------------------- where the time goes
TRACE_RES=$RUN/trace.txt
: > "$TRACE_RES"
if [ "$TRACE" != 0 ] && [ "$RATE" != 0 ]; then
  events=syscalls:sys_enter_recvfrom,syscalls:sys_exit_recvfrom,syscalls:sys_enter_writev,syscalls:sys_exit_writev
  events=$events,syscalls:sys_enter_sendto,syscalls:sys_exit_sendto,syscalls:sys_enter_epoll_wait,syscalls:sys_exit_epoll_wait
  for name in nginx credgate "${PEER_NAMES[@]}"; do
    port=$(port_of "$name")
    timeout 30 "$OHA" --no-tui -q "$RATE" -c "$RATE_CONNS" -z 4s "http://127.0.0.1:$port/" >/dev/null 2>&1 &
    load=$!
    sleep 1.5
    ss -tnpH > "$RUN/trace-$name.ss"
    timeout 20 perf record -q -a -o "$RUN/trace-$name.data" -e "$events" -- sleep 1 2>"$RUN/trace-$name.err" || true
    wait "$load" || true
    if perf script -i "$RUN/trace-$name.data" -F comm,pid,tid,cpu,time,event,trace > "$RUN/trace-$name.txt" 2>/dev/null; then
      python3 "$HERE/trace.py" "$name" "$RUN/trace-$name.txt" "$RUN/trace-$name.ss" "$port" "$UP" >> "$TRACE_RES"
    else
      log "no trace of $name: $(head -c 300 "$RUN/trace-$name.err")"
    fi
    rm -f "$RUN/trace-$name.data"
  done
fi

# ---------------------------------------------------------------- one request per connection
CLOSE_RES=$RUN/close.tsv
: > "$CLOSE_RES"
if [ "$CLOSE" != 0 ]; then
  for round in $(seq "$ROUNDS"); do
    for name in nginx credgate; do
      rps=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" -H 'Connection: close' "http://127.0.0.1:$(port_of $name)/" | awk '/Requests\/sec/ {print $2}')
      printf '%s\t%s\t%s\n' "$round" "$name" "$rps" >> "$CLOSE_RES"
      log "close round $round $(printf '%-9s' "$name") $rps req/s"
    done
  done
fi

# ---------------------------------------------------------------- large bodies
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
worker_of() { pgrep -P "$1" | head -n 1; }  # an nginx master's (only, or first) worker
BIG_RES=$RUN/big.tsv
: > "$BIG_RES"
if [ "$BIG_MIB" -gt 0 ]; then
  for name in nginx credgate; do
    pid=$(eval echo "\$PID_${name}")
    [ "$name" = nginx ] && pid=$(worker_of "$pid")
    for dir in download upload; do
      peak=$RUN/peak-$name-$dir
      before=$(rss "$pid"); echo "$before" > "$peak"
      ( for _ in $(seq 2400); do r=$(rss "$pid") || break; [ "$r" -gt "$(cat "$peak")" ] && echo "$r" > "$peak"; sleep 0.05; done ) &
      sampler=$!
      if [ "$dir" = download ]; then
        speed=$(curl -s -o /dev/null -m 120 -w '%{speed_download}' "http://127.0.0.1:$(port_of $name)/big")
      else
        speed=$(curl -s -o /dev/null -m 120 -w '%{speed_upload}' -T "$RUN/big.bin" "http://127.0.0.1:$(port_of $name)/sink")
      fi
      kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
      printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$dir" "$speed" "$before" "$(cat "$peak")" >> "$BIG_RES"
      log "$BIG_MIB MiB $dir via $name: $(awk -v s="$speed" 'BEGIN {printf "%.0f MiB/s", s/1048576}'), RSS $before -> peak $(cat "$peak") KiB"
    done
  done
fi

# ---------------------------------------------------------------- memory with idle connections
IDLE_REPORT="skipped"
if [ "$IDLE" -gt 0 ]; then
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  IDLE_REPORT=""
  for name in credgate-nolog nginx; do
    pid=$(eval echo "\$PID_${name//-/_}")
    [ "$name" = nginx ] && pid=$(pgrep -P "$pid" | paste -sd,)  # all its workers
    line=$(python3 - "$(port_of $name)" "$IDLE" "$pid" "$name" <<'PY'
import socket, sys, time
port, n, pids, name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4]
def rss():  # KiB, summed over the processes
    return sum(int(l.split()[1]) for p in pids for l in open(f"/proc/{p}/status") if l.startswith("VmRSS"))
before = rss()
import threading
peak, sampling = [before], [True]
def sample():  # peak RSS while the connections open and are answered
    while sampling[0]:
        peak[0] = max(peak[0], rss()); time.sleep(0.02)
sampler = threading.Thread(target=sample, daemon=True); sampler.start()  # never holds up an exit
socks = []
req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
t0 = time.time()
for i in range(n):  # as fast as one loop can: the requests arrive nearly together
    s = socket.create_connection(("127.0.0.1", port)); s.sendall(req); socks.append(s)
opened = time.time() - t0
deadline = time.time() + 30
for s in socks:  # one request each, so every connection is a served keep-alive connection
    s.settimeout(max(0.1, deadline - time.time())); s.recv(4096)
sampling[0] = False; sampler.join()
time.sleep(3)  # idle: credgate parks them within 0.2 s; its allocator purges after 1 s
after = rss()
# a new request is still served while they are open
t = socket.create_connection(("127.0.0.1", port)); t.sendall(req); ok = b" 200 " in t.recv(4096)
for s in socks + [t]:
    s.close()
time.sleep(3)
gone = rss()
print(f"{name}: {n} idle keep-alive connections: RSS {before/1024:.1f} -> {after/1024:.1f} MiB "
      f"({(after-before)*1024/n:.0f} B/connection; peak {peak[0]/1024:.1f} MiB while they opened "
      f"in {opened:.1f} s; {gone/1024:.1f} MiB 3 s after they closed); new request served: {ok}")
PY
) || line="$name: idle connection check failed"
    log "$line"
    IDLE_REPORT+="$line"$'\n'
  done
fi

# ---------------------------------------------------------------- table
python3 - "$RES" "$STARTUP_MS" "$IDLE_REPORT" "$WORKERS" "$CONNS" "$DURATION" "$ROUNDS" "$RATE_RES" "$BIG_RES" "$RATE" "$CLOSE_RES" <<'PY'
import statistics as st, sys
res, startup, idle, workers, conns, dur, rounds, rate_res, big_res, rate, close_res = sys.argv[1:]
rows = {}
for line in open(res):
    r, name, rps, p50, p99, cpu, errs = line.rstrip("\n").split("\t")
    rows.setdefault(name, []).append((float(rps), float(p50), float(p99), float(cpu), errs))
med = {n: tuple(st.median(x[i] for x in v) for i in range(4)) for n, v in rows.items()}
base = med["nginx"][0]
print(f"\nworkers={workers} wrk -t1 -c{conns} -d{dur}s, {rounds} round(s), medians")
print("cpu: the proxy's own CPU time (user + system) per request")
print(f"{'target':<16}{'req/s':>10}{'vs nginx':>10}{'p50 us':>10}{'p99 us':>10}{'cpu us':>8}{'vs nginx':>10}  errors")
for n, (rps, p50, p99, cpu) in med.items():
    errs = " ".join(sorted({x[4] for x in rows[n]}))
    cpu_cols = f"{cpu:>8.2f}{cpu/med['nginx'][3]:>10.2f}" if cpu and med["nginx"][3] else f"{'-':>8}{'-':>10}"
    print(f"{n:<16}{rps:>10.0f}{rps/base:>10.2f}{p50:>10.0f}{p99:>10.0f}{cpu_cols}  {errs}")
lo = med["credgate"][0] / med["credgate-nolog"][0]
ng = med["nginx-log"][0] / med["nginx"][0]
print(f"\nlogging on/off: credgate {lo:.2f}, nginx {ng:.2f}")
print(f"token route vs static: {med['credgate-token'][0]/med['credgate'][0]:.2f}")
print(f"start-up to first answered request: {startup} ms (best of 5, includes curl)")
rate_rows = {}
for line in open(rate_res):
    r, name, rps, p50, p99 = line.rstrip("\n").split("\t")
    rate_rows.setdefault(name, []).append((float(p50), float(p99)))
if "direct" in rate_rows:
    d50 = st.median(x[0] for x in rate_rows["direct"])
    d99 = st.median(x[1] for x in rate_rows["direct"])
    print(f"\nfixed rate {rate} req/s (oha, medians over rounds); + is added to direct")
    print(f"{'target':<10}{'p50 us':>8}{'p99 us':>8}{'+p50':>8}{'+p99':>8}")
    for n, v in rate_rows.items():
        p50, p99 = st.median(x[0] for x in v), st.median(x[1] for x in v)
        print(f"{n:<10}{p50:>8.0f}{p99:>8.0f}{p50-d50:>8.0f}{p99-d99:>8.0f}")
close = {}
for line in open(close_res):
    r, name, rps = line.rstrip("\n").split("\t")
    close.setdefault(name, []).append(float(rps))
if close:
    nginx_close = st.median(close["nginx"])
    print("\none request per connection (Connection: close; medians over rounds)")
    for n, v in close.items():
        print(f"{n:<10}{st.median(v):>10.0f} req/s {st.median(v)/nginx_close:>5.2f}x nginx")
big = [l.rstrip("\n").split("\t") for l in open(big_res)]
if big:
    print("\nlarge bodies (one transfer each)")
    speed = {(n, d): float(s) for n, d, s, _, _ in big}
    for n, d, s, before, peak in big:
        ratio = float(s) / speed[("nginx", d)] if speed.get(("nginx", d)) else 0
        print(f"{n:<10}{d:<10}{float(s)/1048576:>8.0f} MiB/s {ratio:>5.2f}x nginx  RSS {int(before)/1024:.1f} -> peak {int(peak)/1024:.1f} MiB")
print()
print(idle)
PY
if [ -s "$TRACE_RES" ]; then
  printf '\nwhere the time goes at %s req/s (microseconds: median, 90th percentile)\n' "$RATE"
  cat "$TRACE_RES"
fi
