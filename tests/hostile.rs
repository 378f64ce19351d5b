//! Hostile input: `kiln import` must refuse path escapes, links out of the
//! layer, corrupt and truncated streams and decompression bombs with exit
//! code 125 and a message naming the problem, leave no image and no blob
//! behind (after `gc`), and never write outside its store.

mod common;
use common::*;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;

/// A unique file name for an escape marker, so a stray write is noticed.
fn marker(case: &str) -> String {
    format!("escape-kiln-{}-{case}", std::process::id())
}

/// Lexically resolves `rel` against `base` (no symlinks followed).
fn lexical_join(base: &Path, rel: &str) -> PathBuf {
    let mut out = if rel.starts_with('/') {
        PathBuf::from("/")
    } else {
        base.to_path_buf()
    };
    for c in Path::new(rel).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// Top-level names in the test's temp dir outside the store.
fn outside_store(k: &Kiln) -> BTreeSet<String> {
    fs::read_dir(k.dir.path())
        .expect("read temp dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n != "store")
        .collect()
}

/// Blob names in the store.
fn blobs(k: &Kiln) -> BTreeSet<String> {
    match fs::read_dir(k.store().join("blobs/sha256")) {
        Ok(rd) => rd
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// Asserts that no path an archive entry named `rel` (or a link target `rel`)
/// could resolve to exists: not relative to the store, its blob and temp
/// directories, the test's temp dir, the working directory, or /.
fn assert_no_escape(k: &Kiln, rel: &str) {
    let store = k.store();
    let cwd = std::env::current_dir().expect("cwd");
    for base in [
        store.clone(),
        store.join("blobs/sha256"),
        store.join(".kiln/tmp"),
        k.dir.path().to_path_buf(),
        cwd,
    ] {
        let p = lexical_join(&base, rel);
        assert!(
            fs::symlink_metadata(&p).is_err(),
            "kiln wrote {} outside the store (entry {rel:?})",
            p.display()
        );
    }
    let name = Path::new(rel)
        .file_name()
        .expect("marker name")
        .to_string_lossy()
        .into_owned();
    for dir in [std::env::temp_dir(), k.dir.path().to_path_buf()] {
        assert!(
            fs::symlink_metadata(dir.join(&name)).is_err(),
            "kiln wrote {}",
            dir.join(&name).display()
        );
    }
}

/// After a failed import: the store is consistent, `gc` removes every blob
/// and temp file the import left, and nothing is left over.
fn assert_store_clean(k: &Kiln, blobs_before: &BTreeSet<String>) {
    let fsck = k.ok(["fsck"]);
    assert!(fsck.contains("consistent"), "fsck output: {fsck}");
    let gc: serde_json::Value =
        serde_json::from_str(&k.ok(["gc", "--format", "json"])).expect("gc json");
    assert!(gc.is_object(), "gc json: {gc}");
    let tmp = k.store().join(".kiln/tmp");
    let left: Vec<_> = fs::read_dir(&tmp)
        .expect("read .kiln/tmp")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(left.is_empty(), "temp files left after gc: {left:?}");
    assert_eq!(
        &blobs(k),
        blobs_before,
        "blobs of the failed import survived gc"
    );
    let fsck = k.ok(["fsck"]);
    assert!(fsck.contains("consistent"), "fsck after gc: {fsck}");
    // Only the layout's own files in the store root (no stray index temp files).
    for e in fs::read_dir(k.store()).expect("read store") {
        let n = e.expect("entry").file_name().to_string_lossy().into_owned();
        assert!(
            ["oci-layout", "index.json", "blobs", ".kiln"].contains(&n.as_str()),
            "unexpected {n} in the store root"
        );
    }
}

/// Imports `input` (a file written next to the store), asserts exit 125 with
/// every string of `want` in the message, no new tag, no escape, a clean
/// store. Returns the error message.
fn refuse(
    k: &Kiln,
    case: &str,
    input: &[u8],
    extra: &[&str],
    want: &[&str],
    escapes: &[&str],
) -> String {
    // Make sure the store exists, so "before" snapshots are meaningful.
    let names_before = k.names();
    let blobs_before = blobs(k);
    let src = k.dir.path().join(format!("{case}.input"));
    fs::write(&src, input).expect("write input");
    let outside_before = outside_store(k);
    let tag = format!("hostile:{case}");
    let mut args: Vec<String> = vec![
        "import".into(),
        src.display().to_string(),
        "-t".into(),
        tag.clone(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let err = k.fails(&args);
    eprintln!("[{case}] {}", err.trim_end());
    check_refusal(k, case, &err, want, &tag, &names_before);
    assert_eq!(
        outside_store(k),
        outside_before,
        "{case}: files appeared next to the store"
    );
    for e in escapes {
        assert_no_escape(k, e);
    }
    assert_store_clean(k, &blobs_before);
    err
}

fn check_refusal(
    k: &Kiln,
    case: &str,
    err: &str,
    want: &[&str],
    tag: &str,
    names_before: &[String],
) {
    assert!(
        err.contains("kiln: error:"),
        "{case}: stderr lacks 'kiln: error:': {err}"
    );
    for w in want {
        assert!(
            err.to_lowercase().contains(&w.to_lowercase()),
            "{case}: stderr should mention {w:?}: {err}"
        );
    }
    let names = k.names();
    assert!(
        !names.iter().any(|n| n.starts_with(tag)),
        "{case}: failed import left tag {tag}: {names:?}"
    );
    assert_eq!(
        names, names_before,
        "{case}: tags changed by a failed import"
    );
}

/// The raw (un-normalized) entry paths of a layer blob.
fn raw_paths(layer: &Path) -> Vec<String> {
    let f = fs::File::open(layer).expect("open layer");
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    ar.entries()
        .expect("entries")
        .map(|e| String::from_utf8_lossy(&e.expect("entry").path_bytes()).into_owned())
        .collect()
}

/// A small but real tarball with some incompressible content.
fn small_tar() -> Vec<u8> {
    tar_with_noise(200_000)
}

/// A tarball with `n` bytes of incompressible content in `noise.bin`.
fn tar_with_noise(n: usize) -> Vec<u8> {
    let mut noise = vec![0u8; n];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    TarMaker::new()
        .dir("etc")
        .file("etc/hostname", b"kiln\n")
        .file("noise.bin", &noise)
        .file("etc/motd", b"hello\n")
        .finish()
}

// ---- paths ----------------------------------------------------------------

#[test]
fn dotdot_path_is_refused() {
    let k = Kiln::new();
    let m = format!("../../{}", marker("dotdot"));
    let tar = TarMaker::new()
        .file("ok", b"fine")
        .file(&m, b"pwned")
        .finish();
    let err = refuse(&k, "dotdot", &tar, &[], &[".."], &[&m]);
    assert!(err.contains("unsafe entry"), "{err}");
    assert!(err.contains(&m), "message should name the path: {err}");
}

#[test]
fn dotdot_inside_path_is_refused() {
    let k = Kiln::new();
    let m = format!("a/../../{}", marker("inner-dotdot"));
    let tar = TarMaker::new().dir("a").file(&m, b"pwned").finish();
    let err = refuse(
        &k,
        "inner-dotdot",
        &tar,
        &[],
        &["..", "unsafe entry"],
        &[&m],
    );
    assert!(err.contains(&m), "message should name the path: {err}");
}

#[test]
fn absolute_path_is_normalized_not_refused() {
    let k = Kiln::new();
    let m = format!("/tmp/{}", marker("abs"));
    let src = k.dir.path().join("abs.tar");
    fs::write(
        &src,
        TarMaker::new()
            .file("/abs/file", b"absolute\n")
            .file(&m, b"not outside")
            .finish(),
    )
    .expect("write");
    k.import(&src, "abs", &[]);
    assert!(k.names().contains(&"abs:latest".to_string()));
    let layer = k.only_layer("abs");
    let tree = tree_of_tar(&layer);
    assert!(
        tree.contains_key("abs/file"),
        "layer lacks abs/file: {:?}",
        tree.keys().collect::<Vec<_>>()
    );
    assert_eq!(tree["abs/file"].kind, 'f');
    for p in raw_paths(&layer) {
        assert!(!p.starts_with('/'), "absolute path {p:?} in the layer");
        assert!(!p.split('/').any(|c| c == ".."), "'..' in layer path {p:?}");
    }
    // The absolute path was stored inside the layer, never written to the host.
    assert_no_escape(&k, &m);
    assert!(k.ok(["fsck"]).contains("consistent"));
}

/// One PAX extended-header record, `"LEN key=value\n"`.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = 1 + key.len() + 1 + value.len() + 1;
    let mut len = body + 1;
    while body + len.to_string().len() != len {
        len = body + len.to_string().len();
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

#[test]
fn dotdot_in_long_names_is_refused() {
    let k = Kiln::new();
    // A PAX `path` record overriding a harmless ustar name.
    let m = format!("../../{}", marker("pax-path"));
    let tar = TarMaker::new()
        .raw(
            "PaxHeaders/safe",
            tar::EntryType::XHeader,
            &pax_record("path", m.as_bytes()),
            None,
        )
        .file("safe", b"pwned")
        .finish();
    let err = refuse(&k, "pax-path", &tar, &[], &["..", "unsafe entry"], &[&m]);
    assert!(
        err.contains(&m),
        "message should name the PAX path, not the ustar one: {err}"
    );
    // A GNU long name.
    let m = format!("a/../../{}", marker("gnu-longname"));
    let mut name = m.clone().into_bytes();
    name.push(0);
    let tar = TarMaker::new()
        .raw("././@LongLink", tar::EntryType::GNULongName, &name, None)
        .file("safe", b"pwned")
        .finish();
    let err = refuse(
        &k,
        "gnu-longname",
        &tar,
        &[],
        &["..", "unsafe entry"],
        &[&m],
    );
    assert!(err.contains(&m), "{err}");
    // A PAX `linkpath` taking a hardlink out of the archive.
    let m = format!("../{}", marker("pax-linkpath"));
    let tar = TarMaker::new()
        .file("ok", b"fine")
        .raw(
            "PaxHeaders/h",
            tar::EntryType::XHeader,
            &pax_record("linkpath", m.as_bytes()),
            None,
        )
        .hardlink("h", "ok")
        .finish();
    refuse(&k, "pax-linkpath", &tar, &[], &["hardlink", &m], &[&m]);
}

// ---- links ------------------------------------------------------------------

#[test]
fn file_through_absolute_symlink_is_refused() {
    let k = Kiln::new();
    let m = marker("symlink-abs");
    let tmp = std::env::temp_dir().display().to_string();
    let tar = TarMaker::new()
        .symlink("evil", &tmp)
        .file(&format!("evil/{m}"), b"pwned")
        .finish();
    let err = refuse(
        &k,
        "symlink-abs",
        &tar,
        &[],
        &["symlink", "evil"],
        &[&format!("{tmp}/{m}")],
    );
    assert!(err.contains("unsafe entry"), "{err}");
}

#[test]
fn file_through_relative_symlink_is_refused() {
    let k = Kiln::new();
    let m = marker("symlink-rel");
    let tar = TarMaker::new()
        .symlink("evil", "../..")
        .file(&format!("evil/{m}"), b"pwned")
        .finish();
    let err = refuse(
        &k,
        "symlink-rel",
        &tar,
        &[],
        &["symlink", "evil"],
        &[&format!("../../{m}")],
    );
    assert!(err.contains("unsafe entry"), "{err}");
    // Also through a symlinked directory deeper in the tree.
    let m2 = marker("symlink-deep");
    let tar = TarMaker::new()
        .dir("a")
        .symlink("a/b", "../../..")
        .file(&format!("a/b/c/{m2}"), b"pwned")
        .finish();
    refuse(
        &k,
        "symlink-deep",
        &tar,
        &[],
        &["symlink", "a/b"],
        &[&format!("../../../c/{m2}"), &format!("../../{m2}")],
    );
}

#[test]
fn hardlink_to_host_file_is_refused() {
    let k = Kiln::new();
    let tar = TarMaker::new()
        .file("ok", b"fine")
        .hardlink("pw", "/etc/passwd")
        .finish();
    let err = refuse(
        &k,
        "hardlink-abs",
        &tar,
        &[],
        &["hardlink", "/etc/passwd", "not an earlier file"],
        &[],
    );
    assert!(err.contains("unsafe entry"), "{err}");
}

#[test]
fn hardlink_outside_the_archive_is_refused() {
    let k = Kiln::new();
    let m = format!("../{}", marker("hardlink-rel"));
    // The target exists next to the store: a naive extractor would link it.
    fs::write(lexical_join(&k.store(), &m), b"outside").expect("write outside file");
    let tar = TarMaker::new()
        .file("ok", b"fine")
        .hardlink("out", &m)
        .finish();
    let err = refuse(&k, "hardlink-rel", &tar, &[], &["hardlink", &m], &[]);
    assert!(err.contains("unsafe entry"), "{err}");
    assert_eq!(
        fs::read(lexical_join(&k.store(), &m)).expect("outside file"),
        b"outside"
    );
    // A hardlink whose target comes later in the archive is refused too.
    let tar = TarMaker::new()
        .hardlink("early", "late")
        .file("late", b"x")
        .finish();
    refuse(
        &k,
        "hardlink-forward",
        &tar,
        &[],
        &["hardlink", "late"],
        &[],
    );
}

// ---- corrupt and truncated streams ----------------------------------------

#[test]
fn truncated_tar_is_refused() {
    let k = Kiln::new();
    let tar = small_tar();
    // Cut inside noise.bin's data (headers: etc, etc/hostname + 1 block, noise.bin).
    let cut = 512 * 4 + 100_000;
    let err = refuse(
        &k,
        "truncated-tar",
        &tar[..cut],
        &[],
        &["truncated", "offset"],
        &[],
    );
    assert!(
        err.contains("noise.bin"),
        "message should name the entry: {err}"
    );
    // Cut inside a header block.
    refuse(
        &k,
        "truncated-header",
        &tar[..512 * 4 + 200_192 + 100],
        &[],
        &["offset"],
        &[],
    );
}

#[test]
fn truncated_gzip_is_refused() {
    let k = Kiln::new();
    let gz = gzip(&small_tar());
    let half = &gz[..gz.len() / 2];
    refuse(
        &k,
        "truncated-gzip",
        half,
        &[],
        &["truncated", "offset"],
        &[],
    );
    // Past the first 256 KiB kiln peeks at: the cut is found while copying file data.
    let big = gzip(&tar_with_noise(2 << 20));
    let err = refuse(
        &k,
        "truncated-gzip-big",
        &big[..big.len() * 3 / 4],
        &[],
        &["truncated", "offset"],
        &[],
    );
    assert!(
        err.contains("noise.bin") || err.contains("offset 1536"),
        "message should locate the entry: {err}"
    );
    let zst = zstd::encode_all(&tar_with_noise(2 << 20)[..], 3).expect("zstd");
    refuse(
        &k,
        "truncated-zstd",
        &zst[..zst.len() * 3 / 4],
        &[],
        &["offset"],
        &[],
    );
    // The same through stdin.
    let names_before = k.names();
    let blobs_before = blobs(&k);
    let mut child = k
        .cmd()
        .args(["import", "-", "-t", "hostile:truncated-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = half.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait kiln");
    feeder.join().expect("feeder");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("[truncated-stdin] {}", err.trim_end());
    assert_eq!(out.status.code(), Some(125), "stdin truncated gzip: {err}");
    assert!(!err.contains("panicked"), "{err}");
    check_refusal(
        &k,
        "truncated-stdin",
        &err,
        &["truncated", "-"],
        "hostile:truncated-stdin",
        &names_before,
    );
    assert_store_clean(&k, &blobs_before);
}

#[test]
fn corrupt_gzip_is_refused() {
    let k = Kiln::new();
    let mut gz = gzip(&small_tar());
    let mid = gz.len() / 2;
    for b in &mut gz[mid..mid + 16] {
        *b ^= 0x5a;
    }
    let err = refuse(&k, "corrupt-gzip", &gz, &[], &["offset"], &[]);
    let l = err.to_lowercase();
    assert!(
        l.contains("corrupt") || l.contains("invalid") || l.contains("checksum"),
        "message should say the gzip data is corrupt: {err}"
    );
    // A gzip whose data is intact but whose CRC trailer is wrong.
    let mut gz = gzip(&small_tar());
    let n = gz.len();
    gz[n - 8] ^= 0xff;
    let err = refuse(&k, "gzip-crc", &gz, &[], &[], &[]);
    let l = err.to_lowercase();
    assert!(
        l.contains("checksum") || l.contains("crc") || l.contains("corrupt"),
        "message should name the bad checksum: {err}"
    );
}

#[test]
fn tar_header_with_bad_checksum_is_refused() {
    let k = Kiln::new();
    let tar = small_tar();
    // Second header (etc/hostname, at 512): change a name byte, keep the checksum.
    let mut bad = tar.clone();
    bad[512 + 4] ^= 0x01;
    let err = refuse(&k, "bad-cksum", &bad, &[], &["checksum", "offset 512"], &[]);
    assert!(err.contains("at offset"), "{err}");
    // The same inside gzip.
    refuse(&k, "bad-cksum-gz", &gzip(&bad), &[], &["checksum"], &[]);
    // First header: nothing valid to recognize the input by.
    let mut first = tar.clone();
    first[0] ^= 0x01;
    let err = refuse(&k, "bad-cksum-first", &first, &[], &[], &[]);
    let l = err.to_lowercase();
    assert!(
        l.contains("checksum") || l.contains("not a directory, tarball"),
        "{err}"
    );
}

#[test]
fn empty_input_is_refused() {
    let k = Kiln::new();
    refuse(&k, "empty", b"", &[], &["empty"], &[]);
    // An empty gzip stream (valid, zero bytes inside).
    refuse(&k, "empty-gzip", &gzip(b""), &[], &[], &[]);
}

#[test]
fn garbage_is_refused() {
    let k = Kiln::new();
    let mut junk = vec![0u8; 100_000];
    let mut x: u32 = 0x1234_5678;
    for b in junk.iter_mut() {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        *b = (x >> 24) as u8;
    }
    junk[0] = b'G'; // not a compression magic
    let err = refuse(&k, "garbage", &junk, &[], &["unsupported input"], &[]);
    assert!(
        err.contains("not a directory, tarball or image archive"),
        "{err}"
    );
    // Garbage behind a gzip header.
    let mut gz = gzip(&junk);
    let n = gz.len();
    for (i, b) in gz[10..n - 8].iter_mut().enumerate() {
        *b = junk[i % junk.len()];
    }
    refuse(&k, "garbage-gzip", &gz, &[], &[], &[]);
}

// ---- bombs and limits -----------------------------------------------------

/// Writes a tar holding one `size`-byte file of zeros through `w`, streaming.
fn zero_tar_into(w: &mut dyn Write, size: u64) {
    let mut h = tar::Header::new_gnu();
    h.set_path("zeros").expect("path");
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(size);
    h.set_mtime(1_600_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    w.write_all(h.as_bytes()).expect("header");
    let chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        w.write_all(&chunk[..n]).expect("zeros");
        left -= n as u64;
    }
    let pad = (512 - (size % 512) as usize) % 512;
    w.write_all(&vec![0u8; pad + 1024]).expect("trailer");
}

#[test]
fn gzip_bomb_is_refused() {
    let k = Kiln::new();
    let path = k.dir.path().join("bomb.tar.gz");
    {
        let f = std::io::BufWriter::new(fs::File::create(&path).expect("create bomb"));
        let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::default());
        zero_tar_into(&mut e, 600 << 20);
        e.finish().expect("gzip").flush().expect("flush");
    }
    let size = fs::metadata(&path).expect("bomb").len();
    assert!(size < 2 << 20, "bomb is {size} bytes");
    let data = fs::read(&path).expect("read bomb");
    fs::remove_file(&path).expect("rm");
    let err = refuse(
        &k,
        "gzip-bomb",
        &data,
        &[],
        &["decompression bomb", "--max-size"],
        &[],
    );
    assert!(
        err.contains("ratio"),
        "message should give the limits: {err}"
    );
}

#[test]
fn zstd_bomb_is_refused() {
    let k = Kiln::new();
    let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd");
    zero_tar_into(&mut e, 1 << 30);
    let data = e.finish().expect("zstd finish");
    assert!(data.len() < 1 << 20, "bomb is {} bytes", data.len());
    refuse(&k, "zstd-bomb", &data, &[], &["decompression bomb"], &[]);
}

#[test]
fn max_size_refuses_large_plain_tar() {
    let k = Kiln::new();
    let tar = small_tar(); // ~200 KB
    let err = refuse(
        &k,
        "max-size",
        &tar,
        &["--max-size", "100000"],
        &["exceed", "100000", "--max-size"],
        &[],
    );
    // The limit trips while the first 256 KiB are sniffed, before any entry
    // is read, so the message names the input and the limit (checked above).
    assert!(
        err.contains("max-size.input"),
        "message should name the input: {err}"
    );
    // The same limit on a gzip'd copy.
    refuse(
        &k,
        "max-size-gz",
        &gzip(&tar),
        &["--max-size", "100000"],
        &["100000"],
        &[],
    );
    // A limit above the size lets it through.
    let src = k.dir.path().join("fits.tar");
    fs::write(&src, &tar).expect("write");
    k.import(&src, "fits", &["--max-size", "10000000"]);
    assert!(k.names().contains(&"fits:latest".to_string()));
}

#[test]
fn max_size_counts_metadata_too() {
    // A plain tar whose bulk is metadata (a 2 MiB PAX xattr on a 3-byte
    // file) is larger than --max-size just as much as file data would be;
    // kiln must not buffer and copy it into the layer.
    let k = Kiln::new();
    let big = vec![b'a'; 2 << 20];
    let tar = TarMaker::new()
        .raw(
            "PaxHeaders/f",
            tar::EntryType::XHeader,
            &pax_record("SCHILY.xattr.user.big", &big),
            None,
        )
        .file("f", b"abc")
        .finish();
    refuse(
        &k,
        "max-size-metadata",
        &tar,
        &["--max-size", "1000000"],
        &["1000000"],
        &[],
    );
}

#[test]
fn legit_gzip_tarball_imports_with_default_limits() {
    let k = Kiln::new();
    let d = tmpdir();
    let plain = fixture_tar(d.path());
    let gz = d.path().join("fixture.tar.gz");
    fs::write(&gz, gzip(&fs::read(&plain).expect("read fixture"))).expect("write gz");
    k.import(&gz, "legit", &[]);
    assert_same_tree(
        &tree_of_tar(&plain),
        &tree_of_tar(&k.only_layer("legit")),
        "gzip'd fixture",
    );
    // Highly compressible but under the ratio threshold: 32 MiB of zeros.
    let z = d.path().join("zeros.tar.gz");
    {
        let f = std::io::BufWriter::new(fs::File::create(&z).expect("create"));
        let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::default());
        zero_tar_into(&mut e, 32 << 20);
        e.finish().expect("gzip").flush().expect("flush");
    }
    k.import(&z, "zeros", &[]);
    let mut names = k.names();
    names.sort();
    assert_eq!(
        names,
        vec!["legit:latest".to_string(), "zeros:latest".to_string()]
    );
    let mut layer = Vec::new();
    flate2::read::GzDecoder::new(fs::File::open(k.only_layer("zeros")).expect("layer"))
        .read_to_end(&mut layer)
        .expect("gunzip");
    assert!(layer.len() > 32 << 20);
    assert!(k.ok(["fsck"]).contains("consistent"));
}

#[test]
fn root_entry_that_is_not_a_directory_is_refused() {
    // A "./" symlink would make the root a non-directory, and a hardlink to
    // an unusable target must never fall back to naming the root.
    let k = Kiln::new();
    let tar = TarMaker::new()
        .symlink("./", "/etc")
        .file("passwd", b"x\n")
        .finish();
    refuse(
        &k,
        "root-symlink",
        &tar,
        &[],
        &["root must be a directory"],
        &[],
    );
    let tar = TarMaker::new()
        .dir("./")
        .file("a", b"a\n")
        .hardlink("x", "../../../../etc/shadow")
        .finish();
    refuse(&k, "hardlink-dotdot", &tar, &[], &["hardlink"], &[]);
}

#[test]
fn hardlink_to_a_child_of_a_replaced_directory_is_refused() {
    let k = Kiln::new();
    let tar = TarMaker::new()
        .dir("d")
        .file("d/shadow", b"s\n")
        .symlink("d", "/etc")
        .hardlink("h", "d/shadow")
        .finish();
    refuse(&k, "stale-child", &tar, &[], &["hardlink"], &[]);
}
