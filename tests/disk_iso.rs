//! Disk-image readers against real tools: ISOs from xorriso, DDK-like chunked
//! streams and XVA exports from scripts/make-ddk-like-iso.sh.

// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use kiln::disk::chunks::{ChunkError, ChunkOptions, ChunkedStream};
use kiln::disk::ext::{ExtError, ExtFs};
use kiln::disk::iso9660::{Iso, IsoError, NameMode};
use kiln::disk::part::PartitionTable;
use kiln::disk::xva::Xva;
use kiln::disk::{Cursor, FileSource, ReadAt};
use kiln::import::{Entry, EntryKind};
use sha2::{Digest, Sha256};

use common::{is_root, require, sh, tmpdir};

#[derive(Debug, Clone, PartialEq, Eq)]
struct N {
    kind: char,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: i64,
    sha: String,
    link: Vec<u8>,
    dev: (u64, u64),
}

fn sha_hex(r: &mut dyn Read) -> String {
    let mut h = Sha256::new();
    io::copy(r, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// The tree under `root` as the ISO should show it.
fn host_tree(root: &Path) -> BTreeMap<String, N> {
    let mut out = BTreeMap::new();
    fn visit(p: &Path, rel: String, out: &mut BTreeMap<String, N>) {
        let md = fs::symlink_metadata(p).unwrap();
        let ft = md.file_type();
        let kind = common::kind_of(&ft);
        let sha = if kind == 'f' {
            sha_hex(&mut fs::File::open(p).unwrap())
        } else {
            String::new()
        };
        let link = if kind == 'l' {
            std::os::unix::ffi::OsStrExt::as_bytes(fs::read_link(p).unwrap().as_os_str()).to_vec()
        } else {
            Vec::new()
        };
        let rdev = md.rdev();
        let dev = if matches!(kind, 'c' | 'b') {
            (
                ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff),
                (rdev & 0xff) | ((rdev >> 12) & !0xff),
            )
        } else {
            (0, 0)
        };
        out.insert(
            rel.clone(),
            N {
                kind,
                mode: md.mode() & 0o7777,
                uid: u64::from(md.uid()),
                gid: u64::from(md.gid()),
                mtime: md.mtime(),
                sha,
                link,
                dev,
            },
        );
        if kind == 'd' {
            let mut names: Vec<_> = fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                let name = n.to_str().unwrap().to_string();
                let r = if rel.is_empty() {
                    name.clone()
                } else {
                    format!("{rel}/{name}")
                };
                visit(&p.join(&n), r, out);
            }
        }
    }
    visit(root, String::new(), &mut out);
    out
}

/// The ISO walk as the same map; also checks the order (sorted, parents
/// first).
fn iso_tree(iso: &Iso, subdir: &str) -> BTreeMap<String, N> {
    let mut out = BTreeMap::new();
    let mut order = Vec::new();
    iso.walk::<IsoError, _>(subdir, |e, r| {
        let kind = match e.kind {
            EntryKind::Dir => 'd',
            EntryKind::Symlink => 'l',
            EntryKind::Char => 'c',
            EntryKind::Block => 'b',
            EntryKind::Fifo => 'p',
            _ => 'f',
        };
        let sha = if kind == 'f' {
            sha_hex(r)
        } else {
            String::new()
        };
        order.push(e.path.clone());
        out.insert(
            e.path.clone(),
            N {
                kind,
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                mtime: e.mtime,
                sha,
                link: e.link.clone().unwrap_or_default(),
                dev: (u64::from(e.dev_major), u64::from(e.dev_minor)),
            },
        );
        Ok(())
    })
    .unwrap();
    // Depth-first, siblings by name bytes: each path's parent came earlier
    // and siblings are ascending.
    for w in order.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let parent = |p: &str| {
            p.rsplit_once('/')
                .map_or(String::new(), |x| x.0.to_string())
        };
        if parent(a) == parent(b) {
            assert!(a.as_bytes() < b.as_bytes(), "order: {a} before {b}");
        }
    }
    out
}

fn open_iso(p: &Path) -> Iso {
    Iso::open(Arc::new(FileSource::open(p).unwrap())).unwrap()
}

fn xorriso(args: &[&str]) {
    require("xorriso");
    sh(Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet"])
        .args(args));
}

/// A tree exercising Rock Ridge: long names, deep dirs, symlinks (one with
/// a target too long for one SL entry), modes, mtimes, a fifo, and (as
/// root only) device nodes and other owners.
fn make_tree(root: &Path) {
    let long = "a-very-long-file-name-".repeat(10); // 220 bytes
    fs::create_dir_all(root.join("deep/1/2/3/4/5/6/7/8/9/10/11")).unwrap();
    fs::write(
        root.join("deep/1/2/3/4/5/6/7/8/9/10/11/leaf.txt"),
        b"leaf\n",
    )
    .unwrap();
    fs::write(root.join(&long), b"long name\n").unwrap();
    fs::write(root.join("Mixed Case & spaces.TXT"), b"x").unwrap();
    let big: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(root.join("big.bin"), &big).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::create_dir(root.join("bin")).unwrap();
    fs::write(root.join("bin/tool"), b"#!/bin/sh\n").unwrap();
    std::os::unix::fs::symlink("tool", root.join("bin/rel")).unwrap();
    std::os::unix::fs::symlink("/usr/lib/../share/./x", root.join("bin/abs")).unwrap();
    let far = format!("/{}", ["component-of-a-long-target"; 14].join("/")); // ~380 bytes
    std::os::unix::fs::symlink(&far, root.join("bin/far")).unwrap();
    let mode = |p: &str, m: u32| {
        fs::set_permissions(
            root.join(p),
            std::os::unix::fs::PermissionsExt::from_mode(m),
        )
        .unwrap()
    };
    sh(Command::new("mkfifo").arg(root.join("bin/fifo")));
    if is_root() {
        sh(Command::new("mknod")
            .arg(root.join("bin/null"))
            .args(["c", "1", "3"]));
        sh(Command::new("mknod")
            .arg(root.join("bin/sda"))
            .args(["b", "8", "0"]));
        sh(Command::new("chown")
            .args(["-h", "1234:5678"])
            .arg(root.join("bin/tool")));
        sh(Command::new("chown")
            .args(["-h", "7:8"])
            .arg(root.join("bin/rel")));
        sh(Command::new("chown")
            .args(["1000:1000"])
            .arg(root.join("deep/1")));
    }
    // After chown, which clears set-id bits.
    mode("bin/tool", 0o4755);
    mode("empty", 0o600);
    mode("deep/1", 0o1777);
    // Fixed mtimes, bottom-up so directories keep theirs.
    sh(Command::new("find").arg(root).args([
        "-depth",
        "-exec",
        "touch",
        "-h",
        "-d",
        "@1600000000",
        "{}",
        "+",
    ]));
    sh(Command::new("touch")
        .args(["-d", "@1234567890"])
        .arg(root.join("big.bin")));
}

#[test]
fn rock_ridge_tree_matches_source_and_xorriso_extract() {
    let t = tmpdir();
    let root = t.path().join("tree");
    make_tree(&root);
    let iso_path = t.path().join("rr.iso");
    xorriso(&[
        "-R",
        "-J",
        "-V",
        "RRTEST",
        "-o",
        iso_path.to_str().unwrap(),
        root.to_str().unwrap(),
    ]);
    let iso = open_iso(&iso_path);
    assert_eq!(iso.name_mode(), NameMode::RockRidge);
    assert!(
        iso.describe()
            .starts_with("iso9660 \"RRTEST\" (rock ridge) "),
        "{}",
        iso.describe()
    );
    let want = host_tree(&root);
    let got = iso_tree(&iso, "");
    for (p, w) in &want {
        let g = got
            .get(p)
            .unwrap_or_else(|| panic!("{p:?} missing from the ISO walk"));
        // Symlink modes are 0777 in the ISO whatever the host shows.
        let mut w = w.clone();
        if w.kind == 'l' {
            w.mode = g.mode;
        }
        assert_eq!(g, &w, "{p:?}");
    }
    assert_eq!(
        got.len(),
        want.len(),
        "extra entries: {:?}",
        got.keys()
            .filter(|k| !want.contains_key(*k))
            .collect::<Vec<_>>()
    );
    assert_eq!(got["bin/fifo"].kind, 'p');
    if is_root() {
        assert_eq!(got["bin/null"].dev, (1, 3));
        assert_eq!(got["bin/sda"].kind, 'b');
        assert_eq!(
            (
                got["bin/tool"].uid,
                got["bin/tool"].gid,
                got["bin/tool"].mode
            ),
            (1234, 5678, 0o4755)
        );
    } else {
        // Without root the tree is the caller's own, and so is the ISO's.
        let (uid, gid) = common::my_ids();
        assert!(!got.contains_key("bin/null") && !got.contains_key("bin/sda"));
        assert_eq!(
            (
                got["bin/tool"].uid,
                got["bin/tool"].gid,
                got["bin/tool"].mode
            ),
            (uid, gid, 0o4755)
        );
    }

    // A subdirectory walk is rooted at it.
    let sub = iso_tree(&iso, "deep/1/2");
    assert!(sub.contains_key("") && sub.contains_key("3/4/5/6/7/8/9/10/11/leaf.txt"));
    assert!(iso.lookup("no/such").unwrap().is_none());

    // Second oracle: xorriso's own extraction.
    let out = t.path().join("extract");
    sh(Command::new("xorriso")
        .args(["-osirrox", "on", "-indev"])
        .arg(&iso_path)
        .args(["-extract", "/"])
        .arg(&out));
    let x = host_tree(&out);
    // xorriso does not extract device files unless told to.
    let nodev: Vec<&String> = got
        .iter()
        .filter(|(_, n)| !matches!(n.kind, 'c' | 'b'))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(x.keys().collect::<Vec<_>>(), nodev);
    for (p, n) in &x {
        let g = &got[p];
        assert_eq!(
            (n.kind, &n.sha, &n.link),
            (g.kind, &g.sha, &g.link),
            "{p:?}"
        );
    }
}

#[test]
fn joliet_only_and_plain_names() {
    let t = tmpdir();
    let root = t.path().join("tree");
    fs::create_dir_all(root.join("Sub Dir")).unwrap();
    fs::write(root.join("Sub Dir/Read Me.txt"), b"joliet\n").unwrap();
    fs::write(root.join("readme.txt"), b"plain\n").unwrap();
    fs::write(root.join("Makefile"), b"all:\n").unwrap();

    let j = t.path().join("j.iso");
    xorriso(&[
        "--norock",
        "-J",
        "-o",
        j.to_str().unwrap(),
        root.to_str().unwrap(),
    ]);
    let iso = open_iso(&j);
    assert_eq!(iso.name_mode(), NameMode::Joliet);
    let got = iso_tree(&iso, "");
    let names: Vec<&str> = got.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "",
            "Makefile",
            "Sub Dir",
            "Sub Dir/Read Me.txt",
            "readme.txt"
        ]
    );
    let f = &got["Sub Dir/Read Me.txt"];
    assert_eq!((f.mode, f.uid, f.gid), (0o644, 0, 0));
    assert_eq!(got["Sub Dir"].mode, 0o755);
    assert_eq!(f.sha, sha_hex(&mut &b"joliet\n"[..]));

    let p = t.path().join("p.iso");
    xorriso(&[
        "--norock",
        "-o",
        p.to_str().unwrap(),
        root.to_str().unwrap(),
    ]);
    let iso = open_iso(&p);
    assert_eq!(iso.name_mode(), NameMode::Plain);
    let got = iso_tree(&iso, "");
    // ISO level 1 names: upper case 8.3, ";1" and the lone dot stripped.
    assert!(got.contains_key("README.TXT"), "{:?}", got.keys());
    assert!(got.contains_key("MAKEFILE"), "{:?}", got.keys());
    let n = iso.lookup("README.TXT").unwrap().unwrap();
    let mut s = String::new();
    Cursor::new(iso.open_file(&n).unwrap(), 0)
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "plain\n");
}

/// Whether `prog` is on PATH or in the sbin directories an unprivileged
/// PATH often lacks (the generator looks there too).
fn require_tool(prog: &str) {
    let found = common::have(prog)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(prog).is_file());
    assert!(
        found,
        "{prog} is not installed: run scripts/setup.sh (apt-get install {prog})"
    );
}

/// Runs the generator on a small rootfs tarball holding a device node;
/// returns (output, manifest). Not as root, it runs with ALLOW_NONROOT=1:
/// the device node is skipped and the files are the caller's.
fn generate(dir: &Path, out: &str, env: &[(&str, &str)]) -> (PathBuf, BTreeMap<String, String>) {
    for tool in [
        "tar", "mke2fs", "sfdisk", "qemu-img", "xorriso", "gzip", "sha1sum",
    ] {
        require_tool(tool);
    }
    let rootfs = dir.join("rootfs");
    if !rootfs.exists() {
        fs::create_dir_all(rootfs.join("etc")).unwrap();
        fs::create_dir_all(rootfs.join("usr/bin")).unwrap();
        fs::write(rootfs.join("etc/os-release"), b"ID=ddk\n").unwrap();
        // ~3 MB of poorly compressible data so there are several chunks.
        let mut x = 0x9E3779B97F4A7C15u64;
        let data: Vec<u8> = (0..3_000_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        fs::write(rootfs.join("usr/bin/blob"), data).unwrap();
        // The tarball also holds a device node, owned by root: anyone can
        // write that into a tar; only root can unpack it.
        let mut b = tar::Builder::new(fs::File::create(dir.join("rootfs.tar")).unwrap());
        b.follow_symlinks(false);
        b.append_dir_all(".", &rootfs).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "./dev", io::empty()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Char);
        h.set_mode(0o666);
        h.set_size(0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        b.append_data(&mut h, "./dev/null", io::empty()).unwrap();
        b.into_inner().unwrap();
    }
    let outp = dir.join(out);
    let mut c = Command::new("bash");
    c.arg(common::repo().join("scripts/make-ddk-like-iso.sh"))
        .arg(dir.join("rootfs.tar"))
        .arg(&outp)
        .env("TMPDIR", dir);
    if !is_root() {
        c.env("ALLOW_NONROOT", "1");
    }
    for (k, v) in env {
        c.env(k, v);
    }
    sh(&mut c);
    let m = fs::read_to_string(format!("{}.manifest", outp.display())).unwrap();
    let m = m
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (outp, m)
}

fn sha_of(r: &dyn ReadAt) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < r.size() {
        let n = r.read_at(&mut buf, off).unwrap();
        assert!(n > 0, "short read at {off}");
        h.update(&buf[..n]);
        off += n as u64;
    }
    hex::encode(h.finalize())
}

#[test]
fn ddk_chunks_from_iso_and_dir() {
    let t = tmpdir();
    let (iso_path, m) = generate(t.path(), "ddk.iso", &[("CHUNK_BYTES", "1048576")]);
    let iso = open_iso(&iso_path);
    assert_eq!(iso.name_mode(), NameMode::RockRidge);
    let dir = iso.lookup(&m["chunk_dir"]).unwrap().unwrap();
    let s = ChunkedStream::from_iso(&iso, &dir, ChunkOptions::default()).unwrap();
    assert_eq!(s.chunk_count().to_string(), m["chunk_count"]);
    assert!(
        s.chunk_count() > 10,
        "want many chunks, got {}",
        s.chunk_count()
    );
    assert_eq!(s.size().to_string(), m["stream_bytes"]);
    let start = Instant::now();
    assert_eq!(sha_of(&s), m["stream_sha256"]);
    eprintln!(
        "sequential read of {} bytes in {} chunks: {:?} ({})",
        s.size(),
        s.chunk_count(),
        start.elapsed(),
        s.describe()
    );

    // Extract the chunks to a host directory; the reference stream is zcat.
    let x = t.path().join("x");
    sh(Command::new("xorriso")
        .args(["-osirrox", "on", "-indev"])
        .arg(&iso_path)
        .args(["-extract", "/ddk"])
        .arg(&x));
    let xvda = x.join("xvda");
    let mut names: Vec<String> = fs::read_dir(&xvda)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let zcat = Command::new("zcat")
        .args(names.iter().map(|n| xvda.join(n)))
        .output()
        .unwrap();
    assert!(zcat.status.success());
    let whole = zcat.stdout;
    assert_eq!(whole.len().to_string(), m["stream_bytes"]);

    // Random reads through a fresh stream (lazy: ova.xml gives the size).
    let s = ChunkedStream::from_dir(
        &xvda,
        ChunkOptions {
            span: 256 << 10,
            ..ChunkOptions::default()
        },
    )
    .unwrap();
    let mut r = 0x2545F4914F6CDD1Du64;
    for _ in 0..400 {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        let off = (r % whole.len() as u64) as usize;
        let len = ((r >> 40) % 300_000) as usize;
        let mut buf = vec![0u8; len.min(whole.len() - off)];
        s.read_exact_at(&mut buf, off as u64).unwrap();
        assert_eq!(buf, whole[off..off + buf.len()], "at {off}");
    }

    // Numeric order, different widths: chunk-9 and chunk-10 (string order
    // would put 10 first).
    fs::rename(xvda.join("chunk-000000009.gz"), xvda.join("chunk-9.gz")).unwrap();
    fs::rename(xvda.join("chunk-000000010.gz"), xvda.join("chunk-10.gz")).unwrap();
    fs::write(xvda.join("notes.txt"), b"ignored").unwrap();
    let s = ChunkedStream::from_dir(&xvda, ChunkOptions::default()).unwrap();
    assert_eq!(sha_of(&s), m["stream_sha256"]);

    // A duplicate number.
    fs::copy(xvda.join("chunk-000000005.gz"), xvda.join("chunk-5.gz")).unwrap();
    let e = ChunkedStream::from_dir(&xvda, ChunkOptions::default()).unwrap_err();
    assert!(
        matches!(&e, ChunkError::Duplicate { number: 5, first, second } if first == "chunk-000000005.gz" && second == "chunk-5.gz"),
        "{e}"
    );
    fs::remove_file(xvda.join("chunk-5.gz")).unwrap();
    // A gap.
    fs::rename(xvda.join("chunk-000000003.gz"), t.path().join("c3")).unwrap();
    let e = ChunkedStream::from_dir(&xvda, ChunkOptions::default()).unwrap_err();
    assert!(
        matches!(&e, ChunkError::Gap { number: 3, next } if next == "chunk-000000004.gz"),
        "{e}"
    );
    fs::rename(t.path().join("c3"), xvda.join("chunk-000000003.gz")).unwrap();
    // ova.xml disagreeing with the chunks.
    let ova = x.join("ova.xml");
    let text = fs::read_to_string(&ova).unwrap();
    let size: u64 = m["stream_bytes"].parse().unwrap();
    fs::write(
        &ova,
        text.replace(
            &format!("size=\"{size}\""),
            &format!("size=\"{}\"", size + 512),
        ),
    )
    .unwrap();
    let s = ChunkedStream::from_dir(&xvda, ChunkOptions::default()).unwrap();
    let mut buf = [0u8; 512];
    let e = s.read_exact_at(&mut buf, size).unwrap_err().to_string();
    assert!(
        e.contains(&format!("{}", size + 512)) && e.contains(&size.to_string()),
        "{e}"
    );
    // A truncated chunk is named.
    fs::write(&ova, &text).unwrap();
    let c7 = xvda.join("chunk-000000007.gz");
    let data = fs::read(&c7).unwrap();
    fs::write(&c7, &data[..data.len() / 2]).unwrap();
    let s = ChunkedStream::from_dir(&xvda, ChunkOptions::default()).unwrap();
    let e = io::copy(&mut Cursor::new(&s, 0), &mut io::sink())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("chunk-000000007.gz") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn ddk_qcow2_gpt_variant() {
    let t = tmpdir();
    let (iso_path, m) = generate(
        t.path(),
        "q.iso",
        &[("DISK_FORMAT", "qcow2"), ("PART_TABLE", "gpt")],
    );
    assert_eq!(
        (m["disk_format"].as_str(), m["partition_table"].as_str()),
        ("qcow2", "gpt")
    );
    let iso = open_iso(&iso_path);
    let dir = iso.lookup("ddk/xvda").unwrap().unwrap();
    let s = ChunkedStream::from_iso(&iso, &dir, ChunkOptions::default()).unwrap();
    let mut magic = [0u8; 4];
    s.read_exact_at(&mut magic, 0).unwrap();
    assert_eq!(&magic, b"QFI\xfb");
    assert_eq!(sha_of(&s), m["stream_sha256"]);
}

#[test]
fn xva_disk_equals_raw_disk() {
    let t = tmpdir();
    let (xva_path, m) = generate(
        t.path(),
        "vm.xva",
        &[("OUT_FORMAT", "xva"), ("PART_TABLE", "gpt")],
    );
    let xva = Xva::open(Arc::new(FileSource::open(&xva_path).unwrap())).unwrap();
    let disk = xva.disk(&m["xva_vdi_ref"]).unwrap();
    assert_eq!(disk.size().to_string(), m["virtual_disk_bytes"]);
    assert_eq!(disk.block_count().to_string(), m["xva_blocks_present"]);
    assert!(
        disk.block_count() < m["xva_blocks_total"].parse::<usize>().unwrap(),
        "zero blocks were omitted"
    );
    assert_eq!(disk.unverified_blocks(), 0);
    eprintln!("{}", xva.describe());
    let start = Instant::now();
    assert_eq!(sha_of(&*disk), m["raw_disk_sha256"]);
    eprintln!("xva disk read: {:?}", start.elapsed());
    // The GPT header is at LBA 1.
    let mut sig = [0u8; 8];
    disk.read_exact_at(&mut sig, 512).unwrap();
    assert_eq!(&sig, b"EFI PART");

    // Down the chain to the file system: the device node is there with root
    // (the tarball unpacked as it is), skipped without; the files are
    // root's, or the caller's.
    let disk_src: Arc<dyn ReadAt> = disk.clone();
    let table = PartitionTable::read(&disk_src).unwrap().unwrap();
    assert_eq!(table.partitions.len(), 1);
    let part: Arc<dyn ReadAt> = Arc::new(table.partitions[0].open(&disk_src).unwrap());
    let ext = ExtFs::open(part).unwrap();
    let mut got = BTreeMap::new();
    ext.walk(|e: Entry, _: &mut dyn Read| -> Result<(), ExtError> {
        got.insert(e.path.clone(), e);
        Ok(())
    })
    .unwrap();
    let osr = &got["etc/os-release"];
    if is_root() {
        let null = &got["dev/null"];
        assert_eq!(
            (null.kind, null.dev_major, null.dev_minor, null.uid),
            (EntryKind::Char, 1, 3, 0)
        );
        assert_eq!((osr.uid, osr.gid), (0, 0));
    } else {
        assert!(got.contains_key("dev") && !got.contains_key("dev/null"));
        assert_eq!((osr.uid, osr.gid), common::my_ids());
    }
    assert_eq!(got["usr/bin/blob"].size, 3_000_000);

    // Corrupt one byte of the first block's data: its read fails, naming it.
    let mut bytes = fs::read(&xva_path).unwrap();
    let hdr = bytes
        .windows(14)
        .position(|w| w == b"Ref:1/00000000")
        .unwrap();
    bytes[hdr + 512 + 100] ^= 0xff;
    let bad = t.path().join("bad.xva");
    fs::write(&bad, &bytes).unwrap();
    let xva = Xva::open(Arc::new(FileSource::open(&bad).unwrap())).unwrap();
    let e = xva.disks()[0]
        .read_exact_at(&mut sig, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("block 0") && e.contains("checksum"), "{e}");

    // A gzip-compressed export gets a clear message.
    let gz = t.path().join("vm.xva.gz");
    sh(Command::new("sh").arg("-c").arg(format!(
        "gzip -1 -c {} > {}",
        xva_path.display(),
        gz.display()
    )));
    let e = Xva::open(Arc::new(FileSource::open(&gz).unwrap()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("gzip") && e.contains("decompress"), "{e}");
}
