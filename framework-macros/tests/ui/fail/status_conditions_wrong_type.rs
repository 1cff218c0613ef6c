use kube_plan_macros::Status;

#[derive(Status)]
struct WidgetStatus {
    #[status(conditions)]
    conditions: Vec<String>,
}

fn main() {}
