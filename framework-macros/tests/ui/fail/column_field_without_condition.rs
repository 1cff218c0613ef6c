use kube_plan_macros::PrinterColumns;
struct Condition;

#[derive(PrinterColumns)]
struct WidgetStatus {
    #[column(field = "reason")]
    conditions: Vec<Condition>,
}

fn main() {}
