//! The gateway's threads: requests are served by one single-threaded tokio runtime per serving
//! thread, each with its own listening socket (`SO_REUSEPORT`, so the kernel spreads connections
//! over them) and its own upstream connection pools; startup and background work (log writer,
//! flushes, sync with other replicas) run on the process's main runtime.
//!
//! The model is nginx's: a request never leaves the thread that accepted its connection, so no
//! task is woken on another core and no lock or pool is shared on the hot path. A tokio
//! multi-threaded runtime, whose work stealing moves tasks between threads, spent half again as
//! much CPU per request on this path (docs/performance.md).

use std::cell::Cell;
use std::sync::OnceLock;

thread_local! {
    static SERVING_THREAD: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as serving thread `index` (counted from 1; 0 is any other thread).
pub fn enter_serving_thread(index: usize) {
    SERVING_THREAD.set(index);
}

/// Which serving thread this is: 1 and up on a serving thread, 0 on any other.
pub fn serving_thread() -> usize {
    SERVING_THREAD.get()
}

/// Serving threads for a `server.worker_threads` setting: as many as the machine has cores when
/// unset.
pub fn serving_threads(configured: Option<usize>) -> usize {
    configured.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(std::num::NonZeroUsize::get)
            .unwrap_or(1)
    })
}

/// The runtime requests with large bodies are served on: a multi-threaded one shared by the
/// serving threads, built on first use. Megabytes of JSON parsed, hashed and serialised take a
/// serving thread for that long, and every other connection it accepted would wait behind them;
/// here they take a thread of their own. `None` if it could not be built (the request is then
/// served where it was accepted).
pub fn large_requests() -> Option<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(serving_threads(None))
                .thread_name("reprise-large")
                .enable_all()
                .build()
                .map_err(|error| tracing::warn!(%error, "no runtime for large requests"))
                .ok()
        })
        .as_ref()
}
