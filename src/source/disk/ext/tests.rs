//! Crafted corruptions of real `mke2fs` images, and a deterministic
//! mutation test: every hostile input must give a specific error (or at
//! least no panic and no hang).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, FileExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (is e2fsprogs installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn populate(s: &Path) {
    fs::create_dir_all(s.join("a/sub")).unwrap();
    fs::write(s.join("a/file"), b"some content\n").unwrap();
    fs::write(s.join("a/sub/x"), b"x").unwrap();
    fs::write(s.join("a/sub/y"), b"y").unwrap();
    symlink("t".repeat(80), s.join("a/slowlink")).unwrap();
    symlink("fast", s.join("a/fastlink")).unwrap();
    // 20 one-block islands: more extents than fit the inode, so the tree
    // gets an index level.
    let f = fs::File::create(s.join("frag")).unwrap();
    for i in 0..20u64 {
        f.write_all_at(&[i as u8 + 1; 1024], i * 4096).unwrap();
    }
    // Past the 12 direct and 256 single-indirect blocks at 1 KiB: double
    // indirect on ext2.
    fs::write(s.join("big"), vec![7u8; 300 * 1024]).unwrap();
    fs::create_dir(s.join("many")).unwrap();
    for i in 0..60 {
        fs::write(s.join(format!("many/n{i:03}")), b"").unwrap();
    }
    ::xattr::set(s.join("a/file"), "user.k", &[b'v'; 300]).unwrap();
}

/// A small image made by mke2fs with `args`, as bytes.
fn image(args: &[&str], size: &str) -> Vec<u8> {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    populate(&src);
    let img = t.path().join("i.img");
    let mut a = vec!["-F", "-q", "-b", "1024"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-d", src.to_str().unwrap(), img.to_str().unwrap(), size]);
    run("mke2fs", &a);
    fs::read(&img).unwrap()
}

fn ext4() -> Vec<u8> {
    image(&["-t", "ext4", "-O", "^metadata_csum,^has_journal"], "2M")
}

fn open(img: &[u8]) -> Result<ExtFs, ExtError> {
    ExtFs::open(Arc::new(img.to_vec()))
}

/// Path -> inode number.
fn inodes(fs: &ExtFs) -> BTreeMap<String, u32> {
    let mut m = BTreeMap::new();
    fs.walk_with(|e, info, _| -> Result<(), ExtError> {
        m.insert(e.path, info.ino);
        Ok(())
    })
    .unwrap();
    m
}

/// Walks everything, reading all data; returns the first error.
fn walk_err(img: &[u8]) -> ExtError {
    let fs = match open(img) {
        Ok(fs) => fs,
        Err(e) => return e,
    };
    fs.walk(|_, r| -> Result<(), ExtError> {
        let mut v = Vec::new();
        r.read_to_end(&mut v).map_err(|e| ExtError::Io {
            offset: 0,
            source: e,
        })?;
        Ok(())
    })
    .unwrap_err()
}

fn put32(img: &mut [u8], at: u64, v: u32) {
    img[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
}

fn put16(img: &mut [u8], at: u64, v: u16) {
    img[at as usize..at as usize + 2].copy_from_slice(&v.to_le_bytes());
}

/// Byte offset of the directory entry `name` in directory `dir`.
fn dirent_offset(fs: &ExtFs, img: &[u8], dir: u32, name: &[u8]) -> u64 {
    for ext in fs.file_extents(dir).unwrap() {
        let mut pos = ext.physical;
        while pos < ext.physical + ext.len {
            let p = pos as usize;
            let rec = u64::from(u16::from_le_bytes([img[p + 4], img[p + 5]]));
            let nl = usize::from(img[p + 6]);
            if &img[p + 8..p + 8 + nl] == name {
                return pos;
            }
            assert!(rec > 0);
            pos += rec;
        }
    }
    panic!("no entry {name:?}");
}

#[test]
fn pristine_images_walk() {
    for img in [
        ext4(),
        image(&["-t", "ext2"], "2M"),
        image(&["-t", "ext4", "-O", "inline_data"], "2M"),
    ] {
        let fs = open(&img).unwrap();
        let m = inodes(&fs);
        assert!(m.contains_key("a/sub/y") && m.contains_key("many/n059"));
        assert!(!fs.has_linux_root().unwrap());
        // The mutation test relies on this being quick.
        let t = Instant::now();
        fuzz_input(&img);
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}

#[test]
fn bad_magic_is_not_ext() {
    let mut img = ext4();
    put16(&mut img, 1024 + 0x38, 0x1234);
    assert!(matches!(
        open(&img),
        Err(ExtError::NotExt {
            found: "no recognizable file system"
        })
    ));
    img[..4].copy_from_slice(b"XFSB");
    assert!(matches!(open(&img), Err(ExtError::NotExt { found: "xfs" })));
}

#[test]
fn bad_block_size() {
    let mut img = ext4();
    put32(&mut img, 1024 + 0x18, 10);
    let e = open(&img).unwrap_err();
    assert!(
        matches!(
            e,
            ExtError::BadSuperblock {
                field: "s_log_block_size",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn superblock_checksum_is_verified() {
    let mut img = image(&["-t", "ext4"], "4M");
    open(&img).unwrap();
    img[1024 + 0x78] ^= 0x20; // the label
    let e = open(&img).unwrap_err();
    assert!(
        matches!(
            e,
            ExtError::Checksum {
                what: "superblock",
                offset: 1024,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn unknown_incompat_features_are_named() {
    let mut img = ext4();
    let at = 1024 + 0x60;
    let v = u32::from_le_bytes(img[at..at + 4].try_into().unwrap());
    put32(&mut img, at as u64, v | 0x8000_0000 | 0x10000);
    let e = open(&img).unwrap_err();
    match &e {
        ExtError::UnsupportedFeatures { names } => {
            assert_eq!(names, "encrypt, 0x80000000")
        }
        other => panic!("{other}"),
    }
}

#[test]
fn inode_table_past_the_end() {
    let mut img = ext4();
    // 1 KiB blocks: the descriptor table is block 2; bg_inode_table_lo at 8.
    put32(&mut img, 2048 + 8, 0x00FF_FFFF);
    let e = open(&img).unwrap_err();
    assert!(
        matches!(
            e,
            ExtError::BadGroupDesc {
                group: 0,
                offset: 2048,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("outside the file system"), "{e}");
}

#[test]
fn extent_depth_200() {
    let mut img = ext4();
    let fs = open(&img).unwrap();
    let ino = inodes(&fs)["a/file"];
    let at = fs.inode(ino).unwrap().offset + 0x28 + 6;
    put16(&mut img, at, 200);
    match walk_err(&img) {
        ExtError::BadBlockMap {
            ino: i,
            path,
            reason,
            ..
        } => {
            assert_eq!(i, ino);
            assert_eq!(path.0.as_deref(), Some("a/file"));
            assert!(reason.contains("depth 200"), "{reason}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn extent_child_with_wrong_depth_and_block_past_end() {
    let img0 = ext4();
    let fs = open(&img0).unwrap();
    let ino = inodes(&fs)["frag"];
    let inode = fs.inode(ino).unwrap();
    let ib = inode.offset + 0x28;
    // The inode holds an index node (depth 1) pointing at one leaf block.
    assert_eq!(superblock::le16(&img0, ib as usize + 6), 1);
    let leaf = u64::from(superblock::le32(&img0, ib as usize + 12 + 4));
    let mut img = img0.clone();
    put16(&mut img, leaf * 1024 + 6, 1);
    let e = walk_err(&img);
    assert!(e.to_string().contains("its parent expects 0"), "{e}");
    // The index pointing at itself is also refused (depth mismatch), and
    // an index pointing past the end of the file system.
    let mut img = img0.clone();
    put32(&mut img, ib + 12 + 4, 0x7FFF_FFFF);
    let e = walk_err(&img);
    assert!(matches!(e, ExtError::BadBlockMap { .. }), "{e}");
    assert!(e.to_string().contains("outside the file system"), "{e}");
    // A leaf extent past the end.
    let mut img = img0.clone();
    put32(&mut img, leaf * 1024 + 12 + 8, 0x7FFF_FFFF);
    let e = walk_err(&img);
    assert!(e.to_string().contains("outside the file system"), "{e}");
    // Two leaf extents out of order.
    let mut img = img0;
    put32(&mut img, leaf * 1024 + 24, 0);
    let e = walk_err(&img);
    assert!(e.to_string().contains("overlaps or precedes"), "{e}");
}

#[test]
fn indirect_block_loop() {
    let mut img = image(&["-t", "ext2"], "2M");
    let fs = open(&img).unwrap();
    let ino = inodes(&fs)["big"];
    let inode = fs.inode(ino).unwrap();
    let dind = superblock::le32(&img, inode.offset as usize + 0x28 + 13 * 4);
    assert_ne!(
        dind, 0,
        "300 KiB at 1 KiB blocks needs a double-indirect block"
    );
    // The double-indirect block's first entry points back at itself.
    put32(&mut img, u64::from(dind) * 1024, dind);
    let e = walk_err(&img);
    assert!(e.to_string().contains("referenced twice"), "{e}");
}

#[test]
fn dir_rec_len_zero() {
    let mut img = ext4();
    let fs = open(&img).unwrap();
    let ino = inodes(&fs)["a"];
    let block = fs.file_extents(ino).unwrap()[0].physical;
    put16(&mut img, block + 4, 0);
    match walk_err(&img) {
        ExtError::BadDirEntry {
            ino: i,
            path,
            offset,
            reason,
        } => {
            assert_eq!((i, path.0.as_deref(), offset), (ino, Some("a"), block));
            assert!(reason.contains("record length 0"), "{reason}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn dir_rec_len_past_the_block() {
    let mut img = ext4();
    let fs = open(&img).unwrap();
    let ino = inodes(&fs)["a"];
    let at = dirent_offset(&fs, &img, ino, b"file");
    put16(&mut img, at + 4, 4000);
    let e = walk_err(&img);
    assert!(
        matches!(e, ExtError::BadDirEntry { offset, .. } if offset == at),
        "{e}"
    );
}

#[test]
fn directory_cycle_names_both_paths() {
    let mut img = ext4();
    let fs = open(&img).unwrap();
    let m = inodes(&fs);
    let at = dirent_offset(&fs, &img, m["a/sub"], b"x");
    put32(&mut img, at, m["a"]);
    match walk_err(&img) {
        ExtError::DirCycle {
            ino,
            first,
            second,
            offset,
        } => {
            assert_eq!(
                (ino, first.as_str(), second.as_str(), offset),
                (m["a"], "a", "a/sub/x", at)
            );
        }
        other => panic!("{other}"),
    }
}

#[test]
fn inode_number_out_of_range() {
    let mut img = ext4();
    let fs = open(&img).unwrap();
    let m = inodes(&fs);
    let at = dirent_offset(&fs, &img, m["a"], b"file");
    put32(&mut img, at, 0x7FFF_FFFF);
    match walk_err(&img) {
        ExtError::InodeOutOfRange { ino, path, .. } => {
            assert_eq!((ino, path.0.as_deref()), (0x7FFF_FFFF, Some("a/file")));
        }
        other => panic!("{other}"),
    }
}

#[test]
fn absurd_file_size() {
    let mut img = ext4();
    let fs = open(&img).unwrap();
    let ino = inodes(&fs)["a/file"];
    let off = fs.inode(ino).unwrap().offset;
    put32(&mut img, off + 0x6C, 0x40_0000); // i_size_high: 16 PiB
    match walk_err(&img) {
        ExtError::BadInode { ino: i, reason, .. } => {
            assert_eq!(i, ino);
            assert!(
                reason.contains("more than its block map can address"),
                "{reason}"
            );
        }
        other => panic!("{other}"),
    }
}

#[test]
fn absurd_symlink_length() {
    let mut img = ext4();
    let fs = open(&img).unwrap();
    let ino = inodes(&fs)["a/slowlink"];
    let off = fs.inode(ino).unwrap().offset;
    put32(&mut img, off + 0x4, 1 << 20);
    let e = walk_err(&img);
    assert!(
        e.to_string().contains("symlink target length 1048576"),
        "{e}"
    );
}

#[test]
fn lying_link_count_still_gives_a_hardlink() {
    let mut img = ext4();
    let fs = open(&img).unwrap();
    let m = inodes(&fs);
    // a/sub/y now names the inode of a/sub/x, whose link count stays 1.
    let at = dirent_offset(&fs, &img, m["a/sub"], b"y");
    put32(&mut img, at, m["a/sub/x"]);
    let fs = open(&img).unwrap();
    let mut got = None;
    fs.walk(|e, _| -> Result<(), ExtError> {
        if e.path == "a/sub/y" {
            got = Some((e.kind, e.link));
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(got, Some((EntryKind::Hardlink, Some(b"a/sub/x".to_vec()))));
}

/// Seeded xorshift64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Byte ranges holding metadata: superblock, descriptors, the used part of
/// the first inode table, directory blocks, external xattr blocks and the
/// extent/indirect blocks are near those, so a window after each dir block
/// is included too.
fn metadata_ranges(img: &[u8]) -> Vec<(u64, u64)> {
    let fs = open(img).unwrap();
    let mut r = vec![(1024, 2048), (2048, 3072)];
    let it = fs.groups[0].inode_table * fs.sb.block_size;
    r.push((it, it + 80 * u64::from(fs.sb.inode_size)));
    for (_, ino) in inodes(&fs) {
        let inode = fs.inode(ino).unwrap();
        if inode.file_acl != 0 {
            let b = inode.file_acl * fs.sb.block_size;
            r.push((b, b + fs.sb.block_size));
        }
        if inode.kind() == S_IFDIR {
            for e in fs.file_extents(ino).unwrap() {
                r.push((e.physical, e.physical + e.len));
            }
        }
    }
    r
}

#[test]
fn mutations_never_panic_or_hang() {
    let images = [
        ext4(),
        image(&["-t", "ext2"], "2M"),
        image(&["-t", "ext4", "-O", "inline_data,^has_journal"], "2M"),
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    for img in &images {
        let ranges = metadata_ranges(img);
        let mut m = img.clone();
        for _ in 0..1000 {
            let flips = 1 + rng.next() % 4;
            let mut saved = Vec::new();
            for _ in 0..flips {
                let (lo, hi) = ranges[(rng.next() % ranges.len() as u64) as usize];
                let at = (lo + rng.next() % (hi - lo)) as usize;
                saved.push((at, m[at]));
                m[at] = match rng.next() % 4 {
                    0 => 0,
                    1 => 0xff,
                    _ => rng.next() as u8,
                };
            }
            let t = Instant::now();
            fuzz_input(&m);
            slowest = slowest.max(t.elapsed());
            for (at, v) in saved.into_iter().rev() {
                m[at] = v;
            }
        }
    }
    eprintln!(
        "3000 mutated images in {:?}, slowest {slowest:?}",
        start.elapsed()
    );
    assert!(slowest < Duration::from_secs(5), "{slowest:?}");
}
