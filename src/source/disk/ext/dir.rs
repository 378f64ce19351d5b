//! Directory entries: classic linear blocks, htree directories (read
//! linearly) and inline directories.

use super::error::{ExtError, PathCtx};
use super::inode::{Inode, FL_INLINE_DATA, I_BLOCK_LEN, READ_CHUNK};
use super::superblock::{le16, le32, read_exact, INCOMPAT_FILETYPE};
use super::ExtFs;

/// One name in a directory.
#[derive(Debug, Clone)]
pub(crate) struct DirEnt {
    pub name: Vec<u8>,
    pub ino: u32,
    /// Device byte offset of the entry (for error messages).
    pub offset: u64,
}

/// Parses the directory entries in `buf` (a directory block, or the inline
/// area) found at device byte `at`.
fn parse_entries(
    fs: &ExtFs,
    dir: &Inode,
    buf: &[u8],
    at: u64,
    out: &mut Vec<DirEnt>,
) -> Result<(), ExtError> {
    let filetype = fs.sb.has_incompat(INCOMPAT_FILETYPE);
    let bs = fs.sb.block_size;
    let mut pos = 0usize;
    while pos < buf.len() {
        let eat = at + pos as u64;
        let bad = |reason: String| ExtError::BadDirEntry {
            ino: dir.ino,
            path: PathCtx::default(),
            offset: eat,
            reason,
        };
        if pos + 8 > buf.len() {
            return Err(bad(format!(
                "entry header runs past the end of the {}-byte block",
                buf.len()
            )));
        }
        let ino = le32(buf, pos);
        let raw_rec = le16(buf, pos + 4);
        // 64 KiB blocks do not fit rec_len's 16 bits: the kernel stores
        // 65536 as 65535 (or 0) and uses the low two bits, which are always
        // zero in a 4-byte aligned length, as bits 16-17.
        let rec_len = if bs < 65536 {
            usize::from(raw_rec)
        } else if raw_rec == 65535 || raw_rec == 0 {
            65536
        } else {
            usize::from(raw_rec & 65532) | (usize::from(raw_rec & 3) << 16)
        };
        if rec_len < 8 || !rec_len.is_multiple_of(4) || pos + rec_len > buf.len() {
            return Err(bad(format!(
                "record length {rec_len} is impossible at offset {pos} of a {}-byte block",
                buf.len()
            )));
        }
        // Without the filetype feature the name length is 16 bits; with it
        // the high byte holds the file type (which the inode also has: the
        // inode's mode is what counts).
        let name_len = if filetype {
            usize::from(buf[pos + 6])
        } else {
            usize::from(le16(buf, pos + 6))
        };
        if ino != 0 {
            if 8 + name_len > rec_len {
                return Err(bad(format!(
                    "name of {name_len} bytes does not fit the {rec_len}-byte record"
                )));
            }
            let name = &buf[pos + 8..pos + 8 + name_len];
            if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
                return Err(bad(format!(
                    "invalid file name {:?}",
                    String::from_utf8_lossy(name)
                )));
            }
            if name != b"." && name != b".." {
                out.push(DirEnt {
                    name: name.to_vec(),
                    ino,
                    offset: eat,
                });
            }
        }
        // Inode 0 marks a free record: deleted entries, htree index nodes
        // (which look like one empty entry spanning the block) and the
        // metadata_csum tail.
        pos += rec_len;
    }
    Ok(())
}

impl ExtFs {
    /// The entries of directory `dir` except `.` and `..`, sorted by name
    /// bytes, without duplicates.
    pub(crate) fn read_dir(&self, dir: &Inode) -> Result<Vec<DirEnt>, ExtError> {
        let mut out = Vec::new();
        if dir.has(FL_INLINE_DATA) {
            // Inline directory: i_block starts with the parent's inode
            // number (there is no "." or ".." entry), then entries fill the
            // rest of i_block and continue in the "system.data" xattr.
            let ib = dir.i_block();
            parse_entries(
                self,
                dir,
                &ib[4..I_BLOCK_LEN],
                dir.offset + 0x28 + 4,
                &mut out,
            )?;
            let (more, at) = self.inline_tail(dir)?;
            if !more.is_empty() {
                parse_entries(self, dir, &more, at, &mut out)?;
            }
        } else {
            let bs = self.sb.block_size;
            let runs = self.block_map(dir)?;
            let mut buf = Vec::new();
            for r in runs.iter().filter(|r| r.init) {
                // Directories may not have holes; the kernel refuses them,
                // here they are simply skipped (nothing to list there).
                let mut done = 0;
                while done < r.len {
                    let n = (r.len - done).min((READ_CHUNK as u64 / bs).max(1));
                    self.charge(n * bs)?;
                    buf.resize((n * bs) as usize, 0);
                    let at = (r.physical + done) * bs;
                    read_exact(&*self.dev, &mut buf, at)?;
                    for (i, block) in buf.chunks(bs as usize).enumerate() {
                        parse_entries(self, dir, block, at + i as u64 * bs, &mut out)?;
                    }
                    done += n;
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = out.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(ExtError::BadDirEntry {
                ino: dir.ino,
                path: PathCtx::default(),
                offset: dir.offset,
                reason: format!(
                    "the name {:?} appears twice",
                    String::from_utf8_lossy(&w[0].name)
                ),
            });
        }
        Ok(out)
    }

    /// The content of an inline-data inode (i_block, then "system.data"),
    /// at most `size` bytes. It may be shorter than the size: e2fsprogs
    /// stores a file that is all hole as inline data with no bytes, and the
    /// kernel reads what is missing as zeros.
    pub(crate) fn inline_content(&self, inode: &Inode) -> Result<Vec<u8>, ExtError> {
        let mut data = inode.i_block().to_vec();
        let (more, _) = self.inline_tail(inode)?;
        data.extend_from_slice(&more);
        data.truncate(usize::try_from(inode.size).unwrap_or(usize::MAX));
        Ok(data)
    }
}
