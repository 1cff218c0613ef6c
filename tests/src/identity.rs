//! Identities of their own for operators under test, so the API server's audit log tells their
//! requests apart: a ServiceAccount bound to cluster-admin (these tests measure cost and faults, not
//! RBAC, which the Helm tests check) and a kubeconfig that authenticates with its token.

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use kube::Client;
use kube::api::{Api, PostParams};
use std::path::{Path, PathBuf};

/// What can go wrong making an identity.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The audit log's user name of ServiceAccount `name` in `namespace`.
pub fn username(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

/// Creates ServiceAccount `name` in `namespace` (which must exist), bound to ClusterRole
/// `cluster_role` if given (by a ClusterRoleBinding named `<namespace>-<name>`). Either may exist
/// already (a test run again on the same control plane).
pub async fn service_account(
    client: &Client,
    namespace: &str,
    name: &str,
    cluster_role: Option<&str>,
) -> Result<(), Error> {
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some(name.into());
    exists_ok(
        Api::<ServiceAccount>::namespaced(client.clone(), namespace)
            .create(&PostParams::default(), &sa)
            .await,
    )?;
    let Some(role) = cluster_role else {
        return Ok(());
    };
    let binding = ClusterRoleBinding {
        metadata: kube::core::ObjectMeta {
            name: Some(format!("{namespace}-{name}")),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: role.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: name.into(),
            namespace: Some(namespace.into()),
            ..Default::default()
        }]),
    };
    exists_ok(
        Api::<ClusterRoleBinding>::all(client.clone())
            .create(&PostParams::default(), &binding)
            .await,
    )
}

fn exists_ok<T>(created: Result<T, kube::Error>) -> Result<(), Error> {
    match created {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A token of ServiceAccount `name` in `namespace`, valid for `hours`.
pub async fn token(
    client: &Client,
    namespace: &str,
    name: &str,
    hours: i64,
) -> Result<String, Error> {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(hours * 3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(name, &PostParams::default(), &request)
        .await?
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| "the token request returned no token".into())
}

/// Creates ServiceAccount `name` in `namespace` (which must exist) with cluster-admin, and writes
/// `<dir>/<name>.kubeconfig`: the cluster's kubeconfig `base`, authenticating as it.
pub async fn service_account_kubeconfig(
    client: &Client,
    base: &Path,
    namespace: &str,
    name: &str,
    dir: &Path,
) -> Result<PathBuf, Error> {
    service_account(client, namespace, name, Some("cluster-admin")).await?;
    let token = token(client, namespace, name, 24).await?;
    let mut kc = kube::config::Kubeconfig::read_from(base)?;
    for user in &mut kc.auth_infos {
        user.auth_info = Some(kube::config::AuthInfo {
            token: Some(token.clone().into()),
            ..Default::default()
        });
    }
    let path = dir.join(format!("{name}.kubeconfig"));
    // JSON is YAML: kube reads it as any kubeconfig.
    std::fs::write(&path, serde_json::to_vec(&kc)?)?;
    Ok(path)
}
