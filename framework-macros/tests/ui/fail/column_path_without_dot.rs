use kube_plan_macros::PrinterColumns;

struct Reference;

#[derive(PrinterColumns)]
struct WidgetSpec {
    #[column(path = "name", type_ = "string")]
    policy_ref: Option<Reference>,
}

fn main() {}
