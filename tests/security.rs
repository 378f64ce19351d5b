//! Escape classes, one named check each, printed as a TAP list:
//!
//! ```text
//! 1..N
//! ok 1 - f1_a_whiteout_of_dotdot_is_refused_at_import
//! not ok 2 - ...
//! # what was seen
//! ```
//!
//! Each check is the regression test of one hole an outside escape test
//! found (issue 9, F1-F10): it fails on the code before the fix. CI runs
//! it as root and as the two unprivileged users (scripts/test.sh and
//! scripts/test-unprivileged.sh); a check whose attack needs a second user
//! or real root does that part only where it can, and says so in its
//! line. Arguments that do not start with `-` select checks by substring.
//!
//! A static probe (tests/security/probe.c, built with `cc -static`) makes
//! the raw system calls inside the sandbox.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{add_to_index, busybox_tar, gzip, is_root, kiln_bin, put_blob, Kiln, TarMaker};

type Check = Result<String, String>;
type CheckFn = fn() -> Check;

/// A child process that is killed and reaped however the check ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fails the check with a message unless `cond`.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

const PROBE_C: &str = include_str!("security/probe.c");

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let checks: &[(&str, CheckFn)] = &[
        (
            "f1_a_whiteout_of_dotdot_is_refused_at_import",
            f1_a_whiteout_of_dotdot_is_refused_at_import,
        ),
        (
            "f1_a_whiteout_of_dotdot_in_the_store_is_refused_at_unpack_and_spares_running_sandboxes",
            f1_a_whiteout_of_dotdot_in_the_store_is_refused_at_unpack,
        ),
        (
            "f1_commit_refuses_files_named_like_whiteouts",
            f1_commit_refuses_files_named_like_whiteouts,
        ),
        (
            "f2_the_stores_private_dirs_are_0700_and_other_users_cannot_reach_the_cache",
            f2_private_dirs_are_0700,
        ),
        (
            "f2_the_rootfs_cache_holds_no_device_nodes",
            f2_the_cache_holds_no_device_nodes,
        ),
        (
            "f3_cap_sys_ptrace_cannot_reach_the_host_through_init_or_the_fuse_daemon",
            f3_cap_sys_ptrace_cannot_reach_the_host,
        ),
        (
            "f4_cap_sys_admin_cannot_lift_read_only_mounts",
            f4_cap_sys_admin_cannot_lift_read_only_mounts,
        ),
        (
            "f5_roots_and_volumes_are_nodev_and_nosuid",
            f5_roots_and_volumes_are_nodev_and_nosuid,
        ),
        (
            "f6_a_store_another_user_owns_or_symlinked_is_refused",
            f6_untrusted_stores_are_refused,
        ),
        (
            "f7_sigkill_of_kiln_before_init_arms_pdeathsig_leaves_no_sandbox",
            f7_sigkill_before_pdeathsig_leaves_no_sandbox,
        ),
        (
            "f8_the_in_memory_file_systems_have_size_limits",
            f8_tmpfs_sizes_are_limited,
        ),
        (
            "f9_io_uring_x32_and_the_mount_change_calls_are_denied",
            f9_io_uring_x32_and_mount_calls_are_denied,
        ),
        (
            "f10_without_tty_the_command_cannot_reconfigure_the_callers_terminal",
            f10_no_terminal_without_tty,
        ),
        (
            "also_proc_acpi_and_sys_firmware_are_masked",
            also_proc_acpi_and_sys_firmware_are_masked,
        ),
    ];
    let selected: Vec<_> = checks
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    let who = if is_root() {
        "root".to_string()
    } else {
        format!("{} ({} mapping)", whoami(), common::id_mapping())
    };
    println!("# security checks as {who}");
    println!("1..{}", selected.len());
    let mut failed = 0;
    for (i, (name, f)) in selected.iter().enumerate() {
        let started = Instant::now();
        let r = std::panic::catch_unwind(f).unwrap_or_else(|p| {
            Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into()))
        });
        let secs = started.elapsed().as_secs_f64();
        match r {
            Ok(note) if note.is_empty() => println!("ok {} - {name} ({secs:.1}s)", i + 1),
            Ok(note) => println!("ok {} - {name} ({secs:.1}s) # {note}", i + 1),
            Err(why) => {
                failed += 1;
                println!("not ok {} - {name} ({secs:.1}s)", i + 1);
                for line in why.lines() {
                    println!("#   {line}");
                }
            }
        }
    }
    if failed > 0 {
        println!("# {failed} of {} checks failed", selected.len());
        std::process::exit(1);
    }
}

fn whoami() -> String {
    Command::new("id")
        .arg("-un")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A store with the busybox example image as `bb` (its cache unpacked).
fn busybox() -> Kiln {
    let k = Kiln::new();
    let tar = busybox_tar(k.dir.path());
    k.import(&tar, "bb", &[]);
    k.ok(["run", "bb", "true"]);
    k
}

/// The probe, built once per store directory.
fn probe(k: &Kiln) -> PathBuf {
    let dir = k.dir.path().join("probe");
    let bin = dir.join("probe");
    if !bin.exists() {
        fs::create_dir_all(&dir).expect("probe dir");
        let src = k.dir.path().join("probe.c");
        fs::write(&src, PROBE_C).expect("write probe.c");
        let out = Command::new("cc")
            .args(["-static", "-O1", "-o"])
            .arg(&bin)
            .arg(&src)
            .output()
            .expect("run cc (scripts/setup.sh installs gcc and libc6-dev)");
        assert!(out.status.success(), "cc probe.c: {}", text(&out.stderr));
    }
    dir
}

/// `kiln run [flags] -v PROBE:/work:ro bb sh -c SCRIPT` (/work exists in
/// the image, so this works with --read-only too).
fn run_sh(k: &Kiln, flags: &[&str], script: &str) -> Output {
    run_in(k, "bb", flags, script)
}

/// [`run_sh`] in image `image`.
fn run_in(k: &Kiln, image: &str, flags: &[&str], script: &str) -> Output {
    let p = probe(k);
    let mut c = k.cmd();
    c.arg("run")
        .args(flags)
        .arg("-v")
        .arg(format!("{}:/work:ro", p.display()))
        .args([image, "sh", "-c", script])
        .stdin(Stdio::null());
    c.output().expect("spawn kiln")
}

/// Stdout and stderr of a run, for messages.
fn both(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    )
}

/// Adds `layer` (an uncompressed tar) on top of image `base` straight in
/// the store, as a hostile layout or registry would deliver it (no import
/// checks), tagged `name`.
fn inject_layer(k: &Kiln, base: &str, layer: &[u8], name: &str) {
    let store = k.store();
    let v = k.inspect(base);
    let (ldigest, lsize) = put_blob(&store, layer);
    let mut config = v["config"].clone();
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .expect("diff_ids")
        .push(serde_json::Value::String(ldigest.clone()));
    let (cdigest, csize) = put_blob(&store, &serde_json::to_vec(&config).expect("json"));
    let mut manifest = v["manifest"].clone();
    manifest["config"]["digest"] = cdigest.into();
    manifest["config"]["size"] = csize.into();
    manifest["layers"]
        .as_array_mut()
        .expect("layers")
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": ldigest,
            "size": lsize,
        }));
    let (mdigest, msize) = put_blob(&store, &serde_json::to_vec(&manifest).expect("json"));
    add_to_index(&store, &mdigest, msize, &format!("{name}:latest"));
}

/// A layer holding one whiteout named `wh` (and a file beside it).
fn whiteout_layer(wh: &str) -> Vec<u8> {
    TarMaker::new()
        .file("hello", b"hi\n")
        .file(wh, b"")
        .finish()
}

/// Every name under `dir` (recursively), for before/after comparisons.
fn listing(dir: &Path) -> Vec<String> {
    let out = Command::new("find").arg(dir).output().expect("find");
    let mut v: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    v.sort();
    v
}

fn f1_a_whiteout_of_dotdot_is_refused_at_import() -> Check {
    let k = busybox();
    // Plain tarballs, one per bad target.
    for wh in [".wh...", "etc/.wh..", "etc/.wh."] {
        let tar = k.dir.path().join("bad.tar");
        fs::write(&tar, whiteout_layer(wh)).expect("write tar");
        let out = k.run([
            "import".as_ref(),
            tar.as_os_str(),
            "-t".as_ref(),
            "bad".as_ref(),
        ]);
        ensure!(
            out.status.code() == Some(125) && text(&out.stderr).contains("whiteout"),
            "importing a tarball with {wh:?} was not refused naming the whiteout:\n{}",
            both(&out)
        );
    }
    // An OCI layout whose layer (copied verbatim on import) holds `.wh...`.
    let layout = k.dir.path().join("layout");
    let put = |bytes: &[u8]| put_blob(&layout, bytes);
    let tar = whiteout_layer(".wh...");
    let (diff_id, _) = put(&tar);
    let gz = gzip(&tar);
    let (ldigest, lsize) = put(&gz);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "config": {}
    });
    let (cdigest, csize) = put(&serde_json::to_vec(&config).expect("json"));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ldigest, "size": lsize}]
    });
    let (mdigest, msize) = put(&serde_json::to_vec(&manifest).expect("json"));
    fs::write(
        layout.join("index.json"),
        br#"{"schemaVersion":2,"manifests":[]}"#,
    )
    .expect("index");
    add_to_index(&layout, &mdigest, msize, "x");
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    let out = k.run([
        "import".as_ref(),
        layout.as_os_str(),
        "-t".as_ref(),
        "bad-oci".as_ref(),
    ]);
    ensure!(
        out.status.code() == Some(125) && text(&out.stderr).contains("whiteout"),
        "importing an OCI layout with a .wh... layer was not refused:\n{}",
        both(&out)
    );
    ensure!(
        !k.names().iter().any(|n| n.starts_with("bad")),
        "a refused import left a tag: {:?}",
        k.names()
    );
    Ok(String::new())
}

fn f1_a_whiteout_of_dotdot_in_the_store_is_refused_at_unpack() -> Check {
    let k = busybox();
    // A sandbox running on the cached busybox tree while the hostile image
    // is unpacked beside it.
    let v = k.dir.path().join("v");
    fs::create_dir_all(&v).expect("volume");
    let mut running = Reaped(
        k.cmd()
            .arg("run")
            .arg("-v")
            .arg(format!("{}:/v", v.display()))
            .args([
                "bb",
                "sh",
                "-c",
                "touch /v/up; sleep 4; cat /etc/passwd > /v/passwd",
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn kiln"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !v.join("up").exists() {
        ensure!(
            Instant::now() < deadline,
            "the running sandbox never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let cache = k.store().join(".kiln/rootfs");
    let before = listing(&cache);
    inject_layer(&k, "bb", &whiteout_layer(".wh..."), "hostile");
    let out = k.run(["run", "hostile", "true"]);
    ensure!(
        out.status.code() == Some(125) && text(&out.stderr).contains("whiteout"),
        "running an image whose layer holds .wh... was not refused:\n{}",
        both(&out)
    );
    let after: Vec<String> = listing(&cache)
        .into_iter()
        .filter(|p| !p.contains("/.tmp-"))
        .collect();
    ensure!(
        after == before,
        "the cache changed: {} entries before, {} after",
        before.len(),
        after.len()
    );
    // `kiln unpack DIR`: the directory beside DIR survives.
    let parent = k.dir.path().join("parent");
    fs::create_dir_all(parent.join("sibling")).expect("sibling");
    let out = k.run([
        "unpack".as_ref(),
        "hostile".as_ref(),
        parent.join("dest").as_os_str(),
    ]);
    ensure!(
        out.status.code() == Some(125) && parent.join("sibling").is_dir(),
        "kiln unpack of .wh... was not refused or removed the destination's parent:\n{}",
        both(&out)
    );
    let st = running.0.wait().expect("wait");
    let passwd = fs::read_to_string(v.join("passwd")).unwrap_or_default();
    ensure!(
        st.success() && passwd.contains("root:"),
        "the running sandbox lost its tree ({st}): /etc/passwd read {passwd:?}"
    );
    Ok(String::new())
}

fn f1_commit_refuses_files_named_like_whiteouts() -> Check {
    let k = busybox();
    for (script, what) in [
        ("touch /.wh...", "/.wh..."),
        ("touch /etc/.wh.passwd", "/etc/.wh.passwd"),
    ] {
        let out = k.run(["run", "--commit", "committed", "bb", "sh", "-c", script]);
        ensure!(
            out.status.code() == Some(125) && text(&out.stderr).contains(what),
            "--commit of a run that did `{script}` was not refused naming {what}:\n{}",
            both(&out)
        );
    }
    ensure!(
        !k.names().iter().any(|n| n.starts_with("committed")),
        "a refused commit was tagged"
    );
    // The cache is whole afterwards.
    k.ok(["run", "bb", "cat", "/etc/passwd"]);
    Ok(String::new())
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).map_or(0, |m| m.mode() & 0o7777)
}

fn f2_private_dirs_are_0700() -> Check {
    let k = busybox();
    k.ok(["run", "--upper", "disk", "bb", "true"]);
    let base = k.store().join(".kiln");
    for d in ["", "tmp", "locks", "rootfs", "runs"] {
        let p = base.join(d);
        ensure!(
            mode_of(&p) == 0o700,
            "{} is mode {:o}, not 0700",
            p.display(),
            mode_of(&p)
        );
    }
    // A store an older kiln left open is made private on first use.
    for d in ["", "rootfs", "runs"] {
        fs::set_permissions(base.join(d), fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    k.ok(["images"]);
    for d in ["", "rootfs", "runs"] {
        ensure!(
            mode_of(&base.join(d)) == 0o700,
            "{} stayed {:o}",
            base.join(d).display(),
            mode_of(&base.join(d))
        );
    }
    if !is_root() {
        return Ok("as a user: modes checked; the second-user part runs as root".into());
    }
    // As another user: the cached image's setuid-root busybox (and its
    // 1777 /var/tmp) must be out of reach even with the store's own
    // directory open to all.
    let setuid = TarMaker::new()
        .owned("bin/", true, 0o755, (0, 0), b"")
        .owned(
            "bin/id",
            false,
            0o4755,
            (0, 0),
            &fs::read("/bin/busybox").expect("busybox"),
        )
        .owned("var/tmp/", true, 0o1777, (0, 0), b"")
        .finish();
    let tar = k.dir.path().join("suid.tar");
    fs::write(&tar, setuid).expect("tar");
    k.import(&tar, "suid", &[]);
    k.ok(["run", "suid", "/bin/id"]);
    fs::set_permissions(k.dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let cache = k.store().join(".kiln/rootfs");
    let script = format!(
        "for d in {0}/*/; do \"$d/bin/id\" -u && echo REACHED; touch \"$d/var/tmp/planted\" && echo PLANTED; done; true",
        cache.display()
    );
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", "sh", "-c", &script])
        .output()
        .expect("runuser");
    ensure!(
        !text(&out.stdout).contains("REACHED") && !text(&out.stdout).contains("PLANTED"),
        "nobody reached the cache: {}",
        both(&out)
    );
    Ok(String::new())
}

/// A tarball with device nodes (a null device and a loop device).
fn device_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, major, minor) in [
        ("nodes/null", tar::EntryType::Char, 1, 3),
        ("nodes/loop0", tar::EntryType::Block, 7, 0),
        ("nodes/vcs", tar::EntryType::Char, 7, 0),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(0o666);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_device_major(major).expect("major");
        h.set_device_minor(minor).expect("minor");
        h.set_path(path).expect("path");
        h.set_cksum();
        b.append(&h, &b""[..]).expect("append");
    }
    b.into_inner().expect("tar")
}

fn f2_the_cache_holds_no_device_nodes() -> Check {
    let k = busybox();
    inject_layer(&k, "bb", &device_tar(), "devs");
    let out = run_in(&k, "devs", &[], "stat -c '%n %F' /nodes/*");
    ensure!(out.status.success(), "run: {}", both(&out));
    let cache = k.store().join(".kiln/rootfs");
    let mut devices = Vec::new();
    for p in listing(&cache) {
        if let Ok(m) = fs::symlink_metadata(&p) {
            let t = m.file_type();
            if t.is_char_device() || t.is_block_device() {
                devices.push(p);
            }
        }
    }
    ensure!(devices.is_empty(), "device nodes in the cache: {devices:?}");
    ensure!(
        !text(&out.stdout).contains("special file"),
        "the image's device nodes are devices inside: {}",
        text(&out.stdout)
    );
    Ok(if is_root() {
        String::new()
    } else {
        "as a user kiln could never create devices; the check bites as root".into()
    })
}

fn f3_cap_sys_ptrace_cannot_reach_the_host() -> Check {
    let k = busybox();
    // A file beside the store: reaching it means reaching the host.
    let marker = format!("MARKER-{}", std::process::id());
    fs::write(k.dir.path().join(&marker), "host file").expect("marker");
    let secret = format!("kiln-secret-{}", std::process::id());
    // Every process's descriptors, walked up to six levels, its root and
    // cwd, its environment and command line.
    let script = r#"
for p in /proc/[0-9]*; do
  for f in "$p"/fd/* "$p"/root "$p"/cwd; do
    d="$f"
    for i in 1 2 3 4 5 6 7; do ls -a "$d/" 2>/dev/null; d="$d/.."; done
  done
  cat "$p/environ" "$p/cmdline" 2>/dev/null | tr '\0' '\n'
done; cat /proc/mounts; true"#;
    let store = k.store().display().to_string();
    for (mode, env, flags) in [
        ("cloned init", None, vec!["--cap-add", "CAP_SYS_PTRACE"]),
        (
            "exec'd helper",
            Some(("KILN_HELPER_EXEC", "1")),
            vec!["--cap-add", "CAP_SYS_PTRACE"],
        ),
        (
            "fuse-overlayfs daemon",
            None,
            vec!["--cap-add", "CAP_SYS_PTRACE", "--rootfs", "fuse-overlay"],
        ),
    ] {
        let mut c = k.cmd();
        c.arg("run")
            .args(&flags)
            .args(["bb", "sh", "-c", script])
            .env("KILN_TEST_SECRET", &secret)
            .stdin(Stdio::null());
        if let Some((key, val)) = env {
            c.env(key, val);
        }
        let out = c.output().expect("spawn kiln");
        ensure!(out.status.success(), "{mode}: run failed: {}", both(&out));
        let seen = text(&out.stdout);
        ensure!(
            !seen.contains(&marker),
            "{mode}: the command listed the host directory holding {marker}"
        );
        ensure!(
            !seen.contains(&secret),
            "{mode}: the command read kiln's environment"
        );
        ensure!(
            !seen.contains(&store),
            "{mode}: the command saw the store's host path {store} (kiln's or the daemon's command line, or /proc/mounts)"
        );
    }
    Ok(String::new())
}

fn f4_cap_sys_admin_cannot_lift_read_only_mounts() -> Check {
    let k = busybox();
    let v = k.dir.path().join("ro");
    fs::create_dir_all(&v).expect("ro dir");
    let vol = format!("{}:/v:ro", v.display());
    for flags in [
        vec!["--cap-add", "CAP_SYS_ADMIN", "-v", vol.as_str()],
        vec![
            "--cap-add",
            "CAP_SYS_ADMIN",
            "--seccomp",
            "unconfined",
            "--allow-userns",
            "-v",
            vol.as_str(),
        ],
    ] {
        let out = run_sh(
            &k,
            &flags,
            "/work/probe mount_setattr /v; /work/probe mount_setattr /proc/sys; \
             /work/probe remount_rw /v; touch /v/written; \
             /work/probe write /proc/sys/kernel/core_pattern; true",
        );
        let seen = text(&out.stdout);
        ensure!(out.status.success(), "run {flags:?}: {}", both(&out));
        let changed = [
            "mount_setattr: ok",
            "remount_rw: ok",
            "remount_rw_in_own_ns: ok",
            "write: ok",
        ];
        ensure!(
            !changed.iter().any(|c| seen.contains(c)),
            "with {flags:?} a read-only mount was changed or opened for writing:\n{seen}"
        );
        ensure!(
            !v.join("written").exists(),
            "with {flags:?} the :ro volume was written"
        );
    }
    Ok(String::new())
}

fn mount_options(mounts: &str, target: &str) -> Option<String> {
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 3 && f[1] == target)
        .map(|f| f[3].to_string())
        .next_back()
}

fn f5_roots_and_volumes_are_nodev_and_nosuid() -> Check {
    let k = busybox();
    let v = k.dir.path().join("vol");
    fs::create_dir_all(&v).expect("vol");
    let made_node = is_root()
        && Command::new("mknod")
            .arg(v.join("null"))
            .args(["c", "1", "3"])
            .status()
            .is_ok_and(|s| s.success());
    let vol = format!("{}:/home", v.display());
    for flags in [
        vec!["--read-only", "-v", vol.as_str()],
        vec!["-v", vol.as_str()],
    ] {
        let out = run_sh(
            &k,
            &flags,
            "cat /proc/mounts; /work/probe read /home/null; true",
        );
        ensure!(out.status.success(), "run {flags:?}: {}", both(&out));
        let seen = text(&out.stdout);
        for target in ["/", "/home"] {
            let opts = mount_options(&seen, target).unwrap_or_default();
            ensure!(
                opts.contains("nosuid") && opts.contains("nodev"),
                "with {flags:?} {target} is mounted {opts:?}, without nosuid and nodev"
            );
        }
        if made_node {
            ensure!(
                seen.contains("read: EACCES"),
                "with {flags:?} a device node on a volume opened:\n{seen}"
            );
        }
    }
    if made_node {
        // Asked for: `:dev` lets it open.
        let out = run_sh(
            &k,
            &["-v", &format!("{vol}:dev")],
            "/work/probe read /home/null",
        );
        ensure!(
            out.status.success(),
            "a :dev volume's node did not open: {}",
            both(&out)
        );
    }
    Ok(if made_node {
        String::new()
    } else {
        "as a user no device node can be made; mount flags checked".into()
    })
}

fn f6_untrusted_stores_are_refused() -> Check {
    // A symlinked .kiln/runs: the reaper would empty the directory it
    // points to (here a look-alike run directory with a file).
    let k = busybox();
    let victim = k.dir.path().join("victim");
    fs::create_dir_all(victim.join("run-x/upper")).expect("victim");
    fs::write(victim.join("run-x/upper/keep"), "keep").expect("victim file");
    let runs = k.store().join(".kiln/runs");
    fs::remove_dir_all(&runs).expect("rm runs");
    std::os::unix::fs::symlink(&victim, &runs).expect("symlink runs");
    let out = k.run(["run", "bb", "true"]);
    ensure!(
        out.status.code() == Some(125) && text(&out.stderr).contains("symlink"),
        "a store with a symlinked .kiln/runs was used:\n{}",
        both(&out)
    );
    let out = k.run(["--trust-store", "gc"]);
    ensure!(
        out.status.code() == Some(125),
        "--trust-store accepted a symlinked .kiln/runs:\n{}",
        both(&out)
    );
    ensure!(
        victim.join("run-x/upper/keep").exists(),
        "the symlinked directory's contents were removed"
    );
    // A symlinked .kiln/rootfs: an unpack must not land outside the store.
    let k = busybox();
    let elsewhere = k.dir.path().join("elsewhere");
    fs::create_dir_all(&elsewhere).expect("elsewhere");
    let rootfs = k.store().join(".kiln/rootfs");
    fs::remove_dir_all(&rootfs).expect("rm rootfs");
    std::os::unix::fs::symlink(&elsewhere, &rootfs).expect("symlink rootfs");
    let out = k.run(["run", "bb", "true"]);
    ensure!(
        out.status.code() == Some(125) && listing(&elsewhere).len() == 1,
        "a store with a symlinked .kiln/rootfs was used (unpacked: {}):\n{}",
        listing(&elsewhere).len(),
        both(&out)
    );
    // A store owned by another user.
    if !is_root() {
        let out = k.run_store("/usr", ["images"]);
        ensure!(
            out.status.code() == Some(125) && text(&out.stderr).contains("owned by"),
            "a root-owned directory was used as a store:\n{}",
            both(&out)
        );
        return Ok("as a user: the other owner is root (a root-owned directory)".into());
    }
    let k = busybox();
    let st = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(k.store())
        .status()
        .expect("chown");
    ensure!(st.success(), "chown failed");
    let out = k.run(["run", "bb", "true"]);
    ensure!(
        out.status.code() == Some(125) && text(&out.stderr).contains("owned by"),
        "root used a store owned by uid 65534:\n{}",
        both(&out)
    );
    let out = k.run(["--trust-store", "images"]);
    ensure!(
        out.status.success(),
        "--trust-store did not accept it: {}",
        both(&out)
    );
    Ok(String::new())
}

trait RunStore {
    fn run_store<const N: usize>(&self, store: &str, args: [&str; N]) -> Output;
}

impl RunStore for Kiln {
    fn run_store<const N: usize>(&self, store: &str, args: [&str; N]) -> Output {
        Command::new(kiln_bin())
            .arg("--store")
            .arg(store)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("spawn kiln")
    }
}

fn f7_sigkill_before_pdeathsig_leaves_no_sandbox() -> Check {
    common::require("strace");
    let k = busybox();
    let v = k.dir.path().join("v7");
    fs::create_dir_all(&v).expect("v7");
    // strace holds init's first prctl (PR_SET_PDEATHSIG) for 0.7 s and
    // kills kiln right after it has resumed init (its next call after the
    // go byte is pidfd_open): before the fix init ran on, unsupervised.
    // newuidmap cannot run setuid under strace, so a subid caller maps
    // itself alone here (the race does not depend on the mapping).
    let log = k.dir.path().join("strace.log");
    for helper in [false, true] {
        let mut c = Command::new("strace");
        c.args(["-f", "-qq", "-o"])
            .arg(&log)
            .args([
                "-e",
                "trace=prctl,pidfd_open",
                "-e",
                "inject=prctl:delay_enter=700000:when=1",
                "-e",
                "inject=pidfd_open:signal=SIGKILL",
            ])
            .arg(kiln_bin())
            .arg("--store")
            .arg(k.store())
            .arg("run")
            .args(if common::id_mapping() == "subids" {
                &["--userns", "self"][..]
            } else {
                &[]
            })
            .arg("-v")
            .arg(format!("{}:/v", v.display()))
            .args(["bb", "sh", "-c", "sleep 1.5; echo ran-on > /v/survived"])
            .env_remove("SOURCE_DATE_EPOCH")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if helper {
            c.env("KILN_HELPER_EXEC", "1");
        }
        let st = c.status().expect("strace");
        let trace = fs::read_to_string(&log).unwrap_or_default();
        ensure!(
            trace.contains("(DELAYED)")
                && trace.contains("pidfd_open(")
                && trace.contains("killed by SIGKILL"),
            "the race was not set up (status {st}): init's prctl was not held or kiln not killed after starting it:\n{trace}"
        );
        std::thread::sleep(Duration::from_secs(3));
        ensure!(
            !v.join("survived").exists(),
            "the sandbox ran on after kiln's SIGKILL (helper path: {helper})"
        );
    }
    Ok(String::new())
}

fn tmpfs_kib(mounts: &str, target: &str) -> Option<u64> {
    mount_options(mounts, target)?
        .split(',')
        .find_map(|o| o.strip_prefix("size="))
        .and_then(|s| s.strip_suffix('k'))
        .and_then(|s| s.parse().ok())
}

fn f8_tmpfs_sizes_are_limited() -> Check {
    let k = busybox();
    let ram_kib: u64 = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .ok_or("no MemTotal")?;
    let out = run_sh(&k, &[], "cat /proc/mounts");
    ensure!(out.status.success(), "run: {}", both(&out));
    let m = text(&out.stdout);
    let tmp = tmpfs_kib(&m, "/tmp").ok_or(format!("no size= on /tmp:\n{m}"))?;
    let shm = tmpfs_kib(&m, "/dev/shm").ok_or(format!("no size= on /dev/shm:\n{m}"))?;
    ensure!(
        tmp <= ram_kib / 4 + 4,
        "/tmp may grow to {tmp} KiB of {ram_kib} KiB RAM (default: a quarter)"
    );
    ensure!(shm == 65536, "/dev/shm is {shm} KiB, not 64 MiB");
    // --memory caps each.
    let out = run_sh(&k, &["--memory", "16m"], "cat /proc/mounts");
    let m = text(&out.stdout);
    for t in ["/tmp", "/dev/shm"] {
        ensure!(
            tmpfs_kib(&m, t).is_some_and(|s| s <= 16384),
            "with --memory 16m {t} is {:?} KiB",
            tmpfs_kib(&m, t)
        );
    }
    // Writing past --tmpfs-size and --upper-size fails.
    let out = run_sh(
        &k,
        &["--tmpfs-size", "1m", "--shm-size", "1m"],
        "head -c 2097152 /dev/zero > /tmp/big && echo TMP-FULL-WRITE; \
         head -c 2097152 /dev/zero > /dev/shm/big && echo SHM-FULL-WRITE; true",
    );
    ensure!(
        out.status.success() && !text(&out.stdout).contains("FULL-WRITE"),
        "a 2 MiB write went past a 1 MiB limit: {}",
        both(&out)
    );
    let out = run_sh(
        &k,
        &["--upper", "memory", "--upper-size", "1m"],
        "head -c 2097152 /dev/zero > /big && echo UPPER-FULL-WRITE; true",
    );
    ensure!(
        out.status.success() && !text(&out.stdout).contains("FULL-WRITE"),
        "a 2 MiB write to the root went past --upper-size 1m: {}",
        both(&out)
    );
    Ok(String::new())
}

fn f9_io_uring_x32_and_mount_calls_are_denied() -> Check {
    let k = busybox();
    // With arguments the kernel would refuse with EINVAL first: EPERM can
    // only come from the filter.
    let out = run_sh(
        &k,
        &[],
        "/work/probe io_uring_setup; /work/probe x32; \
         /work/probe sys 442 -1 0 0xffffffff 0 0; \
         /work/probe sys 433 -1 0 0xffffffff; \
         /work/probe sys 467 -1 0 0xffffffff 0 0; true",
    );
    ensure!(out.status.success(), "run: {}", both(&out));
    let seen = text(&out.stdout);
    let lines: Vec<&str> = seen.lines().collect();
    ensure!(
        lines.len() == 5 && lines.iter().all(|l| l.contains(": EPERM")),
        "not every call was denied by the filter:\n{seen}"
    );
    Ok(String::new())
}

/// Runs `kiln ARGS` under util-linux `script` (a terminal as its stdin,
/// stdout and stderr), feeding `input`; returns what the terminal showed.
fn on_a_terminal(k: &Kiln, args: &str, input: &str) -> String {
    common::require("script");
    let cmd = format!(
        "{} --store {} {args}",
        kiln_bin().display(),
        k.store().display()
    );
    let mut c = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("script");
    if let Some(mut i) = c.stdin.take() {
        use std::io::Write;
        let _ = i.write_all(input.as_bytes());
    }
    let out = c.wait_with_output().expect("script");
    text(&out.stdout)
}

fn f10_no_terminal_without_tty() -> Check {
    let k = busybox();
    probe(&k);
    let p = k.dir.path().join("probe");
    let seen = on_a_terminal(
        &k,
        &format!(
            "run -v {}:/work:ro bb sh -c '[ -t 1 ] && echo STDOUT-TTY; [ -t 2 ] && echo STDERR-TTY; /work/probe tcsetattr 1; /work/probe tcsetattr 2; true'",
            p.display()
        ),
        "",
    );
    ensure!(
        !seen.contains("-TTY") && !seen.contains("tcsetattr: ok"),
        "the command got the caller's terminal as stdout/stderr:\n{seen}"
    );
    ensure!(
        seen.contains("tcgetattr: ENOTTY"),
        "the probe did not run:\n{seen}"
    );
    // -i without -t: input arrives through a pipe, and it still arrives.
    let seen = on_a_terminal(
        &k,
        "run -i bb sh -c '[ -t 0 ] && echo STDIN-TTY; read x; echo got-$x'",
        "hello\n",
    );
    ensure!(
        !seen.contains("STDIN-TTY") && seen.contains("got-hello"),
        "with -i the command got the terminal, or no input:\n{seen}"
    );
    Ok(String::new())
}

fn also_proc_acpi_and_sys_firmware_are_masked() -> Check {
    let k = busybox();
    let out = run_sh(&k, &[], "cat /proc/mounts");
    ensure!(out.status.success(), "run: {}", both(&out));
    let m = text(&out.stdout);
    for t in ["/proc/acpi", "/sys/firmware"] {
        let host_has = Path::new(t).is_dir();
        ensure!(
            !host_has || mount_options(&m, t).is_some_and(|o| o.starts_with("ro")),
            "{t} is not masked:\n{m}"
        );
    }
    Ok(String::new())
}
