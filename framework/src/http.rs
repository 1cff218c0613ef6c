//! `/metrics`, `/healthz` and `/readyz` over plain HTTP (hyper 1; no router needed for three paths).

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

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let text = |status: StatusCode, body: String| {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = status;
            r
        };
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
            "/metrics" => {
                let mut r = text(StatusCode::OK, crate::metrics::render(&self.registry));
                if let Ok(v) = http::HeaderValue::from_str(prometheus::TEXT_FORMAT) {
                    r.headers_mut().insert(http::header::CONTENT_TYPE, v);
                }
                r
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }
}

/// Binds `addr` and returns the bound address (port 0 picks a free one) and the serving future.
pub async fn bind(
    addr: SocketAddr,
    probes: Probes,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = ()> + Send + 'static,
)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let serve = async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting connection");
                    continue;
                }
            };
            let probes = probes.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let resp = probes.respond(&req);
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(error = %e, "serving connection");
                }
            });
        }
    };
    Ok((local, serve))
}
