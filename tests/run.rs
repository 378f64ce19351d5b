//! `kiln run`: the rootless namespace sandbox, checked from inside and from
//! the host. Every test runs as root and as unprivileged users in CI.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?")
}

#[test]
fn inside_the_sandbox_privileges_are_gone() {
    let k = with_busybox();
    let (code, out, err) = run_sh(&k, &[], "cat /proc/self/status");
    assert_eq!(code, 0, "{err}");
    for cap in ["CapEff:", "CapPrm:", "CapBnd:", "CapInh:", "CapAmb:"] {
        assert_eq!(
            status_field(&out, cap),
            "0000000000000000",
            "{cap} in\n{out}"
        );
    }
    assert_eq!(status_field(&out, "NoNewPrivs:"), "1");
    // mount, unshare and module loading are refused.
    let (code, _, _) = run_sh(&k, &[], "mount -t tmpfs none /mnt");
    assert_ne!(code, 0, "mount succeeded inside the sandbox");
    let (code, _, _) = run_sh(&k, &[], "unshare -r true || unshare -m true");
    assert_ne!(code, 0, "unshare succeeded inside the sandbox");
    let (code, _, _) = run_sh(&k, &[], "insmod /nonexistent.ko; modprobe dummy");
    assert_ne!(code, 0, "module loading succeeded");
}

#[test]
fn namespaces_hostname_network_and_pid_1() {
    let k = with_busybox();
    let (code, out, err) = run_sh(
        &k,
        &[],
        "hostname; cat /proc/1/comm; echo $$; ls /sys/class/net; id -u",
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "kiln", "{out}");
    assert_eq!(lines[1], "kiln-init", "PID 1 is not kiln's init: {out}");
    assert_ne!(lines[2], "1", "the command must not be PID 1");
    assert_eq!(lines[3], "lo", "--network none must leave only lo: {out}");
    assert_eq!(lines[4], "0");
    let (code, out, _) = run_sh(
        &k,
        &["--hostname", "builder-7"],
        "hostname; cat /sys/class/net/lo/operstate /sys/class/net/lo/flags",
    );
    assert_eq!(code, 0);
    assert!(out.starts_with("builder-7\n"), "{out}");
    // lo is up (IFF_UP = 0x1).
    let flags = out.lines().nth(2).unwrap_or("0x0");
    assert_eq!(
        u32::from_str_radix(flags.trim_start_matches("0x"), 16).unwrap_or(0) & 1,
        1,
        "{out}"
    );
    // --network host shares the host's interfaces.
    let host_ifaces = fs::read_dir("/sys/class/net").expect("read").count();
    let (code, out, _) = run_sh(&k, &["--network", "host"], "ls /sys/class/net | wc -l");
    assert_eq!(code, 0);
    assert_eq!(out.trim().parse::<usize>().unwrap_or(0), host_ifaces);
}

#[test]
fn host_files_stay_invisible_and_binds_respect_ro() {
    let k = with_busybox();
    let secret = k.dir.path().join("host-secret");
    fs::write(&secret, "secret\n").expect("write");
    let (code, out, _) = run_sh(
        &k,
        &[],
        &format!(
            "cat {} 2>&1; ls /root /home 2>&1; echo done",
            secret.display()
        ),
    );
    assert_eq!(code, 0);
    assert!(!out.contains("secret\n"), "host file visible: {out}");
    let ro = k.dir.path().join("ro");
    let rw = k.dir.path().join("rw");
    fs::create_dir(&ro).expect("mkdir");
    fs::create_dir(&rw).expect("mkdir");
    fs::write(ro.join("input"), "in\n").expect("write");
    let flags = [
        "-v".to_string(),
        format!("{}:/src:ro", ro.display()),
        "-v".to_string(),
        format!("{}:/out", rw.display()),
        "-w".to_string(),
        "/out".to_string(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (code, out, err) = run_sh(
        &k,
        &flags,
        "cat /src/input; touch /src/x 2>&1 && echo WROTE-RO; pwd; cp /src/input result",
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("in\n") && !out.contains("WROTE-RO") && out.contains("/out"),
        "{out}"
    );
    assert!(!ro.join("x").exists());
    assert_eq!(
        fs::read_to_string(rw.join("result")).expect("result"),
        "in\n"
    );
    // --read-only root.
    let (code, out, _) = run_sh(
        &k,
        &["--read-only"],
        "touch /newfile 2>&1 && echo WROTE; echo ok > /tmp/t && cat /tmp/t",
    );
    assert_eq!(code, 0);
    assert!(!out.contains("WROTE") && out.contains("ok"), "{out}");
    // Writes to the root go to the run's overlay, never to the image.
    let (code, _, _) = run_sh(&k, &[], "echo changed > /etc/hostname && rm /bin/ls");
    assert_eq!(code, 0);
    let (_, out, _) = run_sh(&k, &[], "cat /etc/hostname; ls /bin/ls");
    assert!(
        out.contains("kiln\n") && out.contains("/bin/ls"),
        "a run's writes leaked into the image: {out}"
    );
}

#[test]
fn symlinks_in_the_image_cannot_redirect_binds_or_writes_to_the_host() {
    let k = Kiln::new();
    let host_dir = k.dir.path().join("host-target");
    fs::create_dir(&host_dir).expect("mkdir");
    let bb = busybox_tar(k.dir.path());
    k.import(&bb, "bb", &[]);
    // An image layer with absolute symlinks to a host path.
    let extra = TarMaker::new()
        .symlink("evil", host_dir.to_str().expect("utf8"))
        .symlink("evil-file", &format!("{}/f", host_dir.display()))
        .finish();
    let et = k.dir.path().join("evil.tar");
    fs::write(&et, extra).expect("write");
    k.import(&et, "evil-only", &[]);
    // Stack it on busybox with umoci so the image has both layers.
    with_extra_layer(&k, "bb:latest", &fs::read(&et).expect("read"), "bb");
    let src = k.dir.path().join("vol");
    fs::create_dir(&src).expect("mkdir");
    let flags = ["-v".to_string(), format!("{}:/evil/mnt", src.display())];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (code, _, err) = run_sh(
        &k,
        &flags,
        "echo via-bind > /evil/mnt/a; echo via-link > /evil-file; echo more > /evil/b",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        fs::read_to_string(src.join("a")).expect("bind target"),
        "via-bind\n"
    );
    let leaked: Vec<_> = fs::read_dir(&host_dir)
        .expect("read")
        .map(|e| e.expect("e").file_name())
        .collect();
    assert!(
        leaked.is_empty(),
        "writes escaped to the host through image symlinks: {leaked:?}"
    );
}

#[test]
fn exit_codes_follow_the_container_convention() {
    let k = with_busybox();
    for (script, want) in [
        ("exit 0", 0),
        ("exit 1", 1),
        ("exit 42", 42),
        ("kill -9 $$", 137),
        ("kill -15 $$", 143),
    ] {
        let (code, _, err) = run_sh(&k, &[], script);
        assert_eq!(code, want, "{script}: {err}");
    }
    let (code, _, _) = run_sh(&k, &["--timeout", "0.5"], "sleep 30");
    assert_eq!(code, 124);
    let out = k.run(["run", "bb", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("No such file"));
    let out = k.run(["run", "bb", "no-such-command-on-path"]);
    assert_eq!(out.status.code(), Some(127));
    let out = k.run(["run", "bb", "/etc/passwd"]);
    assert_eq!(out.status.code(), Some(126));
    // kiln's own failures are 125.
    let out = k.run(["run", "no-such-image", "true"]);
    assert_eq!(out.status.code(), Some(125));
    // --json-status records the result.
    let status = k.dir.path().join("status.json");
    let out = k.run([
        "run",
        "--json-status",
        status.to_str().expect("utf8"),
        "bb",
        "sh",
        "-c",
        "exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5));
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(&status).expect("status")).expect("json");
    assert_eq!(v["exit_code"], 5);
    assert!(v["image_digest"]
        .as_str()
        .is_some_and(|d| d.starts_with("sha256:")));
}

#[test]
fn sigterm_to_kiln_reaches_the_commands_trap() {
    let k = with_busybox();
    let mut child = k
        .cmd()
        .args([
            "run",
            "bb",
            "sh",
            "-c",
            "trap 'echo got-term; exit 7' TERM; echo ready; while true; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("ready"));
    sh(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let st = child.wait().expect("wait");
    assert_eq!(st.code(), Some(7), "output after TERM: {rest:?}");
    assert!(rest.iter().any(|l| l == "got-term"), "{rest:?}");
}

fn processes_with(marker: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").expect("proc").flatten() {
        if let Ok(c) = fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(marker) {
                out.push(format!("{}: {c}", e.file_name().to_string_lossy()));
            }
        }
    }
    out
}

fn mounts() -> Vec<String> {
    let mut m: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .map(|l| l.split(' ').skip(4).take(1).collect())
        .collect();
    m.sort();
    m
}

fn loop_devices() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir("/sys/block")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name().to_string_lossy().starts_with("loop")
                        && e.path().join("loop/backing_file").exists()
                })
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn two_hundred_runs_leave_nothing_behind_even_when_kiln_is_killed() {
    let k = with_busybox();
    k.ok(["run", "bb", "true"]); // unpack once
    let mounts_before = mounts();
    let loops_before = loop_devices();
    let marker = format!("sleep 31{}", std::process::id() % 1000);
    let started = Instant::now();
    for i in 0..200 {
        // Every other block of 20 runs keeps its upper layer on disk (a run
        // directory to clean up), the rest in memory (nothing on disk).
        let upper = if i == 199 || (i / 20) % 2 == 1 {
            "disk"
        } else {
            "memory"
        };
        match if i == 199 { 0 } else { i % 20 } {
            // SIGKILL kiln mid-run: init and the command must die with it
            // (also the very last run, whose directory gc then removes).
            0 => {
                let mut c = k
                    .cmd()
                    .args(["run", "--upper", upper, "bb", "sh", "-c"])
                    .arg(format!("echo up; {marker}"))
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("spawn");
                let mut line = String::new();
                BufReader::new(c.stdout.take().expect("stdout"))
                    .read_line(&mut line)
                    .expect("read");
                assert_eq!(line, "up\n");
                c.kill().expect("SIGKILL kiln");
                c.wait().expect("wait");
            }
            // Runs that time out.
            1 => {
                let out = k.run([
                    "run",
                    "--upper",
                    upper,
                    "--timeout",
                    "0.2",
                    "bb",
                    "sh",
                    "-c",
                    &marker,
                ]);
                assert_eq!(out.status.code(), Some(124));
            }
            _ => {
                let out = k.run([
                    "run",
                    "--upper",
                    upper,
                    "bb",
                    "sh",
                    "-c",
                    "echo x > /tmp/x; echo y > /y",
                ]);
                assert_eq!(
                    out.status.code(),
                    Some(0),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    // Killed sandboxes die asynchronously (PDEATHSIG chain); give them a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_with(&marker).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        processes_with(&marker),
        Vec::<String>::new(),
        "processes survived"
    );
    // No helper or init of this store survived either (their environment
    // carries the sandbox configuration, which names the store).
    let store = k.store().display().to_string();
    let leftovers: Vec<String> = processes_with("__sandbox-init")
        .into_iter()
        .filter(|p| {
            let pid = p.split(':').next().unwrap_or("");
            fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|e| String::from_utf8_lossy(&e).contains(&store))
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "sandbox helpers survived: {leftovers:?}"
    );
    assert_eq!(mounts(), mounts_before, "host mounts changed");
    assert_eq!(loop_devices(), loops_before, "loop devices changed");
    // `kiln gc` (or the next run) reaps the run directories SIGKILLed runs left.
    let gc: serde_json::Value =
        serde_json::from_str(&k.ok(["gc", "--format", "json"])).expect("json");
    assert!(gc["runs_removed"].as_u64().unwrap_or(0) >= 1, "{gc}");
    k.ok(["run", "bb", "true"]);
    let runs: Vec<_> = fs::read_dir(k.store().join(".kiln/runs"))
        .expect("runs")
        .collect();
    assert!(runs.is_empty(), "run directories left: {runs:?}");
    eprintln!("200 runs in {:?}", started.elapsed());
}

/// Starts `kiln run [FLAGS] bb` writing to its root and then waiting;
/// returns the running kiln once the write is done and what the store's
/// run directory held at that moment.
fn store_runs_while_running(k: &Kiln, flags: &[&str]) -> (std::process::Child, Vec<String>) {
    let v = tempfile::tempdir_in(k.dir.path()).expect("tempdir");
    let mut c = k
        .cmd()
        .arg("run")
        .args(flags)
        .arg("-v")
        .arg(format!("{}:/v", v.path().display()))
        .args(["bb", "sh", "-c"])
        .arg("head -c 100000 /dev/zero > /etc/big && touch /v/started && sleep 30")
        .spawn()
        .expect("spawn kiln");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !v.path().join("started").exists() {
        assert!(Instant::now() < deadline, "the sandbox never started");
        if let Ok(Some(st)) = c.try_wait() {
            panic!("kiln ended early: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let runs = fs::read_dir(k.store().join(".kiln/runs"))
        .expect("runs dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    (c, runs)
}

#[test]
fn the_upper_layer_is_in_memory_by_default_and_on_disk_when_asked() {
    let k = with_busybox();
    k.ok(["run", "bb", "true"]); // unpack once
                                 // Default: a tmpfs only the sandbox sees; the store has no run directory
                                 // even while the run writes to its root, and SIGKILL leaves nothing.
    let (mut c, runs) = store_runs_while_running(&k, &[]);
    assert!(runs.is_empty(), "a memory run made {runs:?}");
    let big = Command::new("find")
        .arg(k.store())
        .args(["-name", "big"])
        .output()
        .expect("find");
    assert!(big.stdout.is_empty(), "the run's write reached the store");
    c.kill().expect("SIGKILL kiln");
    c.wait().expect("wait");
    assert_eq!(
        fs::read_dir(k.store().join(".kiln/runs"))
            .expect("runs dir")
            .count(),
        0
    );
    // --upper disk: a locked run directory holds the writes; after SIGKILL
    // the next run reaps it.
    let (mut c, runs) = store_runs_while_running(&k, &["--upper", "disk"]);
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert!(runs[0].starts_with("run-"), "{runs:?}");
    let big = k
        .store()
        .join(".kiln/runs")
        .join(&runs[0])
        .join("upper/etc/big");
    // The caller is root inside (or its uid is), so it owns what the run
    // wrote there.
    assert_eq!(fs::metadata(&big).expect("the write on disk").len(), 100000);
    c.kill().expect("SIGKILL kiln");
    c.wait().expect("wait");
    // kiln held the run directory's lock; once it is dead the next run
    // reaps the directory (the dying sandbox, PDEATHSIG being
    // asynchronous, may still hold files there for a moment: retried).
    let runs_left = || {
        fs::read_dir(k.store().join(".kiln/runs"))
            .expect("runs dir")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        k.ok(["run", "bb", "true"]);
        if runs_left() == 0 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        runs_left(),
        0,
        "the killed disk run's directory was not reaped"
    );
    // Memory and --commit do not mix; auto picks disk for --commit.
    let out = k.run(["run", "--upper", "memory", "--commit", "x", "bb", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--commit needs the upper layer on disk"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    k.ok(["run", "--commit", "bb-y", "bb", "sh", "-c", "echo y > /y"]);
    assert_eq!(k.ok(["run", "bb-y", "cat", "/y"]), "y\n");
}

#[test]
fn the_command_starts_with_default_signal_dispositions() {
    // kiln (Rust) ignores SIGPIPE; ignored signals would survive exec.
    let k = with_busybox();
    let out = k.ok([
        "run",
        "bb",
        "grep",
        "-E",
        "^Sig(Ign|Blk)",
        "/proc/self/status",
    ]);
    assert_eq!(
        out,
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
    );
    // So a pipe's writer dies quietly when its reader is done.
    let (code, out, err) = run_sh(&k, &[], "set -o pipefail; yes | head -n 1");
    assert_eq!((code, out.as_str()), (141, "y\n"), "{err}");
}

#[test]
fn sixteen_concurrent_runs_with_a_first_time_unpack() {
    let k = with_busybox();
    let children: Vec<_> = (0..16)
        .map(|i| {
            k.cmd()
                .args([
                    "run",
                    "bb",
                    "sh",
                    "-c",
                    &format!("echo {i} > /tmp/me; cat /tmp/me; ls /bin/busybox >/dev/null"),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "run {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{i}\n"));
    }
    let caches: Vec<_> = fs::read_dir(k.store().join(".kiln/rootfs"))
        .expect("rootfs")
        .flatten()
        .collect();
    assert_eq!(caches.len(), 1, "the image was unpacked more than once");
    assert!(Path::new(&k.store().join(".kiln/runs"))
        .read_dir()
        .expect("runs")
        .next()
        .is_none());
}

#[test]
fn seccomp_filter_is_on_by_default_and_blocks_nested_user_namespaces() {
    let k = with_busybox();
    let (code, out, _) = run_sh(&k, &[], "grep Seccomp: /proc/self/status");
    assert_eq!(code, 0);
    assert_eq!(status_field(&out, "Seccomp:"), "2", "{out}");
    let (code, _, err) = run_sh(&k, &[], "unshare -U true");
    assert_ne!(code, 0, "nested user namespace allowed by default");
    assert!(err.contains("not permitted"), "{err}");
    // The filter, not missing privileges, is what said no: allowing nested
    // user namespaces makes the same call work.
    let (code, _, err) = run_sh(&k, &["--allow-userns"], "unshare -U true");
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run_sh(
        &k,
        &["--seccomp", "unconfined"],
        "grep Seccomp: /proc/self/status",
    );
    assert_eq!(code, 0);
    assert_eq!(status_field(&out, "Seccomp:"), "0");
}

#[test]
fn stdin_is_closed_unless_interactive() {
    let k = with_busybox();
    let c = k
        .cmd()
        .args(["run", "bb", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Without -i the command reads /dev/null and ends at once, whatever we send.
    let out = c.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    let mut c = k
        .cmd()
        .args(["run", "-i", "bb", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    {
        use std::io::Write;
        let mut stdin = c.stdin.take().expect("stdin");
        stdin.write_all(b"through stdin\n").expect("write");
    }
    let out = c.wait_with_output().expect("wait");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "through stdin\n");
}

#[test]
fn commit_round_trip_adds_changes_and_deletes() {
    commit_round_trip("overlay");
}

#[test]
fn fuse_overlayfs_backend_runs_commits_and_leaves_no_daemon() {
    require("fuse-overlayfs");
    let k = with_busybox();
    let (code, out, err) = run_sh(
        &k,
        &["--rootfs", "fuse-overlay"],
        "grep -c fuse /proc/mounts; echo x > /etc/new && cat /etc/new",
    );
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_err()
    {
        // This user may not use FUSE here (/dev/fuse is 0600 root on these
        // hosts): a clear error naming the device; the default root (kernel
        // overlayfs) is unaffected.
        assert_eq!(code, 125, "{err}");
        assert!(err.contains("/dev/fuse"), "{err}");
        let (code, out, err) = run_sh(&k, &[], "echo auto");
        assert_eq!((code, out.as_str()), (0, "auto\n"), "{err}");
        return;
    }
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "1\nx\n", "not on fuse-overlayfs: {out}");
    let (_, out, _) = run_sh(&k, &[], "ls /etc/new 2>&1 || true");
    assert!(
        out.contains("No such file"),
        "a fuse run changed the image: {out}"
    );
    // Its daemon lived in the sandbox's pid namespace and died with it.
    let store = k.store().display().to_string();
    let left: Vec<String> = processes_with("fuse-overlayfs")
        .into_iter()
        .filter(|p| p.contains(&store))
        .collect();
    assert!(left.is_empty(), "fuse-overlayfs left running: {left:?}");
    // --commit reads fuse-overlayfs's whiteouts and opaque markers.
    commit_round_trip("fuse-overlay");
}

fn commit_round_trip(rootfs: &str) {
    let k = with_busybox();
    let script = "echo new > /etc/added && echo changed > /etc/hostname && rm /etc/group && rm -rf /var/tmp \
                  && rm -rf /home && mkdir /home && echo f > /home/fresh && mkdir -p /opt/tool && ln /etc/added /opt/tool/link";
    let (code, _, err) = run_sh(
        &k,
        &[
            "--rootfs",
            rootfs,
            "--commit",
            "bb-plus:1",
            "--source-date-epoch",
            "1700000000",
        ],
        script,
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("committed bb-plus:1"), "{err}");
    let v = k.inspect("bb-plus:1");
    assert_eq!(v["manifest"]["layers"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        v["config"]["rootfs"]["diff_ids"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(v["config"]["created"], "2023-11-14T22:13:20Z");
    // The new layer, as OCI: whiteouts, an opaque directory, root-owned files.
    let top = k.blob(
        v["manifest"]["layers"][1]["digest"]
            .as_str()
            .expect("digest"),
    );
    let layer = tree_of_tar(&top);
    for p in [
        "etc/added",
        "etc/.wh.group",
        "var/.wh.tmp",
        "home/.wh..wh..opq",
        "home/fresh",
        "opt/tool/link",
    ] {
        assert!(
            layer.contains_key(p),
            "{p} missing from the committed layer: {:?}",
            layer.keys().collect::<Vec<_>>()
        );
    }
    assert!(
        layer.values().all(|n| n.uid == 0 && n.gid == 0),
        "owners not mapped to root"
    );
    assert!(
        layer.values().all(|n| n.mtime <= 1_700_000_000),
        "mtimes not clamped"
    );
    assert_ne!(layer["opt/tool/link"].hardlink_group, 0, "hardlink lost");
    // The new image runs with the changes...
    let out = k.run([
        "run",
        "bb-plus:1",
        "sh",
        "-c",
        "cat /etc/added /etc/hostname /home/fresh; ls /etc/group /var/tmp 2>&1; ls /home",
    ]);
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(s.starts_with("new\nchanged\nf\n"), "{s}");
    assert!(
        s.contains("/etc/group: No such file") && s.contains("/var/tmp: No such file"),
        "{s}"
    );
    assert!(
        s.ends_with("fresh\n"),
        "opaque /home still shows lower files: {s}"
    );
    // ...and umoci agrees.
    require("umoci");
    let bundle = k.dir.path().join("bundle");
    let mut c = Command::new("umoci");
    c.arg("unpack");
    if !is_root() {
        c.arg("--rootless");
    }
    sh(c.arg("--image")
        .arg(format!("{}:bb-plus:1", k.store().display()))
        .arg(&bundle));
    let root = bundle.join("rootfs");
    assert_eq!(
        fs::read_to_string(root.join("etc/added")).expect("added"),
        "new\n"
    );
    assert!(!root.join("etc/group").exists() && !root.join("var/tmp").exists());
    let home: Vec<_> = fs::read_dir(root.join("home"))
        .expect("home")
        .map(|e| e.expect("e").file_name())
        .collect();
    assert_eq!(home, vec![std::ffi::OsString::from("fresh")]);
    // A failed command commits nothing.
    let (code, _, err) = run_sh(&k, &["--commit", "never"], "touch /x; exit 3");
    assert_eq!(code, 3);
    assert!(err.contains("not committed"), "{err}");
    assert!(!k.names().contains(&"never:latest".to_string()));
}

#[test]
fn cap_add_keeps_one_capability() {
    let k = with_busybox();
    let (code, _, _) = run_sh(&k, &[], "chroot / true");
    assert_ne!(code, 0, "chroot worked without CAP_SYS_CHROOT");
    let (code, out, err) = run_sh(
        &k,
        &["--cap-add", "CAP_SYS_CHROOT"],
        "chroot / true && grep CapEff /proc/self/status",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(status_field(&out, "CapEff:"), "0000000000040000");
    let err = k.fails(["run", "--cap-add", "CAP_NOPE", "bb", "true"]);
    assert!(err.contains("unknown capability"), "{err}");
}

#[test]
fn user_flag_and_ulimits() {
    let k = with_busybox();
    let (code, out, err) = run_sh(&k, &["--user", "1000:1000"], "id -u; id -g");
    if id_mapping() == "caller" {
        // Without a subid range only the caller is mapped: a clear error
        // that names the missing /etc/subuid entry.
        assert_eq!(code, 125);
        assert!(err.contains("not mapped"), "{err}");
        assert!(err.contains("/etc/subuid"), "{err}");
    } else {
        // Real root maps every id; a subid range maps 1..=65536.
        assert_eq!((code, out.as_str()), (0, "1000\n1000\n"), "{err}");
    }
    // --userns self never maps other ids, even with a range.
    if !is_root() {
        let (code, _, err) = run_sh(&k, &["--userns", "self", "--user", "1000"], "id -u");
        assert_eq!(code, 125, "{err}");
        assert!(err.contains("maps only the caller"), "{err}");
    }
    let (code, out, err) = run_sh(&k, &["--ulimit", "nofile=100:200"], "ulimit -n; ulimit -Hn");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "100\n200\n");
    let hard = fs::read_to_string("/proc/self/limits")
        .expect("limits")
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
        .expect("nofile hard");
    let too_high = hard.parse::<u64>().map(|h| h + 1).unwrap_or(u64::MAX);
    let err = k.fails([
        "run",
        "--ulimit",
        &format!("nofile=100:{too_high}"),
        "bb",
        "true",
    ]);
    assert!(
        err.contains("above the current hard limit") && err.contains("CAP_SYS_RESOURCE"),
        "{err}"
    );
}

#[test]
fn cgroup_limits_degrade_to_one_warning() {
    // These hosts delegate no cgroup v2 controller: the run goes on and says so.
    let k = with_busybox();
    let (code, out, err) = run_sh(
        &k,
        &["--memory", "100000000", "--pids-limit", "64"],
        "echo ran",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "ran\n");
    assert_eq!(err.matches("warning").count(), 1, "{err}");
    assert!(err.contains("--memory/--pids-limit ignored"), "{err}");
}

#[test]
fn userns_keep_id_keeps_the_callers_ids() {
    let k = with_busybox();
    let (uid, gid) = my_ids();
    let (code, out, err) = run_sh(
        &k,
        &["--userns", "keep-id"],
        "id -u; id -g; touch /tmp/ok && echo writable",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("{uid}\n{gid}\nwritable\n"));
    let (_, out, _) = run_sh(&k, &[], "id -u");
    assert_eq!(out, "0\n", "the default maps the caller to root");
}

#[test]
fn rootfs_copy_fallback_runs_and_refuses_commit() {
    let k = with_busybox();
    let (code, out, err) = run_sh(
        &k,
        &["--rootfs-copy"],
        "echo x > /etc/new && cat /etc/new && ls /bin/busybox",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "x\n/bin/busybox\n");
    let (_, out, _) = run_sh(&k, &[], "ls /etc/new 2>&1 || true");
    assert!(
        out.contains("No such file"),
        "a copy run changed the image: {out}"
    );
    let err = k.fails(["run", "--rootfs", "copy", "--commit", "c", "bb", "true"]);
    assert!(err.contains("--commit needs an overlay"), "{err}");
}

#[test]
fn image_owners_chown_and_commit_follow_the_id_mapping() {
    // An image with many owners: what the command sees depends on how much
    // of the id space the caller can map (identity as root, 65536 subids,
    // or only itself).
    let k = with_busybox();
    let layer = TarMaker::new()
        .owned("etc/shadow", false, 0o640, (0, 42), b"s\n")
        .owned("home/u", true, 0o755, (1000, 1000), b"")
        .owned("home/u/f", false, 0o644, (1000, 1000), b"f\n")
        .owned("far", false, 0o644, (70000, 70000), b"far\n")
        .finish();
    with_extra_layer(&k, "bb:latest", &layer, "multi");
    let stat = "stat -c %u:%g /etc/shadow /home/u/f /far | tr '\\n' ' '";
    let run = |flags: &[&str], image: &str, script: &str| {
        let mut args = vec!["run"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[image, "sh", "-c", script]);
        let out = k.run(&args);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&[], "multi", stat);
    assert_eq!(code, 0, "{err}");
    let mapping = id_mapping();
    let want = match mapping {
        "identity" => "0:42 1000:1000 70000:70000 ",
        // 70000 is beyond the 65536 subids: kept in user.rootlesscontainers.
        "subids" => "0:42 1000:1000 0:0 ",
        _ => "0:0 0:0 0:0 ",
    };
    assert_eq!(out, want, "owners inside with the {mapping} mapping");
    // --userns self is the caller-only view even with a range.
    let (_, out, err) = run(&["--userns", "self"], "multi", stat);
    if !is_root() {
        assert_eq!(out, "0:0 0:0 0:0 ", "{err}");
    }

    // chown (with CAP_CHOWN kept) works for mapped ids, and --commit keeps
    // the owners, also of files the caller cannot read on the host.
    let script = "chown 1234:1235 /home/u/f && mkdir /secret && echo s > /secret/s \
                  && chmod 600 /secret/s && chmod 700 /secret && chown -R 2000:2000 /secret";
    let (code, _, err) = run(
        &["--cap-add", "CAP_CHOWN", "--commit", "chowned"],
        "multi",
        script,
    );
    if mapping == "caller" {
        assert_ne!(code, 0, "chown to an unmapped id worked: {err}");
        assert!(err.contains("chown"), "{err}");
    } else {
        assert_eq!(code, 0, "{err}");
        let (code, out, err) = run(
            &["--cap-add", "CAP_DAC_OVERRIDE"],
            "chowned",
            "stat -c %u:%g /home/u/f /secret /secret/s | tr '\\n' ' '; cat /secret/s",
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, "1234:1235 2000:2000 2000:2000 s\n");
        // The committed layer itself records the owners.
        let layer = k.top_layer("chowned");
        let t = tree_of_tar(&layer);
        assert_eq!((t["secret/s"].uid, t["secret/s"].gid), (2000, 2000));
        assert_eq!((t["home/u/f"].uid, t["home/u/f"].gid), (1234, 1235));
    }
    // Run dirs full of subordinate-owned files were removed, and gc removes
    // the cached trees of removed images.
    let runs: Vec<_> = fs::read_dir(k.store().join(".kiln/runs"))
        .expect("runs dir")
        .collect();
    assert!(runs.is_empty(), "run dirs left: {runs:?}");
    k.ok(["rm", "multi"]);
    k.ok(["rm", "bb"]);
    let _ = k.run(["rm", "chowned"]);
    k.ok(["gc"]);
    let left: Vec<_> = fs::read_dir(k.store().join(".kiln/rootfs"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "rootfs caches left after gc: {left:?}");
}

#[test]
fn tty_gives_the_command_a_terminal_and_relays_input() {
    let k = with_busybox();
    // Without a terminal on kiln's side (as in CI): the command still gets
    // a pty as stdin/stdout, TERM, and a controlling terminal; it is a
    // session leader, which init must still reap (--timeout guards a hang).
    let out = k.run([
        "run",
        "--timeout",
        "30",
        "-t",
        "bb",
        "sh",
        "-c",
        "test -t 0 && test -t 1 && echo tty; echo $TERM; test -c /dev/console && echo console; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(text.contains("tty\n"), "{text}");
    assert!(text.contains("console\n"), "{text}");
    assert!(
        text.lines()
            .any(|l| !l.is_empty() && l != "tty" && l != "console"),
        "no TERM: {text}"
    );
    // -i relays input to the pty.
    let mut child = k
        .cmd()
        .args(["run", "--timeout", "30", "-t", "-i", "bb", "sh"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"echo from-$((40+2))\nexit 5\n")
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("from-42"), "{text}");
    // With a terminal on kiln's side, its size reaches the command.
    let text = on_a_terminal(
        &k,
        "stty cols 99 rows 33;",
        "run --timeout 30 -t bb stty size",
    );
    assert!(text.contains("33 99"), "{text}");
}

#[test]
fn disabled_user_namespaces_get_an_error_naming_the_sysctl() {
    // user.max_user_namespaces is per user namespace: set it to 0 in a
    // throwaway one and run kiln there (works as root and unprivileged).
    require("unshare");
    let k = with_busybox();
    let script = format!(
        "echo 0 > /proc/sys/user/max_user_namespaces && exec {} --store {} run bb true",
        kiln_bin().display(),
        k.store().display()
    );
    let out = Command::new("unshare")
        .args(["-Ur", "sh", "-c", &script])
        .output()
        .expect("unshare");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("user namespaces are disabled (sysctl user.max_user_namespaces=0)"),
        "{err}"
    );
}

#[test]
fn no_inherited_fds_no_host_terminal_and_no_writable_sys_submounts() {
    let k = with_busybox();
    // A descriptor kiln inherited without close-on-exec stays outside.
    let script = format!(
        "exec 7</etc/hostname; exec {} --store {} run bb ls /proc/self/fd",
        kiln_bin().display(),
        k.store().display()
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .output()
        .expect("bash");
    let fds = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        !fds.lines().any(|l| l.trim() == "7"),
        "fd 7 leaked into the sandbox: {fds}"
    );
    // With kiln on a terminal (script gives it one) the command is in a
    // session of its own, without a controlling terminal: no TIOCSTI into
    // the caller's shell.
    let text = on_a_terminal(
        &k,
        "",
        "run bb sh -c 'echo tty_nr=$(cut -d\" \" -f7 /proc/self/stat); cat /dev/tty 2>&1 | head -c 40'",
    );
    assert!(
        text.contains("tty_nr=0"),
        "the command has a controlling tty: {text}"
    );
    // With the host's network /sys is the host's, read-only all the way
    // down (a plain ro remount would leave /sys/fs/cgroup writable).
    let (code, out, err) = run_sh(
        &k,
        &["--network", "host"],
        "awk '$5 ~ \"^/sys\" {print $5, $6}' /proc/self/mountinfo",
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().count() > 1, "no submounts under /sys: {out}");
    for l in out.lines() {
        let opts = l.split_whitespace().nth(1).unwrap_or("");
        assert!(
            opts.split(',').any(|o| o == "ro"),
            "writable mount under /sys: {l}"
        );
    }
}

#[test]
fn tty_input_the_command_never_reads_does_not_stall_the_timeout() {
    let k = with_busybox();
    // `yes` writes without end; the command never reads. kiln must keep
    // supervising (here: enforce --timeout) instead of blocking on the pty.
    let script = format!(
        "yes | exec {} --store {} run --timeout 2 -t -i bb sleep 60",
        kiln_bin().display(),
        k.store().display()
    );
    let start = Instant::now();
    let out = Command::new("bash")
        .args(["-c", &script])
        .stdout(Stdio::null())
        .output()
        .expect("bash");
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn an_image_whose_config_lies_about_its_layers_is_not_unpacked() {
    // The rootfs cache is keyed by the config's diff_ids: an image claiming
    // another image's diff_ids (here: one that names no real content) must
    // not get its tree cached under that key.
    let k = with_busybox();
    let v = k.inspect("bb");
    let mut config = v["config"].clone();
    let lie = format!("sha256:{}", "ab".repeat(32));
    config["rootfs"]["diff_ids"][0] = serde_json::Value::String(lie.clone());
    let (cdigest, csize) = put_blob(&k.store(), &serde_json::to_vec(&config).expect("json"));
    let mut manifest = v["manifest"].clone();
    manifest["config"]["digest"] = serde_json::Value::String(cdigest);
    manifest["config"]["size"] = serde_json::json!(csize);
    let (mdigest, msize) = put_blob(&k.store(), &serde_json::to_vec(&manifest).expect("json"));
    add_to_index(&k.store(), &mdigest, msize, "liar:latest");
    let err = k.fails(["run", "liar", "true"]);
    assert!(
        err.contains(&format!("but the image config says {lie}")),
        "{err}"
    );
    let cached: Vec<String> = fs::read_dir(k.store().join(".kiln/rootfs"))
        .expect("rootfs dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !cached.iter().any(|n| n.starts_with(&"ab".repeat(32))),
        "a tree was cached under the lying key: {cached:?}"
    );
}

/// The fallback warnings of the root's mount are kiln's, said once on its
/// stderr and recorded in `--json-status`, not written into the command's
/// stderr from inside the sandbox.
#[test]
fn overlay_fallback_warnings_are_in_the_result() {
    let k = with_busybox();
    let status = k.dir.path().join("status.json");
    let out = k
        .cmd()
        .env("KILN_NO_KERNEL_OVERLAY", "1")
        .arg("run")
        .arg("--json-status")
        .arg(&status)
        .args(["bb", "true"])
        .output()
        .expect("spawn kiln");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&status).expect("status")).expect("json");
    let warnings: Vec<&str> = v["warnings"]
        .as_array()
        .expect("warnings")
        .iter()
        .filter_map(|w| w.as_str())
        .collect();
    assert!(
        warnings
            .first()
            .is_some_and(|w| w.contains("kernel overlayfs is unavailable")),
        "{v}"
    );
    for w in &warnings {
        assert_eq!(
            err.matches(&format!("kiln: warning: {w}")).count(),
            1,
            "{err}"
        );
    }
}

/// While the command runs, kiln waits: it uses (almost) no CPU itself. A
/// descriptor left in its poll set after end of file (init's warnings pipe
/// once the root is built) made it spin at 100% for the whole run.
#[test]
fn kiln_does_not_spin_while_the_command_runs() {
    let k = with_busybox();
    for exec_helper in [false, true] {
        let mut cmd = k.cmd();
        if exec_helper {
            cmd.env("KILN_HELPER_EXEC", "1");
        }
        let mut child = cmd
            .args(["run", "bb", "sleep", "2"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn kiln");
        std::thread::sleep(std::time::Duration::from_millis(1500));
        // utime and stime, fields 14 and 15 of /proc/PID/stat, in ticks
        // (100 a second here): kiln's own, not its children's.
        let stat = fs::read_to_string(format!("/proc/{}/stat", child.id())).expect("stat");
        let rest = stat.rsplit_once(')').map(|(_, r)| r).expect("stat fields");
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let ticks = f[11] + f[12];
        assert!(child.wait().expect("wait").success());
        assert!(
            ticks < 30,
            "kiln used {ticks} ticks of CPU in 1.5 s of a sleeping command (exec'd helper: {exec_helper})"
        );
    }
}
