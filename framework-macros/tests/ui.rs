//! Compile-time behaviour of the derives: what compiles, and the message each misuse gets.
//! Re-bless the `.stderr` files with `TRYBUILD=overwrite cargo test -p framework-macros --test ui`.

#[test]
fn ui() {
    // trybuild compiles the cases in a project of its own, which does not inherit this
    // workspace's profile: without this its dependencies carry full debug information, about
    // 2 GB of disk on a machine whose disk is shared.
    // SAFETY: this test binary has one test, and nothing else reads the environment meanwhile.
    unsafe { std::env::set_var("CARGO_PROFILE_DEV_DEBUG", "false") };
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
