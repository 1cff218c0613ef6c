//! Runs the CronJob operator against the cluster of the current kubeconfig.

use cronjob_operator::{CronJob, CronJobReconciler};
use k8s_openapi::api::batch::v1::Job;
use kube_plan::{Controller, Operator};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    kube_plan::logging::init(kube_plan::logging::LogFormat::Text);
    kube_plan::install_crypto_provider();
    let client = kube::Client::try_default().await?;
    Operator::new("cronjob-operator", client)
        .install_crds(vec![kube_plan::crd::build::<CronJob>()])
        .health_addr("127.0.0.1:8081".parse()?)
        .controller(Controller::new("cronjob", CronJobReconciler).owns::<Job>())
        .run()
        .await?;
    Ok(())
}
