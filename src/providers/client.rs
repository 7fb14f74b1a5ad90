//! The HTTP client every upstream call goes through: hyper's pooled client, one per serving
//! thread, or reqwest where the environment sends the upstream through a proxy.
//!
//! hyper's client is the hot path: reqwest parses the request's URL twice per call (in its
//! redirect policy and again for its response), which was a sixth of a pass-through's CPU.
//! reqwest stays where it earns its cost: `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and
//! `NO_PROXY`, read the way reqwest has always read them, so a gateway behind an egress proxy
//! keeps working unchanged.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::{ProviderError, error_chain, reqwest_chain};
use crate::config::ProviderConfig;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An upstream response's body, whichever client fetched it.
pub(crate) type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

type Direct = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One client, and so one connection pool, per serving thread (plus one for every other
/// thread): a request's upstream connection is driven by the runtime that serves the request,
/// never woken on another thread.
#[derive(Clone)]
pub struct Clients(Arc<Pools>);

enum Pools {
    Direct(Box<[Direct]>),
    Proxied(Box<[reqwest::Client]>),
}

const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const POOL_MAX_IDLE_PER_HOST: usize = 256;

impl Clients {
    pub(super) fn new(config: &ProviderConfig, serving_threads: usize) -> anyhow::Result<Self> {
        let count = serving_threads + 1;
        let pools = if behind_proxy(config) {
            Pools::Proxied(
                (0..count)
                    .map(|_| {
                        reqwest::Client::builder()
                            .connect_timeout(config.connect_timeout)
                            .tcp_nodelay(true)
                            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
                            .build()
                    })
                    .collect::<Result<_, _>>()?,
            )
        } else {
            Pools::Direct(
                (0..count)
                    .map(|_| direct(config))
                    .collect::<anyhow::Result<_>>()?,
            )
        };
        Ok(Self(Arc::new(pools)))
    }

    /// Sends the request on the current thread's client. Only the status line and headers are
    /// awaited; the body is read by the caller.
    pub(super) async fn send(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<UpstreamBody>, ProviderError> {
        let thread = crate::runtime::serving_thread();
        match &*self.0 {
            Pools::Direct(clients) => {
                let client = &clients[thread % clients.len()];
                let response = client
                    .request(request.map(Full::new))
                    .await
                    .map_err(|error| {
                        if error.is_connect() {
                            ProviderError::Connect(error_chain(&error))
                        } else {
                            ProviderError::Transport(error_chain(&error))
                        }
                    })?;
                Ok(response.map(|body| body.map_err(BoxError::from).boxed_unsync()))
            }
            Pools::Proxied(clients) => {
                let client = &clients[thread % clients.len()];
                let request = reqwest::Request::try_from(request)
                    .map_err(|error| ProviderError::Transport(reqwest_chain(error)))?;
                let response = client
                    .execute(request)
                    .await
                    .map_err(ProviderError::from_send)?;
                let response: http::Response<reqwest::Body> = response.into();
                Ok(response.map(|body| {
                    body.map_err(|error| BoxError::from(error.without_url()))
                        .boxed_unsync()
                }))
            }
        }
    }
}

fn direct(config: &ProviderConfig) -> anyhow::Result<Direct> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(config.connect_timeout));
    http.set_nodelay(true);
    // The TLS connector in front of it handles https.
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .pool_timer(TokioTimer::new())
        .build(connector))
}

/// Whether the environment's proxy settings cover this provider's address (the same rules, from
/// the same code, as reqwest applies).
fn behind_proxy(config: &ProviderConfig) -> bool {
    let Some(base_url) = &config.base_url else {
        return false;
    };
    base_url
        .as_str()
        .parse::<http::Uri>()
        .is_ok_and(|uri| Matcher::from_env().intercept(&uri).is_some())
}
