//! Sparse files stay sparse: directory, tarball and ext4 imports store them
//! in the PAX sparse 1.0 format (checked with GNU tar, bsdtar, umoci and
//! podman), layers stay small and reproducible, and `kiln unpack` /
//! `kiln rootfs` write them back with their holes.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

/// Asserts `got` has the content of `want` and is sparse on disk: it
/// occupies less than `max_alloc` bytes.
fn assert_sparse_copy(want: &Path, got: &Path, max_alloc: u64, what: &str) {
    assert_eq!(
        fs::metadata(got).expect("stat").len(),
        fs::metadata(want).expect("stat").len(),
        "{what}: size of {}",
        got.display()
    );
    assert_eq!(
        sha256_file(got),
        sha256_file(want),
        "{what}: content of {}",
        got.display()
    );
    assert!(
        on_disk(got) < max_alloc,
        "{what}: {} occupies {} bytes, not sparse",
        got.display(),
        on_disk(got)
    );
}

/// The test tree: `big` 200 MiB with a few KiB at 0, 50 MiB and the end;
/// `allhole` 64 MiB of hole; `smallhole` with a 16 KiB hole (below the
/// threshold: stored plain); `plain`, no hole.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("data")).expect("mkdir");
    let big = root.join("data/big");
    sparse_file(
        &big,
        200 * MIB,
        &[
            (0, &noise(1, 5000)),
            (50 * MIB, &noise(2, 3000)),
            (200 * MIB - 4096, &noise(3, 4096)),
        ],
    );
    sparse_file(&root.join("allhole"), 64 * MIB, &[]);
    sparse_file(
        &root.join("smallhole"),
        48 << 10,
        &[(0, &noise(4, 16 << 10)), (32 << 10, &noise(5, 16 << 10))],
    );
    fs::write(root.join("plain"), noise(6, 100_000)).expect("write");
    // A path longer than a ustar name field (stand-in name truncated).
    fs::create_dir_all(root.join(long_path()).parent().expect("parent")).expect("mkdir");
    sparse_file(&root.join(long_path()), 3 * MIB, &[(MIB, b"long")]);
    assert!(
        on_disk(&big) < MIB,
        "the test directory {} does not keep holes (file system without sparse files?)",
        root.display()
    );
}

/// A sparse file's path of more than 100 bytes.
fn long_path() -> String {
    format!(
        "data/{}/{}",
        "long-directory-name-".repeat(4),
        "long-file-name-".repeat(5)
    )
}

/// The uncompressed layer tar of image `name` (its only or top layer).
fn layer_tar(k: &Kiln, name: &str, out: &Path) -> PathBuf {
    let blob = k.top_layer(name);
    let f = fs::File::open(&blob).expect("open blob");
    let mut d = flate2::read::MultiGzDecoder::new(f);
    let mut w = fs::File::create(out).expect("create");
    std::io::copy(&mut d, &mut w).expect("gunzip layer");
    out.to_path_buf()
}

fn layer_digest(k: &Kiln, name: &str) -> String {
    let v = k.inspect(name);
    v["manifest"]["layers"]
        .as_array()
        .and_then(|l| l.last())
        .and_then(|l| l["digest"].as_str())
        .expect("layer digest")
        .to_string()
}

/// `GNU tar -tvf` and `bsdtar -tvf` list the real names and sizes; both
/// extract the files with their content and holes.
fn check_with_tar_tools(layer: &Path, src: &Path, files: &[&str], dir: &Path) {
    require("tar");
    require("bsdtar");
    for tool in ["tar", "bsdtar"] {
        let list = sh(Command::new(tool).arg("-tvf").arg(layer));
        assert!(
            !list.contains("GNUSparseFile"),
            "{tool} does not see the stand-in names: {list}"
        );
        for f in files {
            let size = fs::metadata(src.join(f)).expect("stat").len();
            assert!(
                list.lines()
                    .any(|l| l.ends_with(f) && l.contains(&size.to_string())),
                "{tool} lists {f} with size {size}: {list}"
            );
        }
        let out = dir.join(format!("extracted-{tool}"));
        fs::create_dir_all(&out).expect("mkdir");
        sh(Command::new(tool).arg("-xf").arg(layer).arg("-C").arg(&out));
        for f in files {
            assert_sparse_copy(&src.join(f), &out.join(f), MIB, tool);
        }
    }
}

#[test]
fn directory_import_stores_sparse_files_in_pax_sparse_and_unpacks_them_sparse() {
    let k = Kiln::new();
    let src = k.dir.path().join("src");
    make_tree(&src);
    let d1 = k.import(&src, "sparse:1", &[]);
    let d2 = k.import(&src, "sparse:2", &[]);
    assert_eq!(d1, d2, "importing twice gives the same image");

    // The layer: small, PAX sparse entries for the files with big holes.
    // (About 160 KiB of it is real data: noise does not compress.)
    let blob_len = fs::metadata(k.top_layer("sparse:1")).expect("stat").len();
    assert!(blob_len < 400_000, "compressed layer: {blob_len} bytes");
    let layer = layer_tar(&k, "sparse:1", &k.dir.path().join("layer.tar"));
    let tar_len = fs::metadata(&layer).expect("stat").len();
    assert!(
        tar_len < MIB,
        "the uncompressed layer is {tar_len} bytes for 264 MiB of (mostly hole) files"
    );
    let raw = fs::read(&layer).expect("read layer");
    let has = |s: &str| raw.windows(s.len()).any(|w| w == s.as_bytes());
    assert!(has("GNU.sparse.major=1\n") && has("GNU.sparse.minor=0\n"));
    assert!(has("data/GNUSparseFile.0/big\0"));
    assert!(has("GNU.sparse.name=data/big\n"));
    assert!(has(&format!("GNU.sparse.realsize={}\n", 200 * MIB)));
    assert!(has("./GNUSparseFile.0/allhole\0"));
    // A file with a hole below the threshold is a plain entry.
    assert!(!has("GNUSparseFile.0/smallhole") && has("smallhole\0"));

    // What other tools make of it.
    check_with_tar_tools(
        &layer,
        &src,
        &["data/big", "allhole", &long_path()],
        k.dir.path(),
    );
    let theirs = k.dir.path().join("extracted-tar");
    assert_eq!(
        sha256_file(&theirs.join("smallhole")),
        sha256_file(&src.join("smallhole"))
    );

    // kiln unpack and kiln rootfs give the files back, holes and all.
    let out = k.dir.path().join("unpacked");
    k.ok(["unpack", "sparse:1", out.to_str().expect("utf8")]);
    let rootfs = PathBuf::from(k.ok(["rootfs", "sparse:1"]).trim());
    for root in [&out, &rootfs] {
        assert_sparse_copy(&src.join("data/big"), &root.join("data/big"), MIB, "unpack");
        assert_sparse_copy(
            &src.join("allhole"),
            &root.join("allhole"),
            64 << 10,
            "unpack",
        );
        let long = long_path();
        assert_sparse_copy(&src.join(&long), &root.join(&long), MIB, "unpack");
        for f in ["smallhole", "plain"] {
            assert_eq!(sha256_file(&root.join(f)), sha256_file(&src.join(f)), "{f}");
        }
    }

    // The layer itself, imported as a tarball, gives the same layer back.
    let again = k.import(&layer, "from-layer", &[]);
    assert_ne!(again, d1, "a tarball's history differs from a directory's");
    assert_eq!(layer_digest(&k, "from-layer"), layer_digest(&k, "sparse:1"));
}

#[test]
fn gnu_tar_sparse_archives_of_every_format_import_sparse() {
    require("tar");
    let k = Kiln::new();
    let src = k.dir.path().join("src");
    make_tree(&src);
    let mut digests = Vec::new();
    for (name, args) in [
        ("pax-1.0", &["--format=pax", "--sparse-version=1.0"][..]),
        ("pax-0.1", &["--format=pax", "--sparse-version=0.1"][..]),
        ("pax-0.0", &["--format=pax", "--sparse-version=0.0"][..]),
        // The old GNU 'S' entries: read (by the tar crate) as dense files.
        ("gnu", &["--format=gnu"][..]),
    ] {
        let tarball = k.dir.path().join(format!("{name}.tar"));
        sh(Command::new("tar")
            .args(["--sparse", "--numeric-owner", "--owner=0", "--group=0"])
            .args(["--mtime=@1600000000", "--sort=name", "-cf"])
            .arg(&tarball)
            .args(args)
            .arg("-C")
            .arg(&src)
            .args(["data", "allhole", "plain"]));
        k.import(&tarball, name, &[]);
        let out = k.dir.path().join(format!("unpacked-{name}"));
        k.ok(["unpack", name, out.to_str().expect("utf8")]);
        assert_eq!(
            sha256_file(&out.join("plain")),
            sha256_file(&src.join("plain"))
        );
        let layer = layer_tar(&k, name, &k.dir.path().join(format!("{name}.layer.tar")));
        let layer_len = fs::metadata(&layer).expect("stat").len();
        if name == "gnu" {
            // Content right; the holes were expanded by the reader.
            assert!(layer_len > 200 * MIB, "{name}: {layer_len}");
            assert_eq!(
                sha256_file(&out.join("data/big")),
                sha256_file(&src.join("data/big"))
            );
            continue;
        }
        assert!(layer_len < MIB, "{name}: the layer is {layer_len} bytes");
        assert_sparse_copy(&src.join("data/big"), &out.join("data/big"), MIB, name);
        assert_sparse_copy(&src.join("allhole"), &out.join("allhole"), 64 << 10, name);
        digests.push((name, layer_digest(&k, name)));
    }
    // Every PAX sparse version gives the same layer: maps are normalized.
    assert!(digests.windows(2).all(|w| w[0].1 == w[1].1), "{digests:?}");
}

/// A ustar header block.
fn ustar(name: &str, typeflag: u8, size: u64) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"13000000000\0");
    h[156] = typeflag;
    h[257..265].copy_from_slice(b"ustar\x0000");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

fn padded(mut v: Vec<u8>) -> Vec<u8> {
    v.resize(v.len().div_ceil(512) * 512, 0);
    v
}

/// A tar with one PAX sparse entry: `records` (key, value) and `data`.
fn sparse_tar(records: &[(&str, &str)], data: &[u8], typeflag: u8) -> Vec<u8> {
    let mut pax = Vec::new();
    for (k, v) in records {
        let body = format!(" {k}={v}\n");
        let mut n = body.len() + 1;
        while (n.to_string() + &body).len() != n {
            n += 1;
        }
        pax.extend_from_slice(format!("{n}{body}").as_bytes());
    }
    let mut out = ustar("PaxHeaders/f", b'x', pax.len() as u64);
    out.extend(padded(pax));
    out.extend(ustar("d/GNUSparseFile.0/f", typeflag, data.len() as u64));
    out.extend(padded(data.to_vec()));
    out.extend(vec![0u8; 1024]);
    out
}

#[test]
fn hostile_sparse_entries_are_clear_errors() {
    let k = Kiln::new();
    fn v1(size: &str) -> Vec<(&str, &str)> {
        vec![
            ("GNU.sparse.major", "1"),
            ("GNU.sparse.minor", "0"),
            ("GNU.sparse.name", "d/real"),
            ("GNU.sparse.realsize", size),
        ]
    }
    let with_map = |map: &str, data: usize| {
        let mut v = padded(map.as_bytes().to_vec());
        v.extend(vec![b'x'; data]);
        v
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "overlapping",
            sparse_tar(&v1("100000"), &with_map("2\n0\n10\n5\n10\n", 20), b'0'),
            "overlaps or precedes",
        ),
        (
            "out-of-order",
            sparse_tar(&v1("100000"), &with_map("2\n500\n10\n0\n10\n", 20), b'0'),
            "overlaps or precedes",
        ),
        (
            "past-realsize",
            sparse_tar(&v1("100"), &with_map("1\n95\n10\n", 10), b'0'),
            "past the real size",
        ),
        (
            "absurd-count",
            sparse_tar(&v1("100"), &with_map("9999999999999\n", 0), b'0'),
            "claims 9999999999999 segments",
        ),
        (
            "map-longer-than-data",
            sparse_tar(&v1("100"), b"3\n0\n1\n", b'0'),
            "runs past the entry's 6 bytes",
        ),
        (
            "overflow",
            sparse_tar(
                &v1("18446744073709551615"),
                &with_map("1\n18446744073709551615\n10\n", 10),
                b'0',
            ),
            "overflows",
        ),
        (
            "huge-number",
            sparse_tar(
                &v1("100"),
                &with_map("1\n99999999999999999999999\n1\n", 1),
                b'0',
            ),
            "more than 20 digits",
        ),
        (
            "data-mismatch",
            sparse_tar(&v1("100"), &with_map("1\n0\n10\n", 4), b'0'),
            "lists 10 bytes of data but the entry holds 4",
        ),
        (
            "bad-version",
            sparse_tar(
                &[
                    ("GNU.sparse.major", "7"),
                    ("GNU.sparse.minor", "0"),
                    ("GNU.sparse.realsize", "10"),
                ],
                b"",
                b'0',
            ),
            "unsupported GNU sparse format version 7.0",
        ),
        (
            "on-a-symlink",
            sparse_tar(&v1("100"), b"", b'2'),
            "GNU.sparse records on an entry of type '2'",
        ),
        (
            "0.1-odd-map",
            sparse_tar(
                &[
                    ("GNU.sparse.size", "100"),
                    ("GNU.sparse.name", "d/real"),
                    ("GNU.sparse.map", "0,10,50"),
                ],
                &[b'x'; 10],
                b'0',
            ),
            "odd number of values",
        ),
    ];
    for (name, tar, want) in cases {
        let p = k.dir.path().join(format!("{name}.tar"));
        fs::write(&p, tar).expect("write");
        let err = k.fails(["import", p.to_str().expect("utf8"), "-t", name]);
        assert!(err.contains(want), "{name}: {err}");
        // The error names the file (its real name once the records are read).
        assert!(
            err.contains("d/real") || err.contains("GNUSparseFile.0/f"),
            "{name}: {err}"
        );
    }
    // The same entry with a sound map imports.
    let ok = k.dir.path().join("ok.tar");
    fs::write(
        &ok,
        sparse_tar(&v1("100000"), &with_map("2\n0\n10\n99990\n10\n", 20), b'0'),
    )
    .expect("write");
    k.import(&ok, "ok", &[]);
    let out = k.dir.path().join("ok-unpacked");
    k.ok(["unpack", "ok", out.to_str().expect("utf8")]);
    let got = fs::read(out.join("d/real")).expect("read");
    assert_eq!(got.len(), 100_000);
    assert_eq!(&got[..10], b"xxxxxxxxxx");
    assert_eq!(&got[99_990..], b"xxxxxxxxxx");
    assert!(got[10..99_990].iter().all(|b| *b == 0));
}

/// The path of `prog`: on PATH, else in the sbin directories an
/// unprivileged user's PATH often lacks (mke2fs).
fn tool(prog: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| PathBuf::from(prog))
}

#[test]
fn ext4_image_with_sparse_files_imports_sparse() {
    let k = Kiln::new();
    let src = k.dir.path().join("src");
    make_tree(&src);
    let img = k.dir.path().join("sparse.img");
    // mke2fs -d copies holes as holes: 64 MiB hold 264 MiB of files.
    sh(Command::new(tool("mke2fs"))
        .args(["-F", "-q", "-t", "ext4", "-b", "4096", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("64M"));
    let d1 = k.import(&img, "ext:1", &[]);
    let d2 = k.import(&img, "ext:2", &[]);
    assert_eq!(d1, d2, "importing twice gives the same image");
    let layer = layer_tar(&k, "ext:1", &k.dir.path().join("layer.tar"));
    let tar_len = fs::metadata(&layer).expect("stat").len();
    assert!(tar_len < MIB, "the uncompressed layer is {tar_len} bytes");
    check_with_tar_tools(
        &layer,
        &src,
        &["data/big", "allhole", &long_path()],
        k.dir.path(),
    );
    let out = k.dir.path().join("unpacked");
    k.ok(["unpack", "ext:1", out.to_str().expect("utf8")]);
    assert_sparse_copy(
        &src.join("data/big"),
        &out.join("data/big"),
        MIB,
        "ext unpack",
    );
    assert_sparse_copy(
        &src.join("allhole"),
        &out.join("allhole"),
        64 << 10,
        "ext unpack",
    );
    for f in ["smallhole", "plain"] {
        assert_eq!(sha256_file(&out.join(f)), sha256_file(&src.join(f)), "{f}");
    }
    // The same data maps as from the directory (4 KiB blocks on both
    // sides): only the stored data, however the tree came in.
    k.import(&src, "dir", &[]);
    let dir_layer = layer_tar(&k, "dir", &k.dir.path().join("dir.tar"));
    let (ext_maps, dir_maps) = (maps_of(&layer), maps_of(&dir_layer));
    assert_eq!(ext_maps, dir_maps);
    let big = &ext_maps["data/big"];
    assert!(big.iter().map(|s| s.1).sum::<u64>() <= 5 * 4096, "{big:?}");
    assert_eq!(ext_maps["allhole"], vec![]);
    assert!(!ext_maps.contains_key("plain") && !ext_maps.contains_key("smallhole"));
}

/// The data maps of a layer's sparse entries, as kiln reads them.
fn maps_of(layer: &Path) -> BTreeMap<String, Vec<(u64, u64)>> {
    let mut maps = BTreeMap::new();
    let f = fs::File::open(layer).expect("open layer");
    kiln::source::tarball::walk(f, "layer", &mut |e, r, _| {
        std::io::copy(r, &mut std::io::sink()).expect("read");
        if let Some(m) = e.sparse {
            maps.insert(e.path, m);
        }
        Ok(())
    })
    .expect("read layer");
    maps
}
