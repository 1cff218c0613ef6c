use kube_plan::{ObjectStatus, Status};

/// A status with neither conditions nor a generation still gets a (trivial) implementation.
#[derive(Status, Default)]
struct PlainStatus {
    count: i32,
}

fn main() {
    let mut s = PlainStatus::default();
    assert!(s.conditions().is_empty());
    assert!(s.conditions_mut().is_none());
    s.set_observed_generation(Some(1));
    assert_eq!(PlainStatus::CONDITIONS_FIELD, None);
    assert_eq!(s.count, 0);
}
