//! The shared vocabulary of kiln's data path: the normalized file-system
//! [`Entry`] every source produces and every layer stores, the layer tar
//! writer, sparse-file maps, layer compression, the rootless-owner xattr
//! codec, compression sniffing of inputs, and the errors of all of these.
//!
//! It stands below every reader (`source`), the store's export, the importer
//! and the unpacker, and imports nothing of kiln but `sys`.

pub mod codec;
pub mod compress;
pub mod entry;
pub mod error;
pub mod rootless;
pub mod sparse;

pub use compress::{Compression, Encoder, ParGzip};
pub use entry::{
    check_whiteout, normalize_path, Entry, EntryKind, PathError, PathGuard, TarWriter,
};
pub use error::LayerError;

/// Largest JSON document (manifest, config, index) kiln will read into memory.
pub const MAX_JSON_SIZE: u64 = 16 << 20;
