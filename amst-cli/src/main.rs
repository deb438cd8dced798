//! The `amst` binary; everything lives in the library so that tests can reach it.

fn main() -> std::process::ExitCode {
    amst_cli::run::main()
}
