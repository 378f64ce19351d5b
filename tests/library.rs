//! The library used directly, as an embedder would: `Sandbox::run_with_events`,
//! typed errors, and a program not named kiln (examples/embedder.rs) that
//! imports, runs and reads a file system in a VM with one entry point.

mod common;

use std::fs;
use std::process::Command;

use common::*;
use kiln::sandbox::{RunEvent, Sandbox, Stream};
use kiln::spec::RunSpec;

#[test]
fn run_with_events_streams_output_and_state() {
    let k = Kiln::new();
    let tar = busybox_tar(k.dir.path());
    k.import(&tar, "bb", &[]);
    let store = kiln::Store::open(k.store()).expect("open store");
    let sandbox = Sandbox::new(store).with_helper(kiln_bin());
    let mut spec = RunSpec::new("bb");
    spec.argv = Some(vec![
        "sh".into(),
        "-c".into(),
        "echo out; echo err >&2; head -c 1000000 /dev/zero | tr '\\0' y; exit 3".into(),
    ]);
    let (mut out, mut err, mut started) = (Vec::new(), Vec::new(), false);
    let result = sandbox
        .run_with_events(&spec, &mut |e| match e {
            RunEvent::Started { pid } => started = pid > 0,
            RunEvent::Output {
                stream: Stream::Stdout,
                data,
            } => out.extend_from_slice(data),
            RunEvent::Output {
                stream: Stream::Stderr,
                data,
            } => err.extend_from_slice(data),
            _ => {}
        })
        .expect("run");
    assert!(started);
    assert_eq!(result.exit_code, 3);
    assert_eq!(out.len(), 4 + 1_000_000, "every byte of stdout arrives");
    assert!(out.starts_with(b"out\nyyy"));
    assert_eq!(err, b"err\n");
    // Invalid specs are refused before anything starts.
    let mut bad = RunSpec::new("bb");
    bad.workdir = Some("relative".into());
    assert!(sandbox.run(&bad).is_err());
}

/// A bad spec is a typed error naming the `RunSpec` field, so an embedder
/// can match it; the library's words name fields, not `kiln` flags. The
/// capability and rlimit numbers are range-checked (a capability >= 64
/// once shifted past the mask; an unknown rlimit became RLIMIT_RTPRIO).
#[test]
fn bad_specs_are_typed_errors_naming_the_field() {
    use kiln::spec::{SpecError, Ulimit, Upper};
    let field_of = |spec: &RunSpec| match spec.validate() {
        Err(SpecError::Invalid { field, reason }) => {
            assert!(!reason.contains("--"), "{reason}");
            field
        }
        other => panic!("expected SpecError::Invalid, got {other:?}"),
    };
    let mut caps = RunSpec::new("bb");
    caps.cap_add = vec![kiln::spec::CAPABILITIES.len() as u32 - 1];
    caps.validate().expect("the last capability is fine");
    for c in [kiln::spec::CAPABILITIES.len() as u32, 64, 65, u32::MAX] {
        caps.cap_add = vec![c];
        assert_eq!(field_of(&caps), "cap_add", "capability {c}");
    }
    let mut lim = RunSpec::new("bb");
    lim.ulimits = vec![Ulimit {
        resource: 99,
        name: "bogus".into(),
        soft: 1,
        hard: 1,
    }];
    assert_eq!(field_of(&lim), "ulimits");
    // A Ulimit built by hand, not parsed, with soft above hard.
    lim.ulimits = vec![Ulimit {
        resource: 7,
        name: "nofile".into(),
        soft: 64,
        hard: 32,
    }];
    assert_eq!(field_of(&lim), "ulimits", "soft above hard");
    let mut env = RunSpec::new("bb");
    env.env = vec!["NOEQUALS".into()];
    assert_eq!(field_of(&env), "env");
    let mut commit = RunSpec::new("bb");
    commit.commit = Some("bb:new".into());
    commit.upper = Upper::Memory;
    match commit.validate() {
        Err(e @ SpecError::Conflict { .. }) => {
            let SpecError::Conflict { field, other, .. } = &e else {
                unreachable!()
            };
            assert_eq!((*field, *other), ("commit", "upper"));
            assert!(!e.to_string().contains("--"), "{e}");
        }
        other => panic!("expected SpecError::Conflict, got {other:?}"),
    }
    // Sandbox::run refuses them as RunError::Spec before anything starts.
    let k = Kiln::new();
    let store = kiln::Store::open(k.store()).expect("open store");
    let sandbox = Sandbox::new(store).with_helper(kiln_bin());
    caps.cap_add = vec![64];
    assert!(matches!(
        sandbox.run(&caps),
        Err(kiln::sandbox::RunError::Spec(SpecError::Invalid {
            field: "cap_add",
            ..
        }))
    ));
}

/// A decompression bomb is a typed error an embedder can match (which
/// limit, what sizes), not a string to search; its words name no flag.
#[test]
fn a_bomb_is_a_typed_error() {
    use kiln::layer::LayerError;
    use kiln::{Expansion, ImportError, ImportOptions, ImportSource};
    let k = Kiln::new();
    // A tar of one 64 MiB file of zeros, gzip'd: about 64 KiB.
    let bomb = k.dir.path().join("bomb.tar.gz");
    sh(std::process::Command::new("sh")
        .current_dir(k.dir.path())
        .args([
            "-c",
            "truncate -s 64M zero && tar -cf - zero | gzip -c > bomb.tar.gz && rm zero",
        ]));
    let store = kiln::Store::open(k.store()).expect("open store");
    let mut opts = ImportOptions::new("bomb");
    opts.limits.max_bytes = 1 << 20;
    let err = store
        .import(ImportSource::Path(bomb.clone()), &opts)
        .expect_err("a 64 MiB stream over a 1 MiB limit");
    match &err {
        // The stream or the layer written from it: whichever check
        // crosses the limit first.
        ImportError::Layer(LayerError::Bomb {
            exceeded: Expansion::Size { limit } | Expansion::Layer { limit, .. },
            ..
        }) => assert_eq!(*limit, 1 << 20),
        other => panic!("expected a typed bomb error, got {other:?}"),
    }
    assert!(!err.to_string().contains("--"), "{err}");
    // The ratio limit trips on its own too.
    let mut opts = ImportOptions::new("bomb");
    opts.limits.max_ratio = 10;
    opts.limits.ratio_after = 1 << 20;
    let err = store
        .import(ImportSource::Path(bomb), &opts)
        .expect_err("64 MiB from 64 KiB is over 10:1");
    assert!(
        matches!(
            err,
            ImportError::Layer(LayerError::Bomb {
                exceeded: Expansion::Ratio { max_ratio: 10, .. },
                ..
            })
        ),
        "{err:?}"
    );
}

/// The example embedder (examples/embedder.rs): a program not named kiln.
fn embedder_bin() -> std::path::PathBuf {
    std::env::var_os("KILN_EMBEDDER")
        .map(Into::into)
        .unwrap_or_else(|| {
            let kiln = kiln_bin();
            let dir = kiln.parent().expect("kiln's directory");
            dir.join("examples/embedder")
        })
}

/// An embedder's command in the test's store, with no KILN_HELPER and,
/// first on PATH, a `kiln` that only leaves a mark: whatever kiln
/// re-executes must be the embedder's own binary.
fn embedder(k: &Kiln) -> Command {
    let trap = k.dir.path().join("trap");
    if !trap.exists() {
        fs::create_dir_all(&trap).expect("mkdir trap");
        let script = format!("#!/bin/sh\ntouch {}\nexit 99\n", mark(k).display());
        fs::write(trap.join("kiln"), script).expect("write the trap");
        sh(Command::new("chmod").arg("755").arg(trap.join("kiln")));
    }
    let mut c = Command::new(embedder_bin());
    c.env("KILN_HOME", k.store())
        .env(
            "PATH",
            format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", trap.display()),
        )
        .env_remove("KILN_HELPER")
        .env_remove("KILN_BIN")
        .stdin(std::process::Stdio::null());
    c
}

/// The file the trap `kiln` on the embedder's PATH touches.
fn mark(k: &Kiln) -> std::path::PathBuf {
    k.dir.path().join("kiln-on-path-was-run")
}

/// One entry point is all an embedder needs: `helper::dispatch()` makes
/// its own binary the sandbox helper (forked, and exec'd as
/// `__sandbox-init`) and the VM guest agent of `--via-vm`, with no kiln
/// binary anywhere on its PATH.
#[test]
fn an_embedder_not_named_kiln_imports_runs_and_reads_in_a_vm() {
    require("qemu-system-x86_64");
    let bin = embedder_bin();
    assert!(bin.is_file(), "no embedder at {}", bin.display());
    assert_ne!(bin.file_name().and_then(|n| n.to_str()), Some("kiln"));
    let k = Kiln::new();
    let tar = busybox_tar(k.dir.path());
    // Runs the embedder, which must succeed; its stdout.
    let ok = |c: &mut Command| -> String {
        let out = c.output().expect("spawn the embedder");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let digest = ok(embedder(&k).arg("import").arg(&tar).arg("bb"));
    assert!(digest.starts_with("sha256:"), "{digest}");

    // Forked helper (a single-threaded embedder), then the exec'd one.
    let out = embedder(&k)
        .args(["run", "bb", "sh", "-c", "echo in-sandbox; exit 7"])
        .output()
        .expect("spawn");
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "in-sandbox\n");
    let said =
        ok(embedder(&k)
            .env("KILN_HELPER_EXEC", "1")
            .args(["run", "bb", "echo", "exec'd helper"]));
    assert_eq!(said, "exec'd helper\n");
    assert!(!mark(&k).exists(), "kiln on PATH was run, not the embedder");

    // --via-vm: the embedder is the guest's /init.
    let src = k.dir.path().join("tree");
    fs::create_dir_all(src.join("etc")).expect("mkdir");
    fs::write(src.join("etc/motd"), "read in a vm\n").expect("write");
    let img = k.dir.path().join("root.ext4");
    sh(Command::new(tool("mke2fs"))
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("16M"));
    ok(embedder(&k)
        .arg("import")
        .arg(&img)
        .arg("vm")
        .arg("--via-vm"));
    // The tree read in the VM, checked through kiln's own unpack.
    let dest = k.dir.path().join("unpacked");
    let out = k.run(["unpack".as_ref(), "vm".as_ref(), dest.as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read_to_string(dest.join("etc/motd")).expect("the file read in the VM"),
        "read in a vm\n"
    );
    assert!(!mark(&k).exists(), "kiln on PATH was run, not the embedder");
}

/// The sandbox's own warnings (kernel overlayfs unavailable, so
/// fuse-overlayfs serves, or a copy where this user may not use FUSE)
/// reach the embedder as `RunEvent::Warning` while the run goes on and in
/// `RunResult::warnings`, and never land in the command's stderr.
#[test]
fn the_sandboxs_warnings_reach_the_embedder_not_the_commands_stderr() {
    require("fuse-overlayfs");
    let k = Kiln::new();
    let tar = busybox_tar(k.dir.path());
    k.import(&tar, "bb", &[]);
    let out = embedder(&k)
        .env("KILN_NO_KERNEL_OVERLAY", "1")
        .args(["run", "bb", "sh", "-c", "echo out; echo err >&2"])
        .output()
        .expect("spawn");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    let said = |how: &str| -> Vec<String> {
        err.lines()
            .filter_map(|l| l.strip_prefix(&format!("embedder: {how}: warning: ")))
            .map(str::to_string)
            .collect()
    };
    let (events, result) = (said("event"), said("result"));
    assert_eq!(events, result, "{err}");
    assert!(
        events.first().is_some_and(
            |w| w.contains("kernel overlayfs is unavailable here (KILN_NO_KERNEL_OVERLAY")
        ),
        "{err}"
    );
    assert!(
        events
            .last()
            .is_some_and(|w| w.starts_with("using fuse-overlayfs instead")
                || w.starts_with("copying the image for this run instead")),
        "{err}"
    );
    // The command's stderr is its own: "err" and nothing of kiln's.
    let own: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("embedder: "))
        .collect();
    assert_eq!(own, ["err"], "{err}");
}

/// The library's messages name its own options, not the CLI's flags: the
/// way out of an unknown disk format is `ChainOptions::via_vm`.
#[test]
fn library_messages_name_library_options() {
    let k = Kiln::new();
    let zeros = k.dir.path().join("zeros.img");
    fs::write(&zeros, vec![0u8; 1 << 20]).expect("write");
    let err = kiln::disk::chain::Chain::open(&zeros, &Default::default())
        .map(|_| ())
        .expect_err("zeros are no disk image");
    let text = err.to_string();
    assert!(text.contains("`ChainOptions::via_vm`"), "{text}");
    assert!(!text.contains("--"), "{text}");
}

/// Disk errors pass through typed: a qcow2 overlay imported without its
/// backing file is `ImportError::Disk` holding the qcow2 reader's own
/// `BackingRequired`, naming the backing file.
#[test]
fn disk_errors_pass_through_typed() {
    use kiln::disk::chain::{DiskError, ReaderError};
    use kiln::disk::qcow2::Qcow2Error;
    use kiln::{ImportError, ImportOptions, ImportSource};
    require("qemu-img");
    let k = Kiln::new();
    let base = k.dir.path().join("base.qcow2");
    let top = k.dir.path().join("top.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("16M"));
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&top));
    let store = kiln::Store::open(k.store()).expect("open store");
    let err = store
        .import(ImportSource::Path(top), &ImportOptions::new("top"))
        .expect_err("no backing file given");
    match &err {
        ImportError::Disk {
            source: DiskError::Reader(ReaderError::Qcow2(Qcow2Error::BackingRequired { name })),
            ..
        } => assert!(name.ends_with("base.qcow2"), "{name}"),
        other => panic!("expected the qcow2 reader's BackingRequired, got {other:?}"),
    }
    assert!(!err.to_string().contains("--"), "{err}");
}

/// Import reports through the same callback style as a run: what the
/// source is, bytes read, the layer written, in that order.
#[test]
fn import_with_events_reports_the_steps() {
    use kiln::{Event, ImportOptions, ImportSource};
    let k = Kiln::new();
    let tar = busybox_tar(k.dir.path());
    let store = kiln::Store::open(k.store()).expect("open store");
    let mut seen = Vec::new();
    let report = store
        .import_with_events(
            ImportSource::Path(tar.clone()),
            &ImportOptions::new("bb"),
            &mut |e| {
                seen.push(match e {
                    Event::Detected { .. } => "detected",
                    Event::Progress { .. } => "progress",
                    Event::LayerWritten { .. } => "layer",
                    _ => "other",
                })
            },
        )
        .expect("import");
    let first = |what| seen.iter().position(|s| *s == what);
    assert!(
        first("detected") < first("layer") && first("detected").is_some(),
        "{seen:?}"
    );
    assert!(first("layer").is_some(), "{seen:?}");
    // The same import without events gives the same image.
    let again = store
        .import(ImportSource::Path(tar), &ImportOptions::new("bb2"))
        .expect("import");
    assert_eq!(again.manifest_digest, report.manifest_digest);
}
