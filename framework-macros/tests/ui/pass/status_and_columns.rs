use kube_plan::{ObjectStatus, PrinterColumns, Status};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

#[derive(Status, PrinterColumns, Default)]
#[serde(rename_all = "camelCase")]
struct WidgetStatus {
    #[status(observed_generation)]
    observed_generation: Option<i64>,
    #[column(name = "Synced")]
    last_sync_time: Option<Time>,
    #[status(conditions)]
    #[column(name = "Status", condition = "Ready", field = "reason")]
    #[column(name = "Message", condition = "Ready", field = "message", priority = 1)]
    conditions: Option<Vec<Condition>>,
}

#[derive(PrinterColumns)]
#[serde(rename_all = "camelCase")]
struct WidgetSpec {
    #[column]
    replica_count: u32,
    #[serde(rename = "img")]
    #[column(description = "the image")]
    image: String,
    #[column(name = "Owner", path = ".name", type_ = "string", priority = 2)]
    owner_ref: Option<Owner>,
    not_shown: bool,
}

struct Owner;

fn main() {
    let mut s = WidgetStatus::default();
    assert!(s.conditions().is_empty());
    s.conditions_mut().unwrap().push(Condition {
        last_transition_time: Time(kube_plan::Timestamp::UNIX_EPOCH),
        message: String::new(),
        observed_generation: None,
        reason: "Fine".into(),
        status: "True".into(),
        type_: "Ready".into(),
    });
    assert_eq!(s.conditions().len(), 1);
    s.set_observed_generation(Some(9));
    assert_eq!(s.observed_generation, Some(9));
    assert_eq!(WidgetStatus::CONDITIONS_FIELD, Some("conditions"));

    let status = WidgetStatus::columns(".status");
    assert_eq!(status[0].json_path, ".status.lastSyncTime");
    assert_eq!(status[0].type_, "date");
    assert_eq!(status[1].json_path, ".status.conditions[?(@.type==\"Ready\")].reason");
    assert_eq!(status[2].priority, 1);

    let spec = WidgetSpec::columns(".spec");
    assert_eq!(spec.len(), 3);
    assert_eq!((spec[0].name.as_str(), spec[0].type_), ("ReplicaCount", "integer"));
    assert_eq!(spec[1].json_path, ".spec.img");
    assert_eq!(spec[1].description.as_deref(), Some("the image"));
    assert_eq!(spec[2].json_path, ".spec.ownerRef.name");
}
