//! Helpers shared by the integration tests.
//!
//! Tests drive the real `kiln` binary. It is `$KILN_BIN` when set (the
//! unprivileged CI run copies the binaries to a world-readable place) and the
//! one cargo built otherwise. Repository files (images/, scripts/) are found
//! under `$KILN_TEST_DATA`, else the crate directory.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};

/// The kiln binary under test.
pub fn kiln_bin() -> PathBuf {
    std::env::var_os("KILN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kiln")))
}

/// The repository root (for images/ and scripts/).
pub fn repo() -> PathBuf {
    std::env::var_os("KILN_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    // /proc/self/status is readable by anyone; avoids an unsafe getuid.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The id mapping kiln gives this caller's runs: `"identity"` (root),
/// `"subids"` (an /etc/subuid and /etc/subgid range and newuidmap), or
/// `"caller"` (only itself).
pub fn id_mapping() -> &'static str {
    if is_root() {
        return "identity";
    }
    let name = String::from_utf8(
        Command::new("id")
            .arg("-un")
            .output()
            .expect("id -un")
            .stdout,
    )
    .expect("utf-8 user name");
    let name = name.trim();
    let listed = |f: &str| {
        fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(':').next() == Some(name))
    };
    if listed("/etc/subuid") && listed("/etc/subgid") && have("newuidmap") && have("newgidmap") {
        "subids"
    } else {
        "caller"
    }
}

/// The caller's real uid and gid.
pub fn my_ids() -> (u64, u64) {
    let status = fs::read_to_string("/proc/self/status").expect("status");
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).expect("field");
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("number")
    };
    (field("Uid:"), field("Gid:"))
}

/// In a rootless unpack, files owned by root are simply the caller's: map
/// the caller's ids back to 0 so trees compare with the image.
pub fn caller_as_root(mut t: Tree) -> Tree {
    if is_root() {
        return t;
    }
    let (uid, gid) = my_ids();
    for n in t.values_mut() {
        if n.uid == uid {
            n.uid = 0;
        }
        if n.gid == gid {
            n.gid = 0;
        }
    }
    t
}

/// Canonical hardlink groups: numbered by their smallest member path, so two
/// trees with the same link structure compare equal.
pub fn canon(mut t: Tree) -> Tree {
    let mut first: std::collections::BTreeMap<usize, String> = Default::default();
    for (p, n) in &t {
        if n.hardlink_group != 0 {
            first.entry(n.hardlink_group).or_insert_with(|| p.clone());
        }
    }
    let mut order: Vec<&String> = first.values().collect();
    order.sort();
    let renum: std::collections::BTreeMap<usize, usize> = first
        .iter()
        .map(|(g, p)| (*g, order.iter().position(|q| *q == p).unwrap_or(0) + 1))
        .collect();
    for n in t.values_mut() {
        if n.hardlink_group != 0 {
            n.hardlink_group = renum[&n.hardlink_group];
        }
    }
    t
}

/// What a rootless `umoci unpack --rootless` can reproduce: device nodes
/// become empty files and security.* xattrs cannot be set.
pub fn rootless_view(t: &Tree) -> Tree {
    t.iter()
        .map(|(p, n)| {
            let mut n = n.clone();
            if n.kind == 'c' || n.kind == 'b' {
                n.kind = 'f';
                n.dev = (0, 0);
                n.sha256 =
                    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into();
            }
            n.xattrs.retain(|k, _| !k.starts_with("security."));
            (p.clone(), n)
        })
        .collect()
}

/// Makes an OCI layout holding image `base` from the kiln store plus one
/// extra layer (raw tar bytes) added with umoci, and imports it as `name`.
pub fn with_extra_layer(k: &Kiln, base: &str, layer: &[u8], name: &str) {
    require("skopeo");
    let layout = k.dir.path().join(format!("layout-{name}"));
    sh(Command::new("skopeo").args([
        "copy",
        "-q",
        &format!("oci:{}:{base}", k.store().display()),
        &format!("oci:{}:x", layout.display()),
    ]));
    let lt = k.dir.path().join(format!("{name}.layer.tar"));
    fs::write(&lt, layer).expect("write layer");
    sh(Command::new("umoci")
        .args([
            "raw",
            "add-layer",
            "--image",
            &format!("{}:x", layout.display()),
        ])
        .arg(&lt));
    k.import(&layout, name, &[]);
}

/// Writes `bytes` as a blob of the OCI layout (or kiln store) at `layout`;
/// returns its digest and size.
pub fn put_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).expect("blobs dir");
    fs::write(dir.join(&hex), bytes).expect("write blob");
    (format!("sha256:{hex}"), bytes.len())
}

/// Adds an image manifest descriptor, tagged `ref_name`, to the
/// index.json of the layout (or kiln store) at `layout`.
pub fn add_to_index(layout: &Path, digest: &str, size: usize, ref_name: &str) {
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(&index_path).expect("index")).expect("index json");
    index["manifests"]
        .as_array_mut()
        .expect("manifests")
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": ref_name}
        }));
    fs::write(&index_path, serde_json::to_vec(&index).expect("json")).expect("write index");
}

/// `umoci unpack` (rootless when not root) of image `name` in kiln's store;
/// the unpacked tree, hardlink groups canonical.
pub fn umoci_unpack(k: &Kiln, name: &str, dest: &Path) -> Tree {
    require("umoci");
    let mut c = Command::new("umoci");
    c.arg("unpack");
    if !is_root() {
        c.arg("--rootless");
    }
    c.arg("--image")
        .arg(format!("{}:{name}", k.store().display()))
        .arg(dest);
    sh(&mut c);
    canon(tree_of_dir(&dest.join("rootfs")))
}

/// A fresh temp directory.
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kiln-test-")
        .tempdir()
        .expect("create temp dir")
}

/// Whether a program is on PATH.
pub fn have(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// Panics with a clear message when a required tool is missing (tests never
/// skip silently: scripts/setup.sh installs them).
pub fn require(prog: &str) {
    assert!(
        have(prog),
        "{prog} is not installed: run scripts/setup.sh (apt-get install {prog})"
    );
}

/// A kiln store in a temp dir plus helpers to run the binary on it.
pub struct Kiln {
    pub dir: tempfile::TempDir,
}

impl Kiln {
    /// A temp dir with an empty store in it (only `kiln import` creates a
    /// store; the other commands need one).
    pub fn new() -> Kiln {
        let k = Kiln::without_store();
        kiln::Store::open(k.store()).expect("create an empty store");
        k
    }

    /// A temp dir whose store does not exist yet.
    pub fn without_store() -> Kiln {
        Kiln { dir: tmpdir() }
    }

    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// A `kiln --store STORE` command, with a clean SOURCE_DATE_EPOCH.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(kiln_bin());
        c.arg("--store")
            .arg(self.store())
            .env_remove("SOURCE_DATE_EPOCH");
        c
    }

    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("spawn kiln")
    }

    /// Runs kiln and asserts success; returns stdout.
    pub fn ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let out = self.run(&args);
        assert!(
            out.status.success(),
            "kiln {:?} failed ({:?}):\nstdout: {}\nstderr: {}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs kiln and asserts failure with exit code 125; returns stderr.
    pub fn fails<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let out = self.run(&args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(125),
            "kiln {args:?} should fail with 125, got {:?}; stderr: {err}",
            out.status
        );
        assert!(!err.contains("panicked"), "kiln panicked: {err}");
        err
    }

    /// Imports `src` as `tag`; returns the manifest digest.
    pub fn import(&self, src: &Path, tag: &str, extra: &[&str]) -> String {
        let mut args: Vec<String> = vec![
            "import".into(),
            src.display().to_string(),
            "-t".into(),
            tag.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = self.ok(&args);
        out.split_whitespace()
            .nth(1)
            .expect("import prints NAME DIGEST")
            .to_string()
    }

    /// The image's manifest/config JSON from `kiln inspect`.
    pub fn inspect(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(["inspect", name])).expect("inspect prints JSON")
    }

    /// Path of a blob in the store.
    pub fn blob(&self, digest: &str) -> PathBuf {
        self.store()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// The single layer blob of an image.
    pub fn only_layer(&self, name: &str) -> PathBuf {
        let v = self.inspect(name);
        let layers = v["manifest"]["layers"].as_array().expect("layers");
        assert_eq!(layers.len(), 1, "expected one layer: {v}");
        self.blob(layers[0]["digest"].as_str().expect("digest"))
    }

    /// Blob path of the last layer of image `name`.
    pub fn top_layer(&self, name: &str) -> PathBuf {
        let v = self.inspect(name);
        let layers = v["manifest"]["layers"].as_array().expect("layers");
        let last = layers.last().expect("at least one layer");
        self.blob(last["digest"].as_str().expect("digest"))
    }

    /// Tag names in the store, from `kiln images --format json`.
    pub fn names(&self) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(["images", "--format", "json"])).expect("json");
        v.as_array()
            .expect("array")
            .iter()
            .map(|i| i["name"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

/// Runs `kiln ARGS` (a shell word list, after `prelude`) on a terminal of
/// its own (util-linux `script`); returns what the terminal showed.
pub fn on_a_terminal(k: &Kiln, prelude: &str, args: &str) -> String {
    require("script");
    let cmd = format!(
        "{prelude} {} --store {} {args}",
        kiln_bin().display(),
        k.store().display()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the bundled busybox example rootfs tarball into `dir`.
pub fn busybox_tar(dir: &Path) -> PathBuf {
    let out = dir.join("busybox.tar");
    let st = Command::new("bash")
        .arg(repo().join("images/busybox/build.sh"))
        .arg(&out)
        .status()
        .expect("run images/busybox/build.sh");
    assert!(
        st.success(),
        "images/busybox/build.sh failed (apt-get install busybox-static)"
    );
    out
}

/// Runs a command, asserting success; returns stdout.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One node of a file tree, as compared between input and output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: char,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
    pub sha256: String,
    pub link: String,
    pub dev: (u32, u32),
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Paths of the hardlink group this file belongs to (empty if nlink 1).
    pub hardlink_group: usize,
}

pub type Tree = BTreeMap<String, Node>;

/// One letter per file type: d l f c b p s.
pub fn kind_of(ft: &fs::FileType) -> char {
    use std::os::unix::fs::FileTypeExt as _;
    if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_file() {
        'f'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_fifo() {
        'p'
    } else {
        's'
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn xattrs_of(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    if let Ok(list) = xattr::list(p) {
        for name in list {
            let n = name.to_string_lossy().into_owned();
            if let Ok(Some(v)) = xattr::get(p, &name) {
                out.insert(n, v);
            }
        }
    }
    out
}

/// Decodes umoci's user.rootlesscontainers owner record.
pub fn decode_rootless(v: &[u8]) -> (u64, u64) {
    let (mut uid, mut gid, mut i) = (0u64, 0u64, 0usize);
    while i < v.len() {
        let key = v[i];
        i += 1;
        let (mut val, mut shift) = (0u64, 0);
        while i < v.len() {
            let b = v[i];
            i += 1;
            val |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        if key == 0x08 {
            uid = val;
        } else if key == 0x10 {
            gid = val;
        }
    }
    (uid, gid)
}

/// Snapshots a directory tree (without the root itself). Owners recorded in
/// `user.rootlesscontainers` (rootless umoci unpack) are used as the owner.
pub fn tree_of_dir(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut groups: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    walk(root, root, &mut out, &mut groups);
    out
}

fn walk(root: &Path, p: &Path, out: &mut Tree, groups: &mut BTreeMap<(u64, u64), usize>) {
    let mut names: Vec<_> = fs::read_dir(p)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    for n in names {
        let path = p.join(&n);
        let rel = path
            .strip_prefix(root)
            .expect("prefix")
            .to_string_lossy()
            .into_owned();
        let md = fs::symlink_metadata(&path).expect("lstat");
        let ft = md.file_type();
        let mut xattrs = xattrs_of(&path);
        let (mut uid, mut gid) = (u64::from(md.uid()), u64::from(md.gid()));
        if let Some(v) = xattrs.remove("user.rootlesscontainers") {
            // u32::MAX means "unchanged": the on-disk owner stands.
            let (u, g) = decode_rootless(&v);
            if u != u64::from(u32::MAX) {
                uid = u;
            }
            if g != u64::from(u32::MAX) {
                gid = g;
            }
        }
        xattrs.remove("security.selinux");
        let kind = kind_of(&ft);
        let sha256 = if kind == 'f' {
            let mut h = Sha256::new();
            let mut f = fs::File::open(&path).expect("open");
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let k = f.read(&mut buf).expect("read");
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
            }
            hex(&h.finalize())
        } else {
            String::new()
        };
        let link = if kind == 'l' {
            fs::read_link(&path)
                .expect("readlink")
                .to_string_lossy()
                .into_owned()
        } else {
            String::new()
        };
        let dev = if kind == 'c' || kind == 'b' {
            (libc_major(md.rdev()), libc_minor(md.rdev()))
        } else {
            (0, 0)
        };
        let hardlink_group = if kind != 'd' && md.nlink() > 1 {
            let next = groups.len() + 1;
            *groups.entry((md.dev(), md.ino())).or_insert(next)
        } else {
            0
        };
        out.insert(
            rel,
            Node {
                kind,
                mode: md.mode() & 0o7777,
                uid,
                gid,
                mtime: md.mtime(),
                sha256,
                link,
                dev,
                xattrs,
                hardlink_group,
            },
        );
        if kind == 'd' {
            walk(root, &path, out, groups);
        }
    }
}

fn libc_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32
}
fn libc_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32
}

/// Snapshots a (possibly compressed) tar file, skipping the root entry.
/// Hardlinks become members of the group of their target.
pub fn tree_of_tar(path: &Path) -> Tree {
    let f = fs::File::open(path).expect("open tar");
    let mut head = [0u8; 4];
    let n = fs::File::open(path)
        .expect("open")
        .read(&mut head)
        .expect("read");
    let r: Box<dyn Read> = match &head[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(f)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(zstd::stream::read::Decoder::new(f).expect("zstd")),
        _ => Box::new(f),
    };
    let mut ar = tar::Archive::new(r);
    let mut out = Tree::new();
    let mut groups: BTreeMap<String, usize> = BTreeMap::new();
    for e in ar.entries().expect("entries") {
        let mut e = e.expect("entry");
        // A PAX sparse 1.0 file (the tar crate shows GNUSparseFile.0/...):
        // its real name and size are in GNU.sparse.* records.
        let mut sparse: (Option<String>, Option<u64>) = (None, None);
        if let Ok(Some(pax)) = e.pax_extensions() {
            for x in pax.flatten() {
                match x.key().unwrap_or("") {
                    "GNU.sparse.name" => sparse.0 = x.value().ok().map(str::to_string),
                    "GNU.sparse.realsize" => sparse.1 = x.value().ok().and_then(|v| v.parse().ok()),
                    _ => {}
                }
            }
        }
        let raw = match &sparse.0 {
            Some(name) => name.clone(),
            None => e.path().expect("path").to_string_lossy().into_owned(),
        };
        let rel = raw
            .trim_start_matches("./")
            .trim_start_matches('/')
            .trim_end_matches('/')
            .to_string();
        if rel.is_empty() || rel == "." {
            continue;
        }
        let h = e.header().clone();
        let mut xattrs = BTreeMap::new();
        let (mut uid, mut gid) = (h.uid().expect("uid"), h.gid().expect("gid"));
        if let Ok(Some(pax)) = e.pax_extensions() {
            for x in pax.flatten() {
                let k = x.key().unwrap_or("").to_string();
                if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(name.to_string(), x.value_bytes().to_vec());
                } else if k == "uid" {
                    uid = x.value().unwrap_or("0").parse().unwrap_or(0);
                } else if k == "gid" {
                    gid = x.value().unwrap_or("0").parse().unwrap_or(0);
                }
            }
        }
        let t = h.entry_type();
        let link = e
            .link_name()
            .ok()
            .flatten()
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        if t.is_hard_link() {
            let target = link
                .trim_start_matches("./")
                .trim_start_matches('/')
                .to_string();
            let mut node = out
                .get(&target)
                .cloned()
                .unwrap_or_else(|| panic!("hardlink {rel} to missing {target}"));
            let next = groups.len() + 1;
            let g = *groups.entry(target.clone()).or_insert(next);
            if let Some(t) = out.get_mut(&target) {
                t.hardlink_group = g;
            }
            node.hardlink_group = g;
            out.insert(rel, node);
            continue;
        }
        let kind = match t {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Char => 'c',
            tar::EntryType::Block => 'b',
            tar::EntryType::Fifo => 'p',
            _ => 'f',
        };
        let sha256 = if kind == 'f' {
            let mut data = Vec::new();
            e.read_to_end(&mut data).expect("read data");
            if let Some(size) = sparse.1 {
                data = expand_sparse_1_0(&data, size);
            }
            hex(&Sha256::digest(&data))
        } else {
            String::new()
        };
        let dev = if kind == 'c' || kind == 'b' {
            (
                h.device_major().ok().flatten().unwrap_or(0),
                h.device_minor().ok().flatten().unwrap_or(0),
            )
        } else {
            (0, 0)
        };
        out.insert(
            rel,
            Node {
                kind,
                mode: h.mode().expect("mode") & 0o7777,
                uid,
                gid,
                mtime: h.mtime().expect("mtime") as i64,
                sha256,
                link: if kind == 'l' { link } else { String::new() },
                dev,
                xattrs,
                hardlink_group: 0,
            },
        );
    }
    out
}

/// The whole content of a PAX sparse 1.0 entry from its stored data (the
/// map text, NUL padding to 512 bytes, the segments' bytes). Written apart
/// from kiln's own reader, to check it.
pub fn expand_sparse_1_0(stored: &[u8], size: u64) -> Vec<u8> {
    let mut nums = Vec::new();
    let mut at = 0;
    let mut count = None;
    while count.is_none_or(|c: usize| nums.len() < 1 + 2 * c) {
        let nl = stored[at..]
            .iter()
            .position(|b| *b == b'\n')
            .expect("sparse map line");
        let n: u64 = std::str::from_utf8(&stored[at..at + nl])
            .expect("map text")
            .parse()
            .expect("map number");
        nums.push(n);
        count.get_or_insert(n as usize);
        at += nl + 1;
    }
    let mut data = &stored[at.div_ceil(512) * 512..];
    let mut out = vec![0u8; size as usize];
    for pair in nums[1..].chunks(2) {
        let (off, len) = (pair[0] as usize, pair[1] as usize);
        out[off..off + len].copy_from_slice(&data[..len]);
        data = &data[len..];
    }
    assert!(data.is_empty(), "data left after the sparse map's segments");
    out
}

/// Makes a sparse file of `size` bytes holding only the `(offset, bytes)`
/// pieces.
pub fn sparse_file(path: &Path, size: u64, pieces: &[(u64, &[u8])]) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::create(path).expect("create");
    f.set_len(size).expect("truncate");
    for (off, data) in pieces {
        f.write_all_at(data, *off).expect("write");
    }
}

/// The SHA-256 of a file's content, in hex.
pub fn sha256_file(p: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    std::io::copy(&mut f, &mut h).expect("read");
    hex(&h.finalize())
}

/// Bytes a file really occupies on disk (`st_blocks * 512`).
pub fn on_disk(p: &Path) -> u64 {
    fs::metadata(p).expect("stat").blocks() * 512
}

/// Asserts two trees are equal, listing every difference.
pub fn assert_same_tree(want: &Tree, got: &Tree, what: &str) {
    let mut diffs = Vec::new();
    for (p, w) in want {
        match got.get(p) {
            None => diffs.push(format!("missing {p}")),
            Some(g) if g != w => diffs.push(format!("{p}: want {w:?}\n      got {g:?}")),
            _ => {}
        }
    }
    for p in got.keys() {
        if !want.contains_key(p) {
            diffs.push(format!("extra {p}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} difference(s):\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    assert!(!want.is_empty(), "{what}: empty tree compared");
}

/// Builds a tar in memory entry by entry (for crafted and hostile inputs).
pub struct TarMaker {
    pub b: tar::Builder<Vec<u8>>,
}

impl TarMaker {
    pub fn new() -> Self {
        let mut b = tar::Builder::new(Vec::new());
        b.mode(tar::HeaderMode::Complete);
        TarMaker { b }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    /// Appends an entry with a raw (unchecked) path, as hostile archives do.
    pub fn raw(
        mut self,
        path: &str,
        kind: tar::EntryType,
        data: &[u8],
        link: Option<&str>,
    ) -> Self {
        let mut h = Self::header(
            kind,
            if kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            },
            data.len() as u64,
        );
        let name = path.as_bytes();
        {
            let g = h.as_gnu_mut().expect("gnu header");
            g.name[..name.len()].copy_from_slice(name);
            if let Some(l) = link {
                g.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
        }
        h.set_cksum();
        self.b.append(&h, data).expect("append");
        self
    }

    /// A file or directory with an owner and mode.
    pub fn owned(
        mut self,
        path: &str,
        dir: bool,
        mode: u32,
        owner: (u64, u64),
        data: &[u8],
    ) -> Self {
        let kind = if dir {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        };
        let mut h = Self::header(kind, mode, data.len() as u64);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_path(path).expect("path");
        h.set_cksum();
        self.b.append(&h, data).expect("append");
        self
    }

    pub fn file(self, path: &str, data: &[u8]) -> Self {
        self.raw(path, tar::EntryType::Regular, data, None)
    }
    pub fn dir(self, path: &str) -> Self {
        self.raw(path, tar::EntryType::Directory, b"", None)
    }
    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.raw(path, tar::EntryType::Symlink, b"", Some(target))
    }
    pub fn hardlink(self, path: &str, target: &str) -> Self {
        self.raw(path, tar::EntryType::Link, b"", Some(target))
    }
    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().expect("finish tar")
    }
}

/// gzip-compresses bytes.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// A crafted root file system tarball with every entry type, odd modes,
/// several owners, xattrs (security.capability, user.*), hardlinks, long
/// names, device nodes and a fifo. Written with Python's tarfile (PAX), an
/// independent writer.
pub fn fixture_tar(dir: &Path) -> PathBuf {
    let out = dir.join("fixture.tar");
    let script = r#"
import io, sys, tarfile
t = tarfile.open(sys.argv[1], 'w', format=tarfile.PAX_FORMAT)
def add(name, typ=tarfile.REGTYPE, data=b'', mode=0o644, uid=0, gid=0, link=None, dev=None, pax=None, mtime=1600000000):
    ti = tarfile.TarInfo(name); ti.type = typ; ti.mtime = mtime; ti.mode = mode; ti.uid = uid; ti.gid = gid
    if link is not None: ti.linkname = link
    if dev: ti.devmajor, ti.devminor = dev
    if pax: ti.pax_headers = pax
    ti.size = len(data)
    t.addfile(ti, io.BytesIO(data) if data else None)
cap = '\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00'
add('etc', tarfile.DIRTYPE, mode=0o755)
add('etc/passwd', data=b'root:x:0:0:root:/root:/bin/sh\n')
add('etc/shadow', data=b'root:*:1::::::\n', mode=0o640, gid=42)
add('home', tarfile.DIRTYPE, mode=0o755)
add('home/user', tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1000)
add('home/user/notes.txt', data=b'hello\n' * 1000, uid=1000, gid=100, mtime=1234567890)
add('tmp', tarfile.DIRTYPE, mode=0o1777)
add('dev', tarfile.DIRTYPE, mode=0o755)
add('dev/null', tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
add('dev/sda', tarfile.BLKTYPE, mode=0o660, gid=6, dev=(8, 0))
add('dev/initctl', tarfile.FIFOTYPE, mode=0o600)
add('bin', tarfile.DIRTYPE, mode=0o755)
add('bin/su', data=b'#!/bin/sh\necho su\n', mode=0o4755)
add('bin/wall', data=b'#!/bin/sh\n', mode=0o2755, gid=5)
add('bin/ping', data=b'\x7fELF-ish', mode=0o755, pax={'SCHILY.xattr.security.capability': cap, 'SCHILY.xattr.user.note': 'kiln'})
add('bin/su-again', tarfile.LNKTYPE, link='bin/su', mode=0o4755)
add('bin/sh', tarfile.SYMTYPE, link='/bin/busybox', mode=0o777)
add('bin/rel', tarfile.SYMTYPE, link='../etc/passwd', mode=0o777)
long = 'usr/share/' + '/'.join(['d%02d-long-directory-name' % i for i in range(8)])
add('usr', tarfile.DIRTYPE, mode=0o755)
p = 'usr'
for part in long.split('/')[1:]:
    p += '/' + part
    add(p, tarfile.DIRTYPE, mode=0o755)
add(long + '/' + 'f' * 120, data=b'long name\n', uid=70000, gid=70000)
add('usr/big', data=bytes(range(256)) * 4096, mode=0o600)
add('usr/empty', mode=0o444)
t.close()
"#;
    let st = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&out)
        .status()
        .expect("run python3");
    assert!(st.success(), "python3 fixture writer failed");
    out
}

/// The path of `prog`: on PATH, else in the sbin directories an
/// unprivileged user's PATH often lacks (mke2fs, sfdisk, mkfs.xfs, ...).
/// Panics naming scripts/setup.sh when it is nowhere (tests never skip).
pub fn tool(prog: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| panic!("{prog} is not installed: run scripts/setup.sh"))
}

/// A sparse raw disk of `size` bytes with a GPT made by sfdisk from
/// `table` (sfdisk's script format), and `fs` copied in at sector 22528
/// (where the tests' tables start their second partition).
pub fn gpt_disk(path: &Path, size: u64, table: &str, fs: &Path) {
    fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .expect("disk file");
    let mut sf = Command::new(tool("sfdisk"))
        .arg("-q")
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("sfdisk");
    std::io::Write::write_all(&mut sf.stdin.take().expect("stdin"), table.as_bytes())
        .expect("table");
    assert!(sf.wait().expect("sfdisk").success());
    sh(Command::new("dd")
        .arg(format!("if={}", fs.display()))
        .arg(format!("of={}", path.display()))
        .args(["bs=512", "seek=22528", "conv=notrunc,sparse", "status=none"]));
}

/// The host's attached loop devices (their backing files) and its mount
/// table, to show that an import attached and mounted nothing.
pub fn loop_state() -> (Vec<String>, String) {
    let mut loops: Vec<String> = fs::read_dir("/sys/block")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
                .filter_map(|e| fs::read_to_string(e.path().join("loop/backing_file")).ok())
                .collect()
        })
        .unwrap_or_default();
    loops.sort();
    let mounts = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    (loops, mounts)
}

/// Deterministic pseudo-random bytes (xorshift), for file contents that
/// neither compress nor repeat.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A store with the busybox example image imported as `bb`.
pub fn with_busybox() -> Kiln {
    let k = Kiln::new();
    let tar = busybox_tar(k.dir.path());
    k.import(&tar, "bb", &[]);
    k
}

/// `kiln run FLAGS bb sh -c SCRIPT`; returns (code, stdout, stderr).
pub fn run_sh(k: &Kiln, flags: &[&str], script: &str) -> (i32, String, String) {
    let mut args: Vec<&str> = vec!["run"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["bb", "sh", "-c", script]);
    let out = k.run(&args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
