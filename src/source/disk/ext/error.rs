//! The errors of the ext2/3/4 reader.

use std::fmt;
use std::io;

/// A path for error messages: `Some` once the walk knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathCtx(pub Option<String>);

impl fmt::Display for PathCtx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(p) if p.is_empty() => f.write_str(" (/)"),
            Some(p) => write!(f, " (/{p})"),
            None => Ok(()),
        }
    }
}

/// Why an ext2/3/4 image could not be read.
///
/// Every variant about on-disk data names the inode, the path when the walk
/// knows it, and the byte offset on the device of the structure that was
/// wrong, so a user can look at it with `debugfs` or a hex dump.
#[derive(Debug, thiserror::Error)]
pub enum ExtError {
    /// Reading the device failed (I/O error, or the image is truncated).
    #[error("ext: read at byte offset {offset}: {source}")]
    Io {
        /// Byte offset on the device.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The device holds no ext2/3/4 file system; `found` names what it holds
    /// when that is recognizable (`"xfs"`, `"btrfs"`, ...).
    #[error("not an ext2/3/4 file system: found {found}")]
    NotExt {
        /// What the device holds instead.
        found: &'static str,
    },
    /// The file system uses incompatible features this reader does not know
    /// or cannot honor; reading it anyway would give wrong data.
    #[error("ext: unsupported incompatible feature(s): {names}")]
    UnsupportedFeatures {
        /// The features, by name (or hex value when unknown).
        names: String,
    },
    /// Something valid but not supported (e.g. an encrypted file).
    #[error("ext: unsupported: {what}")]
    Unsupported {
        /// What it is.
        what: String,
    },
    /// A superblock field is impossible.
    #[error("ext: bad superblock (byte offset 1024): {field}: {reason}")]
    BadSuperblock {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A checksum does not match.
    #[error("ext: {what} checksum mismatch at byte offset {offset} (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// The structure.
        what: &'static str,
        /// Its byte offset on the device.
        offset: u64,
        /// The stored value.
        stored: u32,
        /// The value computed from the data.
        computed: u32,
    },
    /// A group descriptor is impossible.
    #[error("ext: bad descriptor of block group {group} at byte offset {offset}: {reason}")]
    BadGroupDesc {
        /// The group.
        group: u32,
        /// Byte offset of the descriptor.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An inode number outside the file system (or in its unused part).
    #[error("ext: inode {ino}{path} does not exist: {reason}")]
    InodeOutOfRange {
        /// The inode number.
        ino: u64,
        /// Path of the directory entry that named it.
        path: PathCtx,
        /// Why it is out of range.
        reason: String,
    },
    /// An inode's fields are impossible or contradictory.
    #[error("ext: inode {ino}{path} at byte offset {offset}: {reason}")]
    BadInode {
        /// The inode number.
        ino: u32,
        /// Its path, when known.
        path: PathCtx,
        /// Byte offset of the inode (or of the bad structure it points to).
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A block map (extent tree or indirect blocks) is corrupt or hostile.
    #[error("ext: block map of inode {ino}{path}, at byte offset {offset}: {reason}")]
    BadBlockMap {
        /// The inode number.
        ino: u32,
        /// Its path, when known.
        path: PathCtx,
        /// Byte offset of the bad extent node / pointer.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A directory block is corrupt.
    #[error("ext: directory inode {ino}{path}, entry at byte offset {offset}: {reason}")]
    BadDirEntry {
        /// The directory inode.
        ino: u32,
        /// The directory's path, when known.
        path: PathCtx,
        /// Byte offset of the bad entry on the device.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A directory reachable by two paths (a cycle, or a hard-linked
    /// directory): walking on would never end or duplicate a tree.
    #[error("ext: directory inode {ino} is reachable as both /{first} and /{second} (directory cycle or hard-linked directory; the second entry is at byte offset {offset})")]
    DirCycle {
        /// The directory inode.
        ino: u32,
        /// The path it was first seen at.
        first: String,
        /// The second path.
        second: String,
        /// Device byte offset of the directory entry naming the second path.
        offset: u64,
    },
    /// A file name that is not UTF-8 (kiln paths are strings, as for tar
    /// sources).
    #[error("ext: file name {path:?} is not valid UTF-8, which kiln does not support")]
    NonUtf8Name {
        /// The path, with invalid bytes replaced.
        path: String,
    },
    /// Extended attributes are corrupt.
    #[error("ext: extended attributes of inode {ino}{path} at byte offset {offset}: {reason}")]
    BadXattr {
        /// The inode.
        ino: u32,
        /// Its path, when known.
        path: PathCtx,
        /// Byte offset of the bad structure.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The walk read far more metadata than the device holds: blocks are
    /// shared between many inodes, as only a hostile image does.
    #[error("ext: the walk read more than {limit} bytes of metadata, more than the device holds: directories or block maps are shared between inodes (hostile image?)")]
    MetadataAmplification {
        /// The limit, in bytes.
        limit: u64,
    },
    /// A path longer than kiln accepts (a hostile, absurdly deep tree).
    #[error("ext: path /{prefix}... is longer than {limit} bytes")]
    PathTooLong {
        /// The first bytes of the path.
        prefix: String,
        /// The limit.
        limit: usize,
    },
}

impl ExtError {
    /// Fills in the path of the object the error is about, if not known yet.
    pub(crate) fn at_path(mut self, p: &str) -> ExtError {
        match &mut self {
            ExtError::InodeOutOfRange { path, .. }
            | ExtError::BadInode { path, .. }
            | ExtError::BadBlockMap { path, .. }
            | ExtError::BadDirEntry { path, .. }
            | ExtError::BadXattr { path, .. } => {
                path.0.get_or_insert_with(|| p.to_string());
            }
            _ => {}
        }
        self
    }
}

impl From<ExtError> for io::Error {
    fn from(e: ExtError) -> io::Error {
        match e {
            ExtError::Io { source, offset } => io::Error::new(
                source.kind(),
                format!("ext: read at byte offset {offset}: {source}"),
            ),
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}
