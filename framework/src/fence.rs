//! The leader's write fence: a client that refuses every write once this replica can no longer be
//! sure it holds the Lease.
//!
//! Leader election alone does not stop a replica that was paused (a long GC, a frozen VM, SIGSTOP)
//! from writing after a standby has taken over: when it resumes, its queued work runs before its
//! renew loop notices the loss. The fence closes that window. Each successful acquire or renew
//! extends the fence to *when that attempt started* plus the renew deadline, a moment the standby's
//! lease-duration wait cannot have passed yet; every request that is not a read is refused after
//! it, by the client itself, whatever part of the operator makes it.
//!
//! Where the check happens decides how small the window is. [`Fence::client`] wraps a finished
//! client, so it can only check when a request enters it; a replica frozen while that request
//! waits for a pooled connection (or a TLS handshake) still sends it on waking.
//! [`Fence::client_from_config`] builds the client itself and checks in the request body, which the
//! connection polls right before it writes the request to the socket.

use bytes::Bytes;
use http::{Method, Request, Response};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use kube::client::{Body, ConfigExt};
use kube::{Client, Config};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

/// Until when this replica may write.
#[derive(Clone, Default)]
pub(crate) struct Fence {
    valid_until: Arc<Mutex<Until>>,
}

#[derive(Clone, Copy, Default)]
enum Until {
    /// Not at all (before the operator runs, and once a leader can no longer be sure it leads).
    #[default]
    Closed,
    /// Until this moment.
    At(Instant),
    /// For good: an operator without leader election.
    Always,
}

impl Fence {
    fn set(&self, until: Until) {
        if let Ok(mut v) = self.valid_until.lock() {
            *v = until;
        }
    }

    /// Writes are allowed until `until`.
    pub(crate) fn extend(&self, until: Instant) {
        self.set(Until::At(until));
    }

    /// Writes are allowed from now on, with no deadline.
    pub(crate) fn open_always(&self) {
        self.set(Until::Always);
    }

    /// No more writes.
    pub(crate) fn close(&self) {
        self.set(Until::Closed);
    }

    /// Whether a write may go out now.
    pub(crate) fn is_open(&self) -> bool {
        match self.valid_until.lock().map_or(Until::Closed, |v| *v) {
            Until::Closed => false,
            Until::At(until) => Instant::now() < until,
            Until::Always => true,
        }
    }

    /// `client`, fenced: reads pass, writes pass only while the fence is open.
    pub(crate) fn client(&self, client: Client) -> Client {
        let namespace = client.default_namespace().to_owned();
        Client::new(
            Fenced {
                inner: client,
                fence: self.clone(),
            },
            namespace,
        )
    }

    /// A client for `config` that checks the fence when a write's body is about to be written to
    /// its connection, after any wait for a connection. Otherwise it is built as kube builds its
    /// own: the same TLS, authentication (refreshing tokens included), headers and timeouts.
    pub(crate) fn client_from_config(&self, config: &Config) -> Result<Client, kube::Error> {
        let mut connector = hyper_timeout::TimeoutConnector::new(config.rustls_https_connector()?);
        connector.set_connect_timeout(config.connect_timeout);
        connector.set_read_timeout(config.read_timeout);
        connector.set_write_timeout(config.write_timeout);
        connector.set_reset_reader_on_write(config.reset_reader_on_write);
        let http: hyper_util::client::legacy::Client<_, FencedBody> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        let fence = self.clone();
        let service = tower::ServiceBuilder::new()
            .layer(config.base_uri_layer())
            .option_layer(config.auth_layer()?)
            .layer(config.extra_headers_layer()?)
            .map_request(move |req: Request<Body>| {
                let (parts, inner) = req.into_parts();
                // Reads pass as they are; only a write carries the fence (and its refusal).
                let write = (!is_read(&parts.method)).then(|| {
                    let refusal = LeadershipLapsed {
                        method: parts.method.clone(),
                        path: parts.uri.path().to_owned(),
                    };
                    (fence.clone(), refusal)
                });
                Request::from_parts(parts, FencedBody { inner, write })
            })
            .map_err(tower::BoxError::from)
            .service(http);
        Ok(Client::new(service, config.default_namespace.clone()))
    }
}

/// A request body that, for a write, refuses to yield anything once the fence has closed: the
/// connection then drops the request instead of sending it.
struct FencedBody {
    inner: Body,
    /// For a write not yet let through: the fence, and the error to give when it is closed.
    /// Checked once, at the first poll; `None` afterwards (and for reads).
    write: Option<(Fence, LeadershipLapsed)>,
}

impl HttpBody for FencedBody {
    type Data = Bytes;
    type Error = kube::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, kube::Error>>> {
        if let Some((fence, refusal)) = self.write.take() {
            // The time is read before the check: a pass logged with a time after a freeze ended
            // would be a write decided by a replica that was no longer sure it led.
            let checked_at = jiff::Timestamp::now();
            if !fence.is_open() {
                self.write = Some((fence, refusal.clone()));
                return Poll::Ready(Some(Err(kube::Error::Service(Box::new(refusal)))));
            }
            tracing::debug!(method = %refusal.method, path = %refusal.path, %checked_at, "write passed the leader fence");
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    /// A write's body is never reported empty before its check, so the connection always polls it
    /// (and with that, checks the fence), even when it carries no bytes.
    fn is_end_stream(&self) -> bool {
        self.write.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a fenced write was refused.
#[derive(Clone, Debug, thiserror::Error)]
#[error(
    "refusing {method} {path}: this replica's leadership has lapsed (not renewed within the renew deadline)"
)]
pub struct LeadershipLapsed {
    method: Method,
    path: String,
}

struct Fenced {
    inner: Client,
    fence: Fence,
}

fn is_read(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

impl tower::Service<Request<Body>> for Fenced {
    type Response = Response<Body>;
    type Error = kube::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, kube::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let client = self.inner.clone();
        let fence = self.fence.clone();
        // Checked when the request is about to be sent, not when it was made: a replica paused
        // between the two would otherwise send a write it decided on before the pause.
        Box::pin(async move {
            if !is_read(req.method()) && !fence.is_open() {
                let refused = LeadershipLapsed {
                    method: req.method().clone(),
                    path: req.uri().path().to_owned(),
                };
                return Err(kube::Error::Service(Box::new(refused)));
            }
            client.send(req).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fence_is_closed_until_extended_and_lapses_at_its_deadline() {
        let f = Fence::default();
        assert!(!f.is_open());
        f.extend(Instant::now() + Duration::from_secs(60));
        assert!(f.is_open());
        f.extend(Instant::now() - Duration::from_millis(1));
        assert!(!f.is_open(), "a deadline in the past closes it");
        f.extend(Instant::now() + Duration::from_secs(60));
        f.close();
        assert!(!f.is_open());
        f.open_always();
        assert!(f.is_open(), "without an election it stays open");
        f.close();
        assert!(!f.is_open());
    }

    /// A plain-HTTP server on loopback that answers `{}` and records each request's method as it
    /// arrives.
    async fn recording_server() -> (Config, Arc<Mutex<Vec<Method>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((io, _)) = listener.accept().await else {
                    return;
                };
                let record = record.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<_>| {
                        record.lock().unwrap().push(req.method().clone());
                        async {
                            Ok::<_, std::convert::Infallible>(Response::new(
                                http_body_util::Full::new(Bytes::from_static(b"{}")),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                        .await;
                });
            }
        });
        let url = format!("http://{addr}").parse().unwrap();
        (Config::new(url), seen)
    }

    async fn send(client: &Client, method: Method) -> Result<(), kube::Error> {
        let req = Request::builder()
            .method(method)
            .uri("/api/v1/namespaces/default/configmaps/x")
            .body(b"{}".to_vec())
            .unwrap();
        client.request::<serde_json::Value>(req).await.map(drop)
    }

    #[tokio::test]
    async fn fence_refuses_a_write_at_its_body_once_closed_and_nothing_reaches_the_server() {
        crate::install_crypto_provider();
        let (config, seen) = recording_server().await;
        let fence = Fence::default();
        let client = fence.client_from_config(&config).unwrap();

        let refused = send(&client, Method::PATCH).await.unwrap_err();
        assert!(
            format!("{refused:?}").contains("LeadershipLapsed"),
            "refused as lapsed leadership: {refused:?}"
        );
        send(&client, Method::GET)
            .await
            .expect("reads pass a closed fence");
        assert_eq!(
            *seen.lock().unwrap(),
            [Method::GET],
            "the write never arrived"
        );

        fence.extend(Instant::now() + Duration::from_secs(60));
        send(&client, Method::PATCH)
            .await
            .expect("an open fence lets writes out");
        send(&client, Method::DELETE).await.unwrap();
        fence.close();
        assert!(send(&client, Method::POST).await.is_err());
        assert_eq!(
            *seen.lock().unwrap(),
            [Method::GET, Method::PATCH, Method::DELETE]
        );
    }

    #[tokio::test]
    async fn fence_holds_an_operators_leader_client_until_it_runs() {
        crate::install_crypto_provider();
        let (config, seen) = recording_server().await;
        let operator = crate::Operator::from_config("fenced", config).unwrap();
        let writer = operator.leader_client().unwrap();
        assert!(
            send(&writer, Method::POST).await.is_err(),
            "nothing is written before the operator runs"
        );
        send(&writer, Method::GET).await.expect("reads pass");
        // What `run` does without an election (with one, the candidate opens it while it leads).
        operator.fence.open_always();
        send(&writer, Method::POST)
            .await
            .expect("it runs: writes pass");
        assert_eq!(*seen.lock().unwrap(), [Method::GET, Method::POST]);
    }

    #[test]
    fn fence_lets_reads_through() {
        assert!(is_read(&Method::GET));
        assert!(!is_read(&Method::PATCH));
        assert!(!is_read(&Method::DELETE));
        assert!(!is_read(&Method::POST));
        assert!(!is_read(&Method::PUT));
    }
}
