//! Reproducibility: the same tree gives the same digests, whatever the
//! order on disk, the machine, the store or the number of cores.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

fn write_tree(root: &Path, order: &[usize]) {
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            (
                format!("d{}/f{i:02}", i % 5),
                format!("content {i}\n").repeat(i + 1).into_bytes(),
            )
        })
        .collect();
    for &i in order {
        let (p, data) = &files[i];
        let path = root.join(p);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, data).expect("write");
    }
}

fn set_mtimes(root: &Path, secs: u64) {
    sh(Command::new("find")
        .arg(root)
        .arg("-exec")
        .arg("touch")
        .arg("-h")
        .arg("-d")
        .arg(format!("@{secs}"))
        .arg("{}")
        .arg("+"));
}

#[test]
fn directory_order_and_mtimes_on_disk_do_not_change_the_digest() {
    let k = Kiln::new();
    let a = k.dir.path().join("a");
    let b = k.dir.path().join("b");
    let forward: Vec<usize> = (0..40).collect();
    let mut backward = forward.clone();
    backward.reverse();
    write_tree(&a, &forward);
    write_tree(&b, &backward);
    // Different mtimes on disk, clamped by SOURCE_DATE_EPOCH.
    set_mtimes(&a, 1_800_000_000);
    set_mtimes(&b, 1_900_000_000);
    for dir in [&a, &b] {
        let perm = std::os::unix::fs::PermissionsExt::from_mode(0o755);
        fs::set_permissions(dir, perm).expect("chmod");
    }
    let da = k.import(&a, "a", &["--source-date-epoch", "1700000000"]);
    let db = k.import(&b, "b", &["--source-date-epoch", "1700000000"]);
    assert_eq!(
        da, db,
        "same tree, different creation order and mtimes: digests differ"
    );
    // SOURCE_DATE_EPOCH from the environment works like the flag.
    let out = k
        .cmd()
        .args(["import", a.to_str().expect("utf8"), "-t", "env"])
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .expect("spawn");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&da));
    // Without clamping, different mtimes must give different digests (the test can fail).
    let ua = k.import(&a, "ua", &[]);
    let ub = k.import(&b, "ub", &[]);
    assert_ne!(ua, ub);
}

#[test]
fn same_tarball_gives_the_same_digest_in_another_store_and_with_one_core() {
    let k1 = Kiln::new();
    let k2 = Kiln::new();
    let tar = fixture_tar(k1.dir.path());
    for comp in ["gzip", "zstd"] {
        let d1 = k1.import(&tar, &format!("x-{comp}"), &["--compression", comp]);
        // Another store, restricted to one CPU: the parallel compressors must
        // give byte-identical output.
        let out = Command::new("taskset")
            .args(["-c", "0"])
            .arg(kiln_bin())
            .arg("--store")
            .arg(k2.store())
            .args([
                "import",
                tar.to_str().expect("utf8"),
                "-t",
                "y",
                "--compression",
                comp,
            ])
            .output()
            .expect("spawn taskset");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let d2 = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .expect("digest")
            .to_string();
        assert_eq!(
            d1, d2,
            "{comp}: digest differs between stores / core counts"
        );
    }
}

#[test]
fn large_layers_are_identical_across_core_counts() {
    // Several 1 MiB compression chunks, so the parallel path really runs.
    let k = Kiln::new();
    let root = k.dir.path().join("big");
    fs::create_dir(&root).expect("mkdir");
    let mut x: u32 = 7;
    let data: Vec<u8> = (0..6_000_000u32)
        .map(|i| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            if i % 3 == 0 {
                (x >> 24) as u8
            } else {
                b'k'
            }
        })
        .collect();
    fs::write(root.join("blob"), &data).expect("write");
    // 12 MB: zstd's multi-threaded jobs differ from its single-threaded
    // mode above about 8 MB, so this catches a core-count dependence.
    let mut data = data;
    data.extend(data.clone());
    fs::write(root.join("blob"), &data).expect("write");
    for comp in ["gzip", "zstd"] {
        let d1 = k.import(
            &root,
            &format!("big1-{comp}"),
            &["--source-date-epoch", "0", "--compression", comp],
        );
        let out = Command::new("taskset")
            .args(["-c", "0"])
            .arg(kiln_bin())
            .arg("--store")
            .arg(k.store())
            .args([
                "import",
                root.to_str().expect("utf8"),
                "-t",
                "big2",
                "--source-date-epoch",
                "0",
                "--compression",
                comp,
            ])
            .output()
            .expect("spawn");
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&d1),
            "{comp}: digest differs on one core"
        );
    }
    let t = tree_of_tar(&k.only_layer("big1-gzip"));
    assert_eq!(t["blob"].sha256, {
        use sha2::Digest;
        sha2::Sha256::digest(&data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    });
}

#[test]
fn exports_are_deterministic() {
    let k = Kiln::new();
    let tar = busybox_tar(k.dir.path());
    k.import(&tar, "bb", &[]);
    for fmt in ["oci-archive", "docker-archive"] {
        let a = k.dir.path().join(format!("a-{fmt}"));
        let b = k.dir.path().join(format!("b-{fmt}"));
        k.ok([
            "export",
            "bb",
            "-o",
            a.to_str().expect("utf8"),
            "--format",
            fmt,
        ]);
        k.ok([
            "export",
            "bb",
            "-o",
            b.to_str().expect("utf8"),
            "--format",
            fmt,
        ]);
        assert_eq!(
            fs::read(&a).expect("read"),
            fs::read(&b).expect("read"),
            "{fmt} export differs"
        );
    }
}
