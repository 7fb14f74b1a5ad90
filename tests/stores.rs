//! The `Store` contract, run against both backends: the embedded store (fjall) and a real Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::redis_server::RedisServer;
use reprise::store::{FjallStore, RedisStore, Store};

async fn contract(store: &dyn Store) {
    store
        .put("cache/t1/-/r/a", b"one".to_vec(), None)
        .await
        .unwrap();
    store
        .put(
            "cache/t1/-/r/b",
            b"two".to_vec(),
            Some(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    store
        .put("cache/t2/-/r/a", b"three".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(
        store.get("cache/t1/-/r/a").await.unwrap().as_deref(),
        Some(&b"one"[..])
    );
    assert_eq!(store.get("cache/t1/-/r/missing").await.unwrap(), None);
    assert_eq!(store.count_prefix("cache/t1/").await.unwrap(), 2);
    assert_eq!(store.count_prefix("cache/").await.unwrap(), 3);
    store
        .put("cache/t1/-/r/a", b"uno".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(
        store.get("cache/t1/-/r/a").await.unwrap().as_deref(),
        Some(&b"uno"[..])
    );
    assert!(store.delete("cache/t1/-/r/a").await.unwrap());
    assert!(!store.delete("cache/t1/-/r/a").await.unwrap());
    assert_eq!(store.delete_prefix("cache/t1/").await.unwrap(), 1);
    assert_eq!(store.get("cache/t1/-/r/b").await.unwrap(), None);
    assert_eq!(
        store.get("cache/t2/-/r/a").await.unwrap().as_deref(),
        Some(&b"three"[..])
    );
    store
        .put("short", b"x".to_vec(), Some(Duration::from_millis(100)))
        .await
        .unwrap();
    assert!(store.get("short").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        store.get("short").await.unwrap(),
        None,
        "{} expires entries",
        store.backend()
    );
}

/// A scan sees every live entry under the prefix once, across batch boundaries, and nothing else.
async fn scan(store: &dyn Store) {
    for i in 0..2500 {
        store
            .put(&format!("scan/in/{i:05}"), i.to_string().into_bytes(), None)
            .await
            .unwrap();
    }
    store
        .put(
            "scan/in/expiring",
            b"x".to_vec(),
            Some(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    store.put("scan/out/0", b"x".to_vec(), None).await.unwrap();
    store.put("scan/io", b"x".to_vec(), None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut seen = Vec::new();
    let visited = store
        .scan_prefix("scan/in/", &mut |key, value| seen.push((key, value)))
        .await
        .unwrap();
    assert_eq!(visited, 2500, "{}", store.backend());
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 2500);
    assert_eq!(seen[7], ("scan/in/00007".to_owned(), b"7".to_vec()));
    assert!(seen.iter().all(|(k, _)| k.starts_with("scan/in/0")));
}

#[tokio::test]
async fn the_embedded_store_keeps_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract(&FjallStore::open(&dir.path().join("db"), 1 << 20, None).unwrap()).await;
}

#[ignore = "needs redis-server (make test)"]
#[tokio::test]
async fn both_stores_scan_a_prefix_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    scan(&FjallStore::open(&dir.path().join("db"), 1 << 20, None).unwrap()).await;
    let redis = RedisServer::start();
    scan(&RedisStore::new(&redis.url(), "test:").unwrap()).await;
}

#[ignore = "needs redis-server (make test)"]
#[tokio::test]
async fn a_redis_change_feed_is_read_by_another_client_in_order_from_its_cursor() {
    let redis = RedisServer::start();
    let writer = RedisStore::new(&redis.url(), "test:").unwrap();
    let reader = RedisStore::new(&redis.url(), "test:").unwrap();
    writer.publish("feed", b"before".to_vec()).await.unwrap();
    let start = reader.read_feed("feed", None, 10).await.unwrap();
    assert!(start.events.is_empty(), "a new reader starts at the end");
    for i in 0..5 {
        writer
            .publish("feed", format!("e{i}").into_bytes())
            .await
            .unwrap();
    }
    let first = reader
        .read_feed("feed", Some(&start.cursor), 3)
        .await
        .unwrap();
    assert_eq!(
        first.events,
        vec![b"e0".to_vec(), b"e1".to_vec(), b"e2".to_vec()]
    );
    let rest = reader
        .read_feed("feed", Some(&first.cursor), 10)
        .await
        .unwrap();
    assert_eq!(rest.events, vec![b"e3".to_vec(), b"e4".to_vec()]);
    let none = reader
        .read_feed("feed", Some(&rest.cursor), 10)
        .await
        .unwrap();
    assert!(none.events.is_empty());
    assert_eq!(none.cursor, rest.cursor);
    assert!(reader.is_shared());
    let dir = tempfile::tempdir().unwrap();
    let embedded = FjallStore::open(&dir.path().join("db"), 1 << 20, None).unwrap();
    assert!(
        !embedded.is_shared(),
        "one process owns an embedded store: nothing to follow"
    );
}

#[ignore = "needs redis-server (make test)"]
#[tokio::test]
async fn redis_keeps_the_store_contract() {
    let redis = RedisServer::start();
    contract(&RedisStore::new(&redis.url(), "test:").unwrap()).await;
}

#[ignore = "needs redis-server (make test)"]
#[tokio::test]
async fn redis_keys_carry_the_prefix_and_a_prefix_purge_stays_inside_it() {
    let redis = RedisServer::start();
    let a = RedisStore::new(&redis.url(), "deploy-a:").unwrap();
    let b = RedisStore::new(&redis.url(), "deploy-b:").unwrap();
    a.put("k", b"a".to_vec(), None).await.unwrap();
    b.put("k", b"b".to_vec(), None).await.unwrap();
    assert_eq!(a.delete_prefix("").await.unwrap(), 1);
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some(&b"b"[..]));
}

#[ignore = "needs redis-server (make test)"]
#[tokio::test]
async fn redis_down_is_an_error_not_a_hang_and_recovery_is_automatic() {
    let mut redis = RedisServer::start();
    let store = RedisStore::new(&redis.url(), "test:").unwrap();
    store.put("k", b"v".to_vec(), None).await.unwrap();
    redis.stop();
    let started = std::time::Instant::now();
    assert!(store.get("k").await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if store.put("k2", b"back".to_vec(), None).await.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the store did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        store.get("k2").await.unwrap().as_deref(),
        Some(&b"back"[..])
    );
}

/// Many writers at once must all be acknowledged: the embedded store's first engine (sled 0.34)
/// used to hang for good under this load (spacejam/sled#1308), and a write that waits out a
/// stall must not take a runtime thread with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_embedded_store_acknowledges_many_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store: std::sync::Arc<dyn Store> =
        std::sync::Arc::new(FjallStore::open(&dir.path().join("db"), 1 << 20, None).unwrap());
    for round in 0..20 {
        let writes = (0..64).map(|i| {
            let store = std::sync::Arc::clone(&store);
            tokio::spawn(async move {
                let key = format!("k/{round}/{i}");
                store.put(&key, vec![7; 512], None).await.unwrap();
                assert!(
                    store
                        .compare_and_swap(&key, Some(&[7; 512]), vec![8])
                        .await
                        .unwrap()
                );
                store.delete(&key).await.unwrap();
            })
        });
        let all = futures::future::join_all(writes);
        let done = tokio::time::timeout(std::time::Duration::from_secs(30), all)
            .await
            .unwrap_or_else(|_| panic!("round {round}: writes still unacknowledged after 30 s"));
        assert!(done.iter().all(Result::is_ok));
    }
}
