#!/usr/bin/env bash
# Where a request's CPU goes: the release gateway (with line tables for symbols) behind the mock
# upstream, loaded by oha at concurrency 32 on the route with the exact cache on (every request a
# miss, `Cache-Control: max-age=0`) and the request log on, sampled by `perf` with DWARF call
# graphs; `benches/profile_stages.py` then gives each sample to the stage of the gateway whose
# code was running (the innermost `reprise::` module on its stack, else the library under it).
# All traffic goes to 127.0.0.1; bounded in requests.
#
#   bash benches/profile.sh                   # N=40000 requests
#   LINE=passthrough bash benches/profile.sh  # no cache, no request log: the bare path
#   LINE=limits bash benches/profile.sh       # every feature: the miss line and the tenant's
#                                             # rate limits and concurrency cap
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-40000}
MOCK_ADDR=127.0.0.1:${MOCK_PORT:-19200}
GW_ADDR=127.0.0.1:${GW_PORT:-19280}
OHA=.tools/bin/oha
[ -x "$OHA" ] || cargo install oha --version 1.16.0 --locked --root .tools
command -v perf > /dev/null || { echo "perf is not installed (apt-get install linux-perf)"; exit 2; }
cargo build --profile profiling --locked --bin reprise --example mock_upstream

workdir=$(mktemp -d)
cleanup() {
  [ -n "${gw_pid:-}" ] && kill "$gw_pid" 2>/dev/null || true
  [ -n "${mock_pid:-}" ] && kill "$mock_pid" 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$workdir"/*.data "$KEEP"/ 2>/dev/null || true; fi
  rm -rf "$workdir"
}
trap cleanup EXIT
# KEEP=DIR keeps the recordings there, for `perf report -i DIR/perf.data`.

LINE=${LINE:-miss}
case "$LINE" in
  miss) features=$(printf '[cache]\npath = "%s/cache"\n[request_log]\npath = "%s/requests"\n' "$workdir" "$workdir")
        route_cache=$(printf '[routes.bench.cache]\nenabled = true\n') ;;
  limits) features=$(printf '[cache]\npath = "%s/cache"\n[request_log]\npath = "%s/requests"\n' "$workdir" "$workdir")
          features+=$(printf '\n[tenants.bench]\nrpm = 1000000000\ntpm = 1000000000000\nmax_concurrent = 100000\n')
          route_cache=$(printf '[routes.bench.cache]\nenabled = true\n') ;;
  passthrough) features=""; route_cache="" ;;
  *) echo "LINE is miss, limits or passthrough"; exit 2 ;;
esac

cat > "$workdir/profile.toml" <<TOML
[server]
listen = "$GW_ADDR"
[log]
level = "warn"
[auth]
admin_key = "bench-admin"
keys = [{ key = "bench-key", tenant = "bench" }]
[providers.mock]
kind = "openai"
base_url = "http://$MOCK_ADDR/v1"
api_key = "sk-bench"
$features
[routes.bench]
targets = [{ provider = "mock", model = "ok" }]
$route_cache
TOML

./target/profiling/examples/mock_upstream "$MOCK_ADDR" > "$workdir/mock.log" 2>&1 &
mock_pid=$!
./target/profiling/reprise serve --config "$workdir/profile.toml" > "$workdir/gw.log" 2>&1 &
gw_pid=$!
for _ in $(seq 100); do
  curl -sf "http://$GW_ADDR/healthz" > /dev/null && break
  sleep 0.1
done
# A different question on every request: identical concurrent misses would share one upstream
# call (single flight).
for i in $(seq "$N"); do
  printf '{"model":"bench","messages":[{"role":"user","content":"hello %d"}]}\n' "$i"
done > "$workdir/bodies"
load() {
  "$OHA" --no-tui --output-format json -m POST -H 'content-type: application/json' \
    -H 'authorization: Bearer bench-key' -H 'cache-control: max-age=0' -Z "$workdir/bodies" \
    -n "$1" -c 32 "http://$GW_ADDR/v1/chat/completions" > "$workdir/oha.json"
}
load 4000
ticks() { awk '{print $14 + $15}' "/proc/$gw_pid/stat"; }
before=$(ticks)
perf record -q -F 499 --call-graph dwarf,32768 -p "$gw_pid" -o "$workdir/perf.data" -- sleep 600 &
perf_pid=$!
sleep 1
load "$N"
kill -INT "$perf_pid"
wait "$perf_pid" 2>/dev/null || true
cpu_ms=$(( ($(ticks) - before) * 1000 / $(getconf CLK_TCK) ))
rps=$(python3 -c "import json; print(round(json.load(open('$workdir/oha.json'))['summary']['requestsPerSec']))")
echo "gateway CPU: $cpu_ms ms for $N requests (+1 s idle while perf started) = $(python3 -c "print(round($cpu_ms / $N * 1000, 1))") µs a request; $rps req/s"
perf script -i "$workdir/perf.data" --no-inline -F comm,tid,ip,sym,dso 2> /dev/null \
  | python3 benches/profile_stages.py ${PROFILE_OTHER:+--other}

# Where the allocations are made: every call to libc's malloc, through a uprobe, for a few
# thousand requests (each sample is one allocation; `cargo bench --bench allocations` counts
# them per request).
libc=$(ldd ./target/profiling/reprise | awk '/libc.so/ {print $3}')
if perf probe -q -x "$libc" malloc 2> /dev/null || perf probe -l 2> /dev/null | grep -q probe_libc:malloc; then
  perf record -q -e probe_libc:malloc --call-graph dwarf,16384 -p "$gw_pid" -o "$workdir/malloc.data" -- sleep 600 &
  perf_pid=$!
  sleep 1
  load 3000
  kill -INT "$perf_pid"
  wait "$perf_pid" 2>/dev/null || true
  echo
  echo "Allocations (calls to malloc) by stage:"
  perf script -i "$workdir/malloc.data" --no-inline -F comm,tid,ip,sym,dso 2> /dev/null \
    | python3 benches/profile_stages.py ${PROFILE_OTHER:+--other}
  perf probe -q -d probe_libc:malloc 2> /dev/null || true
else
  echo "(no uprobe on malloc here: allocations by stage not measured)"
fi
