//! What a new user meets first: the command line's behaviour on common
//! mistakes and CI chores (store paths, status files, timeouts, owners,
//! names, messages). Each test pins one finding of the new-user review.

mod common;
use common::*;

use std::fs;
use std::process::Command;

fn with_bb() -> Kiln {
    let k = Kiln::new();
    let tar = busybox_tar(k.dir.path());
    k.import(&tar, "bb", &[]);
    k
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_mistyped_store_path_is_an_error_not_a_new_store() {
    let k = Kiln::new();
    let missing = k.dir.path().join("no/such/store");
    for args in [
        vec!["images"],
        vec!["inspect", "bb"],
        vec!["run", "bb", "true"],
        vec!["export", "bb", "-o", "-"],
        vec!["gc"],
    ] {
        let out = Command::new(kiln_bin())
            .arg("--store")
            .arg(&missing)
            .args(&args)
            .output()
            .expect("kiln");
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert!(
            err.contains("no store at")
                && err.contains("--store")
                && err.contains("does not exist"),
            "{args:?}: {err}"
        );
        assert!(!missing.exists(), "{args:?} created the store");
    }
    // A store path that is a file says so.
    let file = k.dir.path().join("file");
    fs::write(&file, b"x").expect("file");
    let out = Command::new(kiln_bin())
        .arg("--store")
        .arg(&file)
        .args(["import", "-t", "x", "/dev/null"])
        .output()
        .expect("kiln");
    let err = stderr_of(&out);
    assert!(
        err.contains("is not a directory") && !err.contains("File exists"),
        "{err}"
    );
    // A missing image names the store searched and how it was chosen.
    let k = with_bb();
    let err = k.fails(["run", "nosuch", "true"]);
    assert!(
        err.contains("no image named nosuch:latest")
            && err.contains(&k.store().display().to_string())
            && err.contains("chosen by --store"),
        "{err}"
    );
}

#[test]
fn json_status_is_checked_first_and_written_whatever_happens() {
    let k = with_bb();
    let marker = k.dir.path().join("ran");
    fs::create_dir(&marker).expect("marker dir");
    // An unwritable path fails before the command runs.
    let err = k.fails([
        "run",
        "--json-status",
        "/proc/no/status.json",
        "-v",
        &format!("{}:/m", marker.display()),
        "bb",
        "touch",
        "/m/x",
    ]);
    assert!(err.contains("--json-status"), "{err}");
    assert!(!marker.join("x").exists(), "the command ran");
    // kiln's own failure is recorded, with the stage.
    let status = k.dir.path().join("status.json");
    k.fails([
        "run",
        "--json-status",
        &status.display().to_string(),
        "nosuch",
        "true",
    ]);
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(&status).expect("status written")).expect("json");
    assert_eq!(v["exit_code"], 125);
    assert_eq!(v["stage"], "image");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("nosuch")),
        "{v}"
    );
    // Success: milliseconds, not {secs, nanos}.
    k.ok([
        "run",
        "--json-status",
        &status.display().to_string(),
        "bb",
        "true",
    ]);
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(&status).expect("status")).expect("json");
    assert!(v["duration_ms"].is_u64(), "{v}");
    assert!(v.get("duration").is_none(), "{v}");
}

#[test]
fn timeout_sends_sigterm_then_sigkill_after_the_grace_period() {
    let k = with_bb();
    let status = k.dir.path().join("status.json");
    // The command's TERM trap runs.
    let out = k.run([
        "run",
        "--timeout",
        "1",
        "bb",
        "sh",
        "-c",
        "trap 'echo got-term; exit 3' TERM; echo up; while true; do sleep 0.1; done",
    ]);
    assert_eq!(out.status.code(), Some(124), "{}", stderr_of(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "up\ngot-term\n");
    assert!(
        stderr_of(&out).contains("kiln: timed out after 1 s"),
        "{}",
        stderr_of(&out)
    );
    // A command that ignores TERM is killed when the grace period ends.
    let t = std::time::Instant::now();
    let out = k.run([
        "run",
        "--timeout",
        "500ms",
        "--timeout-grace",
        "1s",
        "--json-status",
        &status.display().to_string(),
        "bb",
        "sh",
        "-c",
        "trap '' TERM; while true; do sleep 0.1; done",
    ]);
    assert_eq!(out.status.code(), Some(124));
    assert!(t.elapsed() < std::time::Duration::from_secs(20));
    assert!(
        stderr_of(&out).contains("SIGKILL after 1 s"),
        "{}",
        stderr_of(&out)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(&status).expect("status")).expect("json");
    assert_eq!(v["signal"], 9);
    assert_eq!(v["timed_out"], true);
}

#[test]
fn import_can_give_the_callers_files_to_root() {
    let k = Kiln::new();
    let dir = k.dir.path().join("rootfs");
    fs::create_dir_all(dir.join("etc")).expect("dir");
    fs::write(dir.join("etc/conf"), b"x").expect("file");
    let (uid, gid) = my_ids();
    // Plain: the caller's owners are kept, with a warning for a user.
    let out = k
        .cmd()
        .args(["import", "-t", "plain"])
        .arg(&dir)
        .output()
        .expect("import");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let warned = stderr_of(&out).contains("--map-caller");
    assert_eq!(warned, uid != 0, "{}", stderr_of(&out));
    let owner = |name: &str| {
        let t = tree_of_tar(&k.only_layer(name));
        let n = t.get("etc/conf").expect("etc/conf in the layer");
        (n.uid, n.gid)
    };
    assert_eq!(owner("plain"), (uid, gid));
    k.ok([
        "import",
        "-t",
        "mapped",
        "--map-caller",
        &dir.display().to_string(),
    ]);
    assert_eq!(owner("mapped"), (0, 0));
    k.ok([
        "import",
        "-t",
        "all",
        "--owner",
        "7:8",
        &dir.display().to_string(),
    ]);
    assert_eq!(owner("all"), (7, 8));
    let err = k.fails([
        "import",
        "-t",
        "bad",
        "--owner",
        "root",
        &dir.display().to_string(),
    ]);
    assert!(err.contains("UID:GID"), "{err}");
}

#[test]
fn verbose_runs_log_their_steps() {
    let k = with_bb();
    let out = k.run(["-vv", "run", "bb", "true"]);
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("run: rootfs") && err.contains("id map"),
        "{err}"
    );
    let out = k.run(["run", "bb", "true"]);
    assert!(
        !stderr_of(&out).contains("run: rootfs"),
        "debug events shown by default"
    );
    let dir = k.dir.path().join("d");
    fs::create_dir(&dir).expect("d");
    let out = k
        .cmd()
        .env("KILN_LOG", "debug")
        .args(["import", "-t", "d"])
        .arg(&dir)
        .output()
        .expect("import");
    assert!(
        stderr_of(&out).contains("import: Detected"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn kiln_unshare_removes_what_a_subid_run_left() {
    let k = with_bb();
    let ws = k.dir.path().join("ws");
    fs::create_dir(&ws).expect("ws");
    // Writable by the sandbox's uid 1000 (a subordinate uid on the host).
    fs::set_permissions(&ws, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod ws");
    let user = if id_mapping() == "subids" {
        "1000"
    } else {
        "0"
    };
    k.ok([
        "run",
        "--user",
        user,
        "-v",
        &format!("{}:/ws", ws.display()),
        "bb",
        "sh",
        "-c",
        "mkdir /ws/out && echo x > /ws/out/f && chmod 700 /ws/out",
    ]);
    if id_mapping() == "subids" {
        // Owned by a subordinate uid: the caller cannot remove it.
        assert!(fs::remove_dir_all(ws.join("out")).is_err());
    }
    let out = k
        .cmd()
        .args(["unshare", "rm", "-rf"])
        .arg(ws.join("out"))
        .output()
        .expect("unshare");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(!ws.join("out").exists());
    let out = k.run(["unshare", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    let out = k.run(["unshare", "no-such-program"]);
    assert_eq!(out.status.code(), Some(127));
}

#[test]
fn names_follow_the_reference_grammar() {
    let k = Kiln::new();
    let dir = k.dir.path().join("d");
    fs::create_dir(&dir).expect("d");
    let err = k.fails(["import", "-t", "My_Image:V1", &dir.display().to_string()]);
    assert!(err.contains("lowercase"), "{err}");
    k.ok(["import", "-t", "my_image:V1", &dir.display().to_string()]);
    k.ok([
        "import",
        "-t",
        "reg.example.com:5000/team/tool:1.0",
        &dir.display().to_string(),
    ]);
}

#[test]
fn commit_leaves_out_the_mount_points_kiln_made() {
    let k = with_bb();
    let vol = k.dir.path().join("vol");
    fs::create_dir(&vol).expect("vol");
    k.ok([
        "run",
        "-v",
        &format!("{}:/mnt/deep/vol", vol.display()),
        "-w",
        "/newwd",
        "--commit",
        "out",
        "bb",
        "sh",
        "-c",
        "echo x > /made; echo y > /mnt/deep/vol/on-host",
    ]);
    let t = tree_of_tar(&k.top_layer("out"));
    let paths: Vec<&String> = t.keys().collect();
    assert!(t.contains_key("made"), "{paths:?}");
    for p in ["mnt", "mnt/deep", "mnt/deep/vol", "newwd"] {
        assert!(!t.contains_key(p), "{p} baked into the layer: {paths:?}");
    }
    assert!(vol.join("on-host").exists());
    // A working directory the command wrote into stays.
    k.ok([
        "run",
        "-w",
        "/build",
        "--commit",
        "out2",
        "bb",
        "sh",
        "-c",
        "echo z > out.txt",
    ]);
    let t = tree_of_tar(&k.top_layer("out2"));
    assert!(
        t.contains_key("build/out.txt"),
        "{:?}",
        t.keys().collect::<Vec<_>>()
    );
}

#[test]
fn export_refuses_a_terminal_and_a_directory() {
    let k = with_bb();
    let err = k.fails(["export", "bb", "-o", &k.dir.path().display().to_string()]);
    assert!(err.contains("is a directory"), "{err}");
    // A terminal: run under `script`, which gives kiln a pty as stdout.
    let text = on_a_terminal(&k, "", "export bb -o -; echo rc=$?");
    assert!(
        text.contains("stdout is a terminal") && text.contains("rc=125"),
        "{text}"
    );
}

#[test]
fn messages_say_what_to_do() {
    let k = with_bb();
    let out = k.run(["run", "bb", "nosuchcmd"]);
    assert_eq!(out.status.code(), Some(127));
    let err = stderr_of(&out);
    assert!(
        err.contains("kiln: error: exec nosuchcmd: not found in the image's PATH (/usr/local/sbin"),
        "{err}"
    );
    let err = k.fails(["run", "bb"]);
    assert!(err.contains("kiln run bb -- sh"), "{err}");
    assert!(!err.contains("run spec"), "{err}");
    if !is_root() {
        // Root maps every id; a user's sandbox maps a range, and says which.
        let err = k.fails(["run", "--user", "5000000", "bb", "true"]);
        assert!(
            err.contains("5000000") && (err.contains("maps uids") || err.contains("subuid")),
            "{err}"
        );
    }
    assert!(k.ok(["images"]).contains("COMPRESSED"));
    let err = k.fails(["run", "sha256:abc123", "true"]);
    assert!(err.contains("at least 12 hex digits"), "{err}");
}

#[test]
fn require_limits_turns_the_cgroup_warning_into_an_error() {
    let k = with_bb();
    let out = k.run(["run", "--memory", "1g", "bb", "true"]);
    let enforceable = !stderr_of(&out).contains("ignored");
    let out = k.run(["run", "--require-limits", "--memory", "1g", "bb", "true"]);
    if enforceable {
        assert!(out.status.success(), "{}", stderr_of(&out));
    } else {
        assert_eq!(out.status.code(), Some(125));
        assert!(
            stderr_of(&out).contains("--require-limits"),
            "{}",
            stderr_of(&out)
        );
    }
}

#[test]
fn durations_take_units() {
    let k = with_bb();
    let err = k.fails(["run", "--timeout", "soon", "bb", "true"]);
    assert!(err.contains("not a duration"), "{err}");
    k.ok(["run", "--timeout", "5m", "bb", "true"]);
}

#[test]
fn shell_completions_are_generated() {
    let k = Kiln::new();
    let bash = k.ok(["completions", "bash"]);
    assert!(
        bash.contains("_kiln()") && bash.contains("--json-status"),
        "{}",
        &bash[..200.min(bash.len())]
    );
    assert!(k.ok(["completions", "zsh"]).contains("#compdef kiln"));
}

#[test]
fn man_pages_are_written_for_every_command() {
    let k = Kiln::without_store();
    let dir = k.dir.path().join("man1");
    k.ok(["man", dir.to_str().expect("utf-8")]);
    let mut pages: Vec<String> = std::fs::read_dir(&dir)
        .expect("man dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    for want in ["kiln.1", "kiln-run.1", "kiln-import.1", "kiln-probe.1"] {
        assert!(pages.iter().any(|p| p == want), "{want} missing: {pages:?}");
    }
    let run = std::fs::read_to_string(dir.join("kiln-run.1")).expect("kiln-run.1");
    assert!(run.contains(".TH kiln-run"), "{run:.200}");
    assert!(run.contains("timeout\\-grace"), "{run:.400}");
    // No store was needed, and none was made.
    assert!(!k.dir.path().join("store").exists());
}

#[test]
fn user_names_come_from_the_images_passwd() {
    let k = with_bb();
    if is_root() || id_mapping() == "subids" {
        assert_eq!(
            k.ok(["run", "--user", "nobody", "bb", "id", "-u"]),
            "65534\n"
        );
        assert_eq!(
            k.ok(["run", "--user", "nobody:root", "bb", "id", "-g"]),
            "0\n"
        );
    }
    let err = k.fails(["run", "--user", "nosuchuser", "bb", "true"]);
    assert!(
        err.contains("no user \"nosuchuser\" in the image's /etc/passwd"),
        "{err}"
    );
}

#[test]
fn probe_says_what_a_non_disk_input_is() {
    let k = Kiln::new();
    let tar = busybox_tar(k.dir.path());
    let dir = k.dir.path().join("rootfs");
    fs::create_dir(&dir).expect("dir");
    let gz = k.dir.path().join("busybox.tar.gz");
    fs::write(&gz, gzip(&fs::read(&tar).expect("tar"))).expect("gz");
    let noise = k.dir.path().join("noise");
    fs::write(&noise, vec![0x5a; 200_000]).expect("noise");
    for (input, want) in [
        (&tar, "a tar archive: kiln import reads it directly"),
        (&gz, "a compressed (Gzip) tar archive"),
        (&dir, "a directory without disk chunks"),
        (
            &noise,
            "is not a disk image, partition table or file system kiln knows",
        ),
    ] {
        let err = k.fails(["probe", &input.display().to_string()]);
        assert!(err.contains(want), "{}: {err}", input.display());
    }
}

/// A disk image on stdin cannot be read (the readers seek): the error says
/// to import the file, and nothing is tagged.
#[test]
fn a_disk_image_on_stdin_says_to_import_the_file() {
    require("qemu-img");
    let k = Kiln::new();
    let img = k.dir.path().join("disk.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M"));
    let out = k
        .cmd()
        .args(["import", "-", "-t", "fromstdin"])
        .stdin(std::fs::File::open(&img).expect("open the image"))
        .output()
        .expect("spawn kiln");
    assert_eq!(out.status.code(), Some(125));
    let err = stderr_of(&out);
    assert!(
        err.contains("a qcow2 disk image") && err.contains("read from a file, not a stream"),
        "{err}"
    );
    assert!(!err.contains("not implemented"), "{err}");
    assert!(!k.ok(["images"]).contains("fromstdin"));
}
