//! Accepting and keeping connections, with the limits a server facing the open network needs and
//! `axum::serve` does not set: a cap on open connections, a deadline for each request head (which
//! also closes idle keep-alive connections: hyper starts it when a connection opens and again
//! after each answer), and a shutdown that closes connections with no request in flight at once
//! instead of waiting for a half-sent head.
//!
//! The protocol (HTTP/1.1, or HTTP/2 with prior knowledge) is told apart here rather than by
//! hyper-util's `auto` builder, whose detection waits for the first bytes with no deadline: a
//! connection that sends nothing would stay open for ever.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router as HttpRouter;
use axum::body::Body;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::telemetry::Metrics;

pub struct ConnectionLimits {
    /// Open connections at most, shared by every listener of the same port.
    pub slots: Arc<Semaphore>,
    pub header_timeout: Duration,
}

/// `count` listening sockets on `addr`, all bound with `SO_REUSEPORT` so that the kernel spreads
/// new connections over them (port 0 picks one free port for all of them). Another process can
/// join the port only under the same user, as with nginx's `reuseport`.
pub fn bind_reusing_port(
    addr: SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut addr = addr;
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Threads serving the API, each a single-threaded runtime with a listener of its own (see
/// [`crate::runtime`]). They stop accepting at shutdown, finish their connections, then keep
/// running their tasks (cache writes and the like) until released.
pub struct ServingThreads {
    release: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ServingThreads {
    /// Starts one thread per listener. Each serving loop's end is reported on its receiver.
    pub fn start(
        listeners: Vec<std::net::TcpListener>,
        app: &HttpRouter,
        limits: &ConnectionLimits,
        shutdown: &watch::Receiver<bool>,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<(Self, Vec<tokio::sync::oneshot::Receiver<()>>)> {
        let (release, released) = watch::channel(false);
        let mut threads = Vec::with_capacity(listeners.len());
        let mut served = Vec::with_capacity(listeners.len());
        for (index, listener) in listeners.into_iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (done, finished) = tokio::sync::oneshot::channel();
            served.push(finished);
            let (app, metrics) = (app.clone(), Arc::clone(metrics));
            let (shutdown, mut released) = (shutdown.clone(), released.clone());
            let limits = ConnectionLimits {
                slots: Arc::clone(&limits.slots),
                header_timeout: limits.header_timeout,
            };
            let thread = std::thread::Builder::new()
                .name(format!("reprise-serve-{}", index + 1))
                .spawn(move || {
                    crate::runtime::enter_serving_thread(index + 1);
                    runtime.block_on(async move {
                        match TcpListener::from_std(listener) {
                            Ok(listener) => {
                                tokio::select! {
                                    () = serve(listener, app, limits, shutdown, metrics) => {
                                        let _ = done.send(());
                                    }
                                    () = stopped(&mut released) => {}
                                }
                            }
                            Err(error) => {
                                tracing::error!(%error, "a serving thread could not listen");
                                let _ = done.send(());
                            }
                        }
                        stopped(&mut released).await;
                    });
                })?;
            threads.push(thread);
        }
        Ok((Self { release, threads }, served))
    }

    /// Ends the threads, cutting off whatever they still run, and waits for them.
    pub async fn release(self) {
        self.release.send_replace(true);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// Serves `app` on `listener` until `shutdown` turns true, then waits for the open connections:
/// those with a request in flight finish it, the others are closed at once.
pub async fn serve(
    listener: TcpListener,
    app: HttpRouter,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    let slots = Arc::clone(&limits.slots);
    let connections = TaskTracker::new();
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2.timer(TokioTimer::new());
    let builders = Arc::new((http1, http2));
    loop {
        let accepted = tokio::select! {
            biased;
            () = stopped(&mut shutdown) => break,
            accepted = accept(&listener, &slots) => accepted,
        };
        let Some((stream, slot)) = accepted else {
            continue;
        };
        let connection = Connection {
            app: app.clone(),
            builders: Arc::clone(&builders),
            header_timeout: limits.header_timeout,
            shutdown: shutdown.clone(),
            metrics: Arc::clone(&metrics),
            _slot: slot,
        };
        connections.spawn(connection.run(stream));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Resolves once shutdown began (or its sender is gone, which also means stop).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// The next connection, once a connection slot is free. Accept errors (a client that reset
/// before we got to it, or the process out of file descriptors) are logged and survived.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Option<(TcpStream, OwnedSemaphorePermit)> {
    let slot = Arc::clone(slots).acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, _)) => {
            // Without TCP_NODELAY a small answer written in two segments can wait on Nagle for
            // the peer's delayed ACK: tens of microseconds to milliseconds on every request.
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "could not set TCP_NODELAY");
            }
            Some((stream, slot))
        }
        Err(error) => {
            tracing::warn!(%error, "accepting a connection failed");
            // Out of descriptors, retrying at once would spin; a moment lets connections close.
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

struct Connection {
    app: HttpRouter,
    builders: Arc<(http1::Builder, http2::Builder<TokioExecutor>)>,
    header_timeout: Duration,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    _slot: OwnedSemaphorePermit,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

enum Protocol {
    Http1,
    Http2,
}

/// Which protocol the client speaks, from its first bytes (left in the socket for hyper), or
/// `None` if it closed or sent too little before `deadline`.
async fn sniff(stream: &TcpStream, deadline: tokio::time::Instant) -> Option<Protocol> {
    let mut first = [0u8; H2_PREFACE.len()];
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut first))
            .await
            .ok()?
            .ok()?;
        if peeked == 0 {
            return None;
        }
        if first[..peeked] != H2_PREFACE[..peeked] {
            return Some(Protocol::Http1);
        }
        if peeked == H2_PREFACE.len() {
            return Some(Protocol::Http2);
        }
        // Part of the preface: `peek` would return the same bytes at once, so wait a little.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Connection {
    async fn run(mut self, stream: TcpStream) {
        let _open = self.metrics.connection_opened();
        let deadline = tokio::time::Instant::now() + self.header_timeout;
        let protocol = tokio::select! {
            protocol = sniff(&stream, deadline) => protocol,
            () = stopped(&mut self.shutdown) => return,
        };
        let Some(protocol) = protocol else {
            if tokio::time::Instant::now() >= deadline {
                self.metrics.client_timed_out("header");
            }
            return;
        };
        let in_flight = Arc::new(AtomicUsize::new(0));
        let app = self.app.clone();
        let counter = Arc::clone(&in_flight);
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let guard = InFlight::enter(&counter);
            let response = app.clone().oneshot(request);
            async move {
                let response = response.await?;
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(Tracked {
                        body,
                        _guard: guard,
                    })
                }))
            }
        });
        let io = TokioIo::new(stream);
        let builders = Arc::clone(&self.builders);
        let result = match protocol {
            Protocol::Http1 => {
                let connection = builders.0.serve_connection(io, service);
                self.drive(connection, &in_flight).await
            }
            Protocol::Http2 => {
                let connection = builders.1.serve_connection(io, service);
                self.drive(connection, &in_flight).await
            }
        };
        if let Err(error) = result {
            if error.is_timeout() {
                self.metrics.client_timed_out("header");
            }
            tracing::debug!(%error, "connection ended with an error");
        }
    }

    /// Runs `connection` to its end; on shutdown, ends it at once if no request is in flight,
    /// else lets the requests finish (the server's grace period bounds that).
    async fn drive<C>(&mut self, connection: C, in_flight: &AtomicUsize) -> Result<(), C::Error>
    where
        C: GracefulConnection,
    {
        tokio::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => result,
            () = stopped(&mut self.shutdown) => {
                connection.as_mut().graceful_shutdown();
                if in_flight.load(Ordering::Acquire) == 0 {
                    return Ok(());
                }
                connection.await
            }
        }
    }
}

/// Counts a request as in flight from its head until its answer's last byte.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(counter))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Tracked {
    body: Body,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
