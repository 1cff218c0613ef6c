//! What the framework needs to know about a status struct: where its conditions and its
//! `observedGeneration` live. Derive it with [`macro@crate::Status`] rather than by hand.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// A status with standard conditions and an observed generation.
///
/// The framework stamps `observedGeneration` (on the status and on each condition) before it writes a
/// status, records reconcile errors as a condition, and declares the conditions list as a map list keyed
/// by `type` in the generated CRD schema.
///
/// A status is written only when its serialised form differs from the stored one, so it must
/// serialise the same way each time: use `BTreeMap`, not `HashMap`, for map fields (a `HashMap`'s
/// order changes between runs, and every reconcile would write).
///
/// ```
/// use kube_plan::{ObjectStatus, Status};
/// use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
///
/// #[derive(Status, Default)]
/// #[serde(rename_all = "camelCase")]
/// struct WidgetStatus {
///     #[status(observed_generation)]
///     observed_generation: Option<i64>,
///     #[status(conditions)]
///     conditions: Vec<Condition>,
/// }
///
/// let mut s = WidgetStatus::default();
/// s.set_observed_generation(Some(3));
/// assert_eq!(s.observed_generation, Some(3));
/// assert_eq!(WidgetStatus::CONDITIONS_FIELD, Some("conditions"));
/// ```
pub trait ObjectStatus {
    /// The serialized name of the conditions field, if the status has one.
    const CONDITIONS_FIELD: Option<&'static str>;

    /// The conditions recorded in this status (empty if it has none).
    fn conditions(&self) -> &[Condition];

    /// Mutable access to the conditions, or `None` if the status has no conditions field.
    fn conditions_mut(&mut self) -> Option<&mut Vec<Condition>>;

    /// Records the generation of the spec this status describes (no-op without such a field).
    fn set_observed_generation(&mut self, generation: Option<i64>);
}
