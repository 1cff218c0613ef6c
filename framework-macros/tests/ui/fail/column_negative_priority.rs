use kube_plan_macros::PrinterColumns;

#[derive(PrinterColumns)]
struct WidgetSpec {
    #[column(priority = -1)]
    size: i32,
}

fn main() {}
