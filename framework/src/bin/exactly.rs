//! The `exactly` command line; see [`exactly::cli`].

fn main() -> std::process::ExitCode {
    exactly::cli::main()
}
