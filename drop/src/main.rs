//! The `drop` operator binary.

fn main() -> std::process::ExitCode {
    drop::cli::main()
}
