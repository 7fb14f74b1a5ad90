//! One Redis round trip as the gateway's own client sees it (`redis` crate, connection
//! manager, a multi-threaded runtime): the yardstick the load benchmark holds the latency of
//! limits on Redis against. Prints the median of 5,000 PINGs in microseconds.
//!
//!   cargo run --release --example redis_rtt -- redis://127.0.0.1:6379/0
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = std::env::args().nth(1).expect("usage: redis_rtt REDIS_URL");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut connection = client.get_connection_manager().await.unwrap();
    let mut micros = Vec::with_capacity(5000);
    for _ in 0..5000 {
        let started = Instant::now();
        let _: String = redis::cmd("PING")
            .query_async(&mut connection)
            .await
            .unwrap();
        micros.push(started.elapsed().as_micros());
    }
    micros.sort_unstable();
    println!("{}", micros[micros.len() / 2]);
}
