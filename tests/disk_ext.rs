//! The ext2/3/4 reader against images made by the real `mke2fs -d` from a
//! source tree holding every kind of object: the walk must give exactly the
//! entries the directory source gives for the tree itself.

#![allow(clippy::unwrap_used)]

mod common;
use common::{is_root, noise, tool};

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use kiln::disk::ext::{EntryInfo, ExtError, ExtFs, ExtKind};
use kiln::disk::{FileSource, ReadAt};
use kiln::import::{Entry, EntryKind};
use sha2::{Digest, Sha256};

/// Runs a tool, failing the test with its output (or a clear message when
/// the tool is missing).
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(tool(cmd))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const SPARSE_ISLANDS: u64 = 1400;

/// Linux VFS-format POSIX ACL: user::rw-, user:1234:r--, group::r--,
/// mask::r--, other::---.
fn vfs_acl() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (1u16, 6u16, u32::MAX),
        (2, 4, 1234),
        (4, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// The source tree, built once: with device nodes, foreign owners, a
/// trusted.* xattr and a file capability when root, the same tree without
/// those objects otherwise.
fn source() -> &'static Path {
    static SRC: OnceLock<tempfile::TempDir> = OnceLock::new();
    SRC.get_or_init(|| {
        let t = tempfile::tempdir().unwrap();
        build_tree(t.path(), is_root());
        t
    })
    .path()
}

/// The caller's uid and gid (from /proc: no unsafe getuid).
fn my_ids() -> (u32, u32) {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u32 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("Uid:"), field("Gid:"))
}

/// `privileged`: also make what needs root (mknod of devices, chown to
/// other ids, trusted.* xattrs, setcap).
fn build_tree(s: &Path, privileged: bool) {
    let w = |p: &str, data: &[u8]| fs::write(s.join(p), data).unwrap();
    fs::create_dir_all(s.join("etc")).unwrap();
    fs::create_dir_all(s.join("usr/bin")).unwrap();
    fs::create_dir_all(s.join("a/b/c/d/e")).unwrap();
    w("a/b/c/d/e/deep", b"deep file\n");
    w("etc/empty", b"");
    w("etc/hello", b"hello world\n");
    w("etc/5000", &noise(1, 5000));
    // More than 12 blocks at 4 KiB: indirect blocks on ext2/3.
    w("usr/bin/13blocks", &noise(2, 13 * 4096 + 7));
    // Double-indirect at 4 KiB blocks, triple-indirect at 1 KiB.
    w("usr/bin/big", &noise(3, (5 << 20) + 123));
    // Sparse: data islands every 8 KiB, holes between and at the end; at
    // 1400 extents the extent tree needs two index levels.
    {
        let f = fs::File::create(s.join("usr/sparse")).unwrap();
        f.set_len(SPARSE_ISLANDS * 8192 + 100_000).unwrap();
        for i in 0..SPARSE_ISLANDS {
            f.write_all_at(&noise(100 + i, 4096), i * 8192 + 4096)
                .unwrap();
        }
    }
    {
        // All hole.
        let f = fs::File::create(s.join("usr/allhole")).unwrap();
        f.set_len(3 << 20).unwrap();
    }
    run(
        "truncate",
        &["-s", "1M", s.join("usr/truncated").to_str().unwrap()],
    );
    {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(s.join("usr/truncated"))
            .unwrap();
        f.write_all_at(b"middle", 512 * 1024).unwrap();
    }
    fs::create_dir(s.join("many")).unwrap();
    for i in 0..2000 {
        w(&format!("many/entry-{i:05}"), format!("{i}").as_bytes());
    }
    symlink("hello", s.join("etc/short")).unwrap();
    let long = format!("/{}", "long-target-component/".repeat(6));
    assert!(long.len() > 100);
    symlink(&long, s.join("etc/long")).unwrap();
    symlink("/nowhere/at/all", s.join("dangling")).unwrap();
    fs::hard_link(s.join("etc/hello"), s.join("usr/hello-link")).unwrap();
    fs::hard_link(s.join("etc/hello"), s.join("a/b/hello-link2")).unwrap();
    run("mkfifo", &[s.join("fifo").to_str().unwrap()]);
    if privileged {
        run("mknod", &[s.join("null").to_str().unwrap(), "c", "1", "3"]);
        run("mknod", &[s.join("loop0").to_str().unwrap(), "b", "7", "0"]);
        // Needs the new device number encoding (major > 255, minor > 255).
        run(
            "mknod",
            &[s.join("bigdev").to_str().unwrap(), "c", "300", "70000"],
        );
    }
    let sock = std::os::unix::net::UnixListener::bind(s.join("sock")).unwrap();
    drop(sock);
    for (p, m) in [
        ("usr/bin/13blocks", 0o4755),
        ("usr/bin/big", 0o2711),
        ("etc/5000", 0o600),
        // mke2fs -d must open files to copy them: mode 0 only for root.
        ("etc/empty", if privileged { 0o000 } else { 0o400 }),
    ] {
        fs::set_permissions(s.join(p), fs::Permissions::from_mode(m)).unwrap();
    }
    fs::create_dir(s.join("tmp")).unwrap();
    fs::set_permissions(s.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    if privileged {
        std::os::unix::fs::lchown(s.join("etc/5000"), Some(1234), Some(5678)).unwrap();
        std::os::unix::fs::lchown(s.join("a/b"), Some(100_000), Some(100_001)).unwrap();
        std::os::unix::fs::lchown(s.join("etc/long"), Some(70_000), Some(3)).unwrap();
    }
    // Extended attributes: small (in the inode when there is room), large
    // (external block), capabilities, ACLs (access and default).
    let set = |p: &str, k: &str, v: &[u8]| xattr::set(s.join(p), k, v).unwrap();
    set("etc/hello", "user.comment", b"a greeting");
    if privileged {
        set("etc/hello", "trusted.x", b"t");
    }
    set("usr/bin/big", "user.big", &noise(7, 700));
    set("a/b", "user.dir", b"on a directory");
    set("etc/5000", "system.posix_acl_access", &vfs_acl());
    set("tmp", "system.posix_acl_default", &vfs_acl());
    if privileged {
        run(
            "setcap",
            &[
                "cap_net_raw+ep",
                s.join("usr/bin/13blocks").to_str().unwrap(),
            ],
        );
    }
    // Modification times last: everything above touched the directories.
    for (p, when) in [
        ("etc/hello", "2001-02-03 04:05:06 UTC"),
        ("usr/bin/big", "1969-07-20 20:17:40 UTC"),
        ("a/b/c", "2030-01-01 00:00:00 UTC"),
        ("etc/short", "2002-02-02 02:02:02 UTC"),
        ("fifo", "2003-03-03 03:03:03 UTC"),
    ] {
        run("touch", &["-h", "-d", when, s.join(p).to_str().unwrap()]);
    }
    run(
        "touch",
        &["-d", "2010-10-10 10:10:10 UTC", s.to_str().unwrap()],
    );
}

type Tree = BTreeMap<String, String>;

/// Renders an entry and its data (the whole content, holes as zeros,
/// however the source stores them) as one comparable line.
fn describe(e: &Entry, data: &mut dyn Read) -> String {
    let mut h = Sha256::new();
    let n = io::copy(&mut e.dense(data), &mut h).unwrap();
    if e.kind == EntryKind::File {
        assert_eq!(n, e.size, "{}: content length", e.path);
    }
    let xattrs: Vec<String> = e
        .xattrs
        .iter()
        .map(|(k, v)| format!("{k}={}", hex::encode(v)))
        .collect();
    format!(
        "{:?} mode={:o} owner={}:{} mtime={} size={} link={:?} dev={},{} sha={} xattrs={:?}",
        e.kind,
        e.mode,
        e.uid,
        e.gid,
        e.mtime,
        e.size,
        e.link
            .as_ref()
            .map(|l| String::from_utf8_lossy(l).into_owned()),
        e.dev_major,
        e.dev_minor,
        hex::encode(&h.finalize()[..8]),
        xattrs
    )
}

fn source_tree() -> &'static Tree {
    static T: OnceLock<Tree> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = Tree::new();
        kiln::source::dir::walk(source(), &mut |e: Entry, r: &mut dyn Read| {
            t.insert(e.path.clone(), describe(&e, r));
            Ok(())
        })
        .unwrap();
        t
    })
}

struct Walked {
    tree: Tree,
    order: Vec<String>,
    infos: BTreeMap<String, EntryInfo>,
    /// Data maps of the sparse files.
    maps: BTreeMap<String, Vec<(u64, u64)>>,
    fs: ExtFs,
}

fn walk_image(img: &Path) -> Walked {
    let dev: Arc<dyn ReadAt> = Arc::new(FileSource::open(img).unwrap());
    let fs = ExtFs::open(dev).unwrap();
    let mut tree = Tree::new();
    let mut order = Vec::new();
    let mut infos = BTreeMap::new();
    let mut maps = BTreeMap::new();
    fs.walk_with(
        |e: Entry, info: &EntryInfo, r: &mut dyn Read| -> Result<(), ExtError> {
            order.push(e.path.clone());
            infos.insert(e.path.clone(), *info);
            assert_eq!(e.sparse.is_some(), info.sparse, "{}", e.path);
            if let Some(m) = &e.sparse {
                maps.insert(e.path.clone(), m.clone());
            }
            // lost+found is made by mke2fs, not copied from the source.
            if e.path != "lost+found" && !e.path.starts_with("lost+found/") {
                tree.insert(e.path.clone(), describe(&e, r));
            }
            Ok(())
        },
    )
    .unwrap();
    Walked {
        tree,
        order,
        infos,
        maps,
        fs,
    }
}

/// Builds an image with `mke2fs -d`, checks it with e2fsck (optionally
/// indexing directories with -D), walks it and compares with the source.
fn check_variant(name: &str, mkfs_args: &[&str], index_dirs: bool, kind: ExtKind) -> Walked {
    check_variant_sized(name, mkfs_args, index_dirs, kind, "64M", &[])
}

fn check_variant_sized(
    name: &str,
    mkfs_args: &[&str],
    index_dirs: bool,
    kind: ExtKind,
    size: &str,
    debugfs_fixups: &[&str],
) -> Walked {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join(format!("{name}.img"));
    let img_s = img.to_str().unwrap();
    let mut args = vec!["-F", "-q", "-L", name];
    args.extend_from_slice(mkfs_args);
    args.extend_from_slice(&["-d", source().to_str().unwrap(), img_s, size]);
    run("mke2fs", &args);
    for cmd in debugfs_fixups {
        run("debugfs", &["-w", "-R", cmd, img_s]);
    }
    if index_dirs {
        // e2fsck -D turns large directories into htrees; it exits 1 when it
        // changed something.
        let st = Command::new(tool("e2fsck"))
            .args(["-fyD", img_s])
            .output()
            .expect("cannot run e2fsck (is e2fsprogs installed?)");
        assert!(
            st.status.code().unwrap_or(8) <= 1,
            "e2fsck -fyD failed: {st:?}"
        );
        let h = run("debugfs", &["-R", "htree /many", img_s]);
        assert!(
            h.contains("Root node dump"),
            "{name}: /many is not an htree: {h}"
        );
    }
    run("e2fsck", &["-fn", img_s]);
    let start = Instant::now();
    let w = walk_image(&img);
    let took = start.elapsed();
    eprintln!("{name}: {} walked in {took:?}", w.fs.describe());
    assert_eq!(w.fs.kind(), kind, "{name}");
    assert_eq!(w.fs.label(), name);
    assert!(w.fs.has_linux_root().unwrap());
    assert_eq!(w.fs.sockets_skipped(), 1, "{name}: the socket is skipped");

    // Order: root first, then depth first, siblings by name bytes.
    assert_eq!(w.order[0], "");
    let mut sorted = w.order.clone();
    sorted.sort_by(|a, b| {
        a.split('/')
            .map(str::as_bytes)
            .cmp(b.split('/').map(str::as_bytes))
    });
    assert_eq!(w.order, sorted, "{name}: walk order");

    let src = source_tree();
    for (p, want) in src {
        // mke2fs -d gives the root the source directory's attributes only
        // in some versions: compare the root's type alone.
        if p.is_empty() {
            assert!(w.tree[p].starts_with("Dir "));
            continue;
        }
        let got = w
            .tree
            .get(p)
            .unwrap_or_else(|| panic!("{name}: {p} missing"));
        assert_eq!(got, want, "{name}: {p}");
    }
    for p in w.tree.keys() {
        assert!(src.contains_key(p), "{name}: unexpected {p}");
    }
    // What only root can make is really in the image on the root pass; the
    // unprivileged tree is all the caller's own.
    if is_root() {
        for (p, want) in [
            ("null", "Char "),
            ("loop0", "Block "),
            ("bigdev", "dev=300,70000 "),
            ("etc/5000", "owner=1234:5678 "),
            ("a/b", "owner=100000:100001 "),
            ("etc/long", "owner=70000:3 "),
            ("etc/hello", "\"trusted.x=74\""),
            ("usr/bin/13blocks", "\"security.capability="),
        ] {
            assert!(w.tree[p].contains(want), "{name}: {p}: {}", w.tree[p]);
        }
    } else {
        let (uid, gid) = my_ids();
        let own = format!("owner={uid}:{gid} ");
        for p in ["etc/5000", "a/b", "etc/long", "usr/bin/13blocks"] {
            assert!(w.tree[p].contains(&own), "{name}: {p}: {}", w.tree[p]);
        }
        for p in ["null", "loop0", "bigdev"] {
            assert!(!w.tree.contains_key(p), "{name}: {p}");
        }
    }
    for (p, want) in [
        ("fifo", "Fifo "),
        ("etc/hello", "\"user.comment=61206772656574696e67\""),
        ("etc/5000", "\"system.posix_acl_access="),
        ("usr/bin/13blocks", "mode=4755 "),
    ] {
        assert!(w.tree[p].contains(want), "{name}: {p}: {}", w.tree[p]);
    }

    // The sparse file is reported as sparse with exactly its data stored.
    let info = w.infos["usr/sparse"];
    assert!(info.sparse);
    let ext = w.fs.file_extents(info.ino).unwrap();
    // Cross-check with debugfs: the data blocks of the leaf extents.
    let ex = run("debugfs", &["-R", "ex /usr/sparse", img_s]);
    let mut leaf_blocks = 0u64;
    let mut ext_tree = false;
    for line in ex.lines() {
        // " 2/ 2   1/339     1 -     1  5386 -  5386      1 [Uninit]"
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.len() >= 4 && t[0].ends_with('/') && t[0].trim_end_matches('/') == t[1] {
            ext_tree = true;
            if t.last() != Some(&"Uninit") {
                leaf_blocks += t.last().unwrap().parse::<u64>().unwrap();
            }
        }
    }
    if ext_tree {
        assert_eq!(
            info.allocated,
            leaf_blocks * w.fs.block_size(),
            "{name}: {ex}"
        );
    }
    if w.fs.block_size() <= 4096 && !name.contains("inline") {
        assert_eq!(
            info.allocated,
            SPARSE_ISLANDS * 4096,
            "{name}: {:?}",
            &ext[ext.len().saturating_sub(3)..]
        );
        assert!(
            ext.len() >= SPARSE_ISLANDS as usize,
            "{name}: {}",
            ext.len()
        );
    }
    assert!(ext
        .windows(2)
        .all(|x| x[0].logical + x[0].len <= x[1].logical));
    // Its data map holds exactly the stored data: the initialized extents.
    let map = &w.maps["usr/sparse"];
    let stored: u64 = map.iter().map(|s| s.1).sum();
    assert_eq!(stored, info.allocated, "{name}");
    let mut want: Vec<(u64, u64)> = Vec::new();
    for x in ext.iter().filter(|x| x.initialized) {
        match want.last_mut() {
            Some(l) if l.0 + l.1 == x.logical => l.1 += x.len,
            _ => want.push((x.logical, x.len)),
        }
    }
    assert_eq!(map, &want, "{name}");
    assert!(!w.maps.contains_key("usr/bin/big"), "{name}");
    let info = w.infos["usr/allhole"];
    // (Inline data keeps the 60 bytes of i_block, zeros here.)
    assert!(info.sparse && info.allocated <= 60, "{name}: {info:?}");
    let info = w.infos["usr/bin/big"];
    assert!(
        !info.sparse && info.allocated == (5 << 20) + 123,
        "{name}: {info:?}"
    );
    w
}

#[test]
fn ext4_default() {
    let w = check_variant("ext4", &["-t", "ext4"], true, ExtKind::Ext4);
    assert_eq!(
        w.fs.block_size(),
        1024,
        "small file systems get 1 KiB blocks"
    );
}

#[test]
fn ext4_4k_blocks() {
    check_variant(
        "ext4-4k",
        &["-t", "ext4", "-b", "4096"],
        true,
        ExtKind::Ext4,
    );
}

#[test]
fn ext4_64k_blocks() {
    // Every small file takes a 64 KiB block: a bigger (sparse) image.
    check_variant_sized(
        "ext4-64k",
        &["-t", "ext4", "-b", "65536"],
        false, // 2000 names fit one 64 KiB block: no htree
        ExtKind::Ext4,
        "512M",
        &[],
    );
}

#[test]
fn ext2() {
    check_variant("ext2", &["-t", "ext2"], true, ExtKind::Ext2);
}

#[test]
fn ext2_4k_128byte_inodes() {
    // No room in the inode for xattrs: all go to the external block.
    check_variant(
        "ext2-4k",
        &["-t", "ext2", "-b", "4096", "-I", "128"],
        false,
        ExtKind::Ext2,
    );
}

#[test]
fn ext3() {
    check_variant("ext3", &["-t", "ext3", "-b", "4096"], true, ExtKind::Ext3);
}

#[test]
fn ext4_inline_data() {
    // mke2fs 1.47.0 with inline_data drops a trailing hole from the size
    // of files it copies (debugfs shows the short size too): restore the
    // sizes, so the trailing holes are still read.
    let sparse = format!("sif /usr/sparse size {}", SPARSE_ISLANDS * 8192 + 100_000);
    let w = check_variant_sized(
        "ext4-inline",
        &["-t", "ext4", "-O", "inline_data"],
        false,
        ExtKind::Ext4,
        "64M",
        &[&sparse, "sif /usr/truncated size 1048576"],
    );
    // Small files live in the inode: no extents at all.
    let info = w.infos["etc/hello"];
    assert_eq!(w.fs.file_extents(info.ino).unwrap(), vec![]);
}

#[test]
fn ext4_without_extents() {
    check_variant(
        "ext4-noext",
        &["-t", "ext4", "-O", "^extent,^64bit", "-b", "4096"],
        true,
        ExtKind::Ext4,
    );
}

#[test]
fn ext4_32bit_no_csum() {
    check_variant(
        "ext4-32",
        &["-t", "ext4", "-O", "^64bit,^metadata_csum"],
        true,
        ExtKind::Ext4,
    );
}

#[test]
fn ext4_64bit_meta_bg() {
    check_variant(
        "ext4-metabg",
        &["-t", "ext4", "-O", "64bit,meta_bg,^resize_inode"],
        true,
        ExtKind::Ext4,
    );
}

#[test]
fn preallocated_extents_read_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), noise(9, 10 * 4096)).unwrap();
    let img = dir.path().join("p.img");
    let img_s = img.to_str().unwrap();
    run(
        "mke2fs",
        &[
            "-F",
            "-q",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-d",
            src.to_str().unwrap(),
            img_s,
            "16M",
        ],
    );
    // Uninitialized blocks past the data, then grow the size over them.
    run("debugfs", &["-w", "-R", "fallocate /f 10 19", img_s]);
    run("debugfs", &["-w", "-R", "sif /f size 81920", img_s]);
    let w = walk_image(&img);
    let info = w.infos["f"];
    let ext = w.fs.file_extents(info.ino).unwrap();
    assert!(ext.iter().any(|e| !e.initialized), "{ext:?}");
    assert!(info.sparse);
    assert_eq!(info.allocated, 10 * 4096);
    let mut want = noise(9, 10 * 4096);
    want.resize(81920, 0);
    let mut got = Vec::new();
    w.fs.walk(|e: Entry, r: &mut dyn Read| -> Result<(), ExtError> {
        if e.path == "f" {
            // Only the initialized data is stored; the rest is a hole.
            assert_eq!(e.sparse, Some(vec![(0, 10 * 4096)]));
            e.dense(r).read_to_end(&mut got).unwrap();
        }
        Ok(())
    })
    .unwrap();
    assert!(got == want, "preallocated blocks must read as zeros");
}

#[test]
fn non_utf8_name_is_a_clear_error() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(
        src.join("sub")
            .join(std::ffi::OsStr::from_bytes(b"bad\xffname")),
        b"x",
    )
    .unwrap();
    let img = dir.path().join("u.img");
    run(
        "mke2fs",
        &[
            "-F",
            "-q",
            "-t",
            "ext4",
            "-d",
            src.to_str().unwrap(),
            img.to_str().unwrap(),
            "8M",
        ],
    );
    let fs = ExtFs::open(Arc::new(FileSource::open(&img).unwrap())).unwrap();
    let err = fs
        .walk(|_: Entry, _: &mut dyn Read| -> Result<(), ExtError> { Ok(()) })
        .unwrap_err();
    match &err {
        ExtError::NonUtf8Name { path } => assert_eq!(path, "sub/bad\u{fffd}name"),
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("not valid UTF-8"), "{err}");
}

#[test]
fn other_file_systems_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.img");
    let f = fs::File::create(&img).unwrap();
    f.set_len(1 << 20).unwrap();
    f.write_all_at(b"XFSB", 0).unwrap();
    let err = ExtFs::open(Arc::new(FileSource::open(&img).unwrap())).unwrap_err();
    assert!(matches!(err, ExtError::NotExt { found: "xfs" }), "{err}");
    f.write_all_at(b"\0\0\0\0", 0).unwrap();
    f.write_all_at(b"_BHRfS_M", 0x10040).unwrap();
    let err = ExtFs::open(Arc::new(FileSource::open(&img).unwrap())).unwrap_err();
    assert!(matches!(err, ExtError::NotExt { found: "btrfs" }), "{err}");
}

/// The walk's errors convert into the import pipeline's through `E`.
#[test]
fn walk_errors_flow_through_the_callers_error_type() {
    #[derive(Debug)]
    enum MyErr {
        Ext,
        Mine,
    }
    impl From<ExtError> for MyErr {
        fn from(_: ExtError) -> Self {
            MyErr::Ext
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    let img = dir.path().join("e.img");
    run(
        "mke2fs",
        &[
            "-F",
            "-q",
            "-t",
            "ext4",
            "-d",
            src.to_str().unwrap(),
            img.to_str().unwrap(),
            "8M",
        ],
    );
    let fs = ExtFs::open(Arc::new(FileSource::open(&img).unwrap())).unwrap();
    let r = fs.walk(|e: Entry, _: &mut dyn Read| {
        if e.path == "f" {
            Err(MyErr::Mine)
        } else {
            Ok(())
        }
    });
    assert!(matches!(r, Err(MyErr::Mine)));
}

/// A big image: walk time (run with --ignored and KILN_EXT_BENCH=image).
#[test]
#[ignore]
fn bench_walk() {
    let img = std::env::var("KILN_EXT_BENCH").expect("KILN_EXT_BENCH=path/to/image");
    let start = Instant::now();
    let fs = ExtFs::open(Arc::new(FileSource::open(img.as_ref()).unwrap())).unwrap();
    let (mut files, mut bytes) = (0u64, 0u64);
    fs.walk(|_: Entry, r: &mut dyn Read| -> Result<(), ExtError> {
        files += 1;
        bytes += io::copy(r, &mut io::sink()).unwrap();
        Ok(())
    })
    .unwrap();
    let took = start.elapsed();
    if let Ok(src) = std::env::var("KILN_EXT_BENCH_SRC") {
        // The tree the image was made from, with mke2fs -d.
        let mut want = Tree::new();
        kiln::source::dir::walk(src.as_ref(), &mut |e: Entry, r: &mut dyn Read| {
            want.insert(e.path.clone(), describe(&e, r));
            Ok(())
        })
        .unwrap();
        let mut got = walk_image(img.as_ref()).tree;
        got.remove("");
        want.remove("");
        assert_eq!(got.len(), want.len());
        for (p, w) in &want {
            assert_eq!(got.get(p), Some(w), "{p}");
        }
    }
    eprintln!(
        "{}: {files} entries, {bytes} bytes in {:?}",
        fs.describe(),
        took
    );
}

#[test]
fn ea_inode_values_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    // Larger than the image's 1 KiB blocks (the host's 4 KiB blocks
    // limit the source): needs an xattr inode.
    let big = noise(11, 3000);
    xattr::set(src.join("f"), "user.huge", &big).unwrap();
    let img = dir.path().join("ea.img");
    let img_s = img.to_str().unwrap();
    run(
        "mke2fs",
        &[
            "-F",
            "-q",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-O",
            "ea_inode",
            "-d",
            src.to_str().unwrap(),
            img_s,
            "16M",
        ],
    );
    run("e2fsck", &["-fn", img_s]);
    let w = walk_image(&img);
    let want = format!("user.huge={}", hex::encode(&big));
    assert!(w.tree["f"].contains(&want), "{}", &w.tree["f"][..200]);
}
