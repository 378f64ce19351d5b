//! `kiln unpack`: layers to a directory, path-safe, whiteouts applied,
//! checked against umoci's unpack of the same images.

mod common;

use std::fs;
use std::path::Path;

use common::*;

fn kiln_unpack(k: &Kiln, name: &str, dest: &Path) -> Tree {
    k.ok(["unpack", name, dest.to_str().expect("utf8")]);
    caller_as_root(canon(tree_of_dir(dest)))
}

#[test]
fn unpack_matches_umoci_and_the_input() {
    let k = Kiln::new();
    let fx = fixture_tar(k.dir.path());
    k.import(&fx, "fx", &[]);
    let ours = kiln_unpack(&k, "fx", &k.dir.path().join("ours"));
    let theirs = caller_as_root(umoci_unpack(&k, "fx:latest", &k.dir.path().join("umoci")));
    assert_same_tree(&theirs, &ours, "kiln unpack vs umoci unpack");
    let want = canon(tree_of_tar(&fx));
    let want = if is_root() {
        want
    } else {
        rootless_view(&want)
    };
    assert_same_tree(&want, &ours, "kiln unpack vs input");
    // A second unpack into a non-empty directory is refused.
    let err = k.fails([
        "unpack",
        "fx",
        k.dir.path().join("ours").to_str().expect("utf8"),
    ]);
    assert!(err.contains("not empty"), "{err}");
}

#[test]
fn whiteouts_and_opaque_directories() {
    let k = Kiln::new();
    let base = TarMaker::new()
        .dir("etc")
        .file("etc/keep", b"keep\n")
        .file("etc/gone", b"gone\n")
        .dir("opt")
        .dir("opt/old")
        .file("opt/old/a", b"a\n")
        .file("opt/b", b"b\n")
        .dir("var")
        .dir("var/cache")
        .file("var/cache/big", b"cache\n")
        .file("replaced", b"file becomes a dir\n")
        .finish();
    let src = k.dir.path().join("base.tar");
    fs::write(&src, base).expect("write");
    k.import(&src, "base", &[]);
    let top = TarMaker::new()
        .file("etc/.wh.gone", b"")
        .dir("opt")
        .file("opt/.wh..wh..opq", b"")
        .file("opt/new", b"new\n")
        .file("var/.wh.cache", b"")
        .dir("replaced")
        .file("replaced/inside", b"x\n")
        .finish();
    with_extra_layer(&k, "base:latest", &top, "top");
    let ours = kiln_unpack(&k, "top", &k.dir.path().join("ours"));
    let theirs = caller_as_root(umoci_unpack(&k, "top:latest", &k.dir.path().join("umoci")));
    assert_same_tree(&theirs, &ours, "kiln vs umoci on a whiteout layer");
    for gone in [
        "etc/gone",
        "opt/old",
        "opt/old/a",
        "opt/b",
        "var/cache",
        "var/cache/big",
    ] {
        assert!(!ours.contains_key(gone), "{gone} should be whited out");
    }
    for kept in ["etc/keep", "opt/new", "var", "replaced/inside"] {
        assert!(ours.contains_key(kept), "{kept} missing");
    }
    assert_eq!(ours["replaced"].kind, 'd');
}

#[test]
fn symlinks_from_lower_layers_cannot_redirect_writes_to_the_host() {
    let k = Kiln::new();
    let outside = k.dir.path().join("host-dir");
    fs::create_dir(&outside).expect("mkdir");
    fs::write(outside.join("precious"), b"host data\n").expect("write");
    let out_abs = outside.to_str().expect("utf8").to_string();
    let base = TarMaker::new()
        .dir("etc")
        .file("etc/passwd", b"root:x:0:0\n")
        .symlink("abs", &out_abs)
        .symlink("rel", "../../../../../../../../..")
        .symlink("precious-link", &format!("{out_abs}/precious"))
        .finish();
    let src = k.dir.path().join("base.tar");
    fs::write(&src, base).expect("write");
    k.import(&src, "evil-base", &[]);
    let rel_to_outside = format!("rel{}", out_abs);
    let top = TarMaker::new()
        .file("abs/pwned", b"escaped via absolute symlink\n")
        .file(
            &format!("{rel_to_outside}/pwned-rel"),
            b"escaped via relative symlink\n",
        )
        .file("precious-link", b"overwritten through a symlink\n")
        .finish();
    with_extra_layer(&k, "evil-base:latest", &top, "evil");
    let dest = k.dir.path().join("rootfs");
    k.ok(["unpack", "evil", dest.to_str().expect("utf8")]);
    // Nothing reached the host directory...
    let host: Vec<_> = fs::read_dir(&outside)
        .expect("read")
        .map(|e| e.expect("e").file_name())
        .collect();
    assert_eq!(
        host,
        vec![std::ffi::OsString::from("precious")],
        "files escaped the rootfs"
    );
    assert_eq!(
        fs::read(outside.join("precious")).expect("read"),
        b"host data\n"
    );
    // ...the writes landed inside the root, where the symlinks resolve when
    // the root is the root.
    let inside = dest.join(out_abs.trim_start_matches('/'));
    assert!(
        inside.join("pwned").is_file(),
        "absolute symlink not resolved inside the root"
    );
    assert!(
        inside.join("pwned-rel").is_file(),
        "relative symlink not resolved inside the root"
    );
    // The symlink itself was replaced by the file, not written through.
    assert!(dest.join("precious-link").is_file());
}

#[test]
fn rootfs_cache_is_unpacked_once_under_concurrency_and_collected_by_gc() {
    let k = Kiln::new();
    let tar = busybox_tar(k.dir.path());
    k.import(&tar, "bb", &[]);
    k.ok(["tag", "bb", "bb-again"]);
    // Six concurrent first uses of one chain (two names, same layers).
    let children: Vec<_> = (0..6)
        .map(|i| {
            k.cmd()
                .args([
                    "rootfs",
                    if i % 2 == 0 { "bb" } else { "bb-again" },
                    "--format",
                    "json",
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let mut paths = std::collections::BTreeSet::new();
    let mut unpacked = 0;
    for c in children {
        let out = c.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        paths.insert(v["path"].as_str().expect("path").to_string());
        if v["unpacked"] == true {
            unpacked += 1;
        }
    }
    assert_eq!(paths.len(), 1, "one cache entry per chain: {paths:?}");
    assert_eq!(unpacked, 1, "exactly one process unpacks");
    let root = Path::new(paths.iter().next().expect("path"));
    assert_same_tree(
        &caller_as_root(canon(tree_of_dir(root))),
        &kiln_unpack(&k, "bb", &k.dir.path().join("fresh")),
        "cached rootfs vs fresh unpack",
    );
    // Still referenced: gc keeps it; once the image is gone, gc removes it.
    k.ok(["gc"]);
    assert!(root.is_dir());
    k.ok(["rm", "bb", "bb-again"]);
    let gc: serde_json::Value =
        serde_json::from_str(&k.ok(["gc", "--format", "json"])).expect("json");
    assert_eq!(gc["rootfs_removed"], 1, "{gc}");
    assert!(!root.exists());
}
