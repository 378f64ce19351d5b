//! `kiln unpack`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use kiln::unpack::UnpackOptions;

use super::output::{print_json, Format};
use super::{open_store, Cli};

/// `kiln unpack IMAGE DIR`
#[derive(Args, Debug)]
pub struct UnpackArgs {
    /// Image name or digest.
    pub image: String,
    /// Destination directory (created; must be absent or empty).
    pub dest: PathBuf,
    /// Record owners in user.rootlesscontainers instead of chown'ing
    /// (default when not root).
    #[arg(long)]
    pub rootless: bool,
    /// Output format of the report.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

pub fn run(cli: &Cli, a: &UnpackArgs) -> Result<i32> {
    let store = open_store(cli)?;
    let opts = UnpackOptions {
        rootless: a.rootless.then_some(true),
    };
    let r = store.unpack(&a.image, &a.dest, &opts)?;
    if a.format == Format::Json {
        print_json(&r)?;
    } else {
        println!(
            "unpacked {} layer(s), {} entries, {} whiteout(s) into {}",
            r.layers,
            r.entries,
            r.whiteouts,
            a.dest.display()
        );
        if r.rootless_owners + r.devices_as_files + r.xattrs_skipped > 0 {
            eprintln!(
                "kiln: rootless: {} owner(s) recorded in user.rootlesscontainers, {} device(s) written as empty files, {} xattr(s) skipped",
                r.rootless_owners, r.devices_as_files, r.xattrs_skipped
            );
        }
    }
    Ok(0)
}

/// `kiln rootfs IMAGE`
#[derive(Args, Debug)]
pub struct RootfsArgs {
    /// Image name or digest.
    pub image: String,
    /// Remove the image's cached trees instead (the next run unpacks it
    /// again); refused while a run uses one.
    #[arg(long, conflicts_with = "rebuild")]
    pub drop: bool,
    /// Remove the image's cached trees and unpack it again.
    #[arg(long)]
    pub rebuild: bool,
    /// Output format: the path, or a JSON report.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

pub fn rootfs(cli: &Cli, a: &RootfsArgs) -> Result<i32> {
    let store = open_store(cli)?;
    if a.drop || a.rebuild {
        let n = store.drop_rootfs(&a.image)?;
        if a.drop {
            println!("removed {n} cached tree(s) of {}", a.image);
            return Ok(0);
        }
    }
    let r = store.rootfs(&a.image)?;
    if a.format == Format::Json {
        print_json(&r)?;
    } else {
        println!("{}", r.path.display());
    }
    Ok(0)
}
