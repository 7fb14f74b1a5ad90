//! The tests' mock upstream as a standalone server, for the load benchmark (`benches/load.sh`)
//! and for trying the gateway without provider keys: `cargo run --release --example mock_upstream
//! -- 127.0.0.1:9100`, then point a provider's `base_url` at `http://127.0.0.1:9100/v1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mock_upstream.rs"]
mod mock_upstream;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9100".to_owned());
    let mock = mock_upstream::Mock::start_on(&addr).await;
    println!("mock upstream listening on {}", mock.addr);
    std::future::pending::<()>().await;
}
