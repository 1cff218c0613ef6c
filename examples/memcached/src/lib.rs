//! The Memcached operator of the kubebuilder / Operator SDK tutorial, written on the framework: a
//! `Memcached` object asks for `size` memcached replicas; the operator keeps a Deployment of that size
//! and reports whether it is available.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, ObjectMeta};
use kube::{CustomResource, KubeSchema, ResourceExt};
use kube_plan::conditions::{self, Cond};
use kube_plan::{Child, Context, Plan, PrinterColumns, Reconciler, Status, security};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The memcached image the tutorial runs.
pub const IMAGE: &str = "docker.io/library/memcached:1.6.26-alpine3.19";

/// A memcached cluster of `size` replicas.
#[derive(
    CustomResource, KubeSchema, PrinterColumns, Serialize, Deserialize, Clone, Debug, Default,
)]
#[kube(
    group = "cache.example.com",
    version = "v1alpha1",
    kind = "Memcached",
    namespaced
)]
#[kube(status = "MemcachedStatus", derive = "Default")]
pub struct MemcachedSpec {
    /// Number of memcached replicas (1 to 3).
    #[column]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 3").message("size must be between 1 and 3"))]
    pub size: i32,
}

/// Whether the memcached Deployment is available.
#[derive(
    Status, PrinterColumns, Serialize, Deserialize, Clone, Debug, Default, schemars::JsonSchema,
)]
pub struct MemcachedStatus {
    /// `Ready` once every replica is available.
    #[status(conditions)]
    #[column(name = "Ready", condition = "Ready", field = "status")]
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// The reconciler: one Deployment per Memcached, sized by `spec.size`.
pub struct MemcachedReconciler;

impl Reconciler for MemcachedReconciler {
    type Resource = Memcached;
    type Error = kube_plan::children::ChildError;

    async fn reconcile(
        &self,
        m: &Memcached,
        ctx: &Context,
    ) -> Result<Plan<Memcached>, Self::Error> {
        let available = ctx
            .owned::<Deployment>()
            .first()
            .and_then(|d| d.status.clone())
            .and_then(|s| s.available_replicas);
        let ready = available == Some(m.spec.size);
        let message = format!(
            "{}/{} replicas available",
            available.unwrap_or(0),
            m.spec.size
        );
        let mut status = m.status.clone().unwrap_or_default();
        let reason = if ready { "Available" } else { "Reconciling" };
        conditions::set(
            &mut status.conditions,
            Cond::ready(ready, reason, message),
            m.metadata.generation,
            ctx.now(),
        );
        Ok(Plan::new()
            .child(Child::new(&deployment(m))?)
            .status(status))
    }
}

/// The Deployment a Memcached asks for.
pub fn deployment(m: &Memcached) -> Deployment {
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "memcached".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), m.name_any()),
    ]);
    let container = Container {
        name: "memcached".into(),
        image: Some(IMAGE.into()),
        command: Some(
            ["memcached", "--memory-limit=64", "-o", "modern", "-v"]
                .map(String::from)
                .to_vec(),
        ),
        ports: Some(vec![ContainerPort {
            container_port: 11211,
            name: Some("memcached".into()),
            ..Default::default()
        }]),
        security_context: Some(security::restricted_container(Some(1001))),
        ..Default::default()
    };
    Deployment {
        metadata: ObjectMeta {
            name: Some(m.name_any()),
            namespace: m.namespace(),
            ..Default::default()
        },
        spec: DeploymentSpec {
            replicas: Some(m.spec.size),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    security_context: Some(security::restricted_pod()),
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    }
}
