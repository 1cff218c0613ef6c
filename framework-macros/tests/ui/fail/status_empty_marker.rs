use kube_plan_macros::Status;

#[derive(Status)]
struct WidgetStatus {
    #[status()]
    observed_generation: Option<i64>,
}

fn main() {}
