use kube_plan_macros::PrinterColumns;

#[derive(PrinterColumns)]
struct WidgetSpec {
    #[column]
    hosts: Vec<String>,
}

fn main() {}
