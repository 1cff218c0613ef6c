//! A small framework for Kubernetes controllers on [kube](https://docs.rs/kube).
//!
//! kube-runtime watches objects and calls a function; this crate adds what an operator needs around that
//! call, so an operator is mostly a pure function from the observed object to a [`Plan`]:
//!
//! - [`Reconciler`]: observe one object, return a [`Plan`] (status, children, requeue, Events);
//! - [`Controller`]: binds a reconciler to its watches, executes plans (server-side apply of children
//!   with owner references, pruning of children no longer planned, status writes only on change),
//!   retries failures with per-object backoff, and reports them as a condition and an Event;
//! - [`conditions`]: `metav1.Condition` helpers with correct transition times;
//! - [`trim`]: cached objects lose their managed fields, and per kind what no reconcile reads;
//! - [`Operator`]: several controllers in one process, `/metrics`, `/healthz`, `/readyz`, Lease leader
//!   election, graceful shutdown, CRD install or check at start;
//! - derives: [`macro@PrinterColumns`] (columns declared on fields) and [`macro@Status`] (status
//!   bookkeeping from marked fields); [`crd::build`] turns them into a finished CRD;
//! - `testing` (feature): a real local control plane for tests, and `testing::eventually`.
//!
//! See `docs/framework.md` in the repository for a walk-through, and `examples/memcached` for a whole
//! operator.

// Lets the derives' `::kube_plan::…` paths resolve inside this crate's own tests.
extern crate self as kube_plan;

mod applied;
pub mod backoff;
mod changes;
pub mod children;
pub mod columns;
pub mod conditions;
pub mod controller;
pub mod crd;
mod executor;
mod fence;
pub mod http;
pub mod initial_list;
pub mod leader;
pub mod lean;
pub mod logging;
pub mod metrics;
pub mod metrics_auth;
pub mod operator;
mod owned;
mod per_kind;
pub mod plan;
pub mod reconciler;
pub mod security;
pub mod status;
mod status_writes;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trim;

pub use children::Child;
pub use columns::{Column, PrinterColumns};
pub use controller::Controller;
pub use fence::LeadershipLapsed;
pub use jiff::Timestamp;
pub use kube_plan_macros::{PrinterColumns, Status};
pub use leader::LeaderElection;
pub use operator::{Operator, OperatorError};
pub use plan::Plan;
pub use reconciler::{Context, Reconciler};
pub use status::ObjectStatus;

/// A Kubernetes API error as a user should read it: the API server's own message and reason for an
/// API error (kube's `Display` includes a debug dump of the whole `Status` object), the error's
/// message otherwise. Used for conditions, Events and logs.
///
/// ```
/// let status = kube::core::Status::failure("pods \"p\" is forbidden: exceeded quota", "Forbidden")
///     .with_code(403);
/// let text = kube_plan::describe(&kube::Error::Api(status.boxed()));
/// assert_eq!(text, "pods \"p\" is forbidden: exceeded quota (Forbidden)");
/// ```
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.reason.is_empty() => s.message.clone(),
        kube::Error::Api(s) => format!("{} ({})", s.message, s.reason),
        other => other.to_string(),
    }
}

/// Re-exported so derived code and users agree on one version.
pub use k8s_openapi;
/// Re-exported so derived code and users agree on one version.
pub use kube;

/// Installs the process-wide TLS provider (ring) that kube's rustls client uses. Call once at start-up,
/// before building a client; later calls do nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
