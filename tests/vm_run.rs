//! `kiln run --vm`: the QEMU VM backend, from the host. Every test runs as
//! root and as unprivileged users in CI. Guests run under TCG here (the
//! host's /dev/kvm opens, but guests hang: the probe test shows kiln
//! finding that out by running).

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// QEMU processes whose command line names `needle`.
fn qemus_naming(needle: &str) -> Vec<u32> {
    processes_naming("qemu-system", needle)
}

/// Processes whose command line names both `program` and `needle`.
fn processes_naming(program: &str, needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline);
        if text.contains(program) && text.contains(needle) {
            found.push(pid);
        }
    }
    found
}

/// The same command under `--vm` and the namespace backend: the same exit
/// code and output (one table over the common flags).
#[test]
fn the_vm_backend_gives_what_the_namespace_backend_gives() {
    let k = with_busybox();
    // (flags, script, compare stderr too)
    let cases: &[(&[&str], &str, bool)] = &[
        (&[], "true", true),
        (&[], "false", true),
        (&[], "exit 3", true),
        (&[], "echo out; echo err >&2", true),
        (&["-e", "GREETING=hi there"], "echo \"$GREETING\"", true),
        (&["-w", "/etc"], "pwd; ls hostname", true),
        (&["-w", "/made/here"], "pwd", true),
        // 125, a clear error either way (the wording is each backend's).
        (&["--read-only", "-w", "/made/here"], "pwd", false),
        (&["--user", "1000:1000"], "id -u; id -g", true),
        (&["--hostname", "builder"], "hostname", true),
        (&["--read-only"], "touch /x 2>/dev/null; echo $?", true),
        (
            &[],
            "echo x > /new && cat /new && rm /bin/ls && test ! -e /bin/ls",
            true,
        ),
        (&[], "kill -9 $$", true),
        // The messages differ (kiln's init or the guest agent says it).
        (&[], "exec /no/such/command", false),
    ];
    for (flags, script, stderr_too) in cases {
        let ns = run_sh(&k, flags, script);
        let mut vm_flags = vec!["--vm"];
        vm_flags.extend_from_slice(flags);
        let vm = run_sh(&k, &vm_flags, script);
        assert_eq!(
            (ns.0, &ns.1),
            (vm.0, &vm.1),
            "{flags:?} {script:?}: namespace vs vm (stderr {:?} vs {:?})",
            ns.2,
            vm.2
        );
        if *stderr_too {
            assert_eq!(ns.2, vm.2, "{flags:?} {script:?}: stderr");
        }
    }
}

/// 10,000 interleaved lines on stdout and stderr: each stream complete, in
/// order, never mixed.
#[test]
fn stdout_and_stderr_stay_apart_and_complete() {
    let k = with_busybox();
    let (code, out, err) = run_sh(
        &k,
        &["--vm"],
        "i=0; while [ $i -lt 10000 ]; do echo \"out $i\"; echo \"err $i\" >&2; i=$((i+1)); done",
    );
    assert_eq!(code, 0, "{err}");
    let want = |tag: &str| -> String { (0..10000).map(|i| format!("{tag} {i}\n")).collect() };
    assert!(
        out == want("out"),
        "stdout: {} bytes, starts {:?}",
        out.len(),
        &out[..out.len().min(200)]
    );
    assert!(
        err == want("err"),
        "stderr: {} bytes, starts {:?}",
        err.len(),
        &err[..err.len().min(200)]
    );
}

/// `-i` passes stdin (a megabyte, then end of file) to the command.
#[test]
fn stdin_reaches_the_command_with_i() {
    let k = with_busybox();
    let mut child = k
        .cmd()
        .args(["run", "--vm", "-i", "bb", "sh", "-c", "wc -c; echo after"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        stdin.write_all(&vec![b'x'; 1 << 20]).expect("write stdin");
    });
    let out = child.wait_with_output().expect("wait");
    writer.join().expect("writer");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1048576\nafter\n");
    // Without -i the command reads nothing.
    let (code, out, _) = run_sh(&k, &["--vm"], "wc -c");
    assert_eq!((code, out.trim()), (0, "0"));
    // A short input arrives with the job, before the command starts, and
    // is not left waiting for more.
    let out = piped(
        &k,
        &["run", "--vm", "-i", "bb", "sh", "-c", "read x; echo got-$x"],
        b"hello\n",
    );
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).as_ref()
        ),
        (Some(0), "got-hello\n"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `kiln ARGS` with `input` on its stdin, bounded by `timeout` (a hang
/// fails the test, not the suite).
fn piped(k: &Kiln, args: &[&str], input: &[u8]) -> std::process::Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("120")
        .arg(kiln_bin())
        .arg("--store")
        .arg(k.store())
        .args(args);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

/// `-t`: a pty in the guest is the command's stdin, stdout, stderr and
/// controlling terminal, with `TERM` set, input relayed with `-i`, and the
/// caller's terminal size, as in the namespace backend.
#[test]
fn a_pty_in_the_guest_with_t() {
    let k = with_busybox();
    let script = "test -t 0 && test -t 1 && test -t 2 && echo tty; echo $TERM; tty; exit 4";
    let out = piped(&k, &["run", "--vm", "-t", "bb", "sh", "-c", script], b"");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert_eq!(
        out.status.code(),
        Some(4),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0], "tty");
    assert!(!lines[1].is_empty(), "no TERM: {text}");
    assert!(lines[2].starts_with("/dev/pts/"), "{text}");
    // The same with the namespace backend.
    let ns = piped(
        &k,
        &[
            "run",
            "-t",
            "bb",
            "sh",
            "-c",
            "test -t 0 && test -t 1 && test -t 2 && echo tty; exit 4",
        ],
        b"",
    );
    assert_eq!(ns.status.code(), Some(4));
    assert_eq!(
        String::from_utf8_lossy(&ns.stdout).replace('\r', ""),
        "tty\n"
    );
    // -i relays input to the pty (an interactive shell reads it).
    let out = piped(
        &k,
        &["run", "--vm", "-t", "-i", "bb", "sh"],
        b"echo from-$((40+2))\nexit 5\n",
    );
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert_eq!(out.status.code(), Some(5), "{text}");
    assert!(text.lines().any(|l| l == "from-42"), "{text}");
    // The caller's terminal size reaches the command.
    let text = on_a_terminal(&k, "stty cols 99 rows 33;", "run --vm -t bb stty size");
    assert!(text.contains("33 99"), "{text}");
}

/// --timeout stops the command with exit code 124; its SIGTERM trap gets
/// the grace period, measured from the command's start (not the boot).
#[test]
fn timeout_gives_124_and_honours_the_grace() {
    let k = with_busybox();
    let (code, out, err) = run_sh(
        &k,
        &["--vm", "--timeout", "2", "--timeout-grace", "5"],
        "trap 'echo term; sleep 1; echo done; exit 7' TERM; echo started; sleep 100 & wait",
    );
    assert_eq!(code, 124, "{out}{err}");
    assert_eq!(out, "started\nterm\ndone\n", "{err}");
    assert!(err.contains("timed out"), "{err}");
    // Grace 0: killed at once, the trap never finishes.
    let (code, out, _) = run_sh(
        &k,
        &["--vm", "--timeout", "1", "--timeout-grace", "0"],
        "trap 'sleep 5; echo done' TERM; sleep 100 & wait",
    );
    assert_eq!(code, 124);
    assert!(!out.contains("done"), "{out}");
}

/// SIGTERM to kiln reaches a trap in the guest, and the trap's exit code is
/// the run's.
#[test]
fn sigterm_to_kiln_reaches_a_trap_in_the_guest() {
    let k = with_busybox();
    let mut child = k
        .cmd()
        .args([
            "run",
            "--vm",
            "bb",
            "sh",
            "-c",
            "trap 'echo got TERM; exit 42' TERM; echo ready; sleep 100 & wait",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("read");
    assert_eq!(first, "ready");
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .expect("SIGTERM kiln");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().expect("wait");
    assert_eq!(rest, ["got TERM"]);
    assert_eq!(status.code(), Some(42));
}

/// SIGKILL of kiln mid-run: QEMU dies with it, and the run directory goes
/// with the next `kiln gc`.
#[test]
fn sigkill_of_kiln_leaves_no_qemu_and_no_files() {
    let k = with_busybox();
    let shared = k.dir.path().join("shared");
    fs::create_dir(&shared).expect("mkdir");
    let v = format!("{}:/shared", shared.display());
    let mut child = k
        .cmd()
        .args([
            "run",
            "--vm",
            "-v",
            &v,
            "bb",
            "sh",
            "-c",
            "echo ready; sleep 100",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kiln");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("a line").expect("read"), "ready");
    let store = k.store().display().to_string();
    assert_eq!(qemus_naming(&store).len(), 1, "one qemu runs the guest");
    let bind = shared.display().to_string();
    let daemons = processes_naming("virtiofsd", &bind).len();
    if id_mapping() != "caller" {
        assert!(daemons >= 1, "the bind goes through a virtiofsd");
    }
    child.kill().expect("SIGKILL kiln");
    child.wait().expect("wait");
    let until = Instant::now() + Duration::from_secs(5);
    while !qemus_naming(&store).is_empty() || !processes_naming("virtiofsd", &bind).is_empty() {
        assert!(
            Instant::now() < until,
            "qemu or virtiofsd outlived kiln by 5 s: {:?} {:?} (virtiofsd before: {daemons})",
            qemus_naming(&store),
            processes_naming("virtiofsd", &bind)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let runs = k.store().join(".kiln/runs");
    assert_eq!(
        fs::read_dir(&runs).expect("runs").count(),
        1,
        "the dead run's directory"
    );
    k.ok(["gc"]);
    let left: Vec<_> = fs::read_dir(&runs)
        .expect("runs")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Asserts the store holds no run directory (the run went with its files).
fn assert_no_run_dir_left(k: &Kiln) {
    let runs = k.store().join(".kiln/runs");
    let left: Vec<_> = fs::read_dir(&runs)
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Asserts the host's loop devices and mounts are as `before`.
fn assert_host_unchanged(before: &(Vec<String>, String, String)) {
    let after = host_state();
    assert_eq!(before.0, after.0, "/sys/block/loop*");
    assert_eq!(before.1, after.1, "losetup -a");
    assert_eq!(before.2, after.2, "the host's mounts");
}

/// The host's loop devices (`/sys/block/loop*`, `losetup -a`) and mounts.
fn host_state() -> (Vec<String>, String, String) {
    let mut loops: Vec<String> = fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("loop"))
        .collect();
    loops.sort();
    let losetup = Command::new("losetup")
        .arg("-a")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mounts = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    (loops, losetup, mounts)
}

/// The seeds' case, end to end (images/vm-disk): inside the VM a disk
/// image is made, partitioned, attached with `losetup -P`, given a file
/// system, mounted, filled with a root file system, a kernel and an
/// initramfs, unmounted and detached, and reaches the host through a
/// bind; the host then boots it in QEMU (after kiln read the kernel out of
/// it, rootless) and the image's own init prints its ready line. The
/// host's loop devices and mounts are the same before and after.
#[test]
fn a_disk_image_built_in_the_guest_boots_and_the_host_sees_no_loop_device() {
    let k = with_busybox();
    let before = host_state();
    let out = k.dir.path().join("out");
    fs::create_dir(&out).expect("mkdir");
    let recipe = repo().join("images/vm-disk");
    let (code, stdout, err) = run_sh(
        &k,
        &[
            "--vm",
            "-v",
            &format!("{}:/out", out.display()),
            "-v",
            "/boot:/host-boot:ro",
            "-v",
            &format!("{}:/recipe:ro", recipe.display()),
        ],
        "sh /recipe/build-image.sh /out",
    );
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("build-image: done"), "{stdout}");
    assert!(out.join("disk.img").is_file());
    let boot = Command::new("bash")
        .arg(recipe.join("boot.sh"))
        .arg(out.join("disk.img"))
        .env("KILN", kiln_bin())
        .env("KILN_HOME", k.store())
        .output()
        .expect("run boot.sh");
    let console = String::from_utf8_lossy(&boot.stdout);
    assert!(
        boot.status.success(),
        "{console}{}",
        String::from_utf8_lossy(&boot.stderr)
    );
    assert!(
        console.contains("vm-disk: ready: the image built in a kiln VM booted")
            && console.contains("root /dev/vda1"),
        "{console}"
    );
    assert_host_unchanged(&before);
}

/// QEMU runs behind walls: a root of its own with the host's system
/// directories read-only and only the files of its run (the run
/// directory, kernel, initramfs, images, binds), so a guest that took
/// QEMU over finds no home, no other temp file, no other part of the
/// store; and a network namespace of its own unless `--network host`.
#[test]
fn qemu_sees_only_what_its_run_needs() {
    let k = with_busybox();
    let secret = k.dir.path().join("not-for-qemu");
    fs::write(&secret, "secret").expect("write");
    let bind = k.dir.path().join("shared");
    fs::create_dir(&bind).expect("mkdir");
    let store = k.store().display().to_string();
    // (virtiofsd cannot run in a mapping of only the caller's ids.)
    let first = if id_mapping() == "caller" {
        "9p"
    } else {
        "virtiofs"
    };
    for (network, transport) in [(false, first), (true, "9p")] {
        let v = format!("{}:/shared", bind.display());
        let mut args = vec!["run", "--vm", "-v", &v];
        if network {
            args.extend(["--network", "host"]);
        }
        args.extend(["bb", "sh", "-c", "echo ready; sleep 30"]);
        let mut child = k
            .cmd()
            .env("KILN_VM_BINDS", transport)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn kiln");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        assert_eq!(lines.next().expect("a line").expect("read"), "ready");
        let pids = qemus_naming(&store);
        assert_eq!(pids.len(), 1, "one qemu");
        let root = Path::new("/proc").join(pids[0].to_string()).join("root");
        let seen = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p)).exists();
        assert!(seen(Path::new("/usr/bin")), "no /usr in qemu's root");
        // Over 9p QEMU serves the bind; over virtiofs virtiofsd does.
        assert_eq!(
            seen(&bind),
            transport == "9p",
            "{transport}: the bind in qemu's root"
        );
        assert!(seen(&k.store().join(".kiln/runs")), "no run directory");
        assert!(!seen(&secret), "qemu sees {}", secret.display());
        assert!(
            !seen(&k.store().join("index.json")),
            "qemu sees the store's index"
        );
        // Of the caller's home only the path to kiln's cache (the
        // kernel's vmlinux, module image and initramfs) is there.
        if let Ok(home) = std::env::var("HOME") {
            if !k.dir.path().starts_with(&home) {
                let there: Vec<String> = fs::read_dir(root.join(home.trim_start_matches('/')))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                assert!(
                    there.iter().all(|n| n == ".cache"),
                    "qemu sees {home}: {there:?}"
                );
            }
        }
        // Nothing can be written outside its run directory and the bind.
        let usr = root.join("usr/kiln-probe");
        assert!(
            fs::write(&usr, "x").is_err(),
            "{} is writable",
            usr.display()
        );
        let ns = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns/net");
        let (theirs, ours) = (ns(&pids[0].to_string()), ns("self"));
        assert_eq!(
            theirs == ours,
            network,
            "network {network}: {theirs:?} vs {ours:?}"
        );
        child.kill().expect("kill");
        child.wait().expect("wait");
    }
}

/// Loop devices, partitions, a file system and a mount inside the guest,
/// with a module loaded by modprobe from the kernel's module tree: the
/// host's loop devices and mounts are the same before and after.
#[test]
fn loop_devices_and_mounts_in_the_guest_change_nothing_on_the_host() {
    let k = with_busybox();
    let before = host_state();
    let (code, out, err) = run_sh(
        &k,
        &["--vm"],
        "set -e
         modprobe loop
         grep -q '^loop ' /proc/modules && echo loop-loaded
         modprobe ext4
         dd if=/dev/zero of=/tmp/disk bs=1M count=16 2>/dev/null
         printf 'o\\nn\\np\\n1\\n\\n\\nw\\n' | fdisk /tmp/disk >/dev/null 2>&1 || true
         dev=$(losetup -f)
         losetup -P $dev /tmp/disk
         # The partition's node comes a moment later (devtmpfs, no udev).
         for i in 1 2 3 4 5 6 7 8 9 10; do test -b ${dev}p1 && break; sleep 0.2; done
         test -b ${dev}p1 && echo partitioned
         mke2fs ${dev}p1 >/dev/null 2>&1
         mkdir -p /mnt
         mount -t ext4 ${dev}p1 /mnt
         echo hello > /mnt/file
         cat /mnt/file
         umount /mnt
         losetup -d $dev
         echo detached",
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "loop-loaded\npartitioned\nhello\ndetached\n", "{err}");
    assert_host_unchanged(&before);
}

/// Device-mapper in the guest (a linear target over a loop device, made
/// with raw DM ioctls by tests/vm/dmlinear.c, busybox having no dmsetup):
/// the mapped device takes a file system and data; the host's block
/// devices, /dev/mapper and mounts are the same before and after (this
/// host's kernel has no device-mapper at all).
#[test]
fn device_mapper_in_the_guest_changes_nothing_on_the_host() {
    let k = with_busybox();
    let tools = k.dir.path().join("tools");
    fs::create_dir(&tools).expect("mkdir");
    let src = tools.join("dmlinear.c");
    fs::write(&src, include_str!("vm/dmlinear.c")).expect("write");
    let out = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(tools.join("dmlinear"))
        .arg(&src)
        .output()
        .expect("run cc (scripts/setup.sh installs gcc and libc6-dev)");
    assert!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let blocks = || -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir("/sys/block")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let mapper = || -> Vec<String> {
        fs::read_dir("/dev/mapper")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let before = (blocks(), mapper(), host_state());
    let v = format!("{}:/t:ro", tools.display());
    let (code, out, err) = run_sh(
        &k,
        &["--vm", "-v", &v],
        "set -e
         modprobe dm_mod
         modprobe loop
         dd if=/dev/zero of=/tmp/d bs=1M count=8 2>/dev/null
         l=$(losetup -f)
         losetup $l /tmp/d
         dm=$(/t/dmlinear create kiln-test $l 16384)
         cat /sys/block/$dm/dm/name
         mke2fs -q /dev/$dm >/dev/null
         mkdir -p /mnt
         mount /dev/$dm /mnt
         echo through-dm > /mnt/f
         umount /mnt
         /t/dmlinear remove kiln-test
         test ! -e /sys/block/$dm && echo removed
         losetup -d $l
         grep -c through-dm /tmp/d",
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "kiln-test\nremoved\n1\n", "{err}");
    assert_eq!(before.0, blocks(), "/sys/block");
    assert_eq!(before.1, mapper(), "/dev/mapper");
    assert_host_unchanged(&before.2);
}

/// A guest kernel panic: its own exit code (123, not the command's and
/// not kiln's 125) and the console's last lines in the error.
#[test]
fn a_guest_kernel_panic_has_its_own_exit_code_and_the_console_tail() {
    let k = with_busybox();
    let (code, _, err) = run_sh(&k, &["--vm"], "echo c > /proc/sysrq-trigger; sleep 10");
    assert_eq!(code, 123, "{err}");
    assert!(err.contains("the guest kernel panicked"), "{err}");
    assert!(err.contains("Kernel panic"), "{err}");
    assert!(err.contains("sysrq"), "{err}");
}

/// Binds: the guest reads the host's files and writes back, with the
/// caller's ids on the host (the subordinate ids for another owner in a
/// subid mapping, as in the namespace backend).
#[test]
fn binds_are_read_and_written_back_with_the_right_owners() {
    use std::os::unix::fs::MetadataExt;
    let k = with_busybox();
    let dir = k.dir.path().join("work");
    fs::create_dir(&dir).expect("mkdir");
    fs::write(dir.join("in"), "from the host\n").expect("write");
    let ro = k.dir.path().join("ro");
    fs::create_dir(&ro).expect("mkdir");
    let v = format!("{}:/work", dir.display());
    let vro = format!("{}:/ro:ro", ro.display());
    // virtiofs (the default where virtiofsd is installed and can run) and
    // 9p alike. virtiofsd calls setgroups, which a mapping of only the
    // caller's ids denies: there asking for virtiofs is a clear error and
    // the default is 9p.
    for transport in ["virtiofs", "9p"] {
        if transport == "virtiofs" && id_mapping() == "caller" {
            let out = k
                .cmd()
                .env("KILN_VM_BINDS", transport)
                .args(["run", "--vm", "-v", &v, "bb", "true"])
                .output()
                .expect("kiln");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(125), "{err}");
            assert!(err.contains("setgroups"), "{err}");
            let (code, out, err) = run_sh(
                &k,
                &["--vm", "-v", &v],
                "grep ' /work ' /proc/mounts | cut -d' ' -f3",
            );
            assert_eq!((code, out.as_str()), (0, "9p\n"), "{err}");
            continue;
        }
        let script = format!(
            "cat /work/in; echo from the guest > /work/out-{transport}; mkdir /work/d-{transport}; \
             chown 5:6 /work/d-{transport}; touch /ro/x 2>/dev/null || echo ro-refused; \
             grep ' /work ' /proc/mounts | cut -d' ' -f3"
        );
        let out = k
            .cmd()
            .env("KILN_VM_BINDS", transport)
            .args([
                "run", "--vm", "-v", &v, "-v", &vro, "bb", "sh", "-c", &script,
            ])
            .output()
            .expect("kiln");
        let (code, stdout, err) = (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(code, Some(0), "{transport}: {err}");
        assert_eq!(
            stdout,
            format!("from the host\nro-refused\n{transport}\n"),
            "{transport}: {err}"
        );
        assert_eq!(
            fs::read_to_string(dir.join(format!("out-{transport}"))).expect("out"),
            "from the guest\n"
        );
        let (uid, gid) = my_ids();
        let meta = fs::metadata(dir.join(format!("out-{transport}"))).expect("stat out");
        assert_eq!(
            (u64::from(meta.uid()), u64::from(meta.gid())),
            (uid, gid),
            "{transport}"
        );
        let d = fs::metadata(dir.join(format!("d-{transport}"))).expect("stat d");
        match id_mapping() {
            "identity" => assert_eq!((d.uid(), d.gid()), (5, 6), "{transport}"),
            "subids" => {
                assert_ne!(
                    u64::from(d.uid()),
                    uid,
                    "{transport}: chown 5 maps to a subordinate id"
                );
            }
            // Only the caller is mapped: the owner stays the caller's.
            _ => assert_eq!(u64::from(d.uid()), uid, "{transport}"),
        }
    }
    assert!(!ro.join("x").exists());
    // A file cannot be bound (shares are directories): a clear error.
    let file = format!("{}:/in", dir.join("in").display());
    let (code, _, err) = run_sh(&k, &["--vm", "-v", &file], "true");
    assert_eq!(code, 125);
    assert!(err.contains("binds directories only"), "{err}");
}

/// `--commit` from a VM run: the guest's overlay writes its upper layer to
/// a disk of the run, which becomes the same layer (whiteouts, opaque
/// directories, modes, owners) and so the same image digest as the
/// namespace backend's for the same changes; a failed command commits
/// nothing; the committed image runs under both backends.
#[test]
fn commit_from_a_vm_run_equals_the_namespace_backends() {
    let k = with_busybox();
    let changes = "set -e
        echo new > /new-file
        mkdir -p /opt/tool/bin
        printf '#!/bin/sh\necho tool\n' > /opt/tool/bin/t
        chmod 755 /opt/tool/bin/t
        rm /bin/ls
        rm -rf /etc && mkdir /etc && echo only > /etc/only
        ln -s /new-file /link
        mkdir -p /work/out";
    let epoch = ["--source-date-epoch", "1000000000"];
    let mut digests = Vec::new();
    for (backend, name) in [(&[][..], "ns-out"), (&["--vm"][..], "vm-out")] {
        let mut flags: Vec<&str> = backend.to_vec();
        flags.extend(["--commit", name]);
        flags.extend(epoch);
        // A mount point the command did not make is not part of the layer.
        flags.extend(["-w", "/made/by/kiln"]);
        let (code, out, err) = run_sh(&k, &flags, changes);
        assert_eq!(code, 0, "{backend:?}: {out}{err}");
        assert!(err.contains(&format!("committed {name}:latest")), "{err}");
        digests.push(
            k.inspect(name)["digest"]
                .as_str()
                .expect("digest")
                .to_string(),
        );
    }
    assert_eq!(
        digests[0], digests[1],
        "the same changes give the same image under both backends"
    );
    let layer = tree_of_tar(&k.top_layer("vm-out"));
    for (path, kind) in [
        ("bin/.wh.ls", 'f'),
        ("etc/.wh..wh..opq", 'f'),
        ("etc/only", 'f'),
        ("new-file", 'f'),
        ("link", 'l'),
        ("opt/tool/bin/t", 'f'),
        ("work/out", 'd'),
    ] {
        let node = layer
            .get(path)
            .unwrap_or_else(|| panic!("{path} in {layer:?}"));
        assert_eq!(node.kind, kind, "{path}");
    }
    assert_eq!(layer["opt/tool/bin/t"].mode & 0o777, 0o755);
    assert!(!layer.keys().any(|p| p.starts_with("made")), "{layer:?}");
    for backend in [&[][..], &["--vm"][..]] {
        let mut args = vec!["run"];
        args.extend_from_slice(backend);
        args.extend([
            "vm-out",
            "sh",
            "-c",
            "/opt/tool/bin/t; cat /etc/only; test ! -e /bin/ls && echo gone",
        ]);
        assert_eq!(k.ok(&args), "tool\nonly\ngone\n", "{backend:?}");
    }
    // Owners the guest's root gives are the layer's (in the guest every
    // id is mapped, whatever the caller's mapping on the host).
    let (code, _, err) = run_sh(
        &k,
        &["--vm", "--commit", "owned"],
        "echo x > /f && chown 5:6 /f",
    );
    assert_eq!(code, 0, "{err}");
    let f = &tree_of_tar(&k.top_layer("owned"))["f"];
    assert_eq!((f.uid, f.gid), (5, 6));
    // A failed command commits nothing and leaves no run directory.
    let (code, _, err) = run_sh(&k, &["--vm", "--commit", "never"], "touch /x; exit 3");
    assert_eq!(code, 3, "{err}");
    assert!(
        !k.names().iter().any(|n| n.starts_with("never")),
        "{:?}",
        k.names()
    );
    assert_no_run_dir_left(&k);
}

/// `--network host`: the guest is on QEMU's user network and reaches the
/// host's loopback at 10.0.2.2; without it the guest has only `lo`, up,
/// and reaches nothing.
#[test]
fn the_guest_reaches_the_host_only_with_network_host() {
    use std::io::Read;
    use std::net::TcpListener;
    let k = with_busybox();
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        let mut req = [0u8; 1024];
        let _ = c.read(&mut req);
        c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 16\r\n\r\nfrom the host 1\n")
            .expect("reply");
    });
    let url = format!("http://10.0.2.2:{port}/");
    let (code, out, err) = run_sh(
        &k,
        &["--vm", "--network", "host"],
        &format!("wget -q -O - {url} && ip -o -4 addr show eth0 | grep -o 'inet [0-9./]*'"),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "from the host 1\ninet 10.0.2.15/24\n");
    server.join().expect("server");
    let (code, out, err) = run_sh(
        &k,
        &["--vm"],
        &format!("ip -o link show lo | grep -o LOOPBACK,UP; ls /sys/class/net; wget -q -T 5 -O - {url} || echo unreachable"),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "LOOPBACK,UP\nlo\nunreachable\n");
}

/// `--disk SIZE`: a scratch block device of that size in the guest at
/// `$KILN_DISK` (udev's by-id name), to partition, format and mount; it
/// goes with the run.
#[test]
fn a_scratch_disk_of_the_given_size_is_in_the_guest() {
    let k = with_busybox();
    let (code, out, err) = run_sh(
        &k,
        &["--vm", "--disk", "64M"],
        "set -e
         echo $KILN_DISK
         dev=$(readlink -f $KILN_DISK)
         test -b $dev
         cat /sys/block/${dev#/dev/}/size
         mke2fs -q $dev >/dev/null 2>&1
         mkdir -p /mnt && mount $dev /mnt && echo kept > /mnt/f && umount /mnt
         mount $dev /mnt && cat /mnt/f",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out, "/dev/disk/by-id/virtio-kiln-disk\n131072\nkept\n",
        "{err}"
    );
    assert_no_run_dir_left(&k);
}

/// `--initrd FILE`: its files are unpacked before kiln's, so a `/init` in
/// it does not replace kiln's agent, and the run goes as without it.
#[test]
fn an_initrd_of_ones_own_adds_files_and_keeps_kilns_agent() {
    require("cpio");
    let k = with_busybox();
    let tree = k.dir.path().join("initrd-tree");
    fs::create_dir_all(tree.join("lib/firmware")).expect("mkdir");
    fs::write(tree.join("init"), "#!/bin/sh\necho hijacked\n").expect("write");
    fs::write(tree.join("lib/firmware/blob.bin"), [7u8; 100]).expect("write");
    let img = k.dir.path().join("mine.cpio");
    let mut cpio = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet"])
        .current_dir(&tree)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&img).expect("create"))
        .spawn()
        .expect("cpio");
    cpio.stdin
        .take()
        .expect("stdin")
        .write_all(b"init\nlib\nlib/firmware\nlib/firmware/blob.bin\n")
        .expect("list");
    assert!(cpio.wait().expect("cpio").success());
    let (code, out, err) = run_sh(
        &k,
        &["--vm", "--initrd", &img.display().to_string()],
        "echo the command ran; exit 4",
    );
    assert_eq!((code, out.as_str()), (4, "the command ran\n"), "{err}");
    assert!(!err.contains("hijacked"), "{err}");
}

/// The host's newest kernel with a module tree: (release, vmlinuz path).
fn host_kernel() -> (String, std::path::PathBuf) {
    let mut found: Vec<(String, std::path::PathBuf)> = fs::read_dir("/boot")
        .expect("/boot")
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = name.strip_prefix("vmlinuz-")?.to_string();
            Path::new("/lib/modules")
                .join(&rel)
                .join("modules.dep")
                .exists()
                .then(|| (rel, e.path()))
        })
        .collect();
    found.sort();
    found
        .pop()
        .expect("a kernel in /boot with /lib/modules (linux-image-amd64)")
}

/// A busybox tree in `dir` with the host's kernel as its own
/// `/boot/vmlinuz-REL` and the modules a run needs (and `loop`) in
/// `/lib/modules/REL`, with a modules.dep of just those.
fn tree_with_a_kernel(k: &Kiln, dir: &Path) -> String {
    let (rel, vmlinuz) = host_kernel();
    fs::create_dir_all(dir).expect("mkdir");
    let tar = busybox_tar(k.dir.path());
    sh(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(dir));
    fs::create_dir_all(dir.join("boot")).expect("mkdir boot");
    fs::copy(&vmlinuz, dir.join(format!("boot/vmlinuz-{rel}"))).expect("copy kernel");
    let host_mods = Path::new("/lib/modules").join(&rel);
    let dep = fs::read_to_string(host_mods.join("modules.dep")).expect("modules.dep");
    let deps: std::collections::HashMap<&str, Vec<&str>> = dep
        .lines()
        .filter_map(|l| {
            let (m, d) = l.split_once(':')?;
            Some((m, d.split_whitespace().collect()))
        })
        .collect();
    let mut want: Vec<&str> = Vec::new();
    let mut todo: Vec<&str> = deps
        .keys()
        .filter(|m| {
            let base = m.rsplit('/').next().unwrap_or(m);
            let stem = base.split(".ko").next().unwrap_or(base);
            [
                "virtio_pci",
                "virtio_console",
                "virtio_blk",
                "crc32c_generic",
                "ext4",
                "loop",
            ]
            .contains(&stem)
        })
        .copied()
        .collect();
    while let Some(m) = todo.pop() {
        if !want.contains(&m) {
            want.push(m);
            todo.extend(deps.get(m).into_iter().flatten());
        }
    }
    let mods = dir.join("lib/modules").join(&rel);
    let mut text = String::new();
    for m in &want {
        let to = mods.join(m);
        fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        fs::copy(host_mods.join(m), &to).expect("copy module");
        text.push_str(&format!("{m}: {}\n", deps[m].join(" ")));
    }
    fs::write(mods.join("modules.dep"), text).expect("write modules.dep");
    rel
}

/// Without --kernel an image's own `/boot/vmlinuz-*` boots, with the
/// image's `/lib/modules` (modprobe reads the image's tree, not a copy of
/// the host's). The host's kernel is made unusable (`KILN_VM_KERNEL`
/// names nothing), so a run that boots shows the image's kernel was used.
/// Symlinks do not lead out of the image: a kernel that is a symlink to
/// the host's file is not taken, and a module that is one is an error.
#[test]
fn an_images_own_kernel_boots_by_default() {
    use std::os::unix::fs::symlink;
    let k = with_busybox();
    let no_host_kernel = |args: &[&str]| {
        let out = k
            .cmd()
            .env("KILN_VM_KERNEL", "/nonexistent/vmlinuz-0")
            .args(args)
            .output()
            .expect("kiln");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The control: an image without a kernel needs the host's.
    let (code, _, err) = no_host_kernel(&["run", "--vm", "bb", "true"]);
    assert_eq!(code, 125, "{err}");
    let tree = k.dir.path().join("own");
    let rel = tree_with_a_kernel(&k, &tree);
    k.import(&tree, "own", &["--map-caller"]);
    let (code, out, err) = no_host_kernel(&[
        "run",
        "--vm",
        "own",
        "sh",
        "-c",
        "uname -r; modprobe loop && grep -o '^loop ' /proc/modules; ls /lib/modules/$(uname -r)/kernel | sort | tr '\\n' ' '",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first().copied(), Some(rel.as_str()), "{out}");
    assert_eq!(lines.get(1).copied(), Some("loop "), "{out}");
    // Only the image's few module directories, not the host's tree.
    assert!(!out.contains("sound"), "{out}");
    // A kernel that is a symlink (here to the host's file) is not taken.
    let (_, vmlinuz) = host_kernel();
    let link_tree = k.dir.path().join("linked");
    tree_with_a_kernel(&k, &link_tree);
    let own = link_tree.join(format!("boot/vmlinuz-{rel}"));
    fs::remove_file(&own).expect("rm");
    symlink(&vmlinuz, &own).expect("symlink");
    k.import(&link_tree, "linked", &["--map-caller"]);
    let (code, _, err) = no_host_kernel(&["run", "--vm", "linked", "true"]);
    assert_eq!(code, 125, "a symlinked kernel was followed: {err}");
    // A module that is a symlink out of the tree: an error naming it.
    let bad_tree = k.dir.path().join("badmod");
    tree_with_a_kernel(&k, &bad_tree);
    let dep =
        fs::read_to_string(bad_tree.join(format!("lib/modules/{rel}/modules.dep"))).expect("dep");
    let ext4 = dep
        .lines()
        .filter_map(|l| l.split(':').next())
        .find(|m| m.contains("/ext4.ko"))
        .expect("ext4 in modules.dep")
        .to_string();
    let module = bad_tree.join(format!("lib/modules/{rel}/{ext4}"));
    fs::remove_file(&module).expect("rm");
    symlink(Path::new("/lib/modules").join(&rel).join(&ext4), &module).expect("symlink");
    k.import(&bad_tree, "badmod", &["--map-caller"]);
    let (code, _, err) = no_host_kernel(&["run", "--vm", "badmod", "true"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("ext4.ko"), "{err}");
}

/// Flags the VM backend has no use for are refused, naming the flag.
#[test]
fn flags_that_do_not_apply_to_a_vm_are_refused() {
    let k = with_busybox();
    for (flags, word) in [
        (&["--vm", "--seccomp", "unconfined"][..], "--seccomp"),
        (&["--vm", "--cap-add", "NET_ADMIN"][..], "--cap-add"),
        (
            &["--vm", "--commit", "out", "--upper", "memory"][..],
            "--upper",
        ),
        (&["--vm", "--disk", "1k"][..], "--disk"),
        (&["--vm", "--initrd", "/no/such/initrd"][..], "--initrd"),
        (&["--vm", "--cpus", "0"][..], "--cpus"),
        (&["--vm", "--memory", "16m"][..], "--memory"),
        (&["--kernel", "/boot/x"][..], "--vm"),
    ] {
        let (code, _, err) = run_sh(&k, flags, "true");
        assert_ne!(code, 0, "{flags:?}");
        assert!(err.contains(word), "{flags:?}: {err}");
    }
    // A kernel that is not one.
    let junk = k.dir.path().join("junk");
    fs::write(&junk, "not a kernel").expect("write");
    let (code, _, err) = run_sh(
        &k,
        &["--vm", "--kernel", &junk.display().to_string()],
        "true",
    );
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("vm"), "{err}");
}

/// The accelerator: with /dev/kvm usable, kiln probes it by running a
/// guest; on a host where KVM guests hang it falls back to TCG within the
/// probe's 5 s, says why once, and keeps the verdict for the next run. A
/// user who may not open /dev/kvm runs under TCG, is told once to join
/// group kvm, and `--accel kvm` is an error saying so.
#[test]
fn kvm_is_probed_by_running_and_tcg_serves_when_it_hangs() {
    let k = with_busybox();
    let cache = k.dir.path().join("cache");
    let run_with = |extra: &[&str]| {
        let start = Instant::now();
        let mut args = vec!["run", "--vm"];
        args.extend_from_slice(extra);
        args.extend(["bb", "true"]);
        let out = k
            .cmd()
            .env("XDG_CACHE_HOME", &cache)
            .env_remove("KILN_VM_ACCEL")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run kiln");
        (out, start.elapsed())
    };
    let run = || run_with(&[]);
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let (first, _) = run();
            let err = String::from_utf8_lossy(&first.stderr).into_owned();
            assert!(first.status.success(), "{err}");
            assert!(
                err.contains("using tcg") && err.contains("add the user to group kvm"),
                "{err}"
            );
            let (second, _) = run();
            let err2 = String::from_utf8_lossy(&second.stderr);
            assert!(second.status.success(), "{err2}");
            assert!(!err2.contains("group kvm"), "said twice: {err2}");
            let (forced, _) = run_with(&["--accel", "kvm"]);
            let err3 = String::from_utf8_lossy(&forced.stderr);
            assert_eq!(forced.status.code(), Some(125), "{err3}");
            assert!(
                err3.contains("--accel kvm") && err3.contains("group kvm"),
                "{err3}"
            );
            return;
        }
        Err(e) => {
            println!("skipped: /dev/kvm cannot be opened ({e}), so there is no KVM to probe");
            return;
        }
    }
    let (first, took) = run();
    let err = String::from_utf8_lossy(&first.stderr).into_owned();
    assert!(first.status.success(), "{err}");
    let verdict = fs::read_to_string(cache.join("kiln/vm-accel")).expect("the verdict is kept");
    if verdict.starts_with("tcg") {
        assert!(err.contains("kvm does not really work here"), "{err}");
        assert!(err.contains("using tcg"), "{err}");
        // The probe's 5 s, then a TCG boot and run.
        assert!(took < Duration::from_secs(30), "{took:?}");
    } else {
        assert!(verdict.starts_with("kvm"), "{verdict}");
    }
    let (second, _) = run();
    let err2 = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{err2}");
    assert!(
        !err2.contains("kvm does not really work"),
        "probed again: {err2}"
    );
}

/// What is made of the kernel (its PVH vmlinux, its module tree as an
/// ext4 image, the initramfs) goes to the user's cache once; the image's
/// tree becomes an ext4 image beside the cached tree once; a second run
/// writes none of them again.
#[test]
fn the_kernel_modules_initramfs_and_root_image_are_made_once() {
    let k = with_busybox();
    let cache = k.dir.path().join("cache");
    let run = || {
        let out = k
            .cmd()
            .env("XDG_CACHE_HOME", &cache)
            .args([
                "run",
                "--vm",
                "bb",
                "sh",
                "-c",
                "modprobe loop && grep -c '^loop ' /proc/modules",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run kiln");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n");
    };
    let list = |dir: &Path, depth: usize| {
        let mut v: Vec<(String, std::time::SystemTime)> = Vec::new();
        let mut dirs = vec![(dir.to_path_buf(), 0)];
        while let Some((d, n)) = dirs.pop() {
            for e in fs::read_dir(&d).expect("read cache").flatten() {
                let meta = e.metadata().expect("stat");
                if meta.is_dir() && n < depth {
                    dirs.push((e.path(), n + 1));
                } else if meta.is_file() {
                    v.push((
                        e.path().display().to_string(),
                        meta.modified().expect("mtime"),
                    ));
                }
            }
        }
        v.sort();
        v
    };
    run();
    let vm = list(&cache.join("kiln/vm"), 0);
    let names: Vec<&str> = vm
        .iter()
        .map(|(n, _)| n.rsplit('/').next().unwrap_or(""))
        .collect();
    for want in ["vmlinux-", "initrd-", "modules-"] {
        assert!(
            names.iter().any(|n| n.starts_with(want)),
            "{want} in {names:?}"
        );
    }
    let rootfs = list(&k.store().join(".kiln/rootfs"), 1);
    assert!(
        rootfs.iter().any(|(n, _)| n.ends_with("/root.vm1.ext4")),
        "{rootfs:?}"
    );
    run();
    assert_eq!(
        list(&cache.join("kiln/vm"), 0),
        vm,
        "nothing is written again"
    );
    assert_eq!(list(&k.store().join(".kiln/rootfs"), 1), rootfs);
}

/// The same runs with the image's tree over 9p or virtiofs
/// (`KILN_VM_ROOTFS`, the other root file systems the benchmark compares):
/// the same results, and a commit of the same changes gives the same image
/// as with the ext4 root.
#[test]
fn the_tree_over_9p_or_virtiofs_gives_the_same_results() {
    let k = with_busybox();
    let changes = "echo x > /new; rm /bin/ls; cat /new /etc/hostname";
    let mut digests = Vec::new();
    let roots: &[&str] = if id_mapping() == "caller" {
        // virtiofsd needs setgroups, denied in a mapping of only the
        // caller's ids: a clear error.
        let out = k
            .cmd()
            .env("KILN_VM_ROOTFS", "virtiofs")
            .args(["run", "--vm", "bb", "true"])
            .output()
            .expect("kiln");
        assert_eq!(out.status.code(), Some(125));
        assert!(String::from_utf8_lossy(&out.stderr).contains("setgroups"));
        &["ext4", "9p"]
    } else {
        &["ext4", "9p", "virtiofs"]
    };
    for root in roots {
        let name = format!("from-{root}");
        let out = k
            .cmd()
            .env("KILN_VM_ROOTFS", root)
            .args([
                "run",
                "--vm",
                "--commit",
                &name,
                "--source-date-epoch",
                "1000000000",
            ])
            .args(["bb", "sh", "-c", changes])
            .stdin(Stdio::null())
            .output()
            .expect("run kiln");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{root}: {err}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "x\nkiln\n", "{root}");
        digests.push(
            k.inspect(&name)["digest"]
                .as_str()
                .expect("digest")
                .to_string(),
        );
        // The tree below the overlay is out of the command's view.
        let out = k
            .cmd()
            .env("KILN_VM_ROOTFS", root)
            .args([
                "run",
                "--vm",
                "bb",
                "sh",
                "-c",
                "grep -c -E ' (9p|virtiofs) ' /proc/mounts; exit 4",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run kiln");
        assert_eq!(out.status.code(), Some(4), "{root}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n", "{root}");
    }
    for (root, d) in roots.iter().zip(&digests) {
        assert_eq!(&digests[0], d, "{root} root");
    }
}
