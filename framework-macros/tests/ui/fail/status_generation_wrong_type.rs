use kube_plan_macros::Status;

#[derive(Status)]
struct WidgetStatus {
    #[status(observed_generation)]
    observed_generation: Option<String>,
}

fn main() {}
