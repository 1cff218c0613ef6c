//! Drop: keeps container images cached on Kubernetes nodes.
//!
//! - [`api`]: the four kinds and their CRDs;
//! - [`podbuilder`]: the pull Pod for one image on one node (pure);
//! - [`pacing`]: which pulls may start now (pure);

pub mod api;
pub mod pacing;
pub mod podbuilder;
