use kube_plan_macros::PrinterColumns;

#[derive(PrinterColumns)]
struct WidgetStatus {
    #[column(condition = "Ready", field = "reason")]
    phase: String,
}

fn main() {}
