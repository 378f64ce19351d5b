//! The VHD, qcow2 and partition-table readers against the real tools:
//! images made by `qemu-img`/`qemu-io` and tables made by `sfdisk` must read
//! byte for byte as `qemu-img convert -O raw` and `sfdisk --json` say. Plus
//! deterministic mutation runs: thousands of damaged images that must open
//! or fail cleanly, never panic or hang.
//!
//! The tools come from qemu-utils and fdisk (scripts/setup.sh); a missing
//! tool fails the test with a message.

mod common;
use common::tool;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use kiln::disk::part::{Guid, PartitionKind, PartitionTable, Scheme};
use kiln::disk::qcow2::{Compression, Qcow2, Qcow2Error};
use kiln::disk::vhd::{Vhd, VhdError, VhdKind};
use kiln::disk::{part, qcow2, vhd, Cursor, FileSource, ReadAt};
use sha2::{Digest, Sha256};

fn run(prog: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(tool(prog))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("spawn {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A seeded xorshift64 (no dependency, deterministic across runs).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A raw disk of `size` bytes in 64 KiB stripes: random, zero, a repeated
/// byte (compressible), random with a zero hole not aligned to anything.
fn make_raw(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut data = vec![0u8; size];
    for (i, stripe) in data.chunks_mut(64 << 10).enumerate() {
        match i % 4 {
            0 | 3 => stripe.iter_mut().for_each(|b| *b = rng.next() as u8),
            1 => {}
            _ => stripe.fill(i as u8),
        }
        if i % 4 == 3 {
            let len = stripe.len();
            stripe[777.min(len)..(777 + 5000).min(len)].fill(0);
        }
    }
    fs::write(path, &data).expect("write raw");
    data
}

fn sha_of(d: &dyn ReadAt) -> String {
    let mut h = Sha256::new();
    let mut c = Cursor::new(d, 0);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = c.read(&mut buf).expect("read virtual disk");
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
    assert_eq!(total, d.size(), "the reader ended early");
    hex::encode(h.finalize())
}

fn sha_file(path: &Path) -> String {
    hex::encode(Sha256::digest(fs::read(path).expect("read file")))
}

fn file(path: &Path) -> Arc<dyn ReadAt> {
    Arc::new(FileSource::open(path).expect("open image"))
}

/// What qemu itself reads from `image`: `qemu-img convert -O raw`. The
/// format is explicit: qemu probes a fixed VHD (no header at offset 0) as
/// raw, footer included.
fn qemu_raw(dir: &Path, image: &str) -> PathBuf {
    let out = dir.join(format!("{image}.qemu.raw"));
    let format = if image.ends_with(".vhd") {
        "vpc"
    } else {
        "qcow2"
    };
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            format,
            "-O",
            "raw",
            image,
            out.to_str().expect("utf8"),
        ],
        dir,
    );
    out
}

/// Asserts that `disk` reads exactly as qemu reads `image`.
fn assert_same_as_qemu(dir: &Path, image: &str, disk: &dyn ReadAt) {
    let reference = qemu_raw(dir, image);
    assert_eq!(
        disk.size(),
        fs::metadata(&reference).expect("stat").len(),
        "{image}: virtual size differs from qemu's"
    );
    assert_eq!(
        sha_of(disk),
        sha_file(&reference),
        "{image}: bytes differ from qemu-img convert -O raw"
    );
}

const RAW_SIZE: usize = (6 << 20) + (192 << 10); // not a whole number of 2 MiB VHD blocks

#[test]
fn vhd_dynamic_and_fixed_read_as_qemu_reads_them() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let raw = make_raw(&dir.join("disk.raw"), RAW_SIZE, 1);
    let raw_sha = hex::encode(Sha256::digest(&raw));
    for (name, opts, kind) in [
        (
            "dyn.vhd",
            "subformat=dynamic,force_size=on",
            VhdKind::Dynamic,
        ),
        ("fixed.vhd", "subformat=fixed,force_size=on", VhdKind::Fixed),
        // Without force_size qemu rounds the size up to a CHS geometry and
        // writes creator "qemu"; current_size still agrees with qemu.
        ("chs.vhd", "subformat=dynamic", VhdKind::Dynamic),
    ] {
        run(
            "qemu-img",
            &[
                "convert", "-f", "raw", "-O", "vpc", "-o", opts, "disk.raw", name,
            ],
            dir,
        );
        let disk = Vhd::open(file(&dir.join(name))).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(disk.kind(), kind, "{name}");
        assert!(
            disk.describe().starts_with(&format!("vhd {kind} ")),
            "{}",
            disk.describe()
        );
        assert_same_as_qemu(dir, name, &disk);
        if opts.contains("force_size") {
            assert_eq!(disk.size(), RAW_SIZE as u64, "{name}");
            assert_eq!(sha_of(&disk), raw_sha, "{name}: differs from the source");
        }
    }
    // The zero stripes of a dynamic disk are unallocated 2 MiB blocks only
    // if a whole block is zero; at least the BAT says block 0 has data.
    let disk = Vhd::open(file(&dir.join("dyn.vhd"))).expect("open");
    assert!(disk.allocated(0));
    assert_eq!(disk.block_size(), Some(2 << 20));
    assert_eq!(disk.creator_app(), "qem2");
}

#[test]
fn vhd_sparse_blocks_read_as_zeros() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    // 8 MiB, data only in the third 2 MiB block.
    let mut raw = vec![0u8; 8 << 20];
    raw[(4 << 20) + 5..(4 << 20) + 9].copy_from_slice(b"kiln");
    fs::write(dir.join("sparse.raw"), &raw).expect("write");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
            "sparse.raw",
            "sparse.vhd",
        ],
        dir,
    );
    let disk = Vhd::open(file(&dir.join("sparse.vhd"))).expect("open");
    let allocated: Vec<bool> = (0..4).map(|b| disk.allocated(b * (2 << 20))).collect();
    assert_eq!(allocated, [false, false, true, false]);
    assert_same_as_qemu(dir, "sparse.vhd", &disk);
    assert_eq!(sha_of(&disk), hex::encode(Sha256::digest(&raw)));
}

/// VHD checksum: one's complement of the byte sum without the field.
fn vhd_checksum(b: &mut [u8], field: usize) {
    b[field..field + 4].fill(0);
    let sum = b.iter().fold(0u32, |s, x| s.wrapping_add(u32::from(*x)));
    b[field..field + 4].copy_from_slice(&(!sum).to_be_bytes());
}

/// qemu-img cannot create differencing VHDs (its vpc driver has no backing
/// support), so the child is crafted here over a qemu-made parent: the
/// parent's bytes come from qemu, the child's from the crafted layout.
#[test]
fn vhd_differencing_over_a_qemu_parent() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    make_raw(&dir.join("disk.raw"), RAW_SIZE, 2);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
            "disk.raw",
            "parent.vhd",
        ],
        dir,
    );
    let parent_file = fs::read(dir.join("parent.vhd")).expect("read");
    let mut expected = fs::read(qemu_raw(dir, "parent.vhd")).expect("read");
    let size = expected.len() as u64;
    let block = 2u64 << 20;
    let blocks = size.div_ceil(block);

    // Footer: the parent's with type 4 (differencing) and a new unique id.
    let mut footer = parent_file[..512].to_vec();
    footer[60..64].copy_from_slice(&4u32.to_be_bytes());
    footer[68..84].copy_from_slice(&[0x42; 16]);
    footer[16..24].copy_from_slice(&512u64.to_be_bytes());
    vhd_checksum(&mut footer, 64);
    // Dynamic header: BAT at 1536, parent id and name.
    let mut h = vec![0u8; 1024];
    h[..8].copy_from_slice(b"cxsparse");
    h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    h[16..24].copy_from_slice(&1536u64.to_be_bytes());
    h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    h[28..32].copy_from_slice(&(blocks as u32).to_be_bytes());
    h[32..36].copy_from_slice(&(block as u32).to_be_bytes());
    h[40..56].copy_from_slice(&parent_file[68..84]);
    for (i, u) in "parent.vhd".encode_utf16().enumerate() {
        h[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
    }
    vhd_checksum(&mut h, 36);

    let mut img = footer.clone();
    img.extend_from_slice(&h);
    let mut bat = vec![0xffu8; (blocks as usize * 4).div_ceil(512) * 512];
    let data_start = 1536 + bat.len() as u64;
    let stride = 512 + block;
    // Block 0: sectors 0..8 and 100..=109 and 4095 in the child; block 2:
    // every sector. Unset sectors hold 0xee, which must never be read.
    let mut rng = Rng(99);
    let mut blocks_data = Vec::new();
    for (n, (b, sectors)) in [
        (0u64, vec![(0u64, 8u64), (100, 110), (4095, 4096)]),
        (2, vec![(0, 4096)]),
    ]
    .into_iter()
    .enumerate()
    {
        let sector = (data_start + n as u64 * stride) / 512;
        bat[4 * b as usize..4 * b as usize + 4].copy_from_slice(&(sector as u32).to_be_bytes());
        let mut bitmap = vec![0u8; 512];
        let mut data = vec![0xeeu8; block as usize];
        for (s, e) in sectors {
            for s in s..e {
                bitmap[(s / 8) as usize] |= 0x80 >> (s % 8);
                let at = (s * 512) as usize;
                for x in &mut data[at..at + 512] {
                    *x = rng.next() as u8;
                }
                let g = (b * block + s * 512) as usize;
                expected[g..g + 512].copy_from_slice(&data[at..at + 512]);
            }
        }
        blocks_data.extend_from_slice(&bitmap);
        blocks_data.extend_from_slice(&data);
    }
    img.extend_from_slice(&bat);
    img.extend_from_slice(&blocks_data);
    img.extend_from_slice(&footer);
    fs::write(dir.join("child.vhd"), &img).expect("write");

    let child = file(&dir.join("child.vhd"));
    match Vhd::open(child.clone()) {
        Err(VhdError::ParentRequired { name }) => assert_eq!(name, "parent.vhd"),
        other => panic!("expected ParentRequired, got {other:?}"),
    }
    let parent = Vhd::open(file(&dir.join("parent.vhd"))).expect("parent");
    let child = Vhd::open_with_parent(child, Arc::new(parent)).expect("child");
    assert_eq!(child.kind(), VhdKind::Differencing);
    assert_eq!(
        child.parent_unique_id().map(|id| id.to_vec()),
        Some(parent_file[68..84].to_vec())
    );
    assert_eq!(sha_of(&child), hex::encode(Sha256::digest(&expected)));
    // An unaligned read across child and parent sectors.
    let mut buf = vec![0u8; 3000];
    child.read_exact_at(&mut buf, 99 * 512 + 7).expect("read");
    assert_eq!(buf, expected[99 * 512 + 7..99 * 512 + 3007]);
}

#[test]
fn qcow2_variants_read_as_qemu_reads_them() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let raw = make_raw(&dir.join("disk.raw"), RAW_SIZE, 3);
    let raw_sha = hex::encode(Sha256::digest(&raw));
    let cases: &[(&str, &[&str], u32, Compression)] = &[
        ("v2.qcow2", &["-o", "compat=0.10"], 2, Compression::Zlib),
        ("v3.qcow2", &["-o", "compat=1.1"], 3, Compression::Zlib),
        (
            "v2z.qcow2",
            &["-c", "-o", "compat=0.10"],
            2,
            Compression::Zlib,
        ),
        (
            "v3z.qcow2",
            &["-c", "-o", "compat=1.1"],
            3,
            Compression::Zlib,
        ),
        (
            "zstd.qcow2",
            &["-c", "-o", "compression_type=zstd"],
            3,
            Compression::Zstd,
        ),
        (
            "c512.qcow2",
            &["-o", "cluster_size=512"],
            3,
            Compression::Zlib,
        ),
        (
            "c512z.qcow2",
            &["-c", "-o", "cluster_size=512"],
            3,
            Compression::Zlib,
        ),
        (
            "c2m.qcow2",
            &["-c", "-o", "cluster_size=2M"],
            3,
            Compression::Zlib,
        ),
        (
            "ext.qcow2",
            &["-o", "extended_l2=on,cluster_size=64k"],
            3,
            Compression::Zlib,
        ),
    ];
    for (name, opts, version, compression) in cases {
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&["disk.raw", name]);
        run("qemu-img", &args, dir);
        let disk = Qcow2::open(file(&dir.join(name))).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(disk.version(), *version, "{name}");
        assert_eq!(disk.compression(), *compression, "{name}");
        assert_eq!(disk.size(), RAW_SIZE as u64, "{name}");
        assert_same_as_qemu(dir, name, &disk);
        assert_eq!(sha_of(&disk), raw_sha, "{name}: differs from the source");
        // Small unaligned reads (straddling clusters and compressed ones)
        // agree with the source too.
        let mut rng = Rng(7);
        for _ in 0..200 {
            let len = rng.below(70_000) as usize + 1;
            let at = rng.below((RAW_SIZE - len) as u64) as usize;
            let mut buf = vec![0u8; len];
            disk.read_exact_at(&mut buf, at as u64).expect("read");
            assert!(buf == raw[at..at + len], "{name}: {len} bytes at {at}");
        }
    }
    let d = Qcow2::open(file(&dir.join("zstd.qcow2"))).expect("open");
    assert_eq!(d.describe(), "qcow2 v3 6.2 MiB, 64 KiB clusters, zstd");
}

#[test]
fn qcow2_zero_clusters_written_by_qemu_io() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    make_raw(&dir.join("disk.raw"), RAW_SIZE, 4);
    for (name, opts) in [
        ("zero.qcow2", "compat=1.1"),
        ("zero-ext.qcow2", "compat=1.1,extended_l2=on"),
    ] {
        run(
            "qemu-img",
            &[
                "convert", "-f", "raw", "-O", "qcow2", "-o", opts, "disk.raw", name,
            ],
            dir,
        );
        // Zero writes without unmap become zero-flagged clusters (v3),
        // partial ones zero subclusters (extended L2).
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -z 0 256k",
                "-c",
                "write -z 1088k 8k",
                "-c",
                "write -P 0x5c 3M 5k",
                name,
            ],
            dir,
        );
        let disk = Qcow2::open(file(&dir.join(name))).expect("open");
        assert!(
            disk.allocated(0).expect("allocated"),
            "zero clusters count as allocated"
        );
        let mut head = vec![0xffu8; 256 << 10];
        disk.read_exact_at(&mut head, 0).expect("read");
        assert!(head.iter().all(|b| *b == 0));
        assert_same_as_qemu(dir, name, &disk);
    }
}

#[test]
fn qcow2_overlay_over_a_backing_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    make_raw(&dir.join("disk.raw"), RAW_SIZE, 5);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "disk.raw",
            "base.qcow2",
        ],
        dir,
    );
    // The overlay is larger than its base: the tail reads as zeros.
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "overlay.qcow2",
            "8M",
        ],
        dir,
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 1M 64k",
            "-c",
            "write -P 0xcd 2100000 3000", // partial cluster: qemu copies the rest from the base
            "-c",
            "write -P 0xef 7M 4k",
            "overlay.qcow2",
        ],
        dir,
    );
    let overlay = file(&dir.join("overlay.qcow2"));
    match Qcow2::open(overlay.clone()) {
        Err(e @ Qcow2Error::BackingRequired { .. }) => {
            assert!(e.to_string().contains("\"base.qcow2\""), "{e}");
        }
        other => panic!("expected BackingRequired, got {other:?}"),
    }
    let base = Qcow2::open(file(&dir.join("base.qcow2"))).expect("base");
    let disk = Qcow2::open_with_backing(overlay, Arc::new(base)).expect("overlay");
    assert_eq!(disk.backing_file(), Some("base.qcow2"));
    assert_eq!(disk.backing_format(), Some("qcow2"));
    assert!(
        disk.describe().ends_with("backing \"base.qcow2\""),
        "{}",
        disk.describe()
    );
    assert!(!disk.allocated(0).expect("allocated"));
    assert!(disk.allocated(1 << 20).expect("allocated"));
    assert_same_as_qemu(dir, "overlay.qcow2", &disk);
}

/// A partition as compared with sfdisk: number, start and size in sectors,
/// type, bootable flag, name.
type PartRow = (u32, u64, u64, String, bool, String);

/// The table as `sfdisk --json` reports it, and its partitions.
fn sfdisk_parts(dir: &Path, image: &str) -> (serde_json::Value, Vec<PartRow>) {
    let v: serde_json::Value =
        serde_json::from_str(&run("sfdisk", &["--json", image], dir)).expect("json");
    let t = v["partitiontable"].clone();
    let parts = t["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| {
            let node = p["node"].as_str().expect("node");
            let number: u32 = node[image.len()..].parse().expect("number");
            (
                number,
                p["start"].as_u64().expect("start"),
                p["size"].as_u64().expect("size"),
                p["type"].as_str().expect("type").to_string(),
                p["bootable"].as_bool().unwrap_or(false),
                p["name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    (t, parts)
}

fn kiln_parts(t: &PartitionTable) -> Vec<PartRow> {
    t.partitions
        .iter()
        .map(|p| {
            let (kind, name) = match &p.kind {
                PartitionKind::Mbr(b) => (format!("{b:x}"), String::new()),
                PartitionKind::Gpt { type_guid, name } => (type_guid.to_string(), name.clone()),
            };
            (
                p.number,
                p.start_bytes / t.sector_size,
                p.size_bytes / t.sector_size,
                kind,
                p.bootable,
                name,
            )
        })
        .collect()
}

/// Runs `sfdisk` with `script` on a new sparse file of `size` bytes.
fn sfdisk_image(dir: &Path, name: &str, size: u64, script: &str) -> PathBuf {
    let path = dir.join(name);
    fs::File::create(&path)
        .and_then(|f| f.set_len(size))
        .expect("create");
    let script_path = dir.join(format!("{name}.sfdisk"));
    fs::write(&script_path, script.replace("NAME", name)).expect("write");
    let out = Command::new(tool("sfdisk"))
        .args(["-q", name])
        .current_dir(dir)
        .stdin(fs::File::open(&script_path).expect("open"))
        .output()
        .expect("sfdisk");
    assert!(
        out.status.success(),
        "sfdisk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// 64 MiB: p1 (boot), p3 primaries, p2 extended with logicals p5-p7.
fn make_dos(dir: &Path) -> PathBuf {
    sfdisk_image(
        dir,
        "dos.img",
        64 << 20,
        "label: dos\n\
        NAME1 : start=2048, size=20480, type=83, bootable\n\
        NAME2 : start=22528, size=81920, type=5\n\
        NAME5 : start=24576, size=16384, type=83\n\
        NAME6 : start=43008, size=8192, type=82\n\
        NAME7 : start=53248, size=20000, type=c\n\
        NAME3 : start=106496, size=4096, type=7\n",
    )
}

/// 64 MiB: EFI, Linux filesystem (legacy BIOS bootable), Linux root
/// x86-64, swap; names on the first three.
fn make_gpt(dir: &Path) -> PathBuf {
    sfdisk_image(
        dir,
        "gpt.img",
        64 << 20,
        "label: gpt\n\
        size=4MiB, type=U, name=EFI\n\
        size=20MiB, type=L, name=\"root fs\", attrs=LegacyBIOSBootable\n\
        size=8MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=root-x86-64\n\
        type=S\n",
    )
}

#[test]
fn mbr_with_logicals_matches_sfdisk() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let path = make_dos(dir);
    let (_, mut want) = sfdisk_parts(dir, "dos.img");
    want.retain(|p| p.3 != "5"); // kiln lists data partitions, not the container
    assert_eq!(want.len(), 5, "{want:?}");
    let disk = file(&path);
    let t = PartitionTable::read(&disk).expect("read").expect("a table");
    assert_eq!(t.scheme, Scheme::Mbr);
    assert!(t.notes.is_empty(), "{:?}", t.notes);
    want.sort();
    assert_eq!(kiln_parts(&t), want);
    assert_eq!(
        t.describe(),
        "mbr: p1 0x83 (boot) 10 MiB, p3 0x07 2 MiB, p5 0x83 8 MiB, p6 0x82 4 MiB, p7 0x0c 9.8 MiB"
    );
    // A whole-disk file system (here: zeros) has no table.
    let blank: Arc<dyn ReadAt> = Arc::new(vec![0u8; 1 << 20]);
    assert!(PartitionTable::read(&blank).expect("read").is_none());
}

#[test]
fn gpt_matches_sfdisk_and_survives_a_bad_primary() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let path = make_gpt(dir);
    let (json, want) = sfdisk_parts(dir, "gpt.img");
    assert_eq!(want.len(), 4);
    let t = PartitionTable::read(&file(&path))
        .expect("read")
        .expect("a table");
    assert_eq!(t.scheme, Scheme::Gpt);
    assert_eq!(
        t.disk_guid.map(|g| g.to_string()).as_deref(),
        json["id"].as_str()
    );
    let mut got = kiln_parts(&t);
    // sfdisk --json has no flag for the legacy-BIOS attribute; check it apart.
    assert!(got[1].4, "p2 is LegacyBIOSBootable");
    got[1].4 = false;
    assert_eq!(got, want);
    match &t.partitions[2].kind {
        PartitionKind::Gpt { type_guid, .. } => assert!(type_guid.is_linux_root()),
        k => panic!("{k:?}"),
    }
    assert_eq!(
        match &t.partitions[1].kind {
            PartitionKind::Gpt { type_guid, .. } => *type_guid,
            k => panic!("{k:?}"),
        },
        Guid::LINUX_FILESYSTEM
    );

    // Damage the primary header (its CRC now fails) and, separately, the
    // primary entry array: the backup header at the end takes over.
    for (what, at) in [("header", 512 + 40), ("entry array", 1024 + 5)] {
        let mut img = fs::read(&path).expect("read");
        img[at] ^= 0x10;
        let disk: Arc<dyn ReadAt> = Arc::new(img);
        let t = PartitionTable::read(&disk).expect("read").expect("a table");
        let mut got = kiln_parts(&t);
        got[1].4 = false;
        assert_eq!(got, want, "bad primary {what}");
        assert_eq!(t.notes.len(), 1, "{:?}", t.notes);
        assert!(t.notes[0].contains("using the backup"), "{:?}", t.notes);
    }
}

#[test]
fn partition_inside_a_qcow2_reads_through_both_layers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let path = make_gpt(dir);
    // Put recognizable data into partition 2 (root fs: 10240 + 40960 sectors).
    let mut img = fs::read(&path).expect("read");
    let mut rng = Rng(11);
    let p2 = 10240 * 512..(10240 + 40960) * 512;
    for b in &mut img[p2.clone()] {
        *b = rng.next() as u8;
    }
    fs::write(&path, &img).expect("write");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "gpt.img",
            "gpt.qcow2",
        ],
        dir,
    );
    let disk: Arc<dyn ReadAt> = Arc::new(Qcow2::open(file(&dir.join("gpt.qcow2"))).expect("qcow2"));
    let t = PartitionTable::read(&disk).expect("read").expect("a table");
    let part = t
        .partitions
        .iter()
        .find(|p| p.number == 2)
        .expect("p2")
        .open(&disk)
        .expect("open");
    assert_eq!(sha_of(&part), hex::encode(Sha256::digest(&img[p2])));
}

/// Flips or overwrites `rounds` random bytes (1 to 4 at a time) inside
/// `areas` of `image` and runs `parse` on each mutant, on a worker thread
/// watched from here: a panic fails the test, and so does a run that takes
/// longer than `limit` (a hang or a runaway loop), naming the round.
fn mutate(
    image: &[u8],
    areas: &[std::ops::Range<usize>],
    rounds: usize,
    seed: u64,
    limit: Duration,
    parse: fn(&[u8]),
) {
    let image = image.to_vec();
    let areas = areas.to_vec();
    let round = Arc::new(AtomicUsize::new(0));
    let (done_tx, done_rx) = mpsc::channel();
    let worker_round = round.clone();
    let worker = std::thread::spawn(move || {
        let mut rng = Rng(seed);
        let mut img = image.clone();
        for r in 0..rounds {
            worker_round.store(r, Ordering::Relaxed);
            img.copy_from_slice(&image);
            for _ in 0..=rng.below(4) {
                let area = &areas[rng.below(areas.len() as u64) as usize];
                let at = area.start + rng.below((area.end - area.start) as u64) as usize;
                img[at] = match rng.below(3) {
                    0 => img[at] ^ (1 << rng.below(8)),
                    1 => rng.next() as u8,
                    _ => [0x00, 0xff, 0x7f, 0x80][rng.below(4) as usize],
                };
            }
            parse(&img);
        }
        let _ = done_tx.send(());
    });
    match done_rx.recv_timeout(limit) {
        Ok(()) => worker.join().expect("worker"),
        // The worker panicked: join re-raises its panic here.
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!(
            "mutation round {} (seed {seed:#x}) still running after {limit:?}",
            round.load(Ordering::Relaxed)
        ),
    }
}

#[test]
fn mutated_vhd_never_panics() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    make_raw(&dir.join("small.raw"), 1 << 20, 6);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
            "small.raw",
            "small.vhd",
        ],
        dir,
    );
    let img = fs::read(dir.join("small.vhd")).expect("read");
    let n = img.len();
    // Footer copy, dynamic header, BAT, first bitmap, tail footer; then the
    // same on the image turned into a differencing disk (footer type 4).
    let areas = [0..2048 + 512, n - 512..n];
    mutate(
        &img,
        &areas,
        2000,
        0x9e37_79b9,
        Duration::from_secs(120),
        vhd::fuzz_input,
    );
    let mut diff = img.clone();
    for at in [0, n - 512] {
        diff[at + 60..at + 64].copy_from_slice(&4u32.to_be_bytes());
        vhd_checksum(&mut diff[at..at + 512], 64);
    }
    mutate(
        &diff,
        &areas,
        2000,
        0x85eb_ca6b,
        Duration::from_secs(120),
        vhd::fuzz_input,
    );
    // Mutants with their checksums made right again get past the checksum
    // checks into the header and BAT validation.
    for (image, seed) in [(&img, 0xc2b2_ae35), (&diff, 0x27d4_eb2f)] {
        mutate(
            image,
            &areas,
            2000,
            seed,
            Duration::from_secs(120),
            vhd_fuzz_with_checksums,
        );
    }
}

/// [`vhd::fuzz_input`] after fixing the footer and dynamic header checksums.
fn vhd_fuzz_with_checksums(data: &[u8]) {
    let mut d = data.to_vec();
    let n = d.len();
    vhd_checksum(&mut d[..512], 64);
    vhd_checksum(&mut d[512..1536], 36);
    vhd_checksum(&mut d[n - 512..], 64);
    vhd::fuzz_input(&d);
}

/// [`part::fuzz_input`] after fixing the primary GPT header's CRCs (entry
/// array at LBA 2, as sfdisk writes it; header size as the header says,
/// within the sector).
fn gpt_fuzz_with_crcs(data: &[u8]) {
    let mut d = data.to_vec();
    let count = u32::from_le_bytes(d[512 + 80..512 + 84].try_into().expect("4 bytes")) as usize;
    let esize = u32::from_le_bytes(d[512 + 84..512 + 88].try_into().expect("4 bytes")) as usize;
    if let Some(array) = count
        .checked_mul(esize)
        .and_then(|len| d.get(1024..1024 + len))
    {
        let crc = crc32fast::hash(array);
        d[512 + 88..512 + 92].copy_from_slice(&crc.to_le_bytes());
    }
    let hsize = (u32::from_le_bytes(d[512 + 12..512 + 16].try_into().expect("4 bytes")) as usize)
        .clamp(92, 512);
    d[512 + 16..512 + 20].fill(0);
    let crc = crc32fast::hash(&d[512..512 + hsize]);
    d[512 + 16..512 + 20].copy_from_slice(&crc.to_le_bytes());
    part::fuzz_input(&d);
}

#[test]
fn mutated_qcow2_never_panics() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    make_raw(&dir.join("small.raw"), 1 << 20, 7);
    for (name, opts) in [
        ("m.qcow2", &["-o", "cluster_size=4k"][..]),
        ("mz.qcow2", &["-c", "-o", "cluster_size=4k"][..]),
        (
            "mzstd.qcow2",
            &["-c", "-o", "cluster_size=4k,compression_type=zstd"][..],
        ),
        ("mext.qcow2", &["-o", "cluster_size=16k,extended_l2=on"][..]),
    ] {
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&["small.raw", name]);
        run("qemu-img", &args, dir);
        let img = fs::read(dir.join(name)).expect("read");
        let q = Qcow2::open(Arc::new(img.clone())).expect("valid image");
        let cs = q.cluster_size() as usize;
        // The header cluster plus the refcount and L1/L2 clusters qemu puts
        // right behind it.
        let meta = (6 * cs).min(img.len());
        mutate(
            &img,
            &[0..meta, 0..128],
            2000,
            0x1234_5678,
            Duration::from_secs(120),
            qcow2::fuzz_input,
        );
    }
}

#[test]
fn mutated_partition_tables_never_panic() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    // 1 MiB disks (each mutant is copied and fully read): an MBR with three
    // logicals, a GPT with three entries.
    let dos = fs::read(sfdisk_image(
        dir,
        "small-dos.img",
        1 << 20,
        "label: dos\n\
        NAME1 : start=64, size=200, type=83, bootable\n\
        NAME2 : start=300, size=1500, type=5\n\
        NAME5 : start=332, size=200, type=83\n\
        NAME6 : start=600, size=300, type=82\n\
        NAME7 : start=1000, size=500, type=c\n\
        NAME3 : start=1850, size=100, type=7\n",
    ))
    .expect("read");
    let gpt = fs::read(sfdisk_image(
        dir,
        "small-gpt.img",
        1 << 20,
        "label: gpt\nfirst-lba: 34\n\
        start=40, size=200, type=U, name=EFI\n\
        start=300, size=500, type=L, name=root\n\
        start=900, size=100, type=S\n",
    ))
    .expect("read");
    // The table sectors: the MBR and every EBR (found by their signature).
    let table_sectors: Vec<std::ops::Range<usize>> = dos
        .chunks(512)
        .enumerate()
        .filter(|(_, s)| s[510..] == [0x55, 0xaa])
        .map(|(i, _)| i * 512 + 440..i * 512 + 512)
        .collect();
    assert_eq!(table_sectors.len(), 4, "MBR + 3 EBRs");
    let t = PartitionTable::read(&(Arc::new(dos.clone()) as Arc<dyn ReadAt>))
        .expect("read")
        .expect("table");
    assert_eq!(t.partitions.len(), 5);
    mutate(
        &dos,
        &table_sectors,
        3000,
        0xdead_beef,
        Duration::from_secs(120),
        part::fuzz_input,
    );
    let n = gpt.len();
    let t = PartitionTable::read(&(Arc::new(gpt.clone()) as Arc<dyn ReadAt>))
        .expect("read")
        .expect("table");
    assert_eq!(t.partitions.len(), 3);
    let gpt_areas = [0..512 * 34, n - 512 * 33..n, 512..512 + 92];
    mutate(
        &gpt,
        &gpt_areas,
        3000,
        0xfeed_f00d,
        Duration::from_secs(120),
        part::fuzz_input,
    );
    mutate(
        &gpt,
        &[512..512 + 92, 1024..1024 + 3 * 128],
        3000,
        0x1656_67b1,
        Duration::from_secs(120),
        gpt_fuzz_with_crcs,
    );
}

/// Sequential read speed of a 1 GiB qcow2 (run by hand:
/// `cargo test --release --test disk_containers -- --ignored --nocapture`).
#[test]
#[ignore]
fn qcow2_sequential_speed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let mut rng = Rng(8);
    let data: Vec<u8> = (0..(1usize << 30)).map(|_| rng.next() as u8).collect();
    fs::write(dir.join("big.raw"), &data).expect("write");
    drop(data);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "big.raw",
            "big.qcow2",
        ],
        dir,
    );
    let raw = file(&dir.join("big.raw"));
    let q = Qcow2::open(file(&dir.join("big.qcow2"))).expect("open");
    assert_eq!(sha_of(&*raw), sha_of(&q));
    let time = |d: &dyn ReadAt| {
        let mut buf = vec![0u8; 1 << 20];
        let t = Instant::now();
        let mut c = Cursor::new(d, 0);
        while c.read(&mut buf).expect("read") > 0 {}
        t.elapsed()
    };
    // Both files are in the page cache: this measures the reader's overhead.
    let (raw_time, q_time) = (time(&*raw), time(&q));
    println!("1 GiB read: raw file {raw_time:?}, through qcow2 {q_time:?}");
}
