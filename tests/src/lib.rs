//! Shared helpers of the end-to-end suites (`tests/tests/*.rs`). Every suite runs against a real local
//! control plane started (or reused) through `framework::testing`.

use framework::testing::{TestCluster, TestError};
use kube::Client;

/// The shared cluster and a client for it; installs the TLS provider first.
pub async fn cluster() -> Result<(&'static TestCluster, Client), TestError> {
    framework::install_crypto_provider();
    framework::testing::init_logging();
    let cluster = TestCluster::shared()?;
    let client = cluster.client().await?;
    Ok((cluster, client))
}

/// Installs (or updates) Drop's CRDs and waits until they are established.
pub async fn install_drop_crds(client: &Client) -> Result<(), framework::crd::CrdError> {
    framework::crd::install(
        client,
        &drop::api::crds(),
        "drop-e2e",
        std::time::Duration::from_secs(60),
    )
    .await
}
