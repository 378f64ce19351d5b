//! `kiln import --via-vm`: file systems kiln has no userspace reader for
//! (btrfs, xfs), and ext4 for a cross-check against the native reader, are
//! read inside a throwaway QEMU VM. Real mkfs tools, a real kernel, real
//! QEMU; no loop device and no host mount. Runs as root and unprivileged.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small root tree: dirs, files (one of several extents), a setuid
/// binary, a sticky dir, symlinks, a hardlink, a fifo, a user xattr, a long
/// name; as root also foreign owners and a device node.
fn source_tree(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    for d in ["etc", "usr/bin", "tmp", "var/lib/x"] {
        fs::create_dir_all(src.join(d)).expect("mkdir");
    }
    fs::write(src.join("etc/hostname"), "vm\n").expect("write");
    fs::write(src.join("etc/shadow"), "root:*:1::::::\n").expect("write");
    fs::set_permissions(src.join("etc/shadow"), fs::Permissions::from_mode(0o640)).expect("chmod");
    let big: Vec<u8> = (0..700_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(src.join("usr/bin/tool"), &big).expect("write");
    fs::set_permissions(src.join("usr/bin/tool"), fs::Permissions::from_mode(0o755))
        .expect("chmod");
    fs::write(src.join("usr/bin/su"), "#!/bin/sh\n").expect("write");
    fs::set_permissions(src.join("usr/bin/su"), fs::Permissions::from_mode(0o4755)).expect("chmod");
    fs::set_permissions(src.join("tmp"), fs::Permissions::from_mode(0o1777)).expect("chmod");
    std::os::unix::fs::symlink("tool", src.join("usr/bin/sh")).expect("symlink");
    std::os::unix::fs::symlink("/etc/hostname", src.join("etc/abs-link")).expect("symlink");
    fs::hard_link(src.join("usr/bin/tool"), src.join("usr/bin/tool2")).expect("link");
    run(Command::new("mkfifo").arg(src.join("var/lib/x/fifo")));
    fs::write(src.join("var/lib/x").join("n".repeat(200)), "long\n").expect("write");
    run(Command::new("setfattr")
        .args(["-n", "user.kiln", "-v", "yes"])
        .arg(src.join("etc/hostname")));
    if is_root() {
        run(Command::new("chown")
            .args(["1234:5678"])
            .arg(src.join("etc/shadow")));
        run(Command::new("mknod")
            .arg(src.join("var/lib/x/null"))
            .args(["c", "1", "3"]));
    }
    run(Command::new("sh").args([
        "-c",
        "find \"$1\" -exec touch -h -d @1600000000 {} +",
        "-",
        src.to_str().expect("utf-8"),
    ]));
    src
}

/// The fields every file system here keeps: kind, mode, owners, content,
/// link target (mtimes, xattrs and hardlinks depend on the mkfs tool).
type Essentials = (String, char, u32, u64, u64, String, String, (u32, u32));

fn essentials(t: &Tree) -> Vec<Essentials> {
    t.iter()
        .filter(|(p, _)| !p.is_empty())
        .map(|(p, n)| {
            (
                p.clone(),
                n.kind,
                n.mode,
                n.uid,
                n.gid,
                n.sha256.clone(),
                n.link.clone(),
                n.dev,
            )
        })
        .collect()
}

/// `kiln import ARGS`, checking that no loop device or mount appeared;
/// returns stderr.
fn import(k: &Kiln, args: &[&str]) -> String {
    let before = loop_state();
    let mut a = vec!["import"];
    a.extend_from_slice(args);
    let out = k.run(&a);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "kiln {a:?}: {err}");
    assert_eq!(before, loop_state(), "a loop device or mount appeared");
    err
}

/// [`import`] with the per-host KVM verdict kept under `cache`.
fn import_env(k: &Kiln, args: &[&str], cache: &std::path::Path) -> String {
    let before = loop_state();
    let out = k
        .cmd()
        .arg("import")
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .env_remove("KILN_VM_ACCEL")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("spawn kiln");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "kiln import {args:?}: {err}");
    assert_eq!(before, loop_state(), "a loop device or mount appeared");
    err
}

#[test]
fn ext4_read_in_a_vm_equals_the_native_reader_and_kvm_is_detected_by_running() {
    require("qemu-system-x86_64");
    let k = Kiln::new();
    let src = source_tree(k.dir.path());
    let img = k.dir.path().join("root.ext4");
    run(Command::new(tool("mke2fs"))
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("64M"));
    let img_s = img.to_str().expect("utf-8");
    import(&k, &[img_s, "-t", "native"]);
    // No KILN_VM_ACCEL and an empty verdict cache: a usable /dev/kvm is
    // tried first and judged by whether the guest speaks.
    let cache = k.dir.path().join("cache");
    let t = std::time::Instant::now();
    let err = import_env(&k, &["--via-vm", img_s, "-t", "vm"], &cache);
    let first = t.elapsed();
    assert!(err.contains("ext4 64 MiB (read in a VM)"), "{err}");
    let verdict = fs::read_to_string(cache.join("kiln/vm-accel")).unwrap_or_default();
    let kvm_usable = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm_usable {
        // Either KVM ran the guest, or it was found broken by running it;
        // the verdict is kept for this host kernel.
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
        let (accel, kept_for) = verdict.split_once(' ').unwrap_or(("", ""));
        assert!(
            kept_for.starts_with(&format!("{} kvm-dev=", release.trim())),
            "verdict {verdict:?}"
        );
        // The verdict is the host's: a new store (a new CI job) does not
        // probe again.
        let k2 = Kiln::new();
        let t = std::time::Instant::now();
        let err2 = import_env(&k2, &["--via-vm", img_s, "-t", "vm"], &cache);
        assert!(
            !err2.contains("kvm does not really work"),
            "probed again: {err2}"
        );
        eprintln!(
            "first import (with the KVM probe) {:.1} s, second {:.1} s",
            first.as_secs_f64(),
            t.elapsed().as_secs_f64()
        );
        assert!(
            accel == "kvm" || (accel == "tcg" && err.contains("kvm does not really work here")),
            "verdict {verdict:?}: {err}"
        );
        eprintln!("KVM verdict on this host: {}", verdict.trim());
    } else {
        eprintln!("/dev/kvm is not usable by this user: the VM ran with TCG directly");
        assert!(err.contains("booting a tcg VM"), "{err}");
    }
    let native = tree_of_tar(&k.only_layer("native"));
    let vm = tree_of_tar(&k.only_layer("vm"));
    assert_same_tree(&native, &vm, "ext4 through the VM vs the native reader");
    assert!(vm.contains_key("usr/bin/tool2") && vm["usr/bin/tool2"].hardlink_group != 0);
}

#[test]
fn btrfs_and_xfs_import_only_through_a_vm_with_their_trees() {
    require("qemu-system-x86_64");
    // KVM detection is the other test's job; here TCG is forced, so this
    // test does not spend the detection deadline on a KVM that hangs.
    eprintln!("KILN_VM_ACCEL=tcg: KVM detection is covered by ext4_read_in_a_vm_...");
    let k = Kiln::new();
    let src = source_tree(k.dir.path());
    let want = essentials(&tree_of_dir(&src));
    // btrfs, bare, made from the tree by mkfs.btrfs --rootdir.
    let btrfs = k.dir.path().join("root.btrfs");
    fs::File::create(&btrfs)
        .and_then(|f| f.set_len(200 << 20))
        .expect("image file");
    run(Command::new(tool("mkfs.btrfs"))
        .arg("-q")
        .arg("-r")
        .arg(&src)
        .arg(&btrfs));
    let b = btrfs.to_str().expect("utf-8");
    // Without --via-vm: a clear error that names the way out.
    let out = k.run(["import", b, "-t", "nope"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("btrfs") && err.contains("--via-vm"), "{err}");
    let run_vm = |args: &[&str]| {
        let before = loop_state();
        let mut a = vec!["import", "--via-vm"];
        a.extend_from_slice(args);
        let out = k
            .cmd()
            .args(&a)
            .env("KILN_VM_ACCEL", "tcg")
            .output()
            .expect("kiln");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "kiln {a:?}: {err}");
        assert_eq!(before, loop_state(), "a loop device or mount appeared");
        err
    };
    let err = run_vm(&[b, "-t", "btr"]);
    assert!(err.contains("btrfs 200 MiB (read in a VM)"), "{err}");
    let got = tree_of_tar(&k.only_layer("btr"));
    // mkfs.btrfs 6.2 --rootdir stores device nodes without their numbers
    // (the ext4 test checks that numbers do come through the VM).
    let no_rdev = |v: &[Essentials]| -> Vec<Essentials> {
        v.iter()
            .cloned()
            .map(|mut e| {
                e.7 = (0, 0);
                e
            })
            .collect()
    };
    assert_eq!(no_rdev(&essentials(&got)), no_rdev(&want), "btrfs tree");
    assert_eq!(
        got["etc/hostname"]
            .xattrs
            .get("user.kiln")
            .map(Vec::as_slice),
        Some(&b"yes"[..])
    );
    assert_eq!(got["usr/bin/tool"].mtime, 1_600_000_000);
    // The same input gives the same image.
    run_vm(&[b, "-t", "btr2"]);
    assert_eq!(k.inspect("btr")["digest"], k.inspect("btr2")["digest"]);

    // xfs (from a protofile: mkfs.xfs cannot copy a directory) in the
    // second partition of a GPT disk, in qcow2.
    let xfs = k.dir.path().join("root.xfs");
    let proto = k.dir.path().join("proto");
    fs::write(&proto, xfs_proto(&src)).expect("proto");
    fs::File::create(&xfs)
        .and_then(|f| f.set_len(320 << 20))
        .expect("image file");
    run(Command::new(tool("mkfs.xfs"))
        .arg("-q")
        .arg("-p")
        .arg(&proto)
        .arg(&xfs));
    let raw = k.dir.path().join("disk.raw");
    let table = "label: gpt\nstart=2048, size=20480, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\nstart=22528, size=655360, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n";
    gpt_disk(&raw, 400 << 20, table, &xfs);
    let qcow = k.dir.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow));
    let err = run_vm(&[qcow.to_str().expect("utf-8"), "-t", "xfs"]);
    assert!(
        err.contains("gpt p2") && err.contains("xfs 320 MiB (read in a VM)"),
        "{err}"
    );
    let got = tree_of_tar(&k.only_layer("xfs"));
    // The protofile has no hardlinks (tool2 is a copy there) and no
    // sticky bit.
    let no_sticky: Vec<Essentials> = want
        .iter()
        .cloned()
        .map(|mut e| {
            e.2 &= !0o1000;
            e
        })
        .collect();
    assert_eq!(essentials(&got), no_sticky, "xfs tree");

    // A corrupt xfs (its superblock scribbled over after the magic): the
    // guest kernel refuses it, and kiln says so; nothing is tagged.
    let mut bytes = fs::read(&xfs).expect("read xfs");
    for (i, b) in bytes[8..512].iter_mut().enumerate() {
        *b = (i * 37 % 256) as u8;
    }
    let bad = k.dir.path().join("bad.xfs");
    fs::write(&bad, &bytes).expect("write bad xfs");
    let before = loop_state();
    let out = k
        .cmd()
        .args([
            "import",
            "--via-vm",
            bad.to_str().expect("utf-8"),
            "-t",
            "bad",
        ])
        .env("KILN_VM_ACCEL", "tcg")
        .output()
        .expect("kiln");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("the guest could not mount the xfs file system read-only"),
        "{err}"
    );
    assert_eq!(before, loop_state(), "a loop device or mount appeared");
    assert!(
        !k.ok(["images"]).contains("bad"),
        "a failed import was tagged"
    );
}

/// An xfs protofile for `src` (mkfs.xfs -p): types, modes, owners, content
/// and symlink targets.
fn xfs_proto(src: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    fn line(p: &Path, name: &str, depth: usize, out: &mut String) {
        let md = fs::symlink_metadata(p).expect("stat");
        let ft = md.file_type();
        let mode = md.mode();
        let t = match kind_of(&ft) {
            'd' => 'd',
            'l' => 'l',
            'p' => 'p',
            'c' => 'c',
            'b' => 'b',
            _ => '-',
        };
        let su = if mode & 0o4000 != 0 { 'u' } else { '-' };
        let sg = if mode & 0o2000 != 0 { 'g' } else { '-' };
        // A protofile has no place for the sticky bit.
        let perm = format!("{:03o}", mode & 0o777);
        let pad = " ".repeat(depth);
        let head = format!("{pad}{name} {t}{su}{sg}{perm} {} {}", md.uid(), md.gid());
        match t {
            'd' => {
                out.push_str(&format!("{head}\n"));
                let mut kids: Vec<_> = fs::read_dir(p).expect("readdir").flatten().collect();
                kids.sort_by_key(|e| e.file_name());
                for e in kids {
                    line(&e.path(), &e.file_name().to_string_lossy(), depth + 1, out);
                }
                out.push_str(&format!("{pad}$\n"));
            }
            'l' => {
                let target = fs::read_link(p).expect("readlink");
                out.push_str(&format!("{head} {}\n", target.display()));
            }
            'c' | 'b' => {
                let rdev = md.rdev();
                out.push_str(&format!("{head} {} {}\n", (rdev >> 8) & 0xfff, rdev & 0xff));
            }
            'p' => out.push_str(&format!("{head}\n")),
            _ => out.push_str(&format!("{head} {}\n", p.display())),
        }
    }
    let mut out = String::from("/dev/null\n0 0\n");
    let md = fs::symlink_metadata(src).expect("stat");
    out.push_str(&format!("d--755 {} {}\n", md.uid(), md.gid()));
    let mut kids: Vec<_> = fs::read_dir(src).expect("readdir").flatten().collect();
    kids.sort_by_key(|e| e.file_name());
    for e in kids {
        line(&e.path(), &e.file_name().to_string_lossy(), 1, &mut out);
    }
    out.push_str("$\n");
    out
}
