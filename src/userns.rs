//! User-namespace id mappings, and the small helper that does store work
//! (unpack, commit, remove) inside a mapped user namespace.
//!
//! Three mappings exist, picked by [`IdMap::detect`]:
//!
//! - **identity** (kiln runs as real root): every id maps to itself, so
//!   files keep their owners and `chown` works.
//! - **subids** (an unprivileged caller with an `/etc/subuid` and
//!   `/etc/subgid` range, and `newuidmap`/`newgidmap` installed): the caller
//!   is root inside and ids `1..=count` map to the range, as podman does.
//!   Images with many owners behave: `/etc/shadow` stays `0:42`, `chown`
//!   and `--user 1000` work. Files in the run's tree then belong to host ids
//!   the caller does not own, so the rootfs unpack, `--commit` and removal
//!   of such trees run in a helper inside the same mapping (like `podman
//!   unshare`).
//! - **caller** (no range, or `--userns self`/`keep-id`): only the caller's
//!   own id is mapped (to root, or to itself with keep-id). Image owners are
//!   recorded in the `user.rootlesscontainers` xattr and show as root inside.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rustix::process::{Pid, Signal, WaitOptions};

/// One contiguous range of a uid or gid map: `count` ids starting at
/// `inside` in the namespace are `outside..` on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdExtent {
    /// First id in the namespace.
    pub inside: u32,
    /// First id on the host.
    pub outside: u32,
    /// Number of ids.
    pub count: u32,
}

/// Which kind of mapping an [`IdMap`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MapKind {
    /// Real root: every id maps to itself.
    Identity,
    /// The caller plus its `/etc/subuid` and `/etc/subgid` ranges, written
    /// with `newuidmap`/`newgidmap`.
    Subids,
    /// Only the caller's own uid and gid.
    Caller,
}

/// How the user namespace of a run is mapped.
///
/// ```
/// use kiln::userns::{IdMap, MapKind};
/// let m = IdMap::caller(1000, 1000, false);
/// assert_eq!(m.kind, MapKind::Caller);
/// assert!(m.maps_uid(0) && !m.maps_uid(1));
/// assert_eq!(m.to_host_uid(0), Some(1000));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdMap {
    /// The kind of mapping.
    pub kind: MapKind,
    /// uid extents.
    pub uids: Vec<IdExtent>,
    /// gid extents.
    pub gids: Vec<IdExtent>,
    /// Why the caller got no subid range (for error messages), if it did not.
    pub no_subids_reason: Option<String>,
}

/// The first `/etc/subuid`-style range granted to a user, by name or uid.
///
/// ```
/// let db = "# comment\nbob:100000:65536\nalice:200000:1000\n1001:300000:10\n";
/// assert_eq!(kiln::userns::parse_subid(db, Some("alice"), 1000), Some((200000, 1000)));
/// assert_eq!(kiln::userns::parse_subid(db, None, 1001), Some((300000, 10)));
/// assert_eq!(kiln::userns::parse_subid(db, Some("carol"), 7), None);
/// ```
pub fn parse_subid(db: &str, name: Option<&str>, id: u32) -> Option<(u32, u32)> {
    let id = id.to_string();
    db.lines().find_map(|l| {
        let mut f = l.trim().split(':');
        let who = f.next()?;
        if who.starts_with('#') || !(Some(who) == name || who == id) {
            return None;
        }
        let start: u32 = f.next()?.trim().parse().ok()?;
        let count: u32 = f.next()?.trim().parse().ok()?;
        // Inside ids 1..=count must fit, and the host range must not wrap.
        let count = count.min(u32::MAX - 1);
        (count > 0 && start.checked_add(count).is_some()).then_some((start, count))
    })
}

use crate::sys::find_tool;

/// A subordinate id range: (first host id, count).
type Range = (u32, u32);

impl IdMap {
    /// Every id to itself (real root).
    pub fn identity() -> IdMap {
        let all = vec![IdExtent {
            inside: 0,
            outside: 0,
            count: u32::MAX,
        }];
        IdMap {
            kind: MapKind::Identity,
            uids: all.clone(),
            gids: all,
            no_subids_reason: None,
        }
    }

    /// Only the caller: to root, or to itself with `keep_id`.
    pub fn caller(uid: u32, gid: u32, keep_id: bool) -> IdMap {
        let one = |inside, outside| {
            vec![IdExtent {
                inside,
                outside,
                count: 1,
            }]
        };
        IdMap {
            kind: MapKind::Caller,
            uids: one(if keep_id { uid } else { 0 }, uid),
            gids: one(if keep_id { gid } else { 0 }, gid),
            no_subids_reason: None,
        }
    }

    /// The caller as root plus its subordinate ranges.
    pub fn subids(uid: u32, gid: u32, subuid: (u32, u32), subgid: (u32, u32)) -> IdMap {
        let two = |me, (start, count)| {
            vec![
                IdExtent {
                    inside: 0,
                    outside: me,
                    count: 1,
                },
                IdExtent {
                    inside: 1,
                    outside: start,
                    count,
                },
            ]
        };
        IdMap {
            kind: MapKind::Subids,
            uids: two(uid, subuid),
            gids: two(gid, subgid),
            no_subids_reason: None,
        }
    }

    /// The mapping for this process: identity as root; otherwise the
    /// subid ranges when `/etc/subuid` and `/etc/subgid` grant some and
    /// `newuidmap`/`newgidmap` exist (unless `caller_only`); else the caller
    /// alone (as root inside, or as itself with `keep_id`, which always
    /// maps the caller alone).
    pub fn detect(caller_only: bool, keep_id: bool) -> IdMap {
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        if uid == 0 {
            return IdMap::identity();
        }
        let why_not = if keep_id {
            format!("{} maps only the caller", crate::words::Opt::UsernsKeepId)
        } else if caller_only {
            format!("{} maps only the caller", crate::words::Opt::UsernsSelf)
        } else {
            match Self::subid_ranges(uid) {
                Ok((u, g)) => return IdMap::subids(uid, gid, u, g),
                Err(why) => why,
            }
        };
        let mut m = IdMap::caller(uid, gid, keep_id);
        m.no_subids_reason = Some(why_not);
        m
    }

    /// The caller's subordinate ranges, or why there are none.
    fn subid_ranges(uid: u32) -> Result<(Range, Range), String> {
        let name = crate::sys::user_name(uid);
        let who = name.clone().unwrap_or_else(|| format!("uid {uid}"));
        let read = |f: &str| fs::read_to_string(f).unwrap_or_default();
        let su = parse_subid(&read("/etc/subuid"), name.as_deref(), uid);
        // newgidmap looks /etc/subgid up by user name or uid (not gid).
        let sg = parse_subid(&read("/etc/subgid"), name.as_deref(), uid);
        let (Some(su), Some(sg)) = (su, sg) else {
            return Err(format!(
                "there is no /etc/subuid and /etc/subgid entry for {who} (an admin can add one: usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {})",
                name.as_deref().unwrap_or("USER")
            ));
        };
        if find_tool("newuidmap").is_none() || find_tool("newgidmap").is_none() {
            return Err(
                "newuidmap/newgidmap are not installed (Debian package uidmap), so the /etc/subuid range cannot be used".into(),
            );
        }
        Ok((su, sg))
    }

    /// Whether `inside` is a mapped uid.
    pub fn maps_uid(&self, inside: u32) -> bool {
        to_host(&self.uids, inside).is_some()
    }

    /// Whether `inside` is a mapped gid.
    pub fn maps_gid(&self, inside: u32) -> bool {
        to_host(&self.gids, inside).is_some()
    }

    /// The host uid of namespace uid `inside`.
    pub fn to_host_uid(&self, inside: u32) -> Option<u32> {
        to_host(&self.uids, inside)
    }

    /// A short name for the rootfs cache variant this mapping needs:
    /// `None` for identity (real owners), `rootless` for the caller alone,
    /// `subid-...` with the ranges for subids.
    pub(crate) fn cache_suffix(&self) -> Option<String> {
        match self.kind {
            MapKind::Identity => None,
            MapKind::Caller => Some("rootless".into()),
            MapKind::Subids => {
                let r = |v: &[IdExtent]| {
                    v.get(1)
                        .map_or_else(String::new, |e| format!("{}-{}", e.outside, e.count))
                };
                Some(format!("subid-{}-{}", r(&self.uids), r(&self.gids)))
            }
        }
    }

    /// Writes the maps of process `pid`, which must have just created its
    /// user namespace and be waiting.
    pub(crate) fn apply(&self, pid: i32) -> io::Result<()> {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let text = |v: &[IdExtent]| {
            v.iter()
                .map(|e| format!("{} {} {}\n", e.inside, e.outside, e.count))
                .collect::<String>()
        };
        match self.kind {
            MapKind::Identity => {
                fs::write(proc.join("uid_map"), text(&self.uids))?;
                fs::write(proc.join("gid_map"), text(&self.gids))
            }
            MapKind::Caller => {
                // An unprivileged process may map only itself, and only
                // after denying setgroups (which could otherwise drop a
                // group that denies access).
                fs::write(proc.join("setgroups"), "deny\n")?;
                fs::write(proc.join("uid_map"), text(&self.uids))?;
                fs::write(proc.join("gid_map"), text(&self.gids))
            }
            MapKind::Subids => {
                // The setuid helpers check the ranges against /etc/sub[ug]id.
                // They write different files: run both at once (each is
                // an exec of a setuid binary, about 2 ms).
                let uid = newidmap("newuidmap", pid, &self.uids)?;
                let gid = newidmap("newgidmap", pid, &self.gids);
                let uid = uid.wait();
                gid?.wait()?;
                uid
            }
        }
    }
}

fn to_host(v: &[IdExtent], inside: u32) -> Option<u32> {
    v.iter().find_map(|e| {
        let off = inside.checked_sub(e.inside)?;
        (off < e.count).then(|| e.outside.wrapping_add(off))
    })
}

/// A started newuidmap/newgidmap.
struct IdMapper {
    child: std::process::Child,
    path: PathBuf,
}

impl IdMapper {
    fn wait(self) -> io::Result<()> {
        let out = self.child.wait_with_output()?;
        if out.status.success() {
            return Ok(());
        }
        Err(io::Error::other(format!(
            "{} failed ({}): {}",
            self.path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn newidmap(tool: &str, pid: i32, v: &[IdExtent]) -> io::Result<IdMapper> {
    let path = find_tool(tool).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{tool} not found (Debian package uidmap)"),
        )
    })?;
    let mut cmd = Command::new(&path);
    cmd.arg(pid.to_string());
    for e in v {
        cmd.args([
            e.inside.to_string(),
            e.outside.to_string(),
            e.count.to_string(),
        ]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("start {}: {e}", path.display())))?;
    Ok(IdMapper { child, path })
}

/// Name of the hidden subcommand the userns task helper runs as.
pub(crate) const TASK_ARG: &str = "__userns-task";
pub(crate) const TASK_ENV: &str = "KILN_USERNS_TASK";

/// Store work that must happen inside a subid mapping.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) enum Task {
    /// Unpack image `manifest` of the store at `store` into `dest` (an
    /// existing empty directory), chowning to the image's owners.
    Unpack {
        store: PathBuf,
        manifest: String,
        dest: PathBuf,
        /// Where to write the record of the unpacked tree.
        record: PathBuf,
    },
    /// Compare a cached tree with its record.
    Verify {
        root: PathBuf,
        record: PathBuf,
        /// The tree's summary, as JSON (the unpacker's `TreeSummary`).
        tree: String,
    },
    /// Commit a run's upper directory as a new image.
    Commit {
        store: PathBuf,
        manifest: String,
        upper: PathBuf,
        name: String,
        created_by: String,
        epoch: Option<i64>,
        mount_points: Vec<String>,
    },
    /// Remove a tree.
    Remove { path: PathBuf },
    /// Run a host command (`kiln unshare`; QEMU for a VM run), in `cwd`
    /// when given.
    Exec {
        argv: Vec<String>,
        #[serde(default)]
        cwd: Option<PathBuf>,
        /// A root of its own to run in (QEMU's): see [`Walls`].
        #[serde(default)]
        walls: Option<Walls>,
    },
}

/// What a confined host command (QEMU) may see: a mount namespace whose
/// root is an empty read-only tmpfs with the host's system directories
/// (`/usr`, `/lib*`, `/bin`, `/sbin`, `/etc`, `/sys` read-only; `/dev` and
/// `/proc` as they are) and exactly the paths it is given, at the same
/// places; no home, no `/tmp`, no `/var`, no store but its own files. New
/// IPC and UTS namespaces, and a network namespace with nothing in it
/// unless `network`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Walls {
    /// Paths (files or directories) to show, and whether writable.
    pub paths: Vec<(PathBuf, bool)>,
    /// The host's network (QEMU's user network needs it).
    pub network: bool,
    /// An empty directory to build the root in (the run directory's).
    pub scratch: PathBuf,
    /// Directories that get an empty tmpfs of their own (virtiofsd's /run).
    #[serde(default)]
    pub tmpfs: Vec<PathBuf>,
}

/// The helper binary: see [`crate::sys::helper_exe`].
pub(crate) fn helper_path(explicit: Option<&Path>) -> PathBuf {
    crate::sys::helper_exe(explicit)
}

/// Runs `task` in a helper inside `map`; returns what it printed.
pub(crate) fn run_task(helper: Option<&Path>, map: &IdMap, task: &Task) -> io::Result<String> {
    let child = start_task(helper, map, task, true)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `argv` on the host inside the caller's user namespace mapping (as
/// root there, with its subordinate ids mapped), with the caller's stdio
/// and environment, as `podman unshare` does: for removing files a run
/// left owned by subordinate ids. Returns its exit code (128+N if killed
/// by signal N).
///
/// ```no_run
/// let code = kiln::userns::unshare(&["rm".into(), "-rf".into(), "/tmp/ws".into()])?;
/// assert_eq!(code, 0);
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn unshare(argv: &[String]) -> io::Result<i32> {
    use std::os::unix::process::ExitStatusExt;
    if argv.is_empty() {
        return Err(io::Error::other("unshare: no command given"));
    }
    let map = IdMap::detect(false, false);
    let mut child = start_task(
        None,
        &map,
        &Task::Exec {
            argv: argv.to_vec(),
            cwd: None,
            walls: None,
        },
        false,
    )?;
    let st = child.wait()?;
    Ok(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)))
}

/// Starts `argv` on the host inside `map` (as root there), in `cwd`, with
/// no environment, stdin from /dev/null and stdout and stderr piped; it
/// gets SIGKILL when the calling thread ends. For QEMU: a guest that takes
/// QEMU over holds only what the caller's mapping holds.
pub(crate) fn spawn_mapped(
    helper: Option<&Path>,
    map: &IdMap,
    argv: Vec<String>,
    cwd: &Path,
) -> io::Result<std::process::Child> {
    let task = Task::Exec {
        argv,
        cwd: Some(cwd.to_path_buf()),
        walls: None,
    };
    start_task(helper, map, &task, true)
}

/// [`spawn_mapped`] behind `walls`: the command sees only what they let
/// it (a guest that takes QEMU over meets them).
pub(crate) fn spawn_confined(
    helper: Option<&Path>,
    map: &IdMap,
    argv: Vec<String>,
    cwd: &Path,
    walls: Walls,
) -> io::Result<std::process::Child> {
    let task = Task::Exec {
        argv,
        cwd: Some(cwd.to_path_buf()),
        walls: Some(walls),
    };
    start_task(helper, map, &task, true)
}

/// Starts the task helper, maps its user namespace and lets it go.
fn start_task(
    helper: Option<&Path>,
    map: &IdMap,
    task: &Task,
    capture: bool,
) -> io::Result<std::process::Child> {
    let json = serde_json::to_string(task).map_err(io::Error::other)?;
    let mut cmd = Command::new(helper_path(helper));
    cmd.arg(TASK_ARG);
    if capture {
        cmd.env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    cmd.env(TASK_ENV, json);
    crate::sys::pre_exec_pdeathsig(&mut cmd);
    let child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("start userns helper {:?}: {e}", cmd.get_program()),
        )
    })?;
    let pid = Pid::from_raw(child.id() as i32).ok_or_else(|| io::Error::other("bad pid"))?;
    let mut child = child;
    let stopped = loop {
        match rustix::process::waitpid(Some(pid), WaitOptions::UNTRACED) {
            Err(rustix::io::Errno::INTR) => continue,
            Ok(Some((_, st))) => break st.stopped(),
            _ => break false,
        }
    };
    if !stopped {
        // Already reaped: say what it printed, and signal nothing (the pid
        // may belong to someone else by now).
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        return Err(io::Error::other(format!(
            "the userns helper exited early: {}",
            err.trim()
        )));
    }
    let mapped = map.apply(pid.as_raw_nonzero().get());
    if mapped.is_err() {
        let _ = rustix::process::kill_process(pid, Signal::KILL);
    }
    let _ = rustix::process::kill_process(pid, Signal::CONT);
    if let Err(e) = mapped {
        let _ = child.wait();
        return Err(e);
    }
    Ok(child)
}

/// In the task helper: reads the task kiln handed over, creates a user
/// namespace, stops until the parent has mapped it, and checks that it is
/// root there. The task itself is done by the helper dispatcher.
pub(crate) fn enter_task() -> Result<Task, String> {
    let json = std::env::var(TASK_ENV).map_err(|_| format!("{TASK_ENV} is not set"))?;
    let task: Task = serde_json::from_str(&json).map_err(|e| format!("bad task: {e}"))?;
    crate::sys::unshare(rustix::thread::UnshareFlags::NEWUSER)
        .map_err(|e| format!("unshare(user): {e}"))?;
    rustix::process::kill_process(rustix::process::getpid(), Signal::STOP)
        .map_err(|e| format!("stop for id mapping: {e}"))?;
    if !rustix::process::getuid().is_root() {
        return Err("uid 0 is not mapped in the helper's user namespace".into());
    }
    Ok(task)
}

/// Removes a tree, entering the caller's subid mapping when plain removal
/// is refused (files a subid-mapped run created belong to host ids the
/// caller does not own).
pub(crate) fn remove_tree_mapped(path: &Path, helper: Option<&Path>) -> io::Result<()> {
    match crate::sys::tree::remove_tree(path) {
        Err(e)
            if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM))
                && !rustix::process::getuid().is_root() =>
        {
            let map = IdMap::detect(false, false);
            if map.kind != MapKind::Subids {
                return Err(e);
            }
            run_task(
                helper,
                &map,
                &Task::Remove {
                    path: path.to_path_buf(),
                },
            )
            .map(|_| ())
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subid_map_translates_ranges() {
        let m = IdMap::subids(1000, 1001, (100000, 65536), (200000, 10));
        assert_eq!(m.to_host_uid(0), Some(1000));
        assert_eq!(m.to_host_uid(1), Some(100000));
        assert_eq!(m.to_host_uid(65536), Some(165535));
        assert_eq!(m.to_host_uid(65537), None);
        assert!(m.maps_gid(10) && !m.maps_gid(11));
        assert_eq!(
            m.cache_suffix().as_deref(),
            Some("subid-100000-65536-200000-10")
        );
        assert_eq!(IdMap::identity().cache_suffix(), None);
        assert!(IdMap::identity().maps_uid(u32::MAX - 1));
    }

    #[test]
    fn subid_parsing_refuses_nonsense() {
        assert_eq!(parse_subid("bob:x:10\n", Some("bob"), 1), None);
        assert_eq!(parse_subid("bob:10:0\n", Some("bob"), 1), None);
        assert_eq!(parse_subid("bob:4294967295:10\n", Some("bob"), 1), None);
        assert_eq!(parse_subid("#bob:1:10\n", Some("#bob"), 1), None);
        assert_eq!(
            parse_subid("bob:1:10\nbob:100:10\n", Some("bob"), 1),
            Some((1, 10))
        );
    }
}
