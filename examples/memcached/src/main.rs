//! Runs the Memcached operator against the cluster of the current kubeconfig.

use k8s_openapi::api::apps::v1::Deployment;
use kube_plan::{Controller, Operator};
use memcached_operator::{Memcached, MemcachedReconciler};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    kube_plan::logging::init(kube_plan::logging::LogFormat::Text);
    kube_plan::install_crypto_provider();
    let client = kube::Client::try_default().await?;
    Operator::new("memcached-operator", client)
        .install_crds(vec![kube_plan::crd::build::<Memcached>()])
        .health_addr("127.0.0.1:8081".parse()?)
        .controller(Controller::new("memcached", MemcachedReconciler).owns::<Deployment>())
        .run()
        .await?;
    Ok(())
}
