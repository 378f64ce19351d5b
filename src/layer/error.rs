//! The errors of reading inputs and reading or writing layers.

use std::io;
use std::path::PathBuf;

use super::PathError;

/// Errors of reading inputs and layers (and writing layers), each naming the
/// step, the input and where in it.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The source could not be opened.
    #[error("import: open {path}: {source}")]
    Open {
        /// The source as given.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The input is malformed (truncated, corrupt, bad checksum...).
    #[error("import: {step}: {path}: at offset {offset}: {reason}")]
    Corrupt {
        /// What kiln was reading.
        step: &'static str,
        /// The input.
        path: String,
        /// Byte offset in the (decompressed) stream where it went wrong.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// An entry would write outside the image or through a symlink.
    #[error("import: refusing unsafe entry in {source_name} at offset {offset}: {reason}")]
    UnsafeEntry {
        /// The input.
        source_name: String,
        /// Offset of the entry's header.
        offset: u64,
        /// The check that failed.
        reason: PathError,
    },
    /// The compressed input expands far beyond its size.
    #[error(
        "import: {path}: {exceeded} (raise the limits with {} if this input is genuine)",
        crate::words::Opt::MaxSizeRatio
    )]
    Bomb {
        /// The input.
        path: String,
        /// The limit it broke, with the sizes.
        exceeded: super::codec::Expansion,
    },
    /// Reading a file of a directory source failed.
    #[error("import: {step} {}: {source}", path.display())]
    ReadFile {
        /// What kiln was doing.
        step: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The input is a format kiln does not import.
    #[error("import: {path}: unsupported input: {what}")]
    Unsupported {
        /// The input.
        path: String,
        /// What it is.
        what: String,
    },
    /// An image archive is inconsistent or ambiguous.
    #[error("import: {path}: {reason}")]
    Archive {
        /// The input.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Writing the layer failed (disk full, store error...).
    #[error("import: write layer: {0}")]
    Write(#[source] io::Error),
}

impl LayerError {
    /// Classifies a read error from a (possibly decompressing) input stream.
    pub(crate) fn from_read(
        path: &str,
        step: &'static str,
        offset: u64,
        e: &io::Error,
    ) -> LayerError {
        if let Some(x) = super::codec::Expansion::of(e) {
            return LayerError::Bomb {
                path: path.to_string(),
                exceeded: x.clone(),
            };
        }
        let msg = e.to_string();
        // The tar crate reports a short header read as "failed to read entire block".
        let short = e.kind() == io::ErrorKind::UnexpectedEof || msg.contains("entire block");
        let reason = if short {
            format!("truncated input: {msg}")
        } else {
            msg
        };
        LayerError::Corrupt {
            step,
            path: path.to_string(),
            offset,
            reason,
        }
    }
}
