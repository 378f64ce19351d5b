//! The `kiln` binary: parse the command line, call the library, map the
//! outcome to an exit code (125 when kiln itself fails).

mod cli;

use clap::Parser;

fn main() {
    // kiln re-executes itself for the sandbox helper, store tasks in the
    // caller's id mapping, and the VM guest agent: those never return here.
    kiln::helper::dispatch();
    // Messages name this CLI's flags (`--image`), not the library's options.
    kiln::words::use_cli_flags();
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 125 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    // EnvFilter compiles regexes (about a millisecond): only pay for it
    // when KILN_LOG asks for filtering; -v levels use a plain level filter.
    let level = match cli.verbose {
        0 => tracing::Level::WARN,
        1 => tracing::Level::INFO,
        2 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false);
    match std::env::var("KILN_LOG") {
        Ok(f) if !f.is_empty() => builder
            .with_env_filter(tracing_subscriber::EnvFilter::new(f))
            .init(),
        _ => builder.with_max_level(level).init(),
    }
    match cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("kiln: error: {}", error_chain(&e));
            std::process::exit(125);
        }
    }
}

/// The error and its causes, each said once: library errors often put
/// their cause in their own message already.
pub(crate) fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}
