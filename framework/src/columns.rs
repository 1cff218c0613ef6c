//! Printer columns (`kubectl get` output) declared on the fields they display.
//!
//! Derive [`macro@crate::PrinterColumns`] on a spec or status struct and mark fields with `#[column]`; the
//! JSONPath is built from the field's serialized name, so a rename cannot leave a column pointing at
//! nothing. [`crate::crd::build`] collects the columns of the spec and the status.
//!
//! ```
//! use kube_plan::{Column, PrinterColumns};
//!
//! #[derive(PrinterColumns)]
//! #[serde(rename_all = "camelCase")]
//! struct WidgetSpec {
//!     #[column(name = "Size")]
//!     replica_count: i32,
//!     #[column(priority = 1)]
//!     image: String,
//! }
//!
//! let cols = WidgetSpec::columns(".spec");
//! assert_eq!(cols[0].name, "Size");
//! assert_eq!(cols[0].json_path, ".spec.replicaCount");
//! assert_eq!(cols[0].type_, "integer");
//! assert_eq!(cols[1].name, "Image");
//! assert_eq!(cols[1].priority, 1);
//! ```

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceColumnDefinition;

/// One printer column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Column header.
    pub name: String,
    /// OpenAPI type: `string`, `integer`, `number`, `boolean` or `date`.
    pub type_: &'static str,
    /// JSONPath of the value, relative to the object root.
    pub json_path: String,
    /// 0 shows the column always; higher values only with `-o wide`.
    pub priority: i32,
    /// Optional description (shown by `kubectl explain`-like tools).
    pub description: Option<String>,
}

impl From<Column> for CustomResourceColumnDefinition {
    fn from(c: Column) -> Self {
        CustomResourceColumnDefinition {
            name: c.name,
            type_: c.type_.to_owned(),
            json_path: c.json_path,
            priority: (c.priority != 0).then_some(c.priority),
            description: c.description,
            format: None,
        }
    }
}

/// A struct whose fields declare printer columns.
pub trait PrinterColumns {
    /// The columns, with JSONPaths rooted at `prefix` (`.spec` or `.status`), in field order.
    fn columns(prefix: &str) -> Vec<Column>;
}

/// JSONPath selecting one field of the condition of a given type in a conditions list.
pub fn condition_path(list_path: &str, condition_type: &str, field: &str) -> String {
    format!("{list_path}[?(@.type==\"{condition_type}\")].{field}")
}
