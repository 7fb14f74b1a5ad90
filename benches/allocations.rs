//! Allocations per request on the gateway's hot path, for `docs/performance.md` and issue 20:
//! the gateway in this process under `stats_alloc`'s counting allocator, the tests' mock
//! upstream in a child process (this binary run again), and a keep-alive HTTP/1.1 client whose
//! requests are written before counting starts and whose answers are read into one reused
//! buffer, so what is counted is the gateway's work (its background threads included). Each
//! scenario turns on one more feature than the one before: each line's difference is that
//! feature's cost.
//!
//!   cargo bench --bench allocations
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mock_upstream.rs"]
mod mock_upstream;

use std::io::{Read, Write};

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

const ADMIN: &str = "allocations-admin";
const KEY: &str = "allocations-key";
const WARM_UP: usize = 300;
const MEASURED: usize = 3000;

struct Scenario {
    name: &'static str,
    config: &'static str,
    /// A different question each request (every request a cache miss).
    vary: bool,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "pass-through (no cache, no log, no limits)",
        config: "",
        vary: true,
    },
    Scenario {
        name: "+ exact cache on the route (a miss, written)",
        config: "[routes.chat.cache]\nenabled = true\n",
        vary: true,
    },
    Scenario {
        name: "+ request log",
        config: "[routes.chat.cache]\nenabled = true\n[request_log]\npath = \"{dir}/requests\"\n",
        vary: true,
    },
    Scenario {
        name: "+ limits (rpm, tpm, concurrency on the tenant)",
        config: "[routes.chat.cache]\nenabled = true\n[request_log]\npath = \"{dir}/requests\"\n\
                 [tenants.bench]\nrpm = 100000000\ntpm = 100000000000\nmax_concurrent = 100000\n",
        vary: true,
    },
    Scenario {
        name: "exact-cache hit (cache, log and limits on)",
        config: "[routes.chat.cache]\nenabled = true\n[request_log]\npath = \"{dir}/requests\"\n\
                 [tenants.bench]\nrpm = 100000000\ntpm = 100000000000\nmax_concurrent = 100000\n",
        vary: false,
    },
];

fn config(scenario: &Scenario, upstream: &str, dir: &std::path::Path) -> String {
    format!(
        r#"
        [server]
        listen = "127.0.0.1:0"
        [log]
        level = "error"
        [auth]
        admin_key = "{ADMIN}"
        keys = [{{ key = "{KEY}", tenant = "bench" }}]
        [providers.mock]
        kind = "openai"
        base_url = "{upstream}"
        api_key = "sk-bench"
        [cache]
        enabled = false
        path = "{dir}/store"
        [routes.chat]
        targets = [{{ provider = "mock", model = "ok" }}]
        {extra}
        "#,
        dir = dir.display(),
        extra = scenario.config.replace("{dir}", &dir.display().to_string()),
    )
}

/// The requests, written out before anything is counted.
fn requests(addr: std::net::SocketAddr, count: usize, vary: bool, offset: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let question = if vary {
                format!("How do I change the delivery address of order {}?", offset + i)
            } else {
                "How do I change the delivery address of an order?".to_owned()
            };
            let body = format!(
                r#"{{"model":"chat","messages":[{{"role":"system","content":"You are a helpful support agent."}},{{"role":"user","content":"{question}"}}],"max_tokens":64}}"#
            );
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {KEY}\r\n\
                 content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        })
        .collect()
}

/// Sends each request over one keep-alive connection and reads its answer whole, allocating
/// nothing once `buffer` is large enough.
fn send(stream: &mut std::net::TcpStream, requests: &[Vec<u8>], buffer: &mut [u8]) {
    for request in requests {
        stream.write_all(request).unwrap();
        let mut filled = 0;
        loop {
            let read = stream.read(&mut buffer[filled..]).unwrap();
            assert!(read > 0, "the gateway closed the connection");
            filled += read;
            let Some(head_end) = memchr::memmem::find(&buffer[..filled], b"\r\n\r\n") else {
                continue;
            };
            let head = &buffer[..head_end];
            assert!(
                head.starts_with(b"HTTP/1.1 200 "),
                "{}",
                String::from_utf8_lossy(head)
            );
            let length = head
                .split(|&b| b == b'\n')
                .find_map(|line| {
                    let line = std::str::from_utf8(line).ok()?.trim();
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .expect("content-length");
            if filled >= head_end + 4 + length {
                break;
            }
        }
    }
}

fn main() {
    if let Ok(addr) = std::env::var("ALLOCATIONS_MOCK") {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let mock = mock_upstream::Mock::start_on(&addr).await;
            println!("{}", mock.addr);
            std::future::pending::<()>().await;
        });
        return;
    }
    let mock_addr = {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        format!("127.0.0.1:{port}")
    };
    let mut mock = std::process::Command::new(std::env::current_exe().unwrap())
        .env("ALLOCATIONS_MOCK", &mock_addr)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        // The mock prints its address once it listens.
        let mut line = [0u8; 64];
        let _ = mock.stdout.as_mut().unwrap().read(&mut line).unwrap();
    }
    let upstream = format!("http://{mock_addr}/v1");
    println!("| scenario | allocations per request | bytes allocated per request |");
    println!("|---|---|---|");
    for scenario in SCENARIOS {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let text = config(scenario, &upstream, dir.path());
        let config = reprise::config::Config::from_toml_str(&text, "bench.toml", &|_| None)
            .expect("bench config");
        let server = runtime.block_on(reprise::server::start(&config)).unwrap();
        let addr = server.addr;
        let warm_up = requests(addr, WARM_UP, scenario.vary, 0);
        let measured = requests(addr, MEASURED, scenario.vary, WARM_UP);
        let mut buffer = vec![0u8; 1 << 16];
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        send(&mut stream, &warm_up, &mut buffer);
        // Writes behind the answers (cache entries, log records) settle before counting.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let region = Region::new(GLOBAL);
        send(&mut stream, &measured, &mut buffer);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let change = region.change();
        println!(
            "| {} | {:.1} | {:.0} |",
            scenario.name,
            (change.allocations + change.reallocations) as f64 / MEASURED as f64,
            change.bytes_allocated as f64 / MEASURED as f64
        );
        drop(stream);
        runtime.block_on(async { drop(server.stop().await) });
        drop(runtime);
    }
    let _ = mock.kill();
    let _ = mock.wait();
}
