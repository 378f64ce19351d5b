//! Readers that turn an input into file-system entries or image blobs, and
//! the content detection that picks them.
//!
//! Detection looks at bytes, never at file names: compression magic first,
//! then, inside the (decompressed) stream, the first tar headers tell a root
//! file-system tarball from a `docker save` / OCI archive.

pub mod archive;
pub mod dir;
pub mod disk;
pub mod tarball;

pub use crate::layer::codec::{
    decoder, peek, sniff_codec, sniff_unsupported, tar_header_ok, BombGuard, Codec, CountingReader,
    Expansion, ExpansionLimits,
};
