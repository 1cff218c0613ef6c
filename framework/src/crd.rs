//! Finishing, printing and installing CustomResourceDefinitions.
//!
//! kube's `CustomResource` derive makes the CRD; [`build`] adds what the framework's derives describe:
//! printer columns declared on spec and status fields, and the conditions list declared as a map list
//! keyed by `type` (so server-side apply merges conditions by type instead of replacing the list).
//! A status with an `observedGeneration` field gets the default `{observedGeneration: 0}`, so that a
//! new object reads as not yet observed (kstatus: in progress) until its controller writes a status.
//!
//! ```
//! use kube_plan::{PrinterColumns, Status};
//! use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
//! use kube::CustomResource;
//! use schemars::JsonSchema;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(CustomResource, PrinterColumns, Serialize, Deserialize, Clone, Debug, JsonSchema)]
//! #[kube(group = "example.com", version = "v1", kind = "Widget", status = "WidgetStatus")]
//! struct WidgetSpec {
//!     #[column]
//!     size: i32,
//! }
//!
//! #[derive(Status, PrinterColumns, Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
//! struct WidgetStatus {
//!     #[status(conditions)]
//!     #[column(name = "Status", condition = "Ready", field = "reason")]
//!     conditions: Vec<Condition>,
//! }
//!
//! let crd = kube_plan::crd::build::<Widget>();
//! let cols = crd.spec.versions[0].additional_printer_columns.clone().unwrap();
//! assert_eq!(cols[0].json_path, ".spec.size");
//! assert_eq!(cols[1].json_path, ".status.conditions[?(@.type==\"Ready\")].reason");
//! let yaml = kube_plan::crd::to_yaml(&crd).unwrap();
//! assert!(yaml.contains("x-kubernetes-list-type: map"));
//! ```

use crate::{Column, ObjectStatus, PrinterColumns};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceDefinition, CustomResourceDefinitionVersion,
    JSON, JSONSchemaProps,
};
use kube::api::{Api, Patch, PatchParams};
use kube::core::object::{HasSpec, HasStatus};
use kube::{Client, CustomResourceExt};
use std::time::Duration;

/// Errors while printing or installing CRDs.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// The CRD could not be rendered as YAML.
    #[error("rendering CRD {name} as YAML: {source}")]
    Yaml {
        /// CRD name.
        name: String,
        /// Cause.
        #[source]
        source: serde_saphyr::ser::Error,
    },
    /// The API server refused the CRD.
    #[error("applying CRD {name}: {source}")]
    Apply {
        /// CRD name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The CRD was not `Established` in time.
    #[error("CRD {name} not established after {timeout:?}: {detail}")]
    NotEstablished {
        /// CRD name.
        name: String,
        /// How long we waited.
        timeout: Duration,
        /// What the API server last said.
        detail: String,
    },
}

/// The finished CRD of a kind with a status: kube's CRD plus columns and the conditions map list.
pub fn build<K>() -> CustomResourceDefinition
where
    K: CustomResourceExt + HasSpec + HasStatus,
    K::Spec: PrinterColumns,
    K::Status: PrinterColumns + ObjectStatus,
{
    let mut columns = K::Spec::columns(".spec");
    columns.extend(K::Status::columns(".status"));
    finish(K::crd(), columns, K::Status::CONDITIONS_FIELD)
}

/// The finished CRD of a configuration-only kind (no status subresource).
pub fn build_without_status<K>() -> CustomResourceDefinition
where
    K: CustomResourceExt + HasSpec,
    K::Spec: PrinterColumns,
{
    finish(K::crd(), K::Spec::columns(".spec"), None)
}

/// Puts the printer columns named in `order` first, in that order (the rest follow, as they were),
/// for kinds whose table reads best in an order that is not the fields' order: derived spec and
/// status columns and `#[kube(printcolumn)]` ones can then interleave. A name no column has is
/// ignored, so check the result in a test (for instance against `kubectl get` output you expect).
///
/// ```
/// # use kube_plan::crd::order_columns;
/// # use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::*;
/// let col = |name: &str| CustomResourceColumnDefinition {
///     name: name.into(),
///     json_path: format!(".spec.{name}"),
///     type_: "string".into(),
///     ..Default::default()
/// };
/// let mut crd = CustomResourceDefinition::default();
/// crd.spec.versions.push(CustomResourceDefinitionVersion {
///     additional_printer_columns: Some(vec![col("a"), col("b"), col("c")]),
///     ..Default::default()
/// });
/// let crd = order_columns(crd, &["c", "a"]);
/// let names: Vec<_> = crd.spec.versions[0].additional_printer_columns.as_ref().unwrap()
///     .iter().map(|c| c.name.as_str()).collect();
/// assert_eq!(names, ["c", "a", "b"]);
/// ```
pub fn order_columns(
    mut crd: CustomResourceDefinition,
    order: &[&str],
) -> CustomResourceDefinition {
    for version in &mut crd.spec.versions {
        if let Some(columns) = version.additional_printer_columns.as_mut() {
            let rank = |c: &CustomResourceColumnDefinition| {
                order
                    .iter()
                    .position(|n| *n == c.name)
                    .unwrap_or(order.len())
            };
            columns.sort_by_key(rank);
        }
    }
    crd
}

/// Adds derived columns and marks the conditions list.
///
/// Column order: derived spec columns, derived status columns, then columns declared with
/// `#[kube(printcolumn)]` (typically metadata ones such as `Age`), stably sorted so that every
/// always-shown column precedes the `-o wide` ones.
fn finish(
    mut crd: CustomResourceDefinition,
    derived: Vec<Column>,
    conditions_field: Option<&str>,
) -> CustomResourceDefinition {
    for version in &mut crd.spec.versions {
        let declared = version
            .additional_printer_columns
            .take()
            .unwrap_or_default();
        let mut all: Vec<CustomResourceColumnDefinition> =
            derived.iter().cloned().map(Into::into).collect();
        all.extend(declared);
        all.sort_by_key(|c| c.priority.unwrap_or(0));
        version.additional_printer_columns = (!all.is_empty()).then_some(all);

        if conditions_field.is_some() {
            default_unobserved(version);
        }
        if let Some(field) = conditions_field
            && let Some(props) = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
                .and_then(|root| root.properties.as_mut())
                .and_then(|p| p.get_mut("status"))
                .and_then(|status| status.properties.as_mut())
                .and_then(|p| p.get_mut(field))
        {
            mark_map_list(props, "type");
        }
    }
    crd
}

/// Gives a status with an `observedGeneration` field the default `{observedGeneration: 0}`. The API
/// server applies it to an object stored without a status, so a new object reads as "generation 1,
/// generation 0 observed" until its controller first writes the status. kstatus (`helm install
/// --wait`, Flux, `kubectl` tooling built on it) then sees the object as in progress from its
/// creation on; an object with no status at all would read as current before the controller saw it.
fn default_unobserved(version: &mut CustomResourceDefinitionVersion) {
    let Some(status) = version
        .schema
        .as_mut()
        .and_then(|s| s.open_api_v3_schema.as_mut())
        .and_then(|root| root.properties.as_mut())
        .and_then(|p| p.get_mut("status"))
    else {
        return;
    };
    let observed = status
        .properties
        .as_ref()
        .is_some_and(|p| p.contains_key(OBSERVED_GENERATION));
    if observed && status.default.is_none() {
        status.default = Some(JSON(serde_json::json!({ OBSERVED_GENERATION: 0 })));
    }
}

/// The status field kstatus compares with `metadata.generation`.
const OBSERVED_GENERATION: &str = "observedGeneration";

fn mark_map_list(list: &mut JSONSchemaProps, key: &str) {
    list.x_kubernetes_list_type = Some("map".into());
    list.x_kubernetes_list_map_keys = Some(vec![key.into()]);
}

/// The CRD as YAML, as `kubectl apply -f` and Helm take it.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, CrdError> {
    serde_saphyr::to_string(crd).map_err(|source| CrdError::Yaml {
        name: crd.metadata.name.clone().unwrap_or_default(),
        source,
    })
}

/// Several CRDs as one multi-document YAML stream.
pub fn to_yaml_stream(crds: &[CustomResourceDefinition]) -> Result<String, CrdError> {
    let mut out = String::new();
    for crd in crds {
        out.push_str("---\n");
        out.push_str(&to_yaml(crd)?);
    }
    Ok(out)
}

/// Applies the CRDs (server-side apply, field manager `manager`) and waits until each is `Established`.
pub async fn install(
    client: &Client,
    crds: &[CustomResourceDefinition],
    manager: &str,
    timeout: Duration,
) -> Result<(), CrdError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(manager).force();
    for crd in crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let mut body = crd.clone();
        body.metadata.managed_fields = None;
        body.metadata.resource_version = None;
        api.patch(&name, &params, &Patch::Apply(&body))
            .await
            .map_err(|source| CrdError::Apply {
                name: name.clone(),
                source,
            })?;
    }
    for crd in crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        wait_established(&api, &name, timeout).await?;
    }
    Ok(())
}

/// Waits until the named CRD reports `Established=True`.
pub async fn wait_established(
    api: &Api<CustomResourceDefinition>,
    name: &str,
    timeout: Duration,
) -> Result<(), CrdError> {
    let cond = kube::runtime::wait::conditions::is_crd_established();
    match tokio::time::timeout(
        timeout,
        kube::runtime::wait::await_condition(api.clone(), name, cond),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(CrdError::NotEstablished {
            name: name.into(),
            timeout,
            detail: e.to_string(),
        }),
        Err(_) => Err(CrdError::NotEstablished {
            name: name.into(),
            timeout,
            detail: "timed out".into(),
        }),
    }
}

/// Checks that each CRD exists and is `Established`; the error names the missing ones and how to install
/// them. Used at operator start-up so a missing CRD is one clear line instead of endless watch errors.
pub async fn check_installed(
    client: &Client,
    crds: &[CustomResourceDefinition],
) -> Result<(), CrdError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let found = api.get_opt(&name).await.map_err(|source| CrdError::Apply {
            name: name.clone(),
            source,
        })?;
        let established = found.as_ref().is_some_and(|c| {
            c.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        });
        if !established {
            return Err(CrdError::NotEstablished {
                name,
                timeout: Duration::ZERO,
                detail: if found.is_some() {
                    "the CRD exists but is not Established".into()
                } else {
                    "the CRD is not installed; install the CRD chart or apply the generated YAML first".into()
                },
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::{PrinterColumns, Status};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use kube::CustomResource;
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};

    #[derive(CustomResource, PrinterColumns, Serialize, Deserialize, Clone, Debug, JsonSchema)]
    #[kube(
        group = "example.com",
        version = "v1",
        kind = "Gadget",
        status = "GadgetStatus"
    )]
    struct GadgetSpec {
        size: i32,
    }

    #[derive(Status, PrinterColumns, Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    struct GadgetStatus {
        #[status(observed_generation)]
        observed_generation: Option<i64>,
        #[status(conditions)]
        conditions: Vec<Condition>,
    }

    #[test]
    fn crd_status_defaults_to_no_generation_observed() {
        let crd = super::build::<Gadget>();
        let schema = crd.spec.versions[0].schema.as_ref().unwrap();
        let root = schema.open_api_v3_schema.as_ref().unwrap();
        let status = &root.properties.as_ref().unwrap()["status"];
        assert_eq!(
            status.default.as_ref().map(|d| &d.0),
            Some(&serde_json::json!({"observedGeneration": 0}))
        );
        let spec = &root.properties.as_ref().unwrap()["spec"];
        assert!(spec.default.is_none(), "only the status gets a default");
    }
}
