//! The `drop` binary's program under another name, built with the test crate so that its tests can
//! run Drop in processes of their own (to kill, freeze and restart them) without a second `cargo`
//! build. Identical to `drop`: both call [`drop::cli::main`].

fn main() -> std::process::ExitCode {
    drop::cli::main()
}
