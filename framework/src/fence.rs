//! The leader's write fence: a client that refuses every write once this replica can no longer be
//! sure it holds the Lease.
//!
//! Leader election alone does not stop a replica that was paused (a long GC, a frozen VM, SIGSTOP)
//! from writing after a standby has taken over: when it resumes, its queued work runs before its
//! renew loop notices the loss. The fence closes that window. Each successful acquire or renew
//! extends the fence to *when that attempt started* plus the renew deadline, a moment the standby's
//! lease-duration wait cannot have passed yet; every request that is not a read is refused after
//! it, by the client itself, whatever part of the operator makes it.

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

/// Until when this replica may write (`None`: not at all).
#[derive(Clone, Default)]
pub(crate) struct Fence {
    valid_until: Arc<Mutex<Option<Instant>>>,
}

impl Fence {
    /// Writes are allowed until `until`.
    pub(crate) fn extend(&self, until: Instant) {
        if let Ok(mut v) = self.valid_until.lock() {
            *v = Some(until);
        }
    }

    /// No more writes.
    pub(crate) fn close(&self) {
        if let Ok(mut v) = self.valid_until.lock() {
            *v = None;
        }
    }

    /// Whether a write may go out now.
    pub(crate) fn is_open(&self) -> bool {
        self.valid_until
            .lock()
            .ok()
            .and_then(|v| *v)
            .is_some_and(|until| Instant::now() < until)
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
}

/// Why a fenced write was refused.
#[derive(Debug, thiserror::Error)]
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
