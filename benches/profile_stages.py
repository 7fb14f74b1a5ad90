"""Reads `perf script` output (call stacks, innermost frame first) and prints the share of samples
per stage of the gateway: the innermost frame from the gateway's own code names the stage
(`reprise::server`, `reprise::cache`, ...); a stack without one is given to the library or the
kernel under it. Used by benches/profile.sh."""

import re
import sys
from collections import Counter

# The gateway's stages, by module path (first match, innermost frame first).
STAGES = [
    ("request log", r"reprise::request_log|reprise::otel"),
    ("metrics", r"reprise::telemetry"),
    ("exact cache (key, store)", r"reprise::cache|reprise::canonical"),
    ("limits and keys", r"reprise::limits|reprise::keys"),
    ("store (embedded or Redis)", r"reprise::store"),
    ("prompts", r"reprise::prompts"),
    ("routing (router, breakers, retries)", r"reprise::router"),
    ("upstream call (providers)", r"reprise::providers"),
    ("request/answer types (protocol)", r"reprise::protocol"),
    ("pipeline", r"reprise::pipeline"),
    ("server: handlers, auth, admission, body", r"reprise::server::(openai|auth|admission|body|keys)|reprise::server::\{\{closure\}\}|reprise::server::AppState"),
    ("server: connections (accept loop)", r"reprise::server::listener"),
    ("server: other", r"reprise::server"),
    ("reprise: other", r"reprise::"),
]
# Without a gateway frame: what was running.
LIBRARIES = [
    ("allocator", r"^(malloc|free|realloc|calloc|_int_malloc|_int_free|cfree|__libc_)|malloc_consolidate|tcache"),
    ("JSON (serde_json)", r"serde_json"),
    ("HTTP client (reqwest, hyper client)", r"reqwest|hyper_util::client|hyper::client"),
    ("HTTP server (hyper server)", r"hyper::proto|hyper::server|hyper_util::server"),
    ("tower / axum layers and routing", r"tower|axum"),
    ("tracing", r"tracing"),
    ("store (embedded or Redis)", r"fjall|lsm_tree|sled|redis"),
    ("tokio runtime", r"tokio"),
]
KERNEL = "kernel (syscalls, network, scheduling)"

stage_of_stack = Counter()
samples = 0


unmatched = Counter()


def classify(frames):
    for name, pattern in STAGES:
        for frame in frames:
            if re.search(pattern, frame):
                if name.endswith("other"):
                    unmatched[re.sub(r"^[0-9a-f]+ ", "", frame)[:110]] += 1
                return name
    leaf = frames[0] if frames else ""
    if "[kernel" in leaf or "kallsyms" in leaf:
        return KERNEL
    for name, pattern in LIBRARIES:
        for frame in frames:
            if re.search(pattern, frame):
                return name
    return "other (libc, unresolved)"


def innermost_gateway_first(frames):
    """Frames are innermost first; stages are matched on the innermost gateway frame."""
    gateway = [f for f in frames if "reprise::" in f]
    return gateway[:1] if gateway else frames


frames = []
for line in sys.stdin:
    line = line.rstrip("\n")
    if not line.strip():
        if frames:
            samples += 1
            if frames[0].startswith("kernel:"):
                stage_of_stack[KERNEL if not any("reprise::" in f for f in frames) else classify(innermost_gateway_first(frames[1:]))] += 1
            else:
                stage_of_stack[classify(innermost_gateway_first(frames))] += 1
            frames = []
        continue
    if not line.startswith((" ", "\t")):
        frames = []
        continue
    frame = line.strip()
    if "kernel.kallsyms" in frame and not frames:
        frames.append("kernel:" + frame)
    else:
        frames.append(frame)

print(f"| stage (by the gateway's innermost frame on the stack) | share of CPU samples |")
print("|---|---|")
for name, count in stage_of_stack.most_common():
    print(f"| {name} | {100 * count / max(samples, 1):.1f}% |")
print(f"\n{samples} samples")
if unmatched and len(sys.argv) > 1 and sys.argv[1] == "--other":
    for frame, count in unmatched.most_common(15):
        print(count, frame)
