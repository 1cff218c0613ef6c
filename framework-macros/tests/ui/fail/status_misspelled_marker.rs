use kube_plan_macros::Status;
struct Condition;

#[derive(Status)]
struct WidgetStatus {
    #[status(condition)]
    conditions: Vec<Condition>,
}

fn main() {}
