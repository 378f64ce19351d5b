//! The `kiln` binary: parse the command line, call the library, map the
//! outcome to an exit code (125 when kiln itself fails).

mod cli;

use clap::Parser;

fn main() {
    // The sandbox helper: kiln re-executes itself to set up namespaces.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == kiln::sandbox::ns::HELPER_ARG)
    {
        kiln::sandbox::ns::helper_main();
    }
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 125 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("kiln: error: {e:#}");
            std::process::exit(125);
        }
    }
}
