//! The `Store` contract, run against both backends: the embedded sled store and a real Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::redis_server::RedisServer;
use reprise::store::{RedisStore, SledStore, Store};

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

#[tokio::test]
async fn sled_keeps_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract(&SledStore::open(&dir.path().join("db"), 1 << 20, None).unwrap()).await;
}

#[tokio::test]
async fn redis_keeps_the_store_contract() {
    let redis = RedisServer::start();
    contract(&RedisStore::new(&redis.url(), "test:").unwrap()).await;
}

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
