use kube_plan_macros::Status;

#[derive(Status)]
enum WidgetStatus {
    Ready,
}

fn main() {}
