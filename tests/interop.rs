//! Real clients read what kiln writes: skopeo and podman (umoci is covered
//! in tests/import.rs, where its unpacked tree is compared file by file).

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;
use sha2::{Digest, Sha256};

#[test]
fn skopeo_inspects_and_copies_straight_from_the_store() {
    require("skopeo");
    let k = Kiln::new();
    let tar = busybox_tar(k.dir.path());
    let d = k.import(&tar, "kit/busybox:1.0", &["--label", "org.example=kiln"]);
    let src = format!("oci:{}:kit/busybox:1.0", k.store().display());
    let v: serde_json::Value =
        serde_json::from_str(&sh(Command::new("skopeo").args(["inspect", &src]))).expect("json");
    assert_eq!(v["Digest"], d.as_str());
    assert_eq!(v["Labels"]["org.example"], "kiln");
    assert_eq!(v["Architecture"], "amd64");
    // skopeo copies it out, verifying every blob digest on the way.
    let out = k.dir.path().join("copied");
    sh(Command::new("skopeo").args(["copy", "-q", &src, &format!("dir:{}", out.display())]));
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("manifest.json")).expect("manifest"))
            .expect("json");
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .expect("layer digest")
        .trim_start_matches("sha256:")
        .to_string();
    assert_same_tree(
        &tree_of_tar(&tar),
        &tree_of_tar(&out.join(layer)),
        "layer copied by skopeo",
    );
    // And the exported archives are readable by skopeo too.
    for (fmt, transport) in [
        ("oci-archive", "oci-archive"),
        ("docker-archive", "docker-archive"),
    ] {
        let file = k.dir.path().join(format!("{fmt}.tar"));
        k.ok([
            "export",
            "kit/busybox:1.0",
            "-o",
            file.to_str().expect("utf8"),
            "--format",
            fmt,
        ]);
        let v: serde_json::Value =
            serde_json::from_str(&sh(Command::new("skopeo")
                .args(["inspect", &format!("{transport}:{}", file.display())])))
            .expect("json");
        assert_eq!(v["Architecture"], "amd64", "{fmt}");
        assert_eq!(v["Layers"].as_array().map(Vec::len), Some(1), "{fmt}");
        // skopeo copies out of the archive (verifying digests) and the layer
        // is the original tree.
        let dir = k.dir.path().join(format!("{fmt}-copied"));
        sh(Command::new("skopeo").args([
            "copy",
            "-q",
            &format!("{transport}:{}", file.display()),
            &format!("dir:{}", dir.display()),
        ]));
        let m: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("manifest.json")).expect("manifest"))
                .expect("json");
        let l = m["layers"][0]["digest"]
            .as_str()
            .expect("digest")
            .trim_start_matches("sha256:")
            .to_string();
        assert_same_tree(
            &tree_of_tar(&tar),
            &tree_of_tar(&dir.join(l)),
            &format!("layer copied from the {fmt} export"),
        );
    }
}

/// A podman with its own storage in `dir`, so tests never touch the host's
/// images. Running containers on these machines needs two work-arounds:
/// crun refuses the v1/v2 hybrid cgroup layout (hide cgroup2 behind a tmpfs in
/// a private mount namespace) and root lacks CAP_SYS_RESOURCE (keep rlimits at
/// or below the current hard limits).
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Podman {
        require("podman");
        let dir = tmpdir();
        fs::create_dir_all(dir.path().join("xdg")).expect("mkdir");
        let mut perm = fs::metadata(dir.path().join("xdg"))
            .expect("stat")
            .permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o700);
        fs::set_permissions(dir.path().join("xdg"), perm).expect("chmod");
        Podman { dir }
    }

    fn base(&self) -> String {
        format!(
            "podman --root {0}/root --runroot {0}/run --storage-driver vfs --cgroup-manager cgroupfs --events-backend none",
            self.dir.path().display()
        )
    }

    fn shell(&self, script: &str) -> String {
        sh(Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("XDG_RUNTIME_DIR", self.dir.path().join("xdg"))
            .env("HOME", self.dir.path()))
    }

    fn load(&self, archive: &Path) -> String {
        self.shell(&format!(
            "{} load -i '{}' 2>&1",
            self.base(),
            archive.display()
        ))
    }

    fn run(&self, image: &str, cmd: &str) -> String {
        let p = self.base();
        let inner = format!(
            "mount -t tmpfs none /sys/fs/cgroup/unified 2>/dev/null || true; \
             {p} run --rm --network none --cgroups=disabled --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 {image} sh -c '{cmd}'"
        );
        if is_root() {
            self.shell(&format!("unshare -m sh -c \"{inner}\""))
        } else {
            // Rootless podman: do the same inside podman's own user namespace.
            self.shell(&format!("{p} unshare unshare -m sh -c \"{inner}\""))
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Rootless storage holds files owned by sub-ids: remove them from
        // inside podman's namespace, then stop its pause process.
        let p = self.base();
        let d = self.dir.path().display().to_string();
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{p} unshare rm -rf {d}/root {d}/run >/dev/null 2>&1; \
                 kill $(cat {d}/xdg/libpod/tmp/pause.pid 2>/dev/null) 2>/dev/null; true"
            ))
            .env("XDG_RUNTIME_DIR", self.dir.path().join("xdg"))
            .env("HOME", self.dir.path())
            .status();
    }
}

#[test]
fn podman_loads_kiln_exports_and_the_image_runs() {
    let k = Kiln::new();
    let tar = busybox_tar(k.dir.path());
    k.import(&tar, "kiln-demo:1", &["--env", "GREETING=hello-from-kiln"]);
    let podman = Podman::new();
    for (fmt, name) in [("docker-archive", "docker"), ("oci-archive", "oci")] {
        let file = k.dir.path().join(format!("{name}.tar"));
        k.ok([
            "export",
            "kiln-demo:1",
            "-o",
            file.to_str().expect("utf8"),
            "--format",
            fmt,
        ]);
        let out = podman.load(&file);
        assert!(out.contains("Loaded image"), "podman load {fmt}: {out}");
    }
    let out = podman.run(
        "localhost/kiln-demo:1",
        "echo \\$GREETING; cat /etc/os-release; busybox | head -1",
    );
    assert!(out.contains("hello-from-kiln"), "{out}");
    assert!(out.contains("kiln busybox example"), "{out}");
    assert!(out.contains("BusyBox v"), "{out}");
}

#[test]
fn sparse_files_reach_umoci_and_podman_with_their_content() {
    let k = Kiln::new();
    let src = k.dir.path().join("src");
    fs::create_dir(&src).expect("mkdir");
    sparse_file(
        &src.join("sparse"),
        200 << 20,
        &[
            (0, b"head"),
            (50 << 20, b"middle"),
            ((200 << 20) - 3, b"end"),
        ],
    );
    fs::write(src.join("plain"), b"plain\n").expect("write");
    k.import(&src, "sp", &[]);
    // umoci reads the PAX sparse entries through Go's archive/tar.
    let got = umoci_unpack(&k, "sp:latest", &k.dir.path().join("bundle"));
    let want = tree_of_dir(&src);
    assert_eq!(got["sparse"].sha256, want["sparse"].sha256, "umoci");
    assert_eq!(got["plain"].sha256, want["plain"].sha256, "umoci");

    // A sparse file made in a sandbox is committed sparse (the upper dir
    // keeps the hole); podman loads the exported image and sees the content.
    let tar = busybox_tar(k.dir.path());
    k.import(&tar, "bb", &[]);
    k.ok([
        "run",
        "--commit",
        "bb-sparse",
        "bb",
        "sh",
        "-c",
        "truncate -s 100M /f && echo in-the-middle | dd of=/f bs=1M seek=50 conv=notrunc 2>/dev/null",
    ]);
    let blob = k.top_layer("bb-sparse");
    let mut layer = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::MultiGzDecoder::new(fs::File::open(&blob).expect("open")),
        &mut layer,
    )
    .expect("gunzip");
    assert!(
        layer.len() < 1 << 20,
        "committed layer: {} bytes",
        layer.len()
    );
    let mut content = vec![0u8; 100 << 20];
    content[50 << 20..(50 << 20) + 14].copy_from_slice(b"in-the-middle\n");
    let want: String = Sha256::digest(&content)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let podman = Podman::new();
    let file = k.dir.path().join("bb-sparse.tar");
    k.ok([
        "export",
        "bb-sparse",
        "-o",
        file.to_str().expect("utf8"),
        "--format",
        "oci-archive",
    ]);
    let out = podman.load(&file);
    assert!(out.contains("Loaded image"), "podman load: {out}");
    let out = podman.run("localhost/bb-sparse:latest", "sha256sum /f; stat -c %s /f");
    assert!(out.contains(&want), "podman: {out}");
    assert!(out.contains("104857600"), "podman: {out}");
}
