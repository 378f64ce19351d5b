//! `--memory` and `--pids-limit` in a delegated cgroup v2.
//!
//! A run's limits live in a cgroup of its own, `kiln-run-<kiln pid>-<run id>`, made in
//! the cgroup kiln itself runs in, which must be a delegated one (writable
//! by the caller, as `systemd-run --user --scope -p Delegate=yes` gives).
//! cgroup v2's "no internal processes" rule forbids enabling controllers
//! for children of a cgroup that holds processes, so kiln first moves
//! itself into a leaf `kiln-self-<pid>` next to the run's cgroup, as crun
//! does; the next kiln that sets limits removes the leaves of kiln
//! processes that have exited. Where any of this is impossible (no cgroup v2, controllers not
//! delegated, not writable: hybrid hosts such as these CI machines), the
//! run goes on and the caller gets one warning naming the reason.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The controllers a run needs and their limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    /// `memory.max` in bytes.
    pub memory: Option<u64>,
    /// `pids.max`.
    pub pids: Option<u64>,
}

impl Limits {
    fn controllers(&self) -> Vec<&'static str> {
        let mut c = Vec::new();
        if self.memory.is_some() {
            c.push("memory");
        }
        if self.pids.is_some() {
            c.push("pids");
        }
        c
    }
}

/// Where kiln's own cgroup is: the cgroup v2 mount and kiln's path in it.
#[derive(Debug, Clone)]
pub(crate) struct Hierarchy {
    /// kiln's own cgroup directory.
    pub own: PathBuf,
}

impl Hierarchy {
    /// This process's cgroup v2 directory, if there is a v2 hierarchy.
    pub fn detect() -> Result<Hierarchy, String> {
        let own = fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_string))
            })
            .ok_or("this process is in no cgroup v2 hierarchy")?;
        // A pure v2 host mounts it at /sys/fs/cgroup; a hybrid one at
        // /sys/fs/cgroup/unified.
        let mount = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .find(|m| Path::new(m).join("cgroup.controllers").exists())
            .ok_or("no cgroup v2 hierarchy is mounted")?;
        let mut own = Path::new(mount).join(own.trim_start_matches('/'));
        // After an earlier run of this process moved it into its leaf, the
        // delegated cgroup is the leaf's parent (no nesting per run).
        if own
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("kiln-self-"))
        {
            if let Some(p) = own.parent() {
                own = p.to_path_buf();
            }
        }
        Ok(Hierarchy { own })
    }
}

/// Removes what earlier kiln processes left in `own`: run cgroups of
/// SIGKILLed runs (rmdir fails on a busy one), and the `kiln-self-<pid>`
/// leaves of kiln processes that have exited (a process cannot remove the
/// leaf it is in, so each one leaves its leaf for the next). A leaf whose
/// process is alive is kept even while empty: that kiln may be about to
/// move into it.
fn reap_stale(own: &Path) {
    let Ok(list) = fs::read_dir(own) else {
        return;
    };
    for e in list.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // `kiln-run-<pid>-<id>` and `kiln-self-<pid>`: stale once the kiln
        // process that made them is gone (a live one may be about to move
        // its sandbox in, so an empty cgroup alone proves nothing).
        let owner = name
            .strip_prefix("kiln-run-")
            .and_then(|rest| rest.split('-').next())
            .or_else(|| name.strip_prefix("kiln-self-"));
        let stale = owner
            .and_then(|pid| pid.parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw)
            .is_some_and(|p| rustix::process::test_kill_process(p) == Err(rustix::io::Errno::SRCH));
        if stale {
            let _ = fs::remove_dir(e.path());
        }
    }
}

/// A run's cgroup with its limits set; removed on drop.
#[derive(Debug)]
pub(crate) struct RunCgroup {
    dir: PathBuf,
}

fn has_all(list: &str, wanted: &[&str]) -> Vec<String> {
    wanted
        .iter()
        .filter(|c| !list.split_whitespace().any(|x| x == **c))
        .map(|c| c.to_string())
        .collect()
}

impl RunCgroup {
    /// Makes the run's cgroup under `h.own` with `limits`, or says why not.
    pub fn create(h: &Hierarchy, limits: Limits, id: &str) -> Result<RunCgroup, String> {
        let wanted = limits.controllers();
        let own = &h.own;
        let avail = fs::read_to_string(own.join("cgroup.controllers")).unwrap_or_default();
        let missing = has_all(&avail, &wanted);
        if !missing.is_empty() {
            return Err(format!(
                "the cgroup v2 controller{} {} {} not delegated to {}",
                if missing.len() > 1 { "s" } else { "" },
                missing.join(", "),
                if missing.len() > 1 { "are" } else { "is" },
                own.display()
            ));
        }
        if rustix::fs::access(own, rustix::fs::Access::WRITE_OK).is_err() {
            return Err(format!(
                "{} is not writable by this user (no delegated cgroup; try systemd-run --user --scope -p Delegate=yes)",
                own.display()
            ));
        }
        let enabled = fs::read_to_string(own.join("cgroup.subtree_control")).unwrap_or_default();
        let to_enable = has_all(&enabled, &wanted);
        if !to_enable.is_empty() {
            // No internal processes: move kiln into a leaf first.
            let me = own.join(format!("kiln-self-{}", std::process::id()));
            let moved = fs::create_dir_all(&me)
                .and_then(|()| fs::write(me.join("cgroup.procs"), std::process::id().to_string()));
            if let Err(e) = moved {
                return Err(format!("cannot move kiln into {}: {e}", me.display()));
            }
            let ctl: String = to_enable.iter().map(|c| format!("+{c} ")).collect();
            if let Err(e) = fs::write(own.join("cgroup.subtree_control"), ctl.trim_end()) {
                return Err(format!(
                    "cannot enable {} in {} (other processes share the cgroup?): {e}",
                    to_enable.join(", "),
                    own.display()
                ));
            }
        }
        reap_stale(own);
        let dir = own.join(format!("kiln-run-{}-{id}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let cg = RunCgroup { dir };
        let write = |file: &str, v: u64| {
            fs::write(cg.dir.join(file), v.to_string())
                .map_err(|e| format!("write {}: {e}", cg.dir.join(file).display()))
        };
        if let Some(m) = limits.memory {
            write("memory.max", m)?;
            // No swap beyond the limit, so the limit means what it says;
            // absent when swap accounting is off.
            if cg.dir.join("memory.swap.max").exists() {
                write("memory.swap.max", 0)?;
            }
        }
        if let Some(p) = limits.pids {
            write("pids.max", p)?;
        }
        Ok(cg)
    }

    /// Moves process `pid` (the sandbox helper, before it forks) in.
    pub fn add(&self, pid: i32) -> io::Result<()> {
        fs::write(self.dir.join("cgroup.procs"), pid.to_string())
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        // Empty once the sandbox is gone; the kernel may need a moment to
        // notice the last exit.
        for _ in 0..50 {
            match fs::remove_dir(&self.dir) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(2))
                }
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory laid out like a delegated cgroup v2 (plain files stand
    /// in for the kernel's; the real path needs a host with delegation).
    fn fake(controllers: &str, subtree: &str) -> (tempfile::TempDir, Hierarchy) {
        let t = tempfile::tempdir().unwrap();
        let own = t.path().join("user.slice/kiln.scope");
        fs::create_dir_all(&own).unwrap();
        fs::write(own.join("cgroup.controllers"), controllers).unwrap();
        fs::write(own.join("cgroup.subtree_control"), subtree).unwrap();
        (t, Hierarchy { own })
    }

    #[test]
    fn limits_are_written_after_kiln_moves_to_a_leaf() {
        let (_t, h) = fake("cpu memory pids", "");
        let limits = Limits {
            memory: Some(100 << 20),
            pids: Some(64),
        };
        let cg = RunCgroup::create(&h, limits, "7").unwrap();
        let read = |p: &Path| fs::read_to_string(p).unwrap();
        assert_eq!(read(&cg.path().join("memory.max")), "104857600");
        assert_eq!(read(&cg.path().join("pids.max")), "64");
        assert_eq!(
            read(
                &h.own
                    .join(format!("kiln-self-{}/cgroup.procs", std::process::id()))
            ),
            std::process::id().to_string()
        );
        assert_eq!(read(&h.own.join("cgroup.subtree_control")), "+memory +pids");
        cg.add(1234).unwrap();
        assert_eq!(read(&cg.path().join("cgroup.procs")), "1234");
    }

    #[test]
    fn already_enabled_controllers_need_no_move() {
        let (_t, h) = fake("memory pids", "memory pids");
        let cg = RunCgroup::create(
            &h,
            Limits {
                memory: None,
                pids: Some(10),
            },
            "8",
        )
        .unwrap();
        assert!(!h
            .own
            .join(format!("kiln-self-{}", std::process::id()))
            .exists());
        assert!(cg.path().join("pids.max").exists());
        assert!(!cg.path().join("memory.max").exists());
    }

    #[test]
    fn leaves_of_exited_kiln_processes_are_reaped() {
        let (_t, h) = fake("memory pids", "memory pids");
        // A pid above pid_max can never be alive.
        let dead = h.own.join("kiln-self-2147483600");
        let alive = h.own.join("kiln-self-1");
        let old_run = h.own.join("kiln-run-2147483600-run-x");
        let live_run = h.own.join("kiln-run-1-run-y");
        for d in [&dead, &alive, &old_run, &live_run] {
            fs::create_dir(d).unwrap();
        }
        let _cg = RunCgroup::create(
            &h,
            Limits {
                memory: None,
                pids: Some(10),
            },
            "10",
        )
        .unwrap();
        assert!(!dead.exists(), "the dead kiln's leaf stayed");
        assert!(!old_run.exists(), "the old run cgroup stayed");
        assert!(alive.exists(), "a live process's leaf was removed");
        assert!(live_run.exists(), "a live process's run cgroup was removed");
    }

    #[test]
    fn undelegated_controllers_are_named() {
        let (_t, h) = fake("cpu", "");
        let err = RunCgroup::create(
            &h,
            Limits {
                memory: Some(1),
                pids: Some(1),
            },
            "9",
        )
        .unwrap_err();
        assert!(
            err.contains("controllers memory, pids are not delegated"),
            "{err}"
        );
    }
}
