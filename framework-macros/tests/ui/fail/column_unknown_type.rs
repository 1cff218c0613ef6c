use kube_plan_macros::PrinterColumns;

#[derive(PrinterColumns)]
struct WidgetSpec {
    #[column(type_ = "text")]
    name: String,
}

fn main() {}
