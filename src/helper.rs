//! The one dispatcher of kiln's re-exec entry points.
//!
//! kiln re-executes its own binary for work that must start in a fresh
//! process: the namespace sandbox's setup helper, store tasks inside the
//! caller's subordinate-id mapping (unpack, verify, commit, remove,
//! `kiln unshare`), and, as PID 1 of a VM's initramfs, the guest agent. A
//! program embedding kiln calls [`dispatch`] first thing in `main`; for an
//! ordinary start it returns and the program goes on.
//!
//! ```no_run
//! // First thing in the embedder's main():
//! kiln::helper::dispatch();
//! // ... then its own work: import, run, ...
//! ```

use std::io;
use std::process::Command;

use crate::userns::Task;

/// Hands this process to the entry point it was started as, if any: the
/// guest agent (PID 1 `/init` of a kiln VM), the sandbox helper, or the
/// userns task helper. Those never return. For any other start it returns
/// at once (it reads only argv, the pid and one environment variable).
pub fn dispatch() {
    crate::sys::mark_dispatcher();
    if crate::vm::agent::is_agent() {
        crate::vm::agent::agent_main();
    }
    let first = std::env::args_os().nth(1);
    if first
        .as_ref()
        .is_some_and(|a| a == crate::sandbox::ns::HELPER_ARG)
    {
        crate::sandbox::ns::helper_main();
    }
    if first.as_ref().is_some_and(|a| a == crate::userns::TASK_ARG) {
        task_main();
    }
}

/// Entry point of the task helper: enter the user namespace the parent
/// maps, then do the task as root of the namespace.
fn task_main() -> ! {
    let code = match crate::userns::enter_task().and_then(run_task) {
        Ok(out) => {
            print!("{out}");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    };
    std::process::exit(code)
}

/// Does `task`; returns what it prints for the parent.
fn run_task(task: Task) -> Result<String, String> {
    match task {
        Task::Exec { argv, cwd, walls } => {
            use std::os::unix::process::CommandExt;
            if let Some(w) = &walls {
                crate::sys::walls::enter_walls(&w.paths, &w.tmpfs, w.network, &w.scratch)
                    .map_err(|e| format!("confine {}: {e}", argv[0]))?;
            }
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]).env_remove(crate::userns::TASK_ENV);
            if let Some(d) = cwd {
                cmd.current_dir(d);
            }
            let e = cmd.exec();
            eprintln!("kiln unshare: {}: {e}", argv[0]);
            std::process::exit(if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            })
        }
        Task::Remove { path } => crate::sys::tree::remove_tree(&path)
            .map(|()| String::new())
            .map_err(|e| format!("remove {}: {e}", path.display())),
        Task::Verify { root, record, tree } => {
            let tree: crate::unpack::record::TreeSummary =
                serde_json::from_str(&tree).map_err(|e| format!("bad tree summary: {e}"))?;
            crate::unpack::record::verify(&root, &record, &tree, 20)
                .map_err(|e| format!("verify {}: {e}", root.display()))
                .and_then(|p| serde_json::to_string(&p).map_err(|e| e.to_string()))
        }
        Task::Unpack {
            store,
            manifest,
            dest,
            record,
        } => {
            let (store, img) = open_trusted(&store, &manifest)?;
            store
                .unpack_layers(&img, &dest, false)
                .map_err(|e| e.to_string())?;
            let tree = crate::unpack::record::write(&dest, &record)
                .map_err(|e| format!("record the unpacked tree {}: {e}", dest.display()))?;
            serde_json::to_string(&tree).map_err(|e| e.to_string())
        }
        Task::Commit {
            store,
            manifest,
            upper,
            name,
            created_by,
            epoch,
            mount_points,
        } => {
            let (store, img) = open_trusted(&store, &manifest)?;
            let report = crate::sandbox::commit::commit(
                &store,
                &img,
                crate::sandbox::commit::Changes::Dir(&upper),
                &name,
                &created_by,
                epoch,
                &mount_points,
            )
            .map_err(|e| e.to_string())?;
            serde_json::to_string(&report).map_err(|e| e.to_string())
        }
    }
}

/// The store a task works in and its image, by manifest digest (not by
/// tag: the tag may be gone, and the run pinned the image, so its blobs
/// are not). kiln checked the store before it started the task; inside the
/// mapping its owner shows as root, or as nobody for a store the caller
/// chose to trust, so it is opened trusted.
fn open_trusted(
    store: &std::path::Path,
    manifest: &str,
) -> Result<(crate::Store, crate::store::Image), String> {
    let trusted = crate::StoreOptions {
        trust_owner: true,
        ..Default::default()
    };
    let store = crate::Store::open_with(store, &trusted).map_err(|e| e.to_string())?;
    let img = store
        .image_of_manifest(manifest)
        .map_err(|e| e.to_string())?;
    Ok((store, img))
}
