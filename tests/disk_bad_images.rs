//! Crafted bad images (tests/bad-images, made by its make.sh): each is
//! opened with the reader its name prefix names and read through, and must
//! fail with a clean error naming the reader and where the input went wrong:
//! no panic, no hang (each runs on a thread with a deadline), no success.

// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::fmt::Display;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use kiln::disk::chunks::{ChunkOptions, ChunkedStream};
use kiln::disk::ext::{ExtError, ExtFs};
use kiln::disk::iso9660::{Iso, IsoError};
use kiln::disk::part::PartitionTable;
use kiln::disk::qcow2::Qcow2;
use kiln::disk::vhd::Vhd;
use kiln::disk::xva::Xva;
use kiln::disk::{FileSource, ReadAt};
use kiln::import::Entry;

/// Per image: file name, then substrings its error must contain (beyond the
/// reader's name, which every message must start with).
const CASES: &[(&str, &[&str])] = &[
    (
        "vhd-truncated-footer.vhd",
        &["no \"conectix\" footer at offset 16184"],
    ),
    (
        "vhd-bat-past-eof.vhd",
        &["BAT entry 3 at offset 1548", "past the end"],
    ),
    (
        "qcow2-l1-past-eof.qcow2",
        &["L1 table", "at offset 1099511627776"],
    ),
    (
        "qcow2-absurd-size.qcow2",
        &["disk size 4611686018427387904 at offset 24"],
    ),
    (
        "qcow2-l2-past-eof.qcow2",
        &["L1 entry 0 at offset", "L2 table"],
    ),
    (
        "mbr-ebr-loop.img",
        &["EBR link at offset", "loops back to the EBR at LBA 24"],
    ),
    (
        "gpt-bad-crcs.img",
        &[
            "header CRC32 mismatch at offset 512",
            "mismatch at offset 60928",
        ],
    ),
    ("iso-dir-loop.iso", &["directory loop", "record at byte"]),
    ("iso-ce-loop.iso", &["continuation (CE) loop", "at byte"]),
    ("iso-root-past-eof.iso", &["past the end", "at byte"]),
    (
        "ext4-dir-cycle.img",
        &["reachable as both /a and /a/b/up", "byte offset"],
    ),
    (
        "ext4-extent-depth.img",
        &["inode 15 (/file)", "depth 32767", "byte offset"],
    ),
    (
        "ext4-extent-past-end.img",
        &["inode 15 (/file)", "blocks 9999999", "byte offset"],
    ),
    (
        "chunks-gap",
        &["chunk number 1 is missing", "chunk-000000002.gz"],
    ),
    (
        "chunks-bomb.gz",
        &["past the limit of 16777216 bytes", "offset"],
    ),
    ("chunks-truncated.gz", &["truncated", "offset 4000"]),
    (
        "xva-bad-checksum.xva",
        &["block 0", "tar bytes from 2048", "checksum"],
    ),
    ("xva-truncated.xva", &["at byte"]),
];

fn dir() -> PathBuf {
    common::repo().join("tests/bad-images")
}

fn src(path: &Path) -> Arc<dyn ReadAt> {
    Arc::new(FileSource::open(path).unwrap())
}

/// Reads a disk: all of it when small, else 64 spots and the end.
fn read_disk(d: &dyn ReadAt) -> io::Result<()> {
    const CHUNK: u64 = 64 << 10;
    let size = d.size();
    let offsets: Vec<u64> = if size <= 16 << 20 {
        (0..size.div_ceil(CHUNK)).map(|i| i * CHUNK).collect()
    } else {
        (0..64)
            .map(|i| size / 64 * i)
            .chain([size - CHUNK])
            .collect()
    };
    let mut buf = vec![0u8; CHUNK as usize];
    for o in offsets {
        let n = (size - o).min(CHUNK) as usize;
        d.read_exact_at(&mut buf[..n], o)?;
    }
    Ok(())
}

/// A walk's error: the reader's own, or one from reading a file's data.
#[derive(Debug)]
struct Bad(String);

impl From<IsoError> for Bad {
    fn from(e: IsoError) -> Self {
        Bad(e.to_string())
    }
}

impl From<ExtError> for Bad {
    fn from(e: ExtError) -> Self {
        Bad(e.to_string())
    }
}

fn s<E: Display>(e: E) -> String {
    e.to_string()
}

/// Opens and reads `name` with its reader: `Err(message)` is the expected
/// outcome; `Ok(what)` means the image was accepted.
fn open_and_read(name: &str) -> Result<String, String> {
    let path = dir().join(name);
    let prefix = name.split('-').next().unwrap();
    match prefix {
        "vhd" => {
            let d = Vhd::open(src(&path)).map_err(s)?;
            read_disk(&d).map_err(s)?;
            Ok(format!("vhd of {} bytes", d.size()))
        }
        "qcow2" => {
            let d = Qcow2::open(src(&path)).map_err(s)?;
            read_disk(&d).map_err(s)?;
            Ok(format!("qcow2 of {} bytes", d.size()))
        }
        "mbr" | "gpt" => {
            let disk = src(&path);
            let t = PartitionTable::read(&disk)
                .map_err(s)?
                .ok_or("no partition table")?;
            for p in &t.partitions {
                read_disk(&p.open(&disk).map_err(s)?).map_err(s)?;
            }
            Ok(t.describe())
        }
        "iso" => {
            let iso = Iso::open(src(&path)).map_err(s)?;
            let mut n = 0;
            iso.walk::<Bad, _>("", |_, r| {
                n += 1;
                io::copy(r, &mut io::sink()).map_err(|e| Bad(e.to_string()))?;
                Ok(())
            })
            .map_err(|e| e.0)?;
            Ok(format!("{}: {n} entries", iso.describe()))
        }
        "ext4" => {
            let fs = ExtFs::open(src(&path)).map_err(s)?;
            let mut n = 0;
            fs.walk(|_: Entry, r: &mut dyn Read| -> Result<(), Bad> {
                n += 1;
                io::copy(r, &mut io::sink()).map_err(|e| Bad(e.to_string()))?;
                Ok(())
            })
            .map_err(|e| e.0)?;
            Ok(format!("{}: {n} entries", fs.describe()))
        }
        "chunks" => {
            let opts = ChunkOptions {
                limit: 16 << 20,
                ..ChunkOptions::default()
            };
            let st = if path.is_dir() {
                ChunkedStream::from_dir(&path, opts)
            } else {
                // A lone file is chunk 0.
                ChunkedStream::new(vec![("chunk-000000000.gz".into(), src(&path))], opts)
            }
            .map_err(s)?;
            read_disk(&st).map_err(s)?;
            Ok(st.describe())
        }
        "xva" => {
            let x = Xva::open(src(&path)).map_err(s)?;
            for d in x.disks() {
                read_disk(&**d).map_err(s)?;
            }
            Ok(x.describe())
        }
        other => panic!("{name}: no reader for the prefix {other:?}"),
    }
}

/// Whether `msg` gives a position: "offset N", "byte N", "LBA N", or (for a
/// set of chunk files, which has no single byte stream) a chunk number.
fn names_a_position(msg: &str) -> bool {
    ["offset ", "byte ", "bytes from ", "LBA ", "chunk number "]
        .iter()
        .any(|w| {
            msg.match_indices(w).any(|(i, _)| {
                msg[i + w.len()..]
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit())
            })
        })
}

#[test]
fn every_bad_image_fails_cleanly() {
    let mut on_disk: Vec<String> = fs::read_dir(dir())
        .unwrap_or_else(|e| panic!("{}: {e}", dir().display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "make.sh")
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = CASES.iter().map(|c| c.0.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed, "every file in tests/bad-images has a case");

    let mut failures = Vec::new();
    for (name, want) in CASES {
        let (tx, rx) = mpsc::channel();
        let n = name.to_string();
        let start = Instant::now();
        std::thread::spawn(move || {
            let _ = tx.send(open_and_read(&n));
        });
        let reader = match name.split('-').next().unwrap() {
            "ext4" => "ext:".to_string(),
            "iso" => "iso9660:".to_string(),
            p => format!("{p}:"),
        };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Err(msg)) => {
                eprintln!("{name}: {msg} ({:?})", start.elapsed());
                if !msg.starts_with(&reader) {
                    failures.push(format!("{name}: does not start with {reader:?}: {msg}"));
                } else if !names_a_position(&msg) {
                    failures.push(format!("{name}: names no offset: {msg}"));
                }
                for w in *want {
                    if !msg.contains(w) {
                        failures.push(format!("{name}: {w:?} not in: {msg}"));
                    }
                }
            }
            Ok(Ok(what)) => failures.push(format!("{name}: accepted: {what}")),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                failures.push(format!("{name}: no answer in 30 s (a hang?)"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                failures.push(format!("{name}: the reader panicked (see above)"))
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
