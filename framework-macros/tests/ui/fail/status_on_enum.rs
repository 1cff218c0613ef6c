use framework_macros::Status;

#[derive(Status)]
enum WidgetStatus {
    Ready,
}

fn main() {}
