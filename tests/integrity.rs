//! Store integrity under faults: kiln killed (SIGKILL, with strace's
//! syscall fault injection, deterministic) at the steps that publish
//! something, full disks, damaged files. Each test is named after what it
//! guarantees; each failed on the code before the fix.
//!
//! strace traces the main kiln process only (no -f): newuidmap cannot run
//! setuid under ptrace, and every step injected here is the main process's.

mod common;
use common::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A store with the busybox example imported as `base`.
fn with_base() -> Kiln {
    let k = Kiln::new();
    let tar = busybox_tar(k.dir.path());
    k.import(&tar, "base", &[]);
    k
}

/// `kiln --store STORE ARGS` under strace with the given filters.
fn under_strace(k: &Kiln, strace: &[&str], args: &[&str]) -> (Output, String) {
    require("strace");
    let log = k.dir.path().join("strace.log");
    let _ = fs::remove_file(&log);
    let out = Command::new("strace")
        .args(["-qq", "-s", "4096", "-o"])
        .arg(&log)
        .args(strace)
        .arg(kiln_bin())
        .arg("--store")
        .arg(k.store())
        .args(args)
        .env_remove("SOURCE_DATE_EPOCH")
        .stdin(Stdio::null())
        .output()
        .expect("spawn strace");
    (out, fs::read_to_string(&log).unwrap_or_default())
}

fn killed(out: &Output, trace: &str) {
    assert!(
        trace.contains("killed by SIGKILL"),
        "strace did not kill kiln (status {:?}), the fault was not injected:\n{trace}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Names in a directory.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Published cache entries (not temp trees).
fn cache_entries(k: &Kiln) -> Vec<String> {
    names(&k.store().join(".kiln/rootfs"))
        .into_iter()
        .filter(|n| !n.starts_with(".tmp-"))
        .collect()
}

fn listing(k: &Kiln, image: &str) -> String {
    k.ok([
        "run",
        image,
        "sh",
        "-c",
        "find /bin /etc /sbin /usr | sort | wc -l; cat /etc/passwd",
    ])
}

#[test]
fn a_gc_killed_while_removing_a_cached_tree_never_leaves_a_half_tree() {
    let k = with_base();
    let before = listing(&k, "base");
    let tar = busybox_tar(k.dir.path());
    k.ok(["rm", "base"]);
    // The 40th unlinkat is well inside the tree (busybox has ~400 links).
    let (out, trace) = under_strace(
        &k,
        &[
            "-e",
            "trace=unlinkat",
            "-e",
            "inject=unlinkat:signal=SIGKILL:when=40",
        ],
        &["gc"],
    );
    killed(&out, &trace);
    // The same image again: same chain, same cache key.
    k.import(&tar, "base", &[]);
    assert_eq!(
        listing(&k, "base"),
        before,
        "a run used a half-deleted cached tree"
    );
    k.ok(["fsck", "--rootfs"]);
    k.ok(["gc"]);
    let left: Vec<String> = names(&k.store().join(".kiln/rootfs"))
        .into_iter()
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(left.is_empty(), "gc left temp trees: {left:?}");
}

#[test]
fn an_entry_without_its_completion_marker_is_replaced() {
    // What an older kiln (or an interrupted removal) leaves: a tree under
    // the final name, without `done`.
    let k = with_base();
    let before = listing(&k, "base");
    let entries = cache_entries(&k);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = k.store().join(".kiln/rootfs").join(&entries[0]);
    fs::remove_file(entry.join("done")).expect("remove marker");
    fs::remove_file(entry.join("root/etc/passwd")).expect("damage tree");
    assert_eq!(listing(&k, "base"), before, "an incomplete entry was used");
}

#[test]
fn a_run_keeps_its_base_image_while_gc_runs_and_commits_it() {
    let k = with_base();
    let runs = k.store().join(".kiln/runs");
    let child = k
        .cmd()
        .args([
            "run",
            "--commit",
            "out",
            "base",
            "sh",
            "-c",
            "echo made > /made; sleep 4",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run");
    // Wait until the run is set up (its pin is written).
    let t = Instant::now();
    while !names(&runs)
        .iter()
        .any(|n| runs.join(n).join("image").exists())
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the run never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    k.ok(["rm", "base"]);
    k.ok(["gc"]);
    let out = child.wait_with_output().expect("wait run");
    assert!(
        out.status.success(),
        "run --commit failed after the base's tag was removed and gc ran: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    k.ok(["fsck"]);
    assert_eq!(k.ok(["run", "out", "cat", "/made"]), "made\n");
}

#[test]
fn a_failed_commit_keeps_the_commands_changes() {
    let k = with_base();
    // A real file named like a whiteout is refused by commit.
    let err = k.fails([
        "run",
        "--commit",
        "out",
        "base",
        "sh",
        "-c",
        "echo precious > /work-result; touch /.wh.evil",
    ]);
    let kept = err
        .split("kept in ")
        .nth(1)
        .and_then(|s| s.split(" until").next())
        .unwrap_or_else(|| panic!("the error does not say where the changes are: {err}"));
    let kept = PathBuf::from(kept);
    assert_eq!(
        fs::read_to_string(kept.join("work-result")).expect("kept result"),
        "precious\n"
    );
    // A later run does not reap it; gc does.
    k.ok(["run", "base", "true"]);
    assert!(kept.exists(), "a later run removed the kept changes");
    k.ok(["gc"]);
    assert!(!kept.exists(), "gc left the kept run directory");
}

#[test]
fn a_flipped_byte_in_the_cache_is_found_and_repaired() {
    let k = with_base();
    let root = PathBuf::from(k.ok(["rootfs", "base"]).trim());
    k.ok(["fsck", "--rootfs"]);
    let passwd = root.join("etc/passwd");
    let good = fs::read(&passwd).expect("read cached passwd");
    let flip = |p: &Path| {
        let mut b = fs::read(p).expect("read");
        b[0] ^= 0x20;
        fs::write(p, b).expect("write");
    };
    flip(&passwd);
    let out = k.run(["fsck", "--rootfs"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(125), "fsck --rootfs passed: {text}");
    assert!(
        text.contains("/etc/passwd: content changed") && text.contains("base"),
        "fsck does not name the file and image: {text}"
    );
    k.ok(["fsck", "--rootfs", "--repair"]);
    let cat = |k: &Kiln| k.ok(["run", "base", "cat", "/etc/passwd"]);
    assert_eq!(cat(&k).as_bytes(), &good[..]);
    k.ok(["fsck", "--rootfs"]);
    // And one image's cache, by hand.
    let root = PathBuf::from(k.ok(["rootfs", "base"]).trim());
    flip(&root.join("etc/passwd"));
    k.ok(["rootfs", "--rebuild", "base"]);
    assert_eq!(cat(&k).as_bytes(), &good[..]);
    assert!(k.ok(["rootfs", "--drop", "base"]).contains("removed 1"));
    assert!(cache_entries(&k).is_empty());
}

#[test]
fn the_cache_is_synced_before_it_is_published() {
    let k = with_base();
    k.ok(["rootfs", "--drop", "base"]);
    let (out, trace) = under_strace(
        &k,
        &["-e", "trace=syncfs,rename,renameat,renameat2,fsync"],
        &["rootfs", "base"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = trace.lines().collect();
    let publish = lines
        .iter()
        .position(|l| l.starts_with("rename") && l.contains("/.kiln/rootfs/.tmp-"))
        .unwrap_or_else(|| panic!("no rename of the unpacked tree:\n{trace}"));
    assert!(
        lines[..publish]
            .iter()
            .any(|l| l.starts_with("syncfs(") && l.ends_with("= 0")),
        "the tree was not synced (syncfs) before its rename:\n{trace}"
    );
    assert!(
        lines[publish..].iter().any(|l| l.starts_with("fsync(")),
        "the cache directory was not fsynced after the rename:\n{trace}"
    );
}

#[test]
fn a_killed_index_update_leaks_no_temp_file() {
    let k = with_base();
    let (out, trace) = under_strace(
        &k,
        &[
            "-e",
            "trace=rename,renameat,renameat2",
            "-e",
            "inject=rename,renameat,renameat2:signal=SIGKILL:when=1",
        ],
        &["tag", "base", "other"],
    );
    killed(&out, &trace);
    assert_eq!(k.names(), vec!["base:latest".to_string()]);
    k.ok(["gc"]);
    let mut left: Vec<String> = names(&k.store())
        .into_iter()
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    left.extend(names(&k.store().join(".kiln/tmp")));
    assert!(left.is_empty(), "temp files survived gc: {left:?}");
}

#[test]
fn a_killed_export_leaves_nothing_in_the_output_directory() {
    let k = with_base();
    let out_dir = k.dir.path().join("out");
    fs::create_dir(&out_dir).expect("out dir");
    let dest = out_dir.join("base.tar");
    let dest_s = dest.display().to_string();
    // Killed at its fsync: the whole archive is written, not yet named.
    let killed_export = || {
        let (out, trace) = under_strace(
            &k,
            &[
                "-e",
                "trace=fsync",
                "-e",
                "inject=fsync:signal=SIGKILL:when=1",
            ],
            &["export", "base", "-o", &dest_s],
        );
        killed(&out, &trace);
    };
    killed_export();
    assert!(names(&out_dir).is_empty(), "left: {:?}", names(&out_dir));
    // Replacing an existing file: the old one stays whole until the new one is.
    k.ok(["export", "base", "-o", &dest_s]);
    let first = fs::read(&dest).expect("export");
    killed_export();
    assert_eq!(names(&out_dir), vec!["base.tar".to_string()]);
    assert_eq!(fs::read(&dest).expect("export"), first);
    k.ok(["export", "base", "-o", &dest_s]);
    assert_eq!(names(&out_dir), vec!["base.tar".to_string()]);
}

#[test]
fn a_full_disk_is_named_as_such_and_leaves_no_image() {
    require("unshare");
    let k = Kiln::new();
    let src = k.dir.path().join("src");
    fs::create_dir(&src).expect("src");
    fs::write(src.join("noise"), noise(7, 3 << 20)).expect("noise");
    let mnt = k.dir.path().join("small");
    fs::create_dir(&mnt).expect("mnt");
    // A 2 MiB tmpfs in a user and mount namespace of our own (rootless).
    let script = format!(
        "mount -t tmpfs -o size=2m tmpfs {m} && \
         {kiln} --store {m}/s import {src} -t big; echo \"exit=$?\"; ls -A {m}/s/.kiln/tmp; \
         {kiln} --store {m}/s images --format json",
        m = mnt.display(),
        kiln = kiln_bin().display(),
        src = src.display()
    );
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .output()
        .expect("unshare");
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(so.contains("exit=125"), "import did not fail: {so}{se}");
    assert!(
        se.contains("No space left on device") && !se.contains("already finished"),
        "the error does not say the disk is full: {se}"
    );
    assert!(so.trim_end().ends_with("[]"), "an image was tagged: {so}");
    let tmp_listing = so.split("exit=125").nth(1).unwrap_or("");
    assert!(!tmp_listing.contains("blob-"), "a temp blob was left: {so}");
}

#[test]
fn an_export_to_a_full_output_blames_the_output() {
    let k = with_base();
    let out = k
        .cmd()
        .args(["export", "base", "-o", "-"])
        .stdout(fs::File::create("/dev/full").expect("/dev/full"))
        .output()
        .expect("export");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("No space left on device") && err.contains("write export"),
        "{err}"
    );
    assert!(
        !err.contains("blobs/sha256"),
        "a store blob was blamed: {err}"
    );
}

#[test]
fn images_lists_a_broken_image_as_broken() {
    let k = with_base();
    let dir = k.dir.path().join("other");
    fs::create_dir_all(dir.join("etc")).expect("dir");
    fs::write(dir.join("etc/other"), b"x").expect("file");
    k.import(&dir, "other", &[]);
    let v = k.inspect("other");
    let config = v["manifest"]["config"]["digest"].as_str().expect("config");
    fs::remove_file(k.blob(config)).expect("remove config");
    let out = k.run(["images"]);
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{se}");
    let line = so
        .lines()
        .find(|l| l.starts_with("other:latest"))
        .unwrap_or_else(|| panic!("the broken image is not listed: {so}"));
    assert!(line.contains("BROKEN"), "{line}");
    assert!(so.contains("base:latest"), "{so}");
    assert!(se.contains("other:latest is broken"), "no warning: {se}");
    let json: serde_json::Value =
        serde_json::from_str(&k.ok(["images", "--format", "json"])).expect("json");
    let broken: Vec<&str> = json
        .as_array()
        .expect("array")
        .iter()
        .filter(|i| i.get("broken").is_some())
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(broken, vec!["other:latest"]);
}

#[test]
fn kiln_rootfs_prints_the_tree_runs_use() {
    let k = with_base();
    let root = PathBuf::from(k.ok(["rootfs", "base"]).trim());
    k.ok(["run", "base", "true"]);
    let entries = cache_entries(&k);
    assert_eq!(
        entries.len(),
        1,
        "rootfs and run used different trees: {entries:?}"
    );
    assert!(root.starts_with(k.store().join(".kiln/rootfs").join(&entries[0])));
}

#[test]
fn a_store_another_user_owns_is_refused() {
    let k = Kiln::new();
    let theirs = if is_root() {
        // Root working in a user's store would leave root-owned files there.
        let d = k.dir.path().join("users-store");
        fs::create_dir(&d).expect("dir");
        sh(Command::new("chown").arg("65534:65534").arg(&d));
        d
    } else {
        PathBuf::from("/usr")
    };
    let out = Command::new(kiln_bin())
        .arg("--store")
        .arg(&theirs)
        .arg("images")
        .output()
        .expect("kiln");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("not by you") && err.contains("--trust-store"),
        "{err}"
    );
    assert!(
        names(&theirs).iter().all(|n| n != ".kiln"),
        "kiln wrote into it"
    );
}

#[test]
fn a_dangling_store_symlink_and_a_dangling_tag_say_what_to_do() {
    let k = Kiln::new();
    let link = k.dir.path().join("link");
    std::os::unix::fs::symlink(k.dir.path().join("nowhere/store"), &link).expect("symlink");
    let out = Command::new(kiln_bin())
        .arg("--store")
        .arg(&link)
        .arg("images")
        .output()
        .expect("kiln");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not exist") && !err.contains("File exists"),
        "{err}"
    );

    let k = with_base();
    let manifest = k.inspect("base")["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let dir = k.dir.path().join("other");
    fs::create_dir_all(&dir).expect("dir");
    fs::write(dir.join("f"), b"f").expect("file");
    k.import(&dir, "other", &[]);
    fs::remove_file(k.blob(&manifest)).expect("remove manifest");
    let err = k.fails(["gc"]);
    assert!(
        err.contains("base:latest") && err.contains("kiln rm"),
        "gc does not name the broken tag and the fix: {err}"
    );
    k.ok(["rm", "base"]);
    k.ok(["gc"]);
}

#[test]
fn an_unknown_layout_or_store_version_is_refused() {
    let k = with_base();
    let layout = k.store().join("oci-layout");
    let good = fs::read(&layout).expect("oci-layout");
    for bad in [&br#"{"imageLayoutVersion":"2.0.0"}"#[..], b"garbage"] {
        fs::write(&layout, bad).expect("write");
        let err = k.fails(["images"]);
        assert!(err.contains("oci-layout"), "{err}");
    }
    fs::write(&layout, good).expect("restore");
    let version = k.store().join(".kiln/version");
    assert_eq!(fs::read_to_string(&version).expect("version").trim(), "1");
    fs::write(&version, "99\n").expect("write");
    let err = k.fails(["images"]);
    assert!(err.contains("newer kiln"), "{err}");
}

#[test]
fn fsck_repair_rebuilds_an_unreadable_index() {
    let k = with_base();
    let digest = k.inspect("base")["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    fs::write(k.store().join("index.json"), b"{\"manif").expect("damage index");
    k.fails(["fsck"]);
    let out = k.ok(["fsck", "--repair"]);
    assert!(out.contains("recovered"), "{out}");
    let hex = digest.trim_start_matches("sha256:");
    let name = format!("recovered:{}", &hex[..12]);
    assert_eq!(k.ok(["run", &name, "cat", "/etc/hostname"]), "kiln\n");
    let kept = names(&k.store().join(".kiln"));
    assert!(
        kept.iter().any(|n| n.starts_with("index.json.damaged-")),
        "{kept:?}"
    );
}

#[test]
fn a_failed_directory_fsync_after_the_tag_is_written_is_a_warning() {
    let k = with_base();
    // Find the fsync that follows index.json's rename, then fail it.
    let (out, trace) = under_strace(
        &k,
        &["-e", "trace=fsync,rename,renameat,renameat2"],
        &["tag", "base", "probe"],
    );
    assert!(out.status.success());
    let mut n = 0;
    let mut after_rename = None;
    let mut renamed = false;
    for l in trace.lines() {
        if l.starts_with("rename") && l.contains("index.json") {
            renamed = true;
        } else if l.starts_with("fsync(") {
            n += 1;
            if renamed && after_rename.is_none() {
                after_rename = Some(n);
            }
        }
    }
    let when = after_rename.unwrap_or_else(|| panic!("no fsync after the index rename:\n{trace}"));
    let inject = format!("inject=fsync:error=EIO:when={when}");
    let (out, _) = under_strace(
        &k,
        &["-e", "trace=fsync", "-e", &inject],
        &["tag", "base", "other"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the tag was written but kiln failed: {err}"
    );
    assert!(err.contains("power cut"), "no warning: {err}");
    assert!(k.names().contains(&"other:latest".to_string()));
}
