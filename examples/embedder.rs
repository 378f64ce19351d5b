//! A program that embeds kiln, as a CI tool would: it is not named `kiln`,
//! calls [`kiln::helper::dispatch`] first thing, and then imports and runs
//! through the library alone. Its own binary then serves as the sandbox's
//! helper and as the VM's guest agent (it is linked statically, as
//! everything this crate builds is).
//!
//! ```text
//! embedder import SOURCE NAME [--via-vm]   prints the manifest digest
//! embedder run NAME CMD...                 exits with the command's code;
//!                                          warnings on stderr as they come
//!                                          and in the result
//! ```
//!
//! The store is the default one (`$KILN_HOME`, else `$XDG_DATA_HOME/kiln`,
//! else `~/.local/share/kiln`). `tests/library.rs` drives it.

use std::io::Write;

use kiln::{ImportOptions, ImportSource, RunEvent, RunSpec, Sandbox, Store, Stream};

fn main() {
    // kiln re-executes this binary for the sandbox's setup, for store work
    // in the caller's id mapping and as a VM's /init: those starts never
    // return from here; an ordinary start returns at once.
    kiln::helper::dispatch();
    let code = match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("embedder: {e}");
            125
        }
    };
    std::process::exit(code);
}

fn real_main() -> Result<i32, Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let store = Store::open(Store::default_path()?)?;
    match args.as_slice() {
        [cmd, source, name, rest @ ..] if cmd == "import" => {
            let mut opts = ImportOptions::new(name);
            opts.disk.via_vm = rest.iter().any(|a| a == "--via-vm");
            let report = store.import(ImportSource::Path(source.into()), &opts)?;
            println!("{}", report.manifest_digest);
            Ok(0)
        }
        [cmd, name, argv @ ..] if cmd == "run" && !argv.is_empty() => {
            let mut spec = RunSpec::new(name);
            spec.argv = Some(argv.to_vec());
            // The command's output and the run's warnings as they happen.
            let result = Sandbox::new(store).run_with_events(&spec, &mut |e| match e {
                RunEvent::Output { stream, data } => {
                    let _ = match stream {
                        Stream::Stdout => std::io::stdout().write_all(data),
                        Stream::Stderr => std::io::stderr().write_all(data),
                    };
                }
                RunEvent::Warning { message } => eprintln!("embedder: event: warning: {message}"),
                _ => {}
            })?;
            for w in &result.warnings {
                eprintln!("embedder: result: warning: {w}");
            }
            Ok(result.exit_code)
        }
        _ => Err("usage: embedder import SOURCE NAME [--via-vm] | embedder run NAME CMD...".into()),
    }
}
