#!/usr/bin/env bash
# The hot path, feature by feature (issue 20): what each gateway build adds over calling the mock
# upstream directly, with every feature of the path turned on one at a time.
#
# Lines, each on its own: pass-through (no cache, no log, no limits); + the exact cache on the
# route, every request a miss (`Cache-Control: max-age=0`: key, lookup, upstream call, write);
# + the request log; + rate limits on the key's tenant (requests and tokens per minute and a
# concurrency cap); and an exact-cache hit. For each: p50 and p99 at concurrency 1, req/s at
# concurrency 32 and the gateway's own CPU per request there (user + system time from /proc), with
# how often its threads went to sleep per request (voluntary context switches).
# Memory: RSS idle, the peak under pass-through load, and the peak of the process with every
# feature on (its cache filling up to `cache.memory_bytes` of pages).
#
# BEFORE=path/to/an/older/reprise measures that build too, in the same run, each round
# alternating the builds, so the two are compared under the same noise. Medians of ROUNDS rounds.
# All traffic goes to 127.0.0.1, bounded in requests.
#
#   bash benches/hot_path.sh                     # this tree's build alone
#   BEFORE=/tmp/reprise-old bash benches/hot_path.sh
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-5000}
ROUNDS=${ROUNDS:-3}
MOCK_ADDR=127.0.0.1:${MOCK_PORT:-19300}
BASE_PORT=${BASE_PORT:-19310}
OHA=.tools/bin/oha
[ -x "$OHA" ] || cargo install oha --version 1.16.0 --locked --root .tools
cargo build --release --locked --bin reprise --example mock_upstream

workdir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$workdir"
}
trap cleanup EXIT

builds=(after)
binaries=("$PWD/target/release/reprise")
if [ -n "${BEFORE:-}" ]; then
  builds=(before after)
  binaries=("$(realpath "$BEFORE")" "$PWD/target/release/reprise")
fi

./target/release/examples/mock_upstream "$MOCK_ADDR" > "$workdir/mock.log" 2>&1 &
pids+=($!)

# config NAME PORT WITH_LOG -> $workdir/NAME.toml
config() {
  cat > "$workdir/$1.toml" <<TOML
[server]
listen = "127.0.0.1:$2"
[log]
level = "warn"
[auth]
admin_key = "bench-admin"
keys = [
  { key = "bench-key", tenant = "bench" },
  { key = "bench-limited", tenant = "limited" },
]
# Limits high enough never to refuse: what is measured is the cost of counting.
[tenants.limited]
rpm = 1000000000
tpm = 1000000000000
max_concurrent = 100000
[providers.mock]
kind = "openai"
base_url = "http://$MOCK_ADDR/v1"
api_key = "sk-bench"
[cache]
path = "$workdir/$1-cache"
[routes.bench]
targets = [{ provider = "mock", model = "ok" }]
[routes.bench-cached]
targets = [{ provider = "mock", model = "ok" }]
[routes.bench-cached.cache]
enabled = true
TOML
  if [ "$3" = log ]; then
    printf '[request_log]\npath = "%s"\n' "$workdir/$1-requests" >> "$workdir/$1.toml"
  fi
}

declare -A pid_of port_of
port=$BASE_PORT
for i in "${!builds[@]}"; do
  build=${builds[$i]}
  for variant in plain log; do
    name="$build-$variant"
    config "$name" "$port" "$variant"
    "${binaries[$i]}" serve --config "$workdir/$name.toml" > "$workdir/$name.log" 2>&1 &
    pid_of[$name]=$!
    pids+=($!)
    port_of[$name]=$port
    port=$((port + 1))
  done
done
for name in "${!port_of[@]}"; do
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:${port_of[$name]}/healthz" > /dev/null && break
    sleep 0.1
  done
done
for _ in $(seq 100); do curl -s -o /dev/null "http://$MOCK_ADDR/" && break; sleep 0.1; done
for name in "${!pid_of[@]}"; do
  awk '/VmRSS/ {print $2}' "/proc/${pid_of[$name]}/status" > "$workdir/$name.idle-rss"
done

plain_body='{"model":"bench","messages":[{"role":"user","content":"hello"}]}'
cached_body='{"model":"bench-cached","messages":[{"role":"user","content":"hello"}]}'
direct_body='{"model":"ok","messages":[{"role":"user","content":"hello"}]}'
# A miss is measured with a different question on every request: identical concurrent misses
# would share one upstream call (single flight) and flatter the miss path. `max-age=0` keeps
# every round a miss although the rounds ask the same questions.
for i in $(seq "$((N * 8))"); do
  printf '{"model":"bench-cached","messages":[{"role":"user","content":"hello %d"}]}\n' "$i"
done > "$workdir/miss-bodies"

# run OUT URL KEY BODY OHA-ARGS...  -> $workdir/OUT.json (BODY "@FILE": a body per line of FILE)
run() {
  local out=$1 url=$2 key=$3 body=$4
  shift 4
  local bodies=(-d "$body")
  [ "${body:0:1}" = @ ] && bodies=(-Z "${body:1}")
  "$OHA" --no-tui --output-format json -m POST -H 'content-type: application/json' \
    -H "authorization: Bearer $key" "${bodies[@]}" "$@" "$url" > "$workdir/$out.json"
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Times any of the process's threads went to sleep (each is a wake-up later): a hand-off
# between threads per request shows here before it shows in the CPU figures.
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/^voluntary_ctxt_switches/ {s += $2} END {print s}'; }

# line NAME PROCESS KEY BODY EXTRA-HEADER... : one line of the table for one build and round
line() {
  local out=$1 process=$2 key=$3 body=$4
  shift 4
  local url="http://127.0.0.1:${port_of[$process]}/v1/chat/completions"
  run "$out-c1" "$url" "$key" "$body" -n "$N" -c 1 "$@"
  local before slept
  before=$(cpu_ticks "${pid_of[$process]}")
  slept=$(switches "${pid_of[$process]}")
  run "$out-c32" "$url" "$key" "$body" -n "$((N * 8))" -c 32 "$@"
  echo $(( $(cpu_ticks "${pid_of[$process]}") - before )) "$((N * 8))" \
    $(( $(switches "${pid_of[$process]}") - slept )) > "$workdir/$out.cpu"
}

direct="http://$MOCK_ADDR/v1/chat/completions"
run warm-direct "$direct" x "$direct_body" -n 2000 -c 8
for build in "${builds[@]}"; do
  for variant in plain log; do
    url="http://127.0.0.1:${port_of[$build-$variant]}/v1/chat/completions"
    run "warm-$build-$variant" "$url" bench-key "$plain_body" -n 2000 -c 8
    # The one answer every hit is served from.
    curl -s -o /dev/null -H 'authorization: Bearer bench-key' -H 'content-type: application/json' \
      -d "$cached_body" "$url"
  done
done
sleep 0.5

for round in $(seq "$ROUNDS"); do
  echo "round $round of $ROUNDS" >&2
  run "direct-$round-c1" "$direct" x "$direct_body" -n "$N" -c 1
  run "direct-$round-c32" "$direct" x "$direct_body" -n "$((N * 8))" -c 32
  order=("${builds[@]}")
  if [ $((round % 2)) = 0 ] && [ "${#builds[@]}" = 2 ]; then order=("${builds[1]}" "${builds[0]}"); fi
  for build in "${order[@]}"; do
    line "$build-pass-$round" "$build-plain" bench-key "$plain_body"
    # Memory under load without the cache's pages (the cache holds up to `cache.memory_bytes`).
    [ "$round" = 1 ] && awk '/VmHWM/ {print $2}' "/proc/${pid_of[$build-plain]}/status" > "$workdir/$build.pass-rss"
    miss=(@"$workdir/miss-bodies" -H 'cache-control: max-age=0')
    line "$build-miss-$round" "$build-plain" bench-key "${miss[@]}"
    line "$build-log-$round" "$build-log" bench-key "${miss[@]}"
    line "$build-limits-$round" "$build-log" bench-limited "${miss[@]}"
    line "$build-hit-$round" "$build-plain" bench-key "$cached_body"
  done
done
for name in "${!pid_of[@]}"; do
  awk '/VmHWM/ {print $2}' "/proc/${pid_of[$name]}/status" > "$workdir/$name.peak-rss"
done

BUILDS="${builds[*]}" ROUNDS="$ROUNDS" python3 - "$workdir" <<'PY'
import json, os, statistics, sys
workdir = sys.argv[1]
builds = os.environ["BUILDS"].split()
rounds = range(1, int(os.environ["ROUNDS"]) + 1)
tick = os.sysconf("SC_CLK_TCK")

def oha(name):
    with open(f"{workdir}/{name}.json") as f:
        data = json.load(f)
    codes = data.get("statusCodeDistribution", {})
    if codes.get("200", 0) != sum(codes.values()):
        sys.exit(f"{name}: not every answer was 200: {codes}")
    pct = data["latencyPercentiles"]
    return pct["p50"] * 1e6, pct["p99"] * 1e6, data["summary"]["requestsPerSec"]

def cpu_us(name):
    ticks, count, _ = open(f"{workdir}/{name}.cpu").read().split()
    return int(ticks) * 1e6 / tick / int(count)

def switches(name):
    _, count, slept = open(f"{workdir}/{name}.cpu").read().split()
    return int(slept) / int(count)

def median(values):
    return statistics.median(list(values))

d50 = median(oha(f"direct-{r}-c1")[0] for r in rounds)
d99 = median(oha(f"direct-{r}-c1")[1] for r in rounds)
drps = median(oha(f"direct-{r}-c32")[2] for r in rounds)
print(f"direct to the mock (baseline): p50 {d50:.0f} µs, p99 {d99:.0f} µs at concurrency 1; "
      f"{drps:,.0f} req/s at concurrency 32\n")
print("| build | line | added p50, c1 | added p99, c1 | req/s, c32 (of direct) | gateway CPU per request, c32 | thread sleeps per request, c32 |")
print("|---|---|---|---|---|---|---|")
lines = [("pass", "pass-through"), ("miss", "+ exact cache (a miss)"), ("log", "+ request log"),
         ("limits", "+ rate limits"), ("hit", "exact-cache hit")]
for build in builds:
    for key, label in lines:
        p50 = median(oha(f"{build}-{key}-{r}-c1")[0] for r in rounds)
        p99 = median(oha(f"{build}-{key}-{r}-c1")[1] for r in rounds)
        rps = median(oha(f"{build}-{key}-{r}-c32")[2] for r in rounds)
        cpu = median(cpu_us(f"{build}-{key}-{r}") for r in rounds)
        slept = median(switches(f"{build}-{key}-{r}") for r in rounds)
        added = f"+{p50 - d50:.0f} µs" if key != "hit" else f"{p50:.0f} µs end to end"
        print(f"| {build} | {label} | {added} | {p99 - d99:+.0f} µs | {rps:,.0f} ({rps / drps:.2f}×) | {cpu:.0f} µs | {slept:.2f} |")
print()
for build in builds:
    idle = int(open(f"{workdir}/{build}-plain.idle-rss").read()) / 1024
    passing = int(open(f"{workdir}/{build}.pass-rss").read()) / 1024
    peak = int(open(f"{workdir}/{build}-log.peak-rss").read()) / 1024
    print(f"{build}: RSS idle {idle:.1f} MiB; peak under pass-through load {passing:.1f} MiB; "
          f"peak with the cache filling, log and limits {peak:.1f} MiB")
PY
