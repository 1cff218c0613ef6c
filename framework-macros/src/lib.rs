//! Derive macros for the `framework` crate. Use them through `framework`, which re-exports them.
//!
//! They sit beside kube's `CustomResource` derive, not in place of it: `CustomResource` makes the root
//! type; these describe the spec and status structs so the framework can finish the CRD (printer
//! columns, the conditions map list) and drive status bookkeeping.

mod columns;
mod serde_name;
mod status;
mod types;

use proc_macro::TokenStream;

/// Declares printer columns on the fields they display. See `kube_plan::PrinterColumns`.
///
/// Field attribute `#[column(...)]`, repeatable:
/// - `name = "Header"`: column header (default: the serialized field name, first letter upper-cased);
/// - `priority = 1`: shown only with `-o wide` (default 0);
/// - `type_ = "string"`: OpenAPI type, inferred from the Rust type when omitted;
/// - `path = ".name"`: show a field below this one (the type cannot be inferred then: give `type_`);
/// - `description = "..."`;
/// - `condition = "Ready", field = "reason"`: on a conditions list, show one field (`status`, `reason` or
///   `message`) of the condition of that type.
#[proc_macro_derive(PrinterColumns, attributes(column, serde))]
pub fn derive_printer_columns(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    columns::derive(&input)
        .unwrap_or_else(|e| e.write_errors())
        .into()
}

/// Implements `kube_plan::ObjectStatus` from marked fields.
///
/// Field attributes: `#[status(conditions)]` on a `Vec<Condition>` (or `Option<Vec<Condition>>`), and
/// `#[status(observed_generation)]` on an `Option<i64>` (or `i64`). Both are optional, each at most once.
#[proc_macro_derive(Status, attributes(status, serde))]
pub fn derive_status(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    status::derive(&input)
        .unwrap_or_else(|e| e.write_errors())
        .into()
}
