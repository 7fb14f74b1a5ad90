#!/usr/bin/env bash
# Load benchmark: the latency Reprise adds over calling the mock upstream directly.
#
# Starts the mock upstream (examples/mock_upstream.rs) and a release gateway on loopback, then
# drives both with oha at concurrency 1, at concurrency 32, and at a fixed 1,000 req/s, and prints
# p50/p99 for each path, the difference (added latency), throughput, and the gateway's RSS.
# All traffic goes to 127.0.0.1; every run is bounded in requests or seconds.
#
#   bash benches/load.sh            # or: make bench
#   N=20000 DURATION=20s bash benches/load.sh
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-10000}
# Gateway threads: unset = one per core; WORKERS=1 runs the single-threaded runtime.
WORKERS=${WORKERS:-}
DURATION=${DURATION:-10s}
MOCK_ADDR=127.0.0.1:${MOCK_PORT:-19100}
GW_ADDR=127.0.0.1:${GW_PORT:-19180}
OHA=.tools/bin/oha

if [ ! -x "$OHA" ]; then
  cargo install oha --version 1.16.0 --locked --root .tools
fi
cargo build --release --locked --bin reprise --example mock_upstream --example redis_rtt

workdir=$(mktemp -d)
cleanup() {
  [ -n "${gw_pid:-}" ] && kill "$gw_pid" 2>/dev/null || true
  [ -n "${mock_pid:-}" ] && kill "$mock_pid" 2>/dev/null || true
  [ -n "${redis_gw_pid:-}" ] && kill "$redis_gw_pid" 2>/dev/null || true
  [ -n "${redis_pid:-}" ] && kill "$redis_pid" 2>/dev/null || true
  [ -n "${log_gw_pid:-}" ] && kill "$log_gw_pid" 2>/dev/null || true
  [ -n "${plain2_gw_pid:-}" ] && kill "$plain2_gw_pid" 2>/dev/null || true
  [ -n "${otlp_gw_pid:-}" ] && kill "$otlp_gw_pid" 2>/dev/null || true
  rm -rf "$workdir"
}
trap cleanup EXIT

cat > "$workdir/bench.toml" <<TOML
[server]
listen = "$GW_ADDR"
${WORKERS:+worker_threads = $WORKERS}
[log]
level = "warn"
[auth]
admin_key = "bench-admin"
keys = [
  { key = "bench-key", tenant = "bench" },
  { key = "bench-limited", tenant = "limited" },
  { key = "bench-budget", tenant = "budgeted" },
]
# Limits high enough never to refuse: what is measured is the cost of counting.
[tenants.limited]
rpm = 1000000000
tpm = 1000000000000
max_concurrent = 100000
[tenants.budgeted]
rpm = 1000000000
tpm = 1000000000000
max_concurrent = 100000
budget = { usd = 1000000000.0, period = "month" }
[prices.ok]
input = 1.0
output = 1.0
[providers.mock]
kind = "openai"
base_url = "http://$MOCK_ADDR/v1"
api_key = "sk-bench"
[routes.bench]
targets = [{ provider = "mock", model = "ok" }]
[cache]
path = "$workdir/cache"
[routes.bench-cached]
targets = [{ provider = "mock", model = "ok" }]
[routes.bench-cached.cache]
enabled = true
TOML

./target/release/examples/mock_upstream "$MOCK_ADDR" > "$workdir/mock.log" 2>&1 &
mock_pid=$!
./target/release/reprise serve --config "$workdir/bench.toml" > "$workdir/gw.log" 2>&1 &
gw_pid=$!
for _ in $(seq 100); do
  if curl -sf "http://$GW_ADDR/healthz" > /dev/null && curl -s -o /dev/null "http://$MOCK_ADDR/"; then break; fi
  sleep 0.1
done

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$gw_pid/status"; }
idle_rss=$(rss_kb)

direct_body='{"model":"ok","messages":[{"role":"user","content":"hello"}]}'
gateway_body='{"model":"bench","messages":[{"role":"user","content":"hello"}]}'

# run NAME URL BODY OHA-ARGS...  -> writes $workdir/NAME.json
run() {
  local name=$1 url=$2 body=$3
  shift 3
  "$OHA" --no-tui --output-format json -m POST -H 'content-type: application/json' \
    -H "authorization: Bearer ${KEY:-bench-key}" -d "$body" "$@" "$url" > "$workdir/$name.json"
}

direct=http://$MOCK_ADDR/v1/chat/completions
gateway=http://$GW_ADDR/v1/chat/completions
# Warm up connections and allocator on both paths.
run warm-d "$direct" "$direct_body" -n 2000 -c 8
run warm-g "$gateway" "$gateway_body" -n 2000 -c 8

run c1-direct "$direct" "$direct_body" -n "$N" -c 1
run c1-gateway "$gateway" "$gateway_body" -n "$N" -c 1
run c32-direct "$direct" "$direct_body" -n "$((N * 4))" -c 32
run c32-gateway "$gateway" "$gateway_body" -n "$((N * 4))" -c 32
run rate-direct "$direct" "$direct_body" -z "$DURATION" -c 32 -q 1000 --latency-correction
run rate-gateway "$gateway" "$gateway_body" -z "$DURATION" -c 32 -q 1000 --latency-correction

# Exact cache: hits (one answer stored, then served to every request), and the miss path
# (Cache-Control: max-age=0 forces lookup + upstream call + store write on every request).
cached_body='{"model":"bench-cached","messages":[{"role":"user","content":"hello"}]}'
curl -s -o /dev/null -H 'authorization: Bearer bench-key' -H 'content-type: application/json' -d "$cached_body" "$gateway"
sleep 0.5
run hit-c1 "$gateway" "$cached_body" -n "$N" -c 1
run hit-c32 "$gateway" "$cached_body" -n "$((N * 4))" -c 32
run miss-c1 "$gateway" "$cached_body" -n "$N" -c 1 -H 'cache-control: max-age=0'
run nocache-c1 "$gateway" "$gateway_body" -n "$N" -c 1

# Limits: a key whose tenant has requests and tokens per minute and a concurrency cap (counted
# in process with the embedded store), then the same plus a budget (a hold, and spend written durably before
# the answer). Interleaved with the unlimited key so drift hits every line alike.
for round in 1 2; do
  run "plain-c1-$round" "$gateway" "$gateway_body" -n "$N" -c 1
  KEY=bench-limited run "limited-c1-$round" "$gateway" "$gateway_body" -n "$N" -c 1
  KEY=bench-budget run "budget-c1-$round" "$gateway" "$gateway_body" -n "$N" -c 1
done
run plain-c32 "$gateway" "$gateway_body" -n "$((N * 4))" -c 32
KEY=bench-limited run limited-c32 "$gateway" "$gateway_body" -n "$((N * 4))" -c 32
KEY=bench-budget run budget-c32 "$gateway" "$gateway_body" -n "$((N * 4))" -c 32
loaded_rss=$(rss_kb)

# The request log and OTLP export: the same gateway config plus [request_log] (an embedded
# log on disk), then plus [otlp] (spans posted to the mock's /v1/traces), each its own process,
# interleaved round by round with the gateway without them.
# A second gateway without either is the control: two identical processes differ too, and
# that difference is the noise floor of the comparison.
PLAIN2_GW_ADDR=127.0.0.1:${PLAIN2_GW_PORT:-19184}
LOG_GW_ADDR=127.0.0.1:${LOG_GW_PORT:-19182}
OTLP_GW_ADDR=127.0.0.1:${OTLP_GW_PORT:-19183}
sed -e "s|^listen = .*|listen = \"$LOG_GW_ADDR\"|" -e "s|^path = .*|path = \"$workdir/cache-log\"|" \
    "$workdir/bench.toml" > "$workdir/log.toml"
printf '[request_log]\npath = "%s"\n' "$workdir/requests" >> "$workdir/log.toml"
sed -e "s|^listen = .*|listen = \"$OTLP_GW_ADDR\"|" -e "s|^path = .*|path = \"$workdir/cache-otlp\"|" \
    "$workdir/bench.toml" > "$workdir/otlp.toml"
printf '[request_log]\npath = "%s"\n[otlp]\nendpoint = "http://%s"\n' \
    "$workdir/requests-otlp" "$MOCK_ADDR" >> "$workdir/otlp.toml"
sed -e "s|^listen = .*|listen = \"$PLAIN2_GW_ADDR\"|" -e "s|^path = .*|path = \"$workdir/cache-plain2\"|" \
    "$workdir/bench.toml" > "$workdir/plain2.toml"
./target/release/reprise serve --config "$workdir/plain2.toml" > "$workdir/gw-plain2.log" 2>&1 &
plain2_gw_pid=$!
./target/release/reprise serve --config "$workdir/log.toml" > "$workdir/gw-log.log" 2>&1 &
log_gw_pid=$!
./target/release/reprise serve --config "$workdir/otlp.toml" > "$workdir/gw-otlp.log" 2>&1 &
otlp_gw_pid=$!
for _ in $(seq 100); do
  if curl -sf "http://$LOG_GW_ADDR/healthz" > /dev/null && curl -sf "http://$OTLP_GW_ADDR/healthz" > /dev/null \
    && curl -sf "http://$PLAIN2_GW_ADDR/healthz" > /dev/null; then break; fi
  sleep 0.1
done
log_gateway=http://$LOG_GW_ADDR/v1/chat/completions
otlp_gateway=http://$OTLP_GW_ADDR/v1/chat/completions
plain2_gateway=http://$PLAIN2_GW_ADDR/v1/chat/completions
run warm-p2 "$plain2_gateway" "$gateway_body" -n 2000 -c 8
run warm-l "$log_gateway" "$gateway_body" -n 2000 -c 8
run warm-o "$otlp_gateway" "$gateway_body" -n 2000 -c 8
# Five rounds each, the order rotated every round; CPU time per request from /proc (the
# gateway's own user + system time), which drifts less than latency on a shared machine.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
names=(nolog nolog2 log otlp)
urls=("$gateway" "$plain2_gateway" "$log_gateway" "$otlp_gateway")
pids=("$gw_pid" "$plain2_gw_pid" "$log_gw_pid" "$otlp_gw_pid")
for level in c1 c32; do
  if [ "$level" = c1 ]; then count=$N; conc=1; else count=$((N * 4)); conc=32; fi
  for round in 1 2 3 4 5; do
    for k in 0 1 2 3; do
      i=$(( (k + round) % 4 ))
      before=$(cpu_ticks "${pids[$i]}")
      run "${names[$i]}-$level-$round" "${urls[$i]}" "$gateway_body" -n "$count" -c "$conc"
      echo $(( $(cpu_ticks "${pids[$i]}") - before )) "$count" > "$workdir/${names[$i]}-$level-$round.cpu"
    done
  done
done
log_dropped=$(curl -s "http://$LOG_GW_ADDR/metrics" | awk '/^reprise_request_log_dropped_total/ {print $2}')
otlp_spans=$(curl -s "http://$OTLP_GW_ADDR/metrics" | awk '/^reprise_otlp_spans_total/ {printf "%s=%s ", $1, $2}')
kill "$log_gw_pid" "$otlp_gw_pid" "$plain2_gw_pid" 2>/dev/null || true

# The same on Redis (a second gateway sharing a redis-server), with the round trip to Redis
# measured alone for comparison.
redis_rtt=""
if command -v redis-server > /dev/null; then
  REDIS_PORT=${REDIS_PORT:-19190}
  REDIS_GW_ADDR=127.0.0.1:${REDIS_GW_PORT:-19181}
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no > "$workdir/redis.log" 2>&1 &
  redis_pid=$!
  sed -e "s|^listen = .*|listen = \"$REDIS_GW_ADDR\"|" \
      -e "s|^path = .*|store = \"redis\"\nredis_url = \"redis://127.0.0.1:$REDIS_PORT/0\"|" \
      "$workdir/bench.toml" > "$workdir/redis.toml"
  ./target/release/reprise serve --config "$workdir/redis.toml" > "$workdir/gw-redis.log" 2>&1 &
  redis_gw_pid=$!
  for _ in $(seq 100); do
    if curl -sf "http://$REDIS_GW_ADDR/healthz" > /dev/null; then break; fi
    sleep 0.1
  done
  redis_gateway=http://$REDIS_GW_ADDR/v1/chat/completions
  probe_body='{"model":"bench-cached","messages":[{"role":"user","content":"never stored"}]}'
  run warm-r "$redis_gateway" "$gateway_body" -n 2000 -c 8
  KEY=bench-budget run warm-rb "$redis_gateway" "$gateway_body" -n 2000 -c 8
  for round in 1 2; do
    run "redis-plain-c1-$round" "$redis_gateway" "$gateway_body" -n "$N" -c 1
    KEY=bench-limited run "redis-limited-c1-$round" "$redis_gateway" "$gateway_body" -n "$N" -c 1
    KEY=bench-budget run "redis-budget-c1-$round" "$redis_gateway" "$gateway_body" -n "$N" -c 1
    # One round trip as the gateway pays it under the same load: an exact-cache lookup that
    # always misses (no-store: the answer is never written, so the next lookup misses too).
    run "redis-lookup-c1-$round" "$redis_gateway" "$probe_body" -n "$N" -c 1 -H 'cache-control: no-store'
  done
  redis_rtt=$(./target/release/examples/redis_rtt "redis://127.0.0.1:$REDIS_PORT/0")
  kill "$redis_gw_pid" "$redis_pid" 2>/dev/null || true
fi

LOG_DROPPED="${log_dropped:-0}" OTLP_SPANS="$otlp_spans" \
WORKERS="$WORKERS" REDIS_RTT="$redis_rtt" python3 - "$workdir" "$idle_rss" "$loaded_rss" <<'PY'
import json, os, statistics, sys
workdir, idle_rss, loaded_rss = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def load(name):
    with open(f"{workdir}/{name}.json") as f:
        data = json.load(f)
    pct = data["latencyPercentiles"]
    codes = data.get("statusCodeDistribution", {})
    ok = codes.get("200", 0)
    total = sum(codes.values())
    return pct["p50"] * 1e6, pct["p99"] * 1e6, data["summary"]["requestsPerSec"], ok, total

print("| scenario | direct p50 | gateway p50 | added p50 | direct p99 | gateway p99 | added p99 | gateway req/s | 200s |")
print("|---|---|---|---|---|---|---|---|---|")
for label, key in [("concurrency 1", "c1"), ("concurrency 32", "c32"), ("fixed 1,000 req/s", "rate")]:
    d50, d99, drps, _, _ = load(f"{key}-direct")
    g50, g99, grps, ok, total = load(f"{key}-gateway")
    print(f"| {label} | {d50:.0f} µs | {g50:.0f} µs | {g50 - d50:.0f} µs | {d99:.0f} µs | {g99:.0f} µs | "
          f"{g99 - d99:.0f} µs | {grps:,.0f} | {ok}/{total} |")
print()
print("| exact cache | p50 | p99 | req/s |")
print("|---|---|---|---|")
for label, key in [("hit, concurrency 1", "hit-c1"), ("hit, concurrency 32", "hit-c32"),
                   ("miss (lookup + upstream + write), concurrency 1", "miss-c1"),
                   ("no cache on the route, concurrency 1", "nocache-c1")]:
    p50, p99, rps, ok, total = load(key)
    print(f"| {label} | {p50:.0f} µs | {p99:.0f} µs | {rps:,.0f} |")
print()
print("| limits on the key's tenant | p50 at concurrency 1 (median of 2 rounds) | over no limits | req/s at concurrency 32 |")
print("|---|---|---|---|")
def rounds(prefix):
    return statistics.median(load(f"{prefix}-c1-{r}")[0] for r in (1, 2))
plain = rounds("plain")
for label, key in [("none", "plain"), ("requests + tokens per minute + concurrency", "limited"),
                   ("the same + a budget (spend durable before the answer)", "budget")]:
    p50 = rounds(key)
    rps = load(f"{key}-c32")[2]
    print(f"| {label} (embedded) | {p50:.0f} µs | {p50 - plain:+.0f} µs | {rps:,.0f} |")
rtt = os.environ.get("REDIS_RTT")
if rtt:
    redis_plain = rounds("redis-plain")
    for label, key in [("none", "redis-plain"), ("requests + tokens per minute + concurrency", "redis-limited"),
                       ("the same + a budget", "redis-budget"),
                       ("for scale: no limits, one exact-cache lookup (one round trip)", "redis-lookup")]:
        p50 = rounds(key)
        print(f"| {label} (Redis) | {p50:.0f} µs | {p50 - redis_plain:+.0f} µs | – |")
    print(f"\none Redis round trip through the gateway's client (PING, median of 5,000): {rtt} µs")
print()
print("| request log / traces (medians of 5 rounds) | p50, concurrency 1 | over neither | req/s, concurrency 32 | over neither | gateway CPU per request, concurrency 32 | over neither |")
print("|---|---|---|---|---|---|---|")
def median_of(prefix, level, field):
    return statistics.median(load(f"{prefix}-{level}-{r}")[field] for r in range(1, 6))
def cpu_us(prefix, level):
    def one(r):
        ticks, count = open(f"{workdir}/{prefix}-{level}-{r}.cpu").read().split()
        return int(ticks) * 1e6 / os.sysconf("SC_CLK_TCK") / int(count)
    return statistics.median(one(r) for r in range(1, 6))
base_p50, base_rps = median_of("nolog", "c1", 0), median_of("nolog", "c32", 2)
base_cpu = cpu_us("nolog", "c32")
for label, key in [("neither", "nolog"), ("neither, a second process (the control)", "nolog2"),
                   ("request log (embedded, on disk)", "log"), ("request log + OTLP export", "otlp")]:
    p50, rps, cpu = median_of(key, "c1", 0), median_of(key, "c32", 2), cpu_us(key, "c32")
    print(f"| {label} | {p50:.0f} µs | {p50 - base_p50:+.0f} µs | {rps:,.0f} | {100 * (rps / base_rps - 1):+.1f}% "
          f"| {cpu:.1f} µs | {100 * (cpu / base_cpu - 1):+.1f}% |")
print(f"\nrecords dropped by the log's queue: {os.environ.get('LOG_DROPPED') or 0}; "
      f"OTLP spans: {os.environ.get('OTLP_SPANS') or '-'}")
print()
print(f"gateway threads: {os.environ.get('WORKERS') or 'one per core'}")
print(f"gateway RSS: idle {idle_rss / 1024:.1f} MiB, after the runs {loaded_rss / 1024:.1f} MiB")
PY
