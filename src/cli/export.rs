//! `kiln export`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use kiln::ExportFormat;

use super::{open_store, Cli};

/// `kiln export NAME -o FILE --format oci-archive|docker-archive`
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Image name or digest.
    pub image: String,
    /// Output file; `-` for stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// Archive format: oci-archive or docker-archive.
    #[arg(long, default_value = "oci-archive", value_parser = parse_format)]
    pub format: ExportFormat,
}

fn parse_format(s: &str) -> Result<ExportFormat, String> {
    s.parse()
}

pub fn run(cli: &Cli, a: &ExportArgs) -> Result<i32> {
    let store = open_store(cli)?;
    if a.output.as_os_str() == "-" && rustix::termios::isatty(std::io::stdout()) {
        anyhow::bail!(
            "export: stdout is a terminal; redirect it (kiln export {} -o - > FILE) or use -o FILE",
            a.image
        );
    }
    if a.output.as_os_str() != "-" && a.output.is_dir() {
        anyhow::bail!(
            "export: {} is a directory; name the archive file (e.g. -o {}/image.tar)",
            a.output.display(),
            a.output.display()
        );
    }
    if a.output.as_os_str() == "-" {
        let stdout = std::io::stdout();
        let mut lock = stdout.lock();
        store
            .export(&a.image, a.format, &mut lock)
            .context("export to stdout")?;
    } else {
        store
            .export_to_path(&a.image, a.format, &a.output)
            .with_context(|| format!("export {} to {}", a.image, a.output.display()))?;
    }
    Ok(0)
}

/// `kiln digest FILE...`
#[derive(Args, Debug)]
pub struct DigestArgs {
    /// Files to hash; `-` for stdin.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

pub fn digest(a: &DigestArgs) -> Result<i32> {
    for f in &a.files {
        let (d, _) = if f.as_os_str() == "-" {
            kiln::digest::of_reader(std::io::stdin().lock())
        } else {
            kiln::digest::of_reader(
                std::fs::File::open(f).with_context(|| format!("open {}", f.display()))?,
            )
        }
        .with_context(|| format!("read {}", f.display()))?;
        println!("{d}  {}", f.display());
    }
    Ok(0)
}
