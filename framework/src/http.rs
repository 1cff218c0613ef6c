//! `/metrics`, `/healthz` and `/readyz` over plain HTTP (hyper 1; no router needed for three paths),
//! and `/metrics` alone over TLS for authorised callers ([`bind_secure`], see
//! [`crate::metrics_auth`]).

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;

use crate::metrics_auth::{self, Certificate, TlsError, Verdict};
use kube::Client;

/// What the endpoints report.
#[derive(Clone, Default)]
pub struct Probes {
    ready: Arc<AtomicBool>,
    failure: Arc<std::sync::Mutex<Option<String>>>,
    registry: Registry,
}

impl Probes {
    /// Probes serving the metrics of `registry`; not ready until [`Probes::set_ready`].
    pub fn new(registry: Registry) -> Self {
        Self {
            ready: Arc::new(AtomicBool::new(false)),
            failure: Arc::default(),
            registry,
        }
    }

    /// Makes `/healthz` (and `/livez`) answer 500 with `reason` from now on, so the kubelet restarts
    /// a process that can no longer do its work.
    pub fn set_failed(&self, reason: &str) {
        if let Ok(mut f) = self.failure.lock() {
            *f = Some(reason.to_owned());
        }
    }

    /// Why `/healthz` fails, if it does.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Sets what `/readyz` answers.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The probes, and `/metrics` when `metrics` (an endpoint in clear text never serves metrics
    /// that are meant to be served only to authorised callers).
    fn respond(&self, req: &Request<Incoming>, metrics: bool) -> Response<Full<Bytes>> {
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        match req.uri().path() {
            "/healthz" | "/livez" => match self.failure() {
                None => text(StatusCode::OK, "ok\n".into()),
                Some(reason) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{reason}\n")),
            },
            "/readyz" if self.is_ready() => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "caches not synced\n".into(),
            ),
            "/metrics" if metrics => self.metrics(),
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        let mut r = text(StatusCode::OK, crate::metrics::render(&self.registry));
        if let Ok(v) = http::HeaderValue::from_str(prometheus::TEXT_FORMAT) {
            r.headers_mut().insert(http::header::CONTENT_TYPE, v);
        }
        r
    }

    /// `/metrics` for a caller the API server authenticates and allows to `get` it.
    async fn respond_secure(
        &self,
        client: &Client,
        req: &Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        if req.uri().path() != METRICS {
            return text(StatusCode::NOT_FOUND, "not found\n".into());
        }
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        let authorization = req.headers().get(http::header::AUTHORIZATION);
        match metrics_auth::authorize(client, authorization, METRICS).await {
            Verdict::Allowed => self.metrics(),
            Verdict::Unauthenticated(why) => {
                tracing::debug!(reason = %why, "metrics caller not authenticated");
                text(StatusCode::UNAUTHORIZED, format!("Unauthorized: {why}\n"))
            }
            Verdict::Forbidden(why) => {
                tracing::debug!(reason = %why, "metrics caller not allowed");
                text(StatusCode::FORBIDDEN, format!("Forbidden: {why}\n"))
            }
            Verdict::Failed(why) => {
                tracing::warn!(reason = %why, "could not review a metrics caller");
                text(StatusCode::INTERNAL_SERVER_ERROR, format!("{why}\n"))
            }
        }
    }
}

const METRICS: &str = "/metrics";

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// Accepts connections on `listener` for ever, each handled by `handle` in its own task.
async fn accept_loop<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream));
            }
            Err(e) => tracing::warn!(error = %e, "accepting connection"),
        }
    }
}

/// Serves HTTP/1.1 on one connection until it closes.
async fn serve_http1<I, S>(io: I, service: S)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Full<Bytes>>,
            Error = std::convert::Infallible,
        >,
    S::Future: Send + 'static,
{
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await
    {
        tracing::debug!(error = %e, "serving connection");
    }
}

/// Binds `addr` for the probes (and `/metrics` too if `metrics`) over plain HTTP, and returns the
/// bound address (port 0 picks a free one) and the serving future.
pub async fn bind(
    addr: SocketAddr,
    probes: Probes,
    metrics: bool,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = ()> + Send + 'static,
)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let serve = accept_loop(listener, move |stream| {
        let probes = probes.clone();
        async move {
            let svc = service_fn(move |req| {
                let resp = probes.respond(&req, metrics);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            serve_http1(stream, svc).await;
        }
    });
    Ok((local, serve))
}

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Binds `addr` for `/metrics` over TLS with `certificate`, each caller reviewed through `client`
/// (TokenReview, then SubjectAccessReview for `get /metrics`), and returns the bound address and
/// the serving future. Other paths answer 404.
pub async fn bind_secure(
    addr: SocketAddr,
    probes: Probes,
    client: Client,
    certificate: &Certificate,
) -> Result<
    (
        SocketAddr,
        impl std::future::Future<Output = ()> + Send + 'static,
    ),
    SecureBindError,
> {
    let acceptor = tokio_rustls::TlsAcceptor::from(metrics_auth::server_config(certificate)?);
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let serve = accept_loop(listener, move |stream| {
        let (probes, client, acceptor) = (probes.clone(), client.clone(), acceptor.clone());
        async move {
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("TLS handshake timed out");
                        return;
                    }
                };
            let svc = service_fn(move |req| {
                let (probes, client) = (probes.clone(), client.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(probes.respond_secure(&client, &req).await)
                }
            });
            serve_http1(stream, svc).await;
        }
    });
    Ok((local, serve))
}

/// Errors binding the secure `/metrics` endpoint.
#[derive(Debug, thiserror::Error)]
pub enum SecureBindError {
    /// The certificate could not be loaded or made.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The address could not be bound.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
