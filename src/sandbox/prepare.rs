//! The backend-neutral steps before a run: the image and its process
//! parameters (command, environment, working directory, user), the id map,
//! the leased root file system, the run directory and its reaping, and the
//! cgroup. Every backend starts from a [`Prepared`] run.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::outcome::RunError;
use crate::spec::{RunSpec, Userns, ValidSpec};
use crate::store::Store;
use crate::userns::{remove_tree_mapped, IdMap};
use crate::words::Opt;

/// A run made ready for a backend. Its parts are held for the run's
/// lifetime: dropping it removes the run directory (unless kept), then
/// releases the root file system's lease and the cgroup.
pub(crate) struct Prepared {
    /// The image that runs.
    pub img: crate::store::Image,
    /// The command line, with the image's Entrypoint + Cmd as default.
    pub argv: Vec<String>,
    /// The environment: the image's, kiln's fixed variables, the spec's.
    pub env: Vec<String>,
    /// The working directory.
    pub workdir: String,
    /// The user and group the command runs as.
    pub user: (u32, u32),
    /// How the caller's ids map into the sandbox.
    pub map: IdMap,
    /// The run directory (an on-disk upper layer), or `None` in memory.
    pub rundir: Option<RunDir>,
    /// The store's `.kiln/runs`.
    pub runs: PathBuf,
    /// The run's cgroup, where limits could be applied.
    pub cgroup: Option<super::cgroup::RunCgroup>,
    /// What could not be done as asked.
    pub warnings: Vec<String>,
    /// The image's cached tree (read-only lower layer).
    pub rootfs: crate::unpack::CachedRootfs,
    /// The shared lock on that tree: gc removes only trees it can lock
    /// exclusively, never one a run is using.
    _in_use: fs::File,
}

/// Makes `spec` ready to run: see [`Prepared`].
pub(crate) fn prepare(
    store: &Store,
    helper: Option<&Path>,
    spec: &ValidSpec<'_>,
) -> Result<Prepared, RunError> {
    let spec: &RunSpec = spec;
    // A run with an on-disk upper layer (and so any --commit) pins its
    // image: the writer lock (shared) from resolving it to writing the pin,
    // so a gc either runs before (and the image is gone) or sees the pin.
    // An in-memory run needs only its leased tree, not the image's blobs.
    // A VM run always has a run directory: its channel's socket is there
    // (the guest's writes stay in guest memory).
    let in_memory = spec.upper_in_memory() && spec.backend.vm().is_none();
    let writing = if in_memory {
        None
    } else {
        Some(store.writer_lock()?)
    };
    let img = store.resolve(&spec.image)?;
    let (argv, env, workdir) = process_params(spec, &img)?;
    let map = IdMap::detect(
        spec.userns == Userns::SelfOnly,
        spec.userns == Userns::KeepId,
    );
    // A shared lock on the cached tree for the run's lifetime: gc removes
    // only trees it can lock exclusively, never one a run is using.
    tracing::debug!(
        "run: image {} ({}), id map {:?} (uids {:?}), helper {}",
        spec.image,
        img.descriptor.digest(),
        map.kind,
        map.uids,
        crate::userns::helper_path(helper).display()
    );
    let (rootfs, _in_use) = store.lease_rootfs(&img, &map, helper)?;
    tracing::debug!(
        "run: rootfs {} ({})",
        rootfs.path.display(),
        if rootfs.unpacked {
            "unpacked now"
        } else {
            "cached"
        }
    );
    let user = match &spec.user_name {
        Some(n) => lookup_user(&rootfs.path, n)?,
        None => effective_user(spec),
    };
    if !map.maps_uid(user.0) || !map.maps_gid(user.1) {
        return Err(RunError::Unsupported(format!(
            "{} {}:{} is not mapped in the sandbox's user namespace: {}",
            Opt::User,
            user.0,
            user.1,
            map.no_subids_reason.clone().unwrap_or_else(|| {
                let r = |v: &[crate::userns::IdExtent]| {
                    v.iter()
                        .map(|e| {
                            format!(
                                "{}-{}",
                                e.inside,
                                u64::from(e.inside) + u64::from(e.count) - 1
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                };
                format!(
                    "the sandbox maps uids {} and gids {}",
                    r(&map.uids),
                    r(&map.gids)
                )
            })
        )));
    }
    let runs = store.root().join(".kiln/runs");
    fs::create_dir_all(&runs)
        .map_err(|e| RunError::host(format!("create {}", runs.display()), e))?;
    reap_dead_runs(&runs, helper, false);
    // In memory, the run has no directory on the host at all: the sandbox
    // mounts a tmpfs over `runs` in its own mount namespace.
    let rundir = if in_memory {
        None
    } else {
        let d = RunDir::create(&runs, helper)?;
        let pin = d.path.join(crate::store::PIN_FILE);
        fs::write(&pin, img.descriptor.digest().to_string())
            .map_err(|e| RunError::host(format!("write {}", pin.display()), e))?;
        Some(d)
    };
    drop(writing);
    let mut warnings = Vec::new();
    let cgroup = if spec.memory.is_some() || spec.pids_limit.is_some() {
        let limits = super::cgroup::Limits {
            memory: spec.memory,
            pids: spec.pids_limit,
        };
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = match &rundir {
            Some(d) => d
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            // The cgroup's name carries kiln's pid; a counter tells this
            // process's runs apart.
            None => format!(
                "mem-{}",
                RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
        };
        match super::cgroup::Hierarchy::detect()
            .and_then(|h| super::cgroup::RunCgroup::create(&h, limits, &id))
        {
            Ok(c) => {
                tracing::debug!("run: cgroup limits applied ({limits:?})");
                Some(c)
            }
            Err(reason) if spec.require_limits => {
                return Err(RunError::Unsupported(format!(
                    "{} cannot be enforced here ({}): {reason}",
                    Opt::Limits,
                    Opt::RequireLimits
                )));
            }
            Err(reason) => {
                warnings.push(format!("{} ignored: {reason}", Opt::Limits));
                None
            }
        }
    } else {
        None
    };
    Ok(Prepared {
        img,
        argv,
        env,
        workdir,
        user,
        map,
        rundir,
        runs,
        cgroup,
        warnings,
        rootfs,
        _in_use,
    })
}

/// The image's command line, environment and working directory, with the
/// spec's overrides.
fn process_params(
    spec: &RunSpec,
    img: &crate::store::Image,
) -> Result<(Vec<String>, Vec<String>, String), RunError> {
    let cfg = img.config.config().clone().unwrap_or_default();
    let argv = match &spec.argv {
        Some(a) => a.clone(),
        None => {
            let mut a = cfg.entrypoint().clone().unwrap_or_default();
            a.extend(cfg.cmd().clone().unwrap_or_default());
            a
        }
    };
    if argv.is_empty() {
        return Err(RunError::Spec(crate::spec::SpecError::invalid(
            "argv",
            format!(
                "no command given and image {} has no Entrypoint or Cmd",
                spec.image
            ),
        )));
    }
    let mut env: Vec<String> = cfg.env().clone().unwrap_or_default();
    let mut set = |kv: String| {
        let key = kv.split('=').next().unwrap_or("").to_string();
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(kv);
    };
    if !cfg
        .env()
        .as_ref()
        .is_some_and(|e| e.iter().any(|x| x.starts_with("PATH=")))
    {
        set(crate::import::DEFAULT_PATH.to_string());
    }
    set(format!(
        "HOME={}",
        if effective_user(spec).0 == 0 {
            "/root"
        } else {
            "/"
        }
    ));
    set(format!("HOSTNAME={}", spec.hostname));
    if spec.tty {
        let term = std::env::var("TERM")
            .ok()
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or_else(|| "xterm".into());
        set(format!("TERM={term}"));
    }
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        set(format!("SOURCE_DATE_EPOCH={v}"));
    }
    for kv in &spec.env {
        set(kv.clone());
    }
    let workdir = spec
        .workdir
        .clone()
        .or_else(|| cfg.working_dir().clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    Ok((argv, env, workdir))
}

/// The user the command runs as: `--user`, or the caller with keep-id.
/// Reads a small file of the tree at `root`, resolving symlinks and `..`
/// inside it (an image's /etc/passwd may be a symlink anywhere).
fn read_in_root(root: &Path, path: &str) -> io::Result<String> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let dir = rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let fd = rustix::fs::openat2(
        &dir,
        path,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )?;
    let mut s = String::new();
    io::Read::read_to_string(&mut io::Read::take(fs::File::from(fd), 4 << 20), &mut s)?;
    Ok(s)
}

/// `--user NAME[:GROUP]`: the ids from the image's /etc/passwd and
/// /etc/group (numbers pass through).
fn lookup_user(root: &Path, spec: &str) -> Result<(u32, u32), RunError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let field = |file: &str, name: &str, col: usize| -> Result<Option<u32>, RunError> {
        let text = read_in_root(root, file).map_err(|e| {
            RunError::host(format!("{} {spec}: read the image's /{file}", Opt::User), e)
        })?;
        Ok(text
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&name))
            .and_then(|f| f.get(col).and_then(|v| v.parse().ok())))
    };
    let (uid, mut gid) = match user.parse::<u32>() {
        Ok(n) => (n, n),
        Err(_) => {
            let uid = field("etc/passwd", user, 2)?;
            let gid = field("etc/passwd", user, 3)?;
            match (uid, gid) {
                (Some(u), Some(g)) => (u, g),
                _ => {
                    return Err(RunError::Unsupported(format!(
                        "{} {spec}: no user {user:?} in the image's /etc/passwd",
                        Opt::User
                    )))
                }
            }
        }
    };
    if let Some(g) = group {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => field("etc/group", g, 2)?.ok_or_else(|| {
                RunError::Unsupported(format!(
                    "{} {spec}: no group {g:?} in the image's /etc/group",
                    Opt::User
                ))
            })?,
        };
    }
    Ok((uid, gid))
}

fn effective_user(spec: &RunSpec) -> (u32, u32) {
    if spec.userns == Userns::KeepId && spec.user == (0, 0) {
        (
            rustix::process::getuid().as_raw(),
            rustix::process::getgid().as_raw(),
        )
    } else {
        spec.user
    }
}

/// A run directory under the store with a lock held for the run's lifetime.
pub(crate) struct RunDir {
    pub path: PathBuf,
    helper: Option<PathBuf>,
    _lock: fs::File,
    kept: bool,
}

/// Prefix of a run directory kept because its --commit failed.
const KEPT_PREFIX: &str = "kept-";

impl RunDir {
    fn create(runs: &Path, helper: Option<&Path>) -> Result<RunDir, RunError> {
        let dir = tempfile::Builder::new()
            .prefix("run-")
            .tempdir_in(runs)
            .map_err(|e| RunError::host("create run directory", e))?;
        let path = dir.keep();
        // The lock is a flock on the directory itself, taken before `upper`
        // exists: a reaper only removes a directory that has `upper` and
        // whose lock is free (or an old one without `upper`), so it can
        // never take a run that is still being set up. A reaper may hold the
        // lock for a moment while it looks, hence the blocking lock.
        let lock = fs::File::open(&path).map_err(|e| RunError::host("open run directory", e))?;
        lock.lock()
            .map_err(|e| RunError::host("lock run directory", io::Error::other(e.to_string())))?;
        // The overlay is mounted on the run directory itself (inside the
        // sandbox's mount namespace), so no separate mount point is needed.
        for d in ["upper", "work"] {
            fs::create_dir(path.join(d))
                .map_err(|e| RunError::host(format!("create run {d} directory"), e))?;
        }
        Ok(RunDir {
            path,
            helper: helper.map(Path::to_path_buf),
            _lock: lock,
            kept: false,
        })
    }

    /// Keeps the directory (renamed `kept-run-*`) for the user to recover
    /// the command's changes from; returns its upper directory.
    pub(crate) fn keep(&mut self) -> io::Result<PathBuf> {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let to = self.path.with_file_name(format!("{KEPT_PREFIX}{name}"));
        fs::rename(&self.path, &to)?;
        self.path = to;
        self.kept = true;
        Ok(self.path.join("upper"))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let _ = remove_tree_mapped(&self.path, self.helper.as_deref());
    }
}

/// Removes run directories whose owner died (their lock is free). A
/// directory without `upper` yet is left alone for a minute: its run may be
/// creating it right now. Directories kept after a failed --commit go only
/// with `kept` (what `kiln gc` passes).
pub fn reap_dead_runs(runs: &Path, helper: Option<&Path>, kept: bool) -> u64 {
    let mut n = 0;
    let Ok(list) = fs::read_dir(runs) else {
        return 0;
    };
    for e in list.flatten() {
        if !kept && e.file_name().to_string_lossy().starts_with(KEPT_PREFIX) {
            continue;
        }
        let Ok(dir) = fs::File::open(e.path()) else {
            continue;
        };
        // The lock stays held while the tree is removed, so a second
        // reaper skips it.
        let free = dir.try_lock().is_ok()
            && (e.path().join("upper").exists()
                || e.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > std::time::Duration::from_secs(60)));
        if free && remove_tree_mapped(&e.path(), helper).is_ok() {
            n += 1;
        }
    }
    n
}
