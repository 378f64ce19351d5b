//! Extended attributes: in the inode (after `i_extra_isize`) and in an
//! external block, with ext4's name-index compression and its compact
//! POSIX ACL encoding.

use std::collections::BTreeMap;

use super::error::{ExtError, PathCtx};
use super::inode::{Inode, FL_EA_INODE};
use super::superblock::{le16, le32};
use super::ExtFs;

const XATTR_MAGIC: u32 = 0xEA02_0000;
/// Linux caps an xattr value at 64 KiB (`XATTR_SIZE_MAX`).
const XATTR_SIZE_MAX: u64 = 65536;

/// An attribute as stored: name index, name suffix, and the value (or
/// where it is).
struct Raw {
    index: u8,
    name: Vec<u8>,
    value: Vec<u8>,
    /// `e_value_inum`: the value is the content of this inode (ea_inode).
    value_inode: u32,
    value_size: u64,
    at: u64,
}

fn bad(inode: &Inode, offset: u64, reason: impl Into<String>) -> ExtError {
    ExtError::BadXattr {
        ino: inode.ino,
        path: PathCtx::default(),
        offset,
        reason: reason.into(),
    }
}

/// Parses the entry table of one xattr region. `region` starts at device
/// byte `at`; entries start at `first`, and value offsets count from
/// `value_base` (the first entry in the inode, the block start outside).
fn parse_region(
    inode: &Inode,
    region: &[u8],
    at: u64,
    first: usize,
    value_base: usize,
    out: &mut Vec<Raw>,
) -> Result<(), ExtError> {
    let mut pos = first;
    // The table ends with a zero 32-bit word (or at the end of the region).
    while pos + 4 <= region.len() && le32(region, pos) != 0 {
        let eat = at + pos as u64;
        if pos + 16 > region.len() {
            return Err(bad(inode, eat, "entry runs past the end of its area"));
        }
        let name_len = usize::from(region[pos]);
        let index = region[pos + 1];
        let value_offs = usize::from(le16(region, pos + 2));
        let value_inode = le32(region, pos + 4);
        let value_size = u64::from(le32(region, pos + 8));
        let Some(name) = region.get(pos + 16..pos + 16 + name_len) else {
            return Err(bad(inode, eat, "name runs past the end of its area"));
        };
        if value_size > XATTR_SIZE_MAX {
            return Err(bad(
                inode,
                eat,
                format!("value of {value_size} bytes is over the 64 KiB Linux allows"),
            ));
        }
        let value = if value_inode == 0 {
            let start = value_base + value_offs;
            match region.get(start..start + value_size as usize) {
                Some(v) => v.to_vec(),
                None => {
                    return Err(bad(
                        inode,
                        eat,
                        format!("value at {value_offs}+{value_size} is outside its area"),
                    ))
                }
            }
        } else {
            Vec::new()
        };
        out.push(Raw {
            index,
            name: name.to_vec(),
            value,
            value_inode,
            value_size,
            at: eat,
        });
        // Entries are 16 bytes plus the name, padded to 4 bytes.
        pos += (16 + name_len + 3) & !3;
    }
    Ok(())
}

/// Converts an ext4-format POSIX ACL (version 1; 4-byte entries for the
/// owner/group/mask/other tags, 8-byte ones with an id for named users and
/// groups) to the Linux VFS xattr format (version 2, every entry 8 bytes,
/// id 0xFFFFFFFF where there is none) that getfattr, tar and unpackers use.
fn acl_to_vfs(inode: &Inode, at: u64, v: &[u8]) -> Result<Vec<u8>, ExtError> {
    const USER: u16 = 0x2;
    const GROUP: u16 = 0x8;
    if v.len() < 4 || le32(v, 0) != 1 {
        return Err(bad(inode, at, "POSIX ACL is not ext4 ACL version 1"));
    }
    let mut out = 2u32.to_le_bytes().to_vec();
    let mut pos = 4;
    while pos < v.len() {
        if pos + 4 > v.len() {
            return Err(bad(inode, at, "POSIX ACL entry is truncated"));
        }
        let tag = le16(v, pos);
        let perm = le16(v, pos + 2);
        let id = match tag {
            USER | GROUP => {
                if pos + 8 > v.len() {
                    return Err(bad(inode, at, "POSIX ACL entry is truncated"));
                }
                let id = le32(v, pos + 4);
                pos += 8;
                id
            }
            0x1 | 0x4 | 0x10 | 0x20 => {
                pos += 4;
                u32::MAX
            }
            other => {
                return Err(bad(
                    inode,
                    at,
                    format!("POSIX ACL has unknown tag {other:#x}"),
                ))
            }
        };
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    Ok(out)
}

impl ExtFs {
    fn raw_xattrs(&self, inode: &Inode) -> Result<Vec<Raw>, ExtError> {
        let mut raws = Vec::new();
        // In-inode attributes live between the end of the extra fields and
        // the end of the on-disk inode, after a magic number.
        let start = 128 + inode.extra_isize;
        if inode.raw.len() >= start + 4 && le32(&inode.raw, start) == XATTR_MAGIC {
            let region = &inode.raw[start..];
            let at = inode.offset + start as u64;
            parse_region(inode, region, at, 4, 4, &mut raws)?;
        }
        if inode.file_acl != 0 {
            let bs = self.sb.block_size;
            let blk = inode.file_acl;
            if blk >= self.sb.blocks_count {
                return Err(bad(
                    inode,
                    inode.offset + 0x68,
                    format!("xattr block {blk} is past the end of the file system"),
                ));
            }
            let at = blk * bs;
            let buf = self.xattr_block(blk)?;
            if le32(&buf, 0) != XATTR_MAGIC {
                return Err(bad(inode, at, "xattr block magic is not 0xea020000"));
            }
            if le32(&buf, 8) != 1 {
                return Err(bad(inode, at, "xattr block claims more than one block"));
            }
            parse_region(inode, &buf, at, 32, 0, &mut raws)?;
        }
        Ok(raws)
    }

    /// The "system.data" attribute of an inline-data inode: the bytes past
    /// the 60 in i_block, and where they are on the device.
    pub(crate) fn inline_tail(&self, inode: &Inode) -> Result<(Vec<u8>, u64), ExtError> {
        for r in self.raw_xattrs(inode)? {
            if r.index == 7 && r.name == b"data" {
                if r.value_inode != 0 {
                    return Err(bad(inode, r.at, "inline data stored in an xattr inode"));
                }
                return Ok((r.value, r.at));
            }
        }
        Ok((Vec::new(), inode.offset))
    }

    /// All extended attributes of `inode` by full name, ACLs in VFS format.
    pub(crate) fn xattrs(&self, inode: &Inode) -> Result<BTreeMap<String, Vec<u8>>, ExtError> {
        let mut out = BTreeMap::new();
        for r in self.raw_xattrs(inode)? {
            let prefix = match r.index {
                1 => "user.",
                2 | 3 => "",
                4 => "trusted.",
                6 => "security.",
                7 => "system.",
                8 => "system.richacl",
                other => {
                    tracing::warn!(
                        ino = inode.ino,
                        index = other,
                        "skipping extended attribute with unknown name index"
                    );
                    continue;
                }
            };
            // system.data is where inline data continues, not an attribute.
            if r.index == 7 && r.name == b"data" {
                continue;
            }
            let Ok(suffix) = std::str::from_utf8(&r.name) else {
                return Err(bad(inode, r.at, "attribute name is not valid UTF-8"));
            };
            let name = match r.index {
                2 => "system.posix_acl_access".to_string(),
                3 => "system.posix_acl_default".to_string(),
                _ => format!("{prefix}{suffix}"),
            };
            let value = if r.value_inode != 0 {
                self.ea_inode_value(inode, &r)?
            } else {
                r.value
            };
            let value = if matches!(r.index, 2 | 3) {
                acl_to_vfs(inode, r.at, &value)?
            } else {
                value
            };
            out.insert(name, value);
        }
        Ok(out)
    }

    /// The value of an attribute stored in its own inode (ea_inode).
    fn ea_inode_value(&self, owner: &Inode, r: &Raw) -> Result<Vec<u8>, ExtError> {
        let vi = self
            .inode(r.value_inode)
            .map_err(|e| bad(owner, r.at, format!("value inode: {e}")))?;
        if !vi.has(FL_EA_INODE) {
            return Err(bad(
                owner,
                r.at,
                format!("value inode {} is not an xattr inode", r.value_inode),
            ));
        }
        if vi.size < r.value_size {
            return Err(bad(
                owner,
                r.at,
                format!(
                    "value inode {} holds {} bytes, the entry says {}",
                    r.value_inode, vi.size, r.value_size
                ),
            ));
        }
        let mut v = self.read_small(&vi, XATTR_SIZE_MAX)?;
        v.truncate(r.value_size as usize);
        Ok(v)
    }
}
