//! A program that embeds kiln, as a CI tool would: it is not named `kiln`,
//! calls [`kiln::helper::dispatch`] first thing, and then imports and runs
//! through the library alone. Its own binary then serves as the sandbox's
//! helper and as the VM's guest agent (it is linked statically, as
//! everything this crate builds is).
//!
//! ```text
//! embedder import SOURCE NAME [--via-vm]   prints the manifest digest
//! embedder run NAME CMD...                 exits with the command's code
//! ```
//!
//! The store is the default one (`$KILN_HOME`, else `$XDG_DATA_HOME/kiln`,
//! else `~/.local/share/kiln`). `tests/library.rs` drives it.

use kiln::{ImportOptions, ImportSource, RunSpec, Sandbox, Store};

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
            let result = Sandbox::new(store).run(&spec)?;
            for w in &result.warnings {
                eprintln!("embedder: warning: {w}");
            }
            Ok(result.exit_code)
        }
        _ => Err("usage: embedder import SOURCE NAME [--via-vm] | embedder run NAME CMD...".into()),
    }
}
