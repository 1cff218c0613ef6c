//! Compile-time behaviour of the derives: what compiles, and the message each misuse gets.
//! Re-bless the `.stderr` files with `TRYBUILD=overwrite cargo test -p framework-macros --test ui`.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
