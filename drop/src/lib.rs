//! Drop: keeps container images cached on Kubernetes nodes.
//!
//! - [`api`]: the four kinds and their CRDs;
//! - [`podbuilder`]: the pull Pod for one image on one node (pure);
//! - [`reference`]: image references, parsed and normalised (pure);
//! - [`pacing`]: which pulls may start now (pure);
//! - [`cachedimage`]: the CachedImage controller;
//! - [`cachedimageset`]: the CachedImageSet controller;
//! - [`discovery`]: the Prometheus and registry sources;
//! - [`discoverypolicy`]: the DiscoveryPolicy controller;
//! - [`memory`]: handing freed memory back to the system;
//! - [`metrics`]: the `drop_*` metrics;
//! - [`warmup`]: keeping new nodes tainted until their images are cached;
//! - [`operator`]: wiring the controllers into one process;
//! - [`cli`]: the command line of the `drop` binary.

pub mod api;
pub mod cachedimage;
pub mod cachedimageset;
pub mod cli;
pub mod discovery;
pub mod discoverypolicy;
pub mod memory;
pub mod metrics;
pub mod operator;
pub mod pacing;
pub mod podbuilder;
pub mod reference;
pub mod warmup;
