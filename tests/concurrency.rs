//! Concurrency: several `kiln` processes on one store at once (imports, gc,
//! tag, rm, readers) must neither fail, lose a tag, nor leave the store
//! inconsistent.

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

/// An import to run: its tag, and its input as a path or as stdin bytes.
struct Job {
    tag: String,
    path: Option<PathBuf>,
    stdin: Option<Vec<u8>>,
}

/// Spawns `kiln import` for every job at once, then waits for all of them.
fn import_all(k: &Kiln, jobs: &[Job]) -> Vec<Output> {
    import_all_with_gc(k, jobs, usize::MAX).0
}

/// Like [`import_all`], and also spawns a `kiln gc` after every `gc_every`
/// imports, so collections start while imports are in flight. Returns the
/// imports' and the gcs' outputs.
fn import_all_with_gc(k: &Kiln, jobs: &[Job], gc_every: usize) -> (Vec<Output>, Vec<Output>) {
    let mut running: Vec<(Child, Option<thread::JoinHandle<()>>)> = Vec::new();
    let mut gcs = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        let src = j
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "-".into());
        let mut c = k.cmd();
        c.args(["import", &src, "-t", &j.tag])
            .stdin(if j.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn kiln import");
        let feeder = j.stdin.clone().map(|data| {
            let mut w = child.stdin.take().expect("stdin");
            thread::spawn(move || {
                let _ = w.write_all(&data);
            })
        });
        running.push((child, feeder));
        if (i + 1) % gc_every == 0 {
            let gc = k
                .cmd()
                .args(["gc", "--format", "json"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn kiln gc");
            gcs.push(gc);
        }
    }
    let imports = running
        .into_iter()
        .map(|(child, feeder)| {
            let out = child.wait_with_output().expect("wait kiln import");
            if let Some(f) = feeder {
                f.join().expect("stdin feeder");
            }
            out
        })
        .collect();
    let gcs = gcs
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait kiln gc"))
        .collect();
    (imports, gcs)
}

/// Asserts an import succeeded; returns its manifest digest.
fn digest_of(job: &Job, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "import {} failed ({:?}):\nstdout: {stdout}\nstderr: {}",
        job.tag,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut w = stdout.split_whitespace();
    let name = w.next().expect("import prints NAME DIGEST");
    assert_eq!(name, with_latest(&job.tag));
    let d = w.next().expect("import prints NAME DIGEST").to_string();
    assert!(d.starts_with("sha256:") && d.len() == 71, "bad digest {d}");
    d
}

fn with_latest(tag: &str) -> String {
    if tag.contains(':') {
        tag.to_string()
    } else {
        format!("{tag}:latest")
    }
}

/// Runs `args` on the store in a loop on a thread until `stop` is set (at
/// least `min` times); returns how many runs there were. Every run must
/// succeed and `check` its stdout.
fn loop_kiln(
    k: &Kiln,
    args: &'static [&'static str],
    min: usize,
    stop: Arc<AtomicBool>,
    check: fn(&str),
) -> thread::JoinHandle<usize> {
    let store = k.store();
    thread::spawn(move || {
        let mut n = 0;
        while n < min || !stop.load(Ordering::SeqCst) {
            let out = std::process::Command::new(kiln_bin())
                .arg("--store")
                .arg(&store)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .expect("spawn kiln");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "kiln {args:?} failed during concurrent imports ({:?}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            check(&stdout);
            n += 1;
        }
        n
    })
}

fn check_json(s: &str) {
    let v: serde_json::Value =
        serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON {s:?}: {e}"));
    assert!(v.is_object() || v.is_array(), "{v}");
}

/// Tag name -> manifest digest, from `kiln images --format json`.
fn images(k: &Kiln) -> BTreeMap<String, String> {
    let v: serde_json::Value =
        serde_json::from_str(&k.ok(["images", "--format", "json"])).expect("json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|i| {
            (
                i["name"].as_str().expect("name").to_string(),
                i["digest"].as_str().expect("digest").to_string(),
            )
        })
        .collect()
}

fn assert_consistent(k: &Kiln) {
    let out = k.ok(["fsck"]);
    assert!(out.contains("consistent"), "fsck: {out}");
}

fn temp_files(k: &Kiln) -> Vec<PathBuf> {
    fs::read_dir(k.store().join(".kiln/tmp"))
        .expect("read .kiln/tmp")
        .map(|e| e.expect("entry").path())
        .collect()
}

/// Creates the store before the concurrent part (see
/// `fresh_store_opened_concurrently` for concurrent creation).
fn initialized_store() -> Kiln {
    let k = Kiln::new();
    assert!(k.names().is_empty());
    k
}

/// Checks that an image's blobs are present and that it exports as an
/// oci-archive holding its layers.
fn check_image(k: &Kiln, name: &str, dir: &Path) {
    let v = k.inspect(name);
    let cfg = v["manifest"]["config"]["digest"]
        .as_str()
        .expect("config digest");
    assert!(k.blob(cfg).is_file(), "{name}: config blob {cfg} missing");
    let layers = v["manifest"]["layers"].as_array().expect("layers");
    assert!(!layers.is_empty(), "{name}: no layers");
    for l in layers {
        let d = l["digest"].as_str().expect("layer digest");
        let p = k.blob(d);
        assert!(p.is_file(), "{name}: layer {d} missing");
        assert_eq!(
            fs::metadata(&p).expect("layer").len(),
            l["size"].as_u64().expect("size"),
            "{name}: layer {d} size"
        );
    }
    let file = dir.join(format!("{}.oci.tar", name.replace([':', '/'], "_")));
    k.ok(["export", name, "-o", file.to_str().expect("utf-8 path")]);
    let mut members = BTreeSet::new();
    let mut ar = tar::Archive::new(fs::File::open(&file).expect("open export"));
    for e in ar.entries().expect("entries") {
        let mut e = e.expect("entry");
        let p = e
            .path()
            .expect("path")
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        let mut sink = Vec::new();
        e.read_to_end(&mut sink).expect("read member");
        members.insert(p);
    }
    for want in ["oci-layout", "index.json"] {
        assert!(
            members.contains(want),
            "{name}: export lacks {want}: {members:?}"
        );
    }
    for l in layers {
        let hex = l["digest"]
            .as_str()
            .expect("digest")
            .trim_start_matches("sha256:");
        assert!(
            members.contains(&format!("blobs/sha256/{hex}")),
            "{name}: export lacks layer {hex}"
        );
    }
    fs::remove_file(&file).expect("rm export");
}

#[test]
fn concurrent_imports_with_gc_loop() {
    let k = initialized_store();
    let d = tmpdir();
    let bb = busybox_tar(d.path());
    let fx = fixture_tar(d.path());
    let bb_gz = d.path().join("busybox.tar.gz");
    fs::write(&bb_gz, gzip(&fs::read(&bb).expect("read busybox"))).expect("write gz");
    let fx_gz = d.path().join("fixture.tar.gz");
    fs::write(&fx_gz, gzip(&fs::read(&fx).expect("read fixture"))).expect("write gz");
    let job = |tag: &str, p: &Path| Job {
        tag: tag.into(),
        path: Some(p.to_path_buf()),
        stdin: None,
    };
    let jobs = vec![
        job("bb/plain:1", &bb),
        job("fx/plain:1", &fx),
        job("bb/gz:1", &bb_gz),
        job("fx/gz:1", &fx_gz),
        job("bb/plain:2", &bb),
        job("fx/plain:2", &fx),
        job("bb/gz:2", &bb_gz),
        Job {
            tag: "fx/stdin:1".into(),
            path: None,
            stdin: Some(fs::read(&fx_gz).expect("read")),
        },
    ];

    let stop = Arc::new(AtomicBool::new(false));
    let gc = loop_kiln(
        &k,
        &["gc", "--format", "json"],
        4,
        Arc::clone(&stop),
        check_json,
    );
    let reader = loop_kiln(
        &k,
        &["images", "--format", "json"],
        4,
        Arc::clone(&stop),
        check_json,
    );
    let (outs, gcs) = import_all_with_gc(&k, &jobs, 2);
    stop.store(true, Ordering::SeqCst);
    assert_eq!(gcs.len(), 4);
    for g in &gcs {
        assert!(
            g.status.success(),
            "kiln gc during imports failed: {}",
            String::from_utf8_lossy(&g.stderr)
        );
        check_json(&String::from_utf8_lossy(&g.stdout));
    }
    let gc_runs = gc.join().expect("gc loop");
    let reads = reader.join().expect("reader loop");
    eprintln!("gc ran {gc_runs} times, images {reads} times during the imports");
    assert!(
        gc_runs >= 4 && reads >= 4,
        "gc ran {gc_runs} times, images {reads} times"
    );

    let digests: Vec<String> = jobs
        .iter()
        .zip(&outs)
        .map(|(j, o)| digest_of(j, o))
        .collect();
    let imgs = images(&k);
    let want: BTreeSet<String> = jobs.iter().map(|j| with_latest(&j.tag)).collect();
    assert_eq!(
        imgs.keys().cloned().collect::<BTreeSet<_>>(),
        want,
        "tags after concurrent imports"
    );
    for (j, dg) in jobs.iter().zip(&digests) {
        assert_eq!(
            &imgs[&with_latest(&j.tag)],
            dg,
            "{}: index digest differs from the one import printed",
            j.tag
        );
    }
    // Same input, same image: concurrent imports do not disturb each other.
    // (The config records the input's compression, so only equal inputs
    // give equal manifests; the layer is the same whatever the compression.)
    assert_eq!(digests[0], digests[4], "bb/plain:1 and bb/plain:2");
    assert_eq!(digests[1], digests[5], "fx/plain:1 and fx/plain:2");
    assert_eq!(digests[2], digests[6], "bb/gz:1 and bb/gz:2");
    assert_eq!(digests[3], digests[7], "fx/gz:1 and fx/stdin:1");
    let layer = |tag: &str| {
        k.inspect(tag)["manifest"]["layers"][0]["digest"]
            .as_str()
            .expect("layer")
            .to_string()
    };
    for j in &jobs {
        let first = if j.tag.starts_with("bb/") {
            "bb/plain:1"
        } else {
            "fx/plain:1"
        };
        assert_eq!(
            layer(&j.tag),
            layer(first),
            "{}: layer differs from {first}'s (same content)",
            j.tag
        );
    }
    assert_consistent(&k);
    for j in &jobs {
        check_image(&k, &j.tag, d.path());
    }
    assert_same_tree(
        &tree_of_tar(&bb),
        &tree_of_tar(&k.only_layer("bb/gz:2")),
        "busybox layer",
    );
    assert_same_tree(
        &tree_of_tar(&fx),
        &tree_of_tar(&k.only_layer("fx/stdin:1")),
        "fixture layer",
    );

    // A final gc keeps everything tagged and leaves no temp file.
    let r: serde_json::Value =
        serde_json::from_str(&k.ok(["gc", "--format", "json"])).expect("gc json");
    assert_eq!(
        r["blobs_removed"], 0,
        "gc removed blobs of tagged images: {r}"
    );
    assert!(
        temp_files(&k).is_empty(),
        "temp files left: {:?}",
        temp_files(&k)
    );
    assert_consistent(&k);
    assert_eq!(images(&k), imgs);
}

#[test]
fn same_input_concurrently_to_eight_tags() {
    let k = initialized_store();
    let d = tmpdir();
    let bb = busybox_tar(d.path());
    let jobs: Vec<Job> = (0..8)
        .map(|i| Job {
            tag: format!("same:{i}"),
            path: Some(bb.clone()),
            stdin: None,
        })
        .collect();
    let outs = import_all(&k, &jobs);
    let digests: BTreeSet<String> = jobs
        .iter()
        .zip(&outs)
        .map(|(j, o)| digest_of(j, o))
        .collect();
    assert_eq!(
        digests.len(),
        1,
        "one input gave several manifests: {digests:?}"
    );
    let dg = digests.into_iter().next().expect("digest");
    let imgs = images(&k);
    let want: BTreeMap<String, String> =
        (0..8).map(|i| (format!("same:{i}"), dg.clone())).collect();
    assert_eq!(
        imgs, want,
        "index after 8 concurrent imports (lost update?)"
    );
    assert_consistent(&k);
    // One layer, one config, one manifest: identical blobs were shared.
    let blobs = fs::read_dir(k.store().join("blobs/sha256"))
        .expect("blobs")
        .count();
    assert_eq!(blobs, 3, "expected 3 blobs for 8 imports of one input");
    assert!(
        temp_files(&k).is_empty(),
        "temp files left: {:?}",
        temp_files(&k)
    );
    let r: serde_json::Value =
        serde_json::from_str(&k.ok(["gc", "--format", "json"])).expect("gc json");
    assert_eq!(r["blobs_removed"], 0, "{r}");
    check_image(&k, "same:7", d.path());
}

#[test]
fn concurrent_tag_and_rm_lose_nothing() {
    let k = initialized_store();
    let d = tmpdir();
    let fx = fixture_tar(d.path());
    let dg = k.import(&fx, "base", &[]);
    // Tags the workers will remove while others are added.
    for i in 0..4 {
        k.ok(["tag", "base", &format!("old:{i}")]);
    }
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let store = k.store();
            thread::spawn(move || {
                let run = |args: &[String]| {
                    let out = std::process::Command::new(kiln_bin())
                        .arg("--store")
                        .arg(&store)
                        .args(args)
                        .stdin(Stdio::null())
                        .output()
                        .expect("spawn kiln");
                    assert!(
                        out.status.success(),
                        "kiln {args:?} failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                };
                for i in 0..5 {
                    let n = w * 5 + i;
                    run(&["tag".into(), "base".into(), format!("copy/n{n}:t{n}")]);
                    if i == 2 {
                        run(&["rm".into(), format!("old:{w}")]);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("tag worker");
    }
    let imgs = images(&k);
    let mut want: BTreeMap<String, String> = (0..20)
        .map(|n| (format!("copy/n{n}:t{n}"), dg.clone()))
        .collect();
    want.insert("base:latest".into(), dg.clone());
    assert_eq!(
        imgs, want,
        "tags after concurrent kiln tag/rm (lost update?)"
    );
    assert_consistent(&k);
    k.ok(["gc"]);
    assert_eq!(images(&k), want);
    assert_consistent(&k);
}

/// Several processes opening a store that does not exist yet must all
/// create or find the same empty layout.
#[test]
fn fresh_store_opened_concurrently() {
    // Only import creates a store: eight imports race to create it.
    let d = tmpdir();
    let src = d.path().join("src");
    fs::create_dir_all(src.join("etc")).expect("src");
    fs::write(src.join("etc/f"), b"f").expect("file");
    for round in 0..5 {
        let k = Kiln::without_store();
        let children: Vec<Child> = (0..8)
            .map(|i| {
                k.cmd()
                    .args(["import", "-t", &format!("fresh:{i}")])
                    .arg(&src)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn kiln")
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().expect("wait kiln");
            assert!(
                out.status.success(),
                "round {round}: kiln import into a fresh store failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(k.names().len(), 8, "round {round}");
        assert_consistent(&k);
    }
}
