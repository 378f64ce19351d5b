//! `kiln images`, `inspect`, `tag`, `rm`, `gc`, `fsck`.

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

use super::output::{human_size, print_json, Format};
use super::{open_store, Cli};

/// `kiln images`
#[derive(Args, Debug)]
pub struct ImagesArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

/// `kiln inspect`
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Image name or digest.
    pub image: String,
}

/// `kiln tag`
#[derive(Args, Debug)]
pub struct TagArgs {
    /// Existing image name or digest.
    pub source: String,
    /// New name.
    pub target: String,
}

/// `kiln rm`
#[derive(Args, Debug)]
pub struct RmArgs {
    /// Image names to remove.
    #[arg(required = true)]
    pub images: Vec<String>,
}

/// `kiln gc` / `kiln fsck`
#[derive(Args, Debug)]
pub struct GcArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

/// `kiln fsck`
#[derive(Args, Debug)]
pub struct FsckArgs {
    /// Also compare every cached root file system with the record made
    /// when it was unpacked (reads every cached file).
    #[arg(long)]
    pub rootfs: bool,
    /// Fix what can be fixed: remove damaged cached trees (the next run
    /// unpacks them again); rebuild an unreadable index.json from the
    /// manifests in blobs/ (the old one is kept in .kiln/).
    #[arg(long)]
    pub repair: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

pub fn images(cli: &Cli, a: &ImagesArgs) -> Result<i32> {
    let store = open_store(cli)?;
    let list = store.images()?;
    if a.format == Format::Json {
        print_json(&list)?;
        return Ok(0);
    }
    println!(
        "{:<40} {:<19} {:>7} {:>10}  CREATED",
        "NAME", "DIGEST", "LAYERS", "COMPRESSED"
    );
    for i in list {
        let short = i.digest.strip_prefix("sha256:").unwrap_or(&i.digest);
        if i.broken.is_some() {
            println!(
                "{:<40} {:<19} {:>7} {:>10}  BROKEN (see kiln fsck)",
                i.name,
                &short[..12.min(short.len())],
                "-",
                "-"
            );
            continue;
        }
        println!(
            "{:<40} {:<19} {:>7} {:>10}  {}",
            i.name,
            &short[..12.min(short.len())],
            i.layers,
            human_size(i.size),
            i.created.as_deref().unwrap_or("-")
        );
    }
    Ok(0)
}

pub fn inspect(cli: &Cli, a: &InspectArgs) -> Result<i32> {
    let store = open_store(cli)?;
    let img = store.resolve(&a.image)?;
    let config: serde_json::Value = serde_json::from_slice(&img.config_bytes)?;
    print_json(&json!({
        "name": img.name,
        "digest": img.descriptor.digest().to_string(),
        "manifest": img.manifest,
        "config": config,
    }))?;
    Ok(0)
}

pub fn tag(cli: &Cli, a: &TagArgs) -> Result<i32> {
    let store = open_store(cli)?;
    let name = store.tag(&a.source, &a.target)?;
    println!("{name}");
    Ok(0)
}

pub fn rm(cli: &Cli, a: &RmArgs) -> Result<i32> {
    let store = open_store(cli)?;
    for i in &a.images {
        let n = store.remove(i)?;
        println!("removed {n}");
    }
    Ok(0)
}

pub fn gc(cli: &Cli, a: &GcArgs) -> Result<i32> {
    let store = open_store(cli)?;
    let r = store.gc()?;
    if a.format == Format::Json {
        print_json(&r)?;
    } else {
        println!(
            "removed {} blob(s), {} freed, {} stale temp file(s), {} unused rootfs cache(s), {} dead run dir(s)",
            r.blobs_removed,
            human_size(r.bytes_freed),
            r.temp_removed,
            r.rootfs_removed,
            r.runs_removed
        );
    }
    Ok(0)
}

pub fn fsck(cli: &Cli, a: &FsckArgs) -> Result<i32> {
    let store = open_store(cli)?;
    let mut repaired = Vec::new();
    if a.repair {
        if let Some(r) = store.repair_index()? {
            repaired.push(r);
        }
    }
    let mut problems = store.fsck()?;
    if a.rootfs {
        for d in store.fsck_rootfs(a.repair)? {
            let images = if d.images.is_empty() {
                "no image".to_string()
            } else {
                d.images.join(", ")
            };
            let what = format!("cached rootfs {} ({images})", d.entry.display());
            if d.removed {
                repaired.push(format!(
                    "removed {what} (the next run unpacks it again): {}",
                    d.problems.join("; ")
                ));
                continue;
            }
            for p in d.problems {
                problems.push(kiln::store::FsckProblem {
                    what: what.clone(),
                    problem: p,
                });
            }
        }
    }
    if a.format == Format::Json {
        print_json(&json!({ "problems": problems, "repaired": repaired }))?;
    } else {
        for r in &repaired {
            println!("repaired: {r}");
        }
        for p in &problems {
            println!("{}: {}", p.what, p.problem);
        }
    }
    if !problems.is_empty() {
        bail!(
            "store {} has {} problem(s)",
            store.root().display(),
            problems.len()
        );
    }
    if a.format == Format::Table {
        println!("store {} is consistent", store.root().display());
    }
    Ok(0)
}
