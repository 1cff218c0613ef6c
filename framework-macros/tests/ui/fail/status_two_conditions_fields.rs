use kube_plan_macros::Status;
struct Condition;

#[derive(Status)]
struct WidgetStatus {
    #[status(conditions)]
    conditions: Vec<Condition>,
    #[status(conditions)]
    more: Vec<Condition>,
}

fn main() {}
