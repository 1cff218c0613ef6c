use kube_plan_macros::PrinterColumns;

struct Common;

#[derive(PrinterColumns)]
struct WidgetSpec {
    #[column]
    #[serde(flatten)]
    common: Common,
}

fn main() {}
