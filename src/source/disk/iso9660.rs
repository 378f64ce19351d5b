//! ISO 9660 reader with Rock Ridge and Joliet, in userspace.
//!
//! Name and attribute sources, best first: Rock Ridge (SUSP/RRIP in the
//! primary tree: POSIX names, modes, owners, links, devices, mtimes), then
//! Joliet (UCS-2 names in the supplementary tree), then plain ISO names
//! (`;1` version and a trailing dot stripped). Without Rock Ridge every
//! file is 0:0, directories 0755 and files 0644.
//!
//! The input is untrusted vendor data: every extent is checked against the
//! image size, directory loops and repeated directories, SUSP continuation
//! (CE) loops and over-deep trees are errors naming the byte offset, and no
//! allocation follows a size field without a bound.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, Read};
use std::sync::Arc;

use super::{Cursor, ReadAt, Slice};
use crate::layer::{Entry, EntryKind};

/// Sector where the volume descriptors start (after the 32 KiB system area).
const FIRST_VD: u64 = 16;
/// Descriptors read before giving up on a terminator.
const MAX_VDS: u64 = 64;
/// Directory nesting bound (ISO allows 8; Rock Ridge relocation lifts it).
const MAX_DEPTH: usize = 256;
/// SUSP continuation areas followed per record.
const MAX_CE: usize = 32;
/// Largest SUSP continuation area.
const MAX_CE_LEN: u64 = 64 << 10;
/// Records per directory.
const MAX_ENTRIES: usize = 1 << 20;
/// Extents of one multi-extent file.
const MAX_EXTENTS: usize = 1 << 16;

/// Errors of the ISO reader; each names the byte offset in the image.
#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    /// The image could not be read.
    #[error("iso9660: read at byte {offset}: {source}")]
    Io {
        /// Byte offset.
        offset: u64,
        /// Cause.
        source: io::Error,
    },
    /// No `CD001` volume descriptor.
    #[error("iso9660: not an ISO 9660 image: no 'CD001' volume descriptor at byte {offset}")]
    NotIso {
        /// Where it was expected.
        offset: u64,
    },
    /// A volume descriptor is invalid.
    #[error("iso9660: bad volume descriptor at byte {offset}: {why}")]
    BadDescriptor {
        /// Descriptor offset.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// A directory record is invalid.
    #[error("iso9660: bad directory record at byte {offset}: {why}")]
    BadRecord {
        /// Record offset.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// An extent lies (partly) past the end of the image.
    #[error("iso9660: record at byte {offset} points at bytes {start}..{end}, past the end of the {size}-byte image")]
    ExtentPastEnd {
        /// Record offset.
        offset: u64,
        /// Extent start.
        start: u64,
        /// Extent end.
        end: u64,
        /// Image size.
        size: u64,
    },
    /// A directory contains one of its ancestors.
    #[error("iso9660: directory loop: {path:?} (record at byte {offset}) points back at an ancestor directory")]
    DirLoop {
        /// Record offset.
        offset: u64,
        /// Path of the looping entry.
        path: String,
    },
    /// A directory extent appears twice in the tree.
    #[error("iso9660: directory {path:?} (record at byte {offset}) reuses the extent of another directory")]
    DirTwice {
        /// Record offset.
        offset: u64,
        /// Path of the second occurrence.
        path: String,
    },
    /// SUSP continuation areas loop or chain too long.
    #[error("iso9660: SUSP continuation (CE) loop or chain longer than {MAX_CE} at byte {offset}")]
    CeLoop {
        /// Offset of the offending continuation area.
        offset: u64,
    },
    /// A name that cannot be a path component.
    #[error("iso9660: bad file name {name:?} in the record at byte {offset}: {why}")]
    BadName {
        /// Record offset.
        offset: u64,
        /// The name, lossily decoded.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Too deep a tree.
    #[error("iso9660: {path:?} is nested deeper than {MAX_DEPTH} directories")]
    TooDeep {
        /// The path.
        path: String,
    },
    /// A path that is not a directory where one is needed.
    #[error("iso9660: {0:?} is not a directory")]
    NotADirectory(String),
    /// A path that does not exist.
    #[error("iso9660: no such file or directory: {0:?}")]
    NotFound(String),
}

impl From<IsoError> for io::Error {
    fn from(e: IsoError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Where names and attributes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameMode {
    /// Rock Ridge (POSIX) extensions in the primary tree.
    RockRidge,
    /// Joliet supplementary tree.
    Joliet,
    /// Plain ISO 9660 names.
    Plain,
}

/// A file or directory of the image.
#[derive(Debug, Clone)]
pub struct IsoNode {
    /// Path from the root, `/`-separated, `""` for the root.
    pub path: String,
    /// Last path component (`""` for the root).
    pub name: String,
    /// Kind (Rock Ridge, else file or directory).
    pub kind: EntryKind,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Link count from Rock Ridge (1 without).
    pub nlink: u32,
    /// Rock Ridge 1.12 file serial number, when written.
    pub ino: Option<u64>,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Content size for files (sum of the extents).
    pub size: u64,
    /// Symlink target.
    pub link: Option<Vec<u8>>,
    /// Device major and minor numbers.
    pub dev: (u32, u32),
    /// Byte offset of the directory record (for error messages).
    pub record_offset: u64,
    extents: Vec<(u64, u64)>,
}

impl IsoNode {
    /// Whether it is a directory.
    pub fn is_dir(&self) -> bool {
        self.kind == EntryKind::Dir
    }

    /// Whether it is a regular file.
    pub fn is_file(&self) -> bool {
        self.kind == EntryKind::File
    }

    /// Byte extents `(offset, length)` of the content, in order.
    pub fn extents(&self) -> &[(u64, u64)] {
        &self.extents
    }
}

/// Several extents of one file as one [`ReadAt`] (multi-extent files).
struct Concat {
    parts: Vec<(u64, Slice)>,
    size: u64,
}

impl ReadAt for Concat {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let i = self
            .parts
            .partition_point(|p| p.0 <= offset)
            .saturating_sub(1);
        let Some((start, s)) = self.parts.get(i) else {
            return Ok(0);
        };
        s.read_at(buf, offset - start)
    }

    fn size(&self) -> u64 {
        self.size
    }
}

/// One raw directory record.
struct Rec {
    offset: u64,
    flags: u8,
    lba: u64,
    len: u64,
    name: Vec<u8>,
    su: Vec<u8>,
    date: [u8; 7],
}

impl Rec {
    fn is_dir(&self) -> bool {
        self.flags & 0x02 != 0
    }
}

/// What the SUSP/RRIP entries of one record say.
#[derive(Default)]
struct Susp {
    sp_skip: Option<u8>,
    rr: bool,
    px: Option<(u32, u32, u32, u32, Option<u32>)>,
    pn: Option<(u32, u32)>,
    sl: Vec<(u8, Vec<u8>)>,
    nm: Option<Vec<u8>>,
    nm_flags: u8,
    mtime: Option<i64>,
    re: bool,
    cl: Option<u64>,
}

/// An ISO 9660 image.
///
/// ```no_run
/// use kiln::disk::{iso9660::Iso, FileSource, ReadAt};
/// use std::sync::Arc;
///
/// let iso = Iso::open(Arc::new(FileSource::open("kit.iso".as_ref())?))?;
/// println!("{}", iso.describe());
/// if let Some(node) = iso.lookup("ddk/ova.xml")? {
///     let file = iso.open_file(&node)?;
///     let mut head = vec![0u8; file.size().min(64) as usize];
///     file.read_exact_at(&mut head, 0)?;
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Iso {
    src: Arc<dyn ReadAt>,
    block: u64,
    blocks: u64,
    volume_id: String,
    mode: NameMode,
    rr_skip: usize,
    root: IsoNode,
}

impl fmt::Debug for Iso {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Epoch seconds of local time fields at a UTC offset in 15-minute units.
fn epoch(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64, gmtoff: i8) -> Option<i64> {
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s - i64::from(gmtoff) * 900)
}

/// The 7-byte directory-record date (years since 1900).
fn short_time(b: &[u8]) -> Option<i64> {
    let b: &[u8; 7] = b.get(..7)?.try_into().ok()?;
    if b[..6].iter().all(|&x| x == 0) {
        return None;
    }
    epoch(
        1900 + i64::from(b[0]),
        i64::from(b[1]),
        i64::from(b[2]),
        i64::from(b[3]),
        i64::from(b[4]),
        i64::from(b[5]),
        b[6] as i8,
    )
}

/// The 17-byte volume-descriptor date: `YYYYMMDDHHMMSScc` digits + offset.
fn long_time(b: &[u8]) -> Option<i64> {
    let b = b.get(..17)?;
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        std::str::from_utf8(&b[r]).ok()?.parse().ok()
    };
    let y = num(0..4)?;
    if y == 0 {
        return None;
    }
    epoch(
        y,
        num(4..6)?,
        num(6..8)?,
        num(8..10)?,
        num(10..12)?,
        num(12..14)?,
        b[16] as i8,
    )
}

/// Decodes big-endian UCS-2/UTF-16 (Joliet).
fn ucs2(b: &[u8]) -> String {
    let units = b.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]));
    char::decode_utf16(units)
        .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect()
}

/// Strips the `;1` version and a trailing dot of an ISO name.
fn strip_version(s: &str) -> &str {
    let s = match s.rfind(';') {
        Some(i) if s[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &s[..i],
        _ => s,
    };
    // "FILE." is how ISO spells an extension-less file; ".profile" stays.
    match s.strip_suffix('.') {
        Some(t) if !t.is_empty() => t,
        _ => s,
    }
}

impl Iso {
    /// Reads the volume descriptors and the root directory.
    pub fn open(src: Arc<dyn ReadAt>) -> Result<Iso, IsoError> {
        let mut pvd: Option<(u64, Vec<u8>)> = None;
        let mut joliet: Option<(u64, Vec<u8>)> = None;
        let mut vd = vec![0u8; 2048];
        let mut terminated = false;
        for i in 0..MAX_VDS {
            let off = (FIRST_VD + i) * 2048;
            src.read_exact_at(&mut vd, off).map_err(|source| {
                if i == 0 {
                    IsoError::NotIso { offset: off }
                } else {
                    IsoError::Io {
                        offset: off,
                        source,
                    }
                }
            })?;
            if &vd[1..6] != b"CD001" {
                return Err(IsoError::NotIso { offset: off });
            }
            match vd[0] {
                1 if pvd.is_none() => pvd = Some((off, vd.clone())),
                // Joliet is a supplementary descriptor whose escape
                // sequences name UCS-2 level 1, 2 or 3.
                2 if joliet.is_none()
                    && vd[88] == b'%'
                    && vd[89] == b'/'
                    && matches!(vd[90], b'@' | b'C' | b'E') =>
                {
                    joliet = Some((off, vd.clone()))
                }
                255 => {
                    terminated = true;
                    break;
                }
                _ => {}
            }
        }
        let Some((pvd_off, pvd)) = pvd else {
            return Err(IsoError::BadDescriptor {
                offset: FIRST_VD * 2048,
                why: "no primary volume descriptor".into(),
            });
        };
        if !terminated {
            return Err(IsoError::BadDescriptor {
                offset: (FIRST_VD + MAX_VDS) * 2048,
                why: format!("no set terminator within {MAX_VDS} descriptors"),
            });
        }
        let block = u64::from(le16(&pvd, 128));
        if !matches!(block, 512 | 1024 | 2048) {
            return Err(IsoError::BadDescriptor {
                offset: pvd_off + 128,
                why: format!("logical block size {block} (must be 512, 1024 or 2048)"),
            });
        }
        let blocks = u64::from(le32(&pvd, 80));
        let volume_id = String::from_utf8_lossy(&pvd[40..72]).trim_end().to_string();
        let mut iso = Iso {
            src,
            block,
            blocks,
            volume_id,
            mode: NameMode::Plain,
            rr_skip: 0,
            root: IsoNode {
                path: String::new(),
                name: String::new(),
                kind: EntryKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                nlink: 1,
                ino: None,
                mtime: 0,
                size: 0,
                link: None,
                dev: (0, 0),
                record_offset: pvd_off + 156,
                extents: Vec::new(),
            },
        };
        let root_rec = iso.parse_rec(&pvd[156..190], pvd_off + 156, 34)?;
        iso.check_extent(&root_rec)?;
        iso.root.extents = vec![(root_rec.lba * block, root_rec.len)];
        iso.root.mtime = short_time(&root_rec.date).unwrap_or(0);
        // Rock Ridge: the root's "." record starts with an SP entry.
        let recs = iso.records(&iso.root)?;
        if let Some(dot) = recs.first() {
            let s = iso.susp(dot, 0)?;
            if let Some(skip) = s.sp_skip {
                iso.rr_skip = usize::from(skip);
                let s = iso.susp(dot, iso.rr_skip)?;
                if s.rr
                    || s.px.is_some()
                    || recs
                        .iter()
                        .skip(2)
                        .take(8)
                        .any(|r| iso.susp(r, usize::from(skip)).is_ok_and(|s| s.rr))
                {
                    iso.mode = NameMode::RockRidge;
                    iso.apply_rr(&mut iso.root.clone(), &s)
                        .map(|n| iso.root = n)?;
                }
            }
        }
        if iso.mode != NameMode::RockRidge {
            if let Some((joff, j)) = joliet {
                let rec = iso.parse_rec(&j[156..190], joff + 156, 34)?;
                iso.check_extent(&rec)?;
                iso.root.extents = vec![(rec.lba * block, rec.len)];
                iso.mode = NameMode::Joliet;
            }
        }
        Ok(iso)
    }

    /// `iso9660 "DDK" (rock ridge) 160 MiB`.
    pub fn describe(&self) -> String {
        let mode = match self.mode {
            NameMode::RockRidge => "rock ridge",
            NameMode::Joliet => "joliet",
            NameMode::Plain => "plain iso names",
        };
        format!(
            "iso9660 {:?} ({mode}) {}",
            self.volume_id,
            crate::progress::human_bytes(self.blocks.saturating_mul(self.block))
        )
    }

    /// The volume identifier.
    pub fn volume_id(&self) -> &str {
        &self.volume_id
    }

    /// Where names and attributes come from.
    pub fn name_mode(&self) -> NameMode {
        self.mode
    }

    /// The root directory.
    pub fn root(&self) -> &IsoNode {
        &self.root
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), IsoError> {
        self.src
            .read_exact_at(buf, offset)
            .map_err(|source| IsoError::Io { offset, source })
    }

    fn check_extent(&self, r: &Rec) -> Result<(), IsoError> {
        let start = r.lba.saturating_mul(self.block);
        let end = start.saturating_add(r.len);
        if r.len > 0 && end > self.src.size() {
            return Err(IsoError::ExtentPastEnd {
                offset: r.offset,
                start,
                end,
                size: self.src.size(),
            });
        }
        Ok(())
    }

    /// Parses one record from `b` (which holds at least `len` bytes).
    fn parse_rec(&self, b: &[u8], offset: u64, len: usize) -> Result<Rec, IsoError> {
        let bad = |why: &str| IsoError::BadRecord {
            offset,
            why: why.to_string(),
        };
        if len < 34 || b.len() < len {
            return Err(bad("shorter than 34 bytes"));
        }
        let name_len = usize::from(b[32]);
        if 33 + name_len > len {
            return Err(bad("name runs past the record"));
        }
        let name = b[33..33 + name_len].to_vec();
        // A padding byte follows an even-length name (so the system use
        // area starts at an even offset).
        let su_start = 33 + name_len + usize::from(name_len % 2 == 0);
        let su = b.get(su_start.min(len)..len).unwrap_or(&[]).to_vec();
        let mut date = [0u8; 7];
        date.copy_from_slice(&b[18..25]);
        Ok(Rec {
            offset,
            flags: b[25],
            lba: u64::from(le32(b, 2)),
            len: u64::from(le32(b, 10)),
            name,
            su,
            date,
        })
    }

    /// All records of a directory, in order. Records never cross a sector;
    /// a zero length byte means "rest of this sector is padding".
    fn records(&self, dir: &IsoNode) -> Result<Vec<Rec>, IsoError> {
        let Some(&(start, len)) = dir.extents.first() else {
            return Ok(Vec::new());
        };
        if start.saturating_add(len) > self.src.size() {
            return Err(IsoError::ExtentPastEnd {
                offset: dir.record_offset,
                start,
                end: start.saturating_add(len),
                size: self.src.size(),
            });
        }
        let mut out = Vec::new();
        let mut sector = vec![0u8; 2048];
        let mut pos = 0u64;
        while pos < len {
            let n = usize::try_from((len - pos).min(2048)).unwrap_or(2048);
            let sec = &mut sector[..n];
            self.read(sec, start + pos)?;
            let mut i = 0usize;
            while i < n {
                let rl = usize::from(sec[i]);
                if rl == 0 {
                    break;
                }
                let off = start + pos + i as u64;
                if i + rl > n {
                    return Err(IsoError::BadRecord {
                        offset: off,
                        why: "record crosses a sector boundary".into(),
                    });
                }
                let r = self.parse_rec(&sec[i..i + rl], off, rl)?;
                out.push(r);
                if out.len() > MAX_ENTRIES {
                    return Err(IsoError::BadRecord {
                        offset: off,
                        why: format!("more than {MAX_ENTRIES} records in one directory"),
                    });
                }
                i += rl;
            }
            pos += n as u64;
        }
        Ok(out)
    }

    /// Parses the SUSP entries of a record, following CE continuations.
    fn susp(&self, r: &Rec, skip: usize) -> Result<Susp, IsoError> {
        let mut s = Susp::default();
        let mut area = r.su.get(skip..).unwrap_or(&[]).to_vec();
        let mut area_off = r.offset;
        let mut seen: HashSet<(u64, u64)> = HashSet::new();
        let mut sl_open = true;
        loop {
            let mut next: Option<(u64, u64, u64)> = None;
            let mut pos = 0usize;
            let mut stop = false;
            while pos + 4 <= area.len() {
                let len = usize::from(area[pos + 2]);
                if len < 4 || pos + len > area.len() {
                    break;
                }
                let sig = [area[pos], area[pos + 1]];
                let d = &area[pos + 4..pos + len];
                match &sig {
                    b"SP" if d.len() >= 3 && d[0] == 0xbe && d[1] == 0xef => s.sp_skip = Some(d[2]),
                    b"CE" if d.len() >= 24 => {
                        next = Some((
                            u64::from(le32(d, 0)),
                            u64::from(le32(d, 8)),
                            u64::from(le32(d, 16)),
                        ))
                    }
                    b"ST" => stop = true,
                    b"ER" | b"RR" => s.rr = true,
                    b"PX" if d.len() >= 32 => {
                        s.rr = true;
                        let ino = (d.len() >= 40).then(|| le32(d, 32));
                        s.px = Some((le32(d, 0), le32(d, 8), le32(d, 16), le32(d, 24), ino));
                    }
                    b"PN" if d.len() >= 16 => {
                        s.rr = true;
                        let (high, low) = (le32(d, 0), le32(d, 8));
                        // As the Linux kernel reads it: an old-style single
                        // 16-bit dev_t in "low" when "high" is zero.
                        s.pn = Some(if high == 0 && low & !0xff != 0 {
                            (low >> 8, low & 0xff)
                        } else {
                            (high, low)
                        });
                    }
                    b"SL" if !d.is_empty() => {
                        s.rr = true;
                        if !sl_open {
                            // A second, unrelated SL: the spec says the flag
                            // bit 0 chains them; keep the first link only.
                        } else {
                            let mut c = &d[1..];
                            while c.len() >= 2 {
                                let (cf, cl) = (c[0], usize::from(c[1]));
                                let Some(content) = c.get(2..2 + cl) else {
                                    break;
                                };
                                s.sl.push((cf, content.to_vec()));
                                c = &c[2 + cl..];
                            }
                            sl_open = d[0] & 1 != 0;
                        }
                    }
                    b"NM" if !d.is_empty() => {
                        s.rr = true;
                        let nm = s.nm.get_or_insert_with(Vec::new);
                        nm.extend_from_slice(&d[1..]);
                        s.nm_flags |= d[0] & 0x06;
                    }
                    b"TF" if !d.is_empty() => {
                        s.rr = true;
                        let flags = d[0];
                        let long = flags & 0x80 != 0;
                        let w = if long { 17 } else { 7 };
                        // Stamps appear in bit order: creation, modify, ...
                        let idx = usize::from(flags & 0x01 != 0);
                        if flags & 0x02 != 0 {
                            let at = 1 + idx * w;
                            if let Some(b) = d.get(at..at + w) {
                                s.mtime = if long { long_time(b) } else { short_time(b) };
                            }
                        }
                    }
                    b"RE" => s.re = true,
                    b"CL" if d.len() >= 8 => s.cl = Some(u64::from(le32(d, 0))),
                    _ => {}
                }
                pos += len;
                if stop {
                    break;
                }
            }
            let Some((lba, off, len)) = next.filter(|_| !stop) else {
                break;
            };
            let at = lba.saturating_mul(self.block).saturating_add(off);
            if !seen.insert((lba, off)) || seen.len() > MAX_CE {
                return Err(IsoError::CeLoop { offset: at });
            }
            if len > MAX_CE_LEN || at.saturating_add(len) > self.src.size() {
                return Err(IsoError::ExtentPastEnd {
                    offset: area_off,
                    start: at,
                    end: at.saturating_add(len),
                    size: self.src.size(),
                });
            }
            area = vec![0u8; usize::try_from(len).unwrap_or(0)];
            self.read(&mut area, at)?;
            area_off = at;
        }
        Ok(s)
    }

    /// Applies Rock Ridge attributes to a node.
    fn apply_rr(&self, n: &mut IsoNode, s: &Susp) -> Result<IsoNode, IsoError> {
        if let Some((mode, nlink, uid, gid, ino)) = s.px {
            n.mode = mode & 0o7777;
            n.nlink = nlink;
            n.uid = u64::from(uid);
            n.gid = u64::from(gid);
            n.ino = ino.map(u64::from);
            if !n.is_dir() {
                n.kind = match mode & 0o170000 {
                    0o120000 => EntryKind::Symlink,
                    0o020000 => EntryKind::Char,
                    0o060000 => EntryKind::Block,
                    0o010000 => EntryKind::Fifo,
                    _ => EntryKind::File,
                };
            }
        }
        if let Some(t) = s.mtime {
            n.mtime = t;
        }
        if matches!(n.kind, EntryKind::Char | EntryKind::Block) {
            n.dev = s.pn.unwrap_or((0, 0));
        }
        if n.kind == EntryKind::Symlink {
            n.link = Some(symlink_target(&s.sl));
        }
        Ok(n.clone())
    }

    /// The entries of a directory, in on-disk order (without `.`/`..`,
    /// Rock Ridge relocation placeholders resolved, RE entries skipped).
    pub fn read_dir(&self, dir: &IsoNode) -> Result<Vec<IsoNode>, IsoError> {
        if !dir.is_dir() {
            return Err(IsoError::NotADirectory(dir.path.clone()));
        }
        let recs = self.records(dir)?;
        let mut out = Vec::new();
        let mut group: Vec<Rec> = Vec::new();
        for r in recs {
            if r.name.len() == 1 && r.name[0] <= 1 {
                continue; // "." and ".."
            }
            let more = r.flags & 0x80 != 0;
            group.push(r);
            if group.len() > MAX_EXTENTS {
                return Err(IsoError::BadRecord {
                    offset: group[0].offset,
                    why: format!("more than {MAX_EXTENTS} extents"),
                });
            }
            if more {
                continue;
            }
            let g = std::mem::take(&mut group);
            if let Some(n) = self.node(dir, g)? {
                out.push(n);
            }
        }
        if let Some(r) = group.first() {
            return Err(IsoError::BadRecord {
                offset: r.offset,
                why: "multi-extent file without a final extent".into(),
            });
        }
        Ok(out)
    }

    /// Builds the node of one (multi-extent) record group.
    fn node(&self, parent: &IsoNode, g: Vec<Rec>) -> Result<Option<IsoNode>, IsoError> {
        let Some(first) = g.first() else {
            return Ok(None);
        };
        if first.flags & 0x04 != 0 {
            return Ok(None); // associated file (resource fork)
        }
        let susp = if self.mode == NameMode::RockRidge {
            Some(self.susp(first, self.rr_skip)?)
        } else {
            None
        };
        if susp.as_ref().is_some_and(|s| s.re) {
            // The relocated directory itself: it is listed where its CL
            // placeholder is, not under rr_moved.
            return Ok(None);
        }
        let raw_name = match (&susp, self.mode) {
            (Some(Susp { nm: Some(nm), .. }), _) => nm.clone(),
            (_, NameMode::Joliet) => strip_version(&ucs2(&first.name)).as_bytes().to_vec(),
            _ => strip_version(&String::from_utf8_lossy(&first.name))
                .as_bytes()
                .to_vec(),
        };
        let name = String::from_utf8(raw_name).map_err(|e| IsoError::BadName {
            offset: first.offset,
            name: String::from_utf8_lossy(e.as_bytes()).into_owned(),
            why: "not UTF-8",
        })?;
        let why = if name.is_empty() {
            Some("empty")
        } else if name == "." || name == ".." {
            Some("a dot name")
        } else if name.contains('/') || name.contains('\0') {
            Some("contains '/' or NUL")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(IsoError::BadName {
                offset: first.offset,
                name,
                why,
            });
        }
        let mut extents = Vec::with_capacity(g.len());
        for r in &g {
            self.check_extent(r)?;
            if r.len > 0 {
                extents.push((r.lba * self.block, r.len));
            }
        }
        let mut n = IsoNode {
            path: if parent.path.is_empty() {
                name.clone()
            } else {
                format!("{}/{name}", parent.path)
            },
            name,
            kind: if first.is_dir() {
                EntryKind::Dir
            } else {
                EntryKind::File
            },
            mode: if first.is_dir() { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            nlink: 1,
            ino: None,
            mtime: short_time(&first.date).unwrap_or(0),
            size: 0,
            link: None,
            dev: (0, 0),
            record_offset: first.offset,
            extents,
        };
        if n.is_dir() {
            n.extents.truncate(1);
            if n.extents.is_empty() {
                n.extents.push((first.lba * self.block, 0));
            }
        }
        if let Some(s) = &susp {
            if let Some(lba) = s.cl {
                // A placeholder file for a relocated deep directory: the real
                // directory's "." record (first in its extent) gives its size.
                let at = lba.saturating_mul(self.block);
                let mut b = vec![0u8; 255];
                if at.saturating_add(34) > self.src.size() {
                    return Err(IsoError::ExtentPastEnd {
                        offset: first.offset,
                        start: at,
                        end: at.saturating_add(34),
                        size: self.src.size(),
                    });
                }
                let avail = usize::try_from((self.src.size() - at).min(255)).unwrap_or(34);
                self.read(&mut b[..avail], at)?;
                let rl = usize::from(b[0]).min(avail);
                let dot = self.parse_rec(&b[..rl], at, rl)?;
                self.check_extent(&dot)?;
                n.kind = EntryKind::Dir;
                n.extents = vec![(dot.lba * self.block, dot.len)];
                let ds = self.susp(&dot, self.rr_skip)?;
                n = self.apply_rr(&mut n, s)?;
                if ds.px.is_some() {
                    n = self.apply_rr(&mut n, &ds)?;
                }
                n.kind = EntryKind::Dir;
            } else {
                n = self.apply_rr(&mut n, s)?;
            }
        }
        n.size = if n.is_file() {
            n.extents.iter().map(|e| e.1).sum()
        } else {
            0
        };
        Ok(Some(n))
    }

    /// Looks up a `/`-separated path from the root (`""` or `/` is the
    /// root). Symlinks are not followed.
    pub fn lookup(&self, path: &str) -> Result<Option<IsoNode>, IsoError> {
        let mut cur = self.root.clone();
        let mut depth = 0;
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            depth += 1;
            if depth > MAX_DEPTH {
                return Err(IsoError::TooDeep { path: path.into() });
            }
            if !cur.is_dir() {
                return Ok(None);
            }
            let Some(next) = self.read_dir(&cur)?.into_iter().find(|n| n.name == comp) else {
                return Ok(None);
            };
            cur = next;
        }
        Ok(Some(cur))
    }

    /// The content of a file: a zero-copy window over the image (several
    /// extents are concatenated).
    pub fn open_file(&self, node: &IsoNode) -> Result<Arc<dyn ReadAt>, IsoError> {
        let past = |start: u64, len: u64| IsoError::ExtentPastEnd {
            offset: node.record_offset,
            start,
            end: start.saturating_add(len),
            size: self.src.size(),
        };
        if !node.is_file() {
            return Ok(Arc::new(Vec::new()));
        }
        if let [(start, len)] = node.extents[..] {
            let s = Slice::new(self.src.clone(), start, len).ok_or_else(|| past(start, len))?;
            return Ok(Arc::new(s));
        }
        let mut parts = Vec::with_capacity(node.extents.len());
        let mut at = 0u64;
        for &(start, len) in &node.extents {
            let s = Slice::new(self.src.clone(), start, len).ok_or_else(|| past(start, len))?;
            parts.push((at, s));
            at += len;
        }
        Ok(Arc::new(Concat { parts, size: at }))
    }

    /// Walks the tree under `subdir` (`""` for the root), calling `f` for the
    /// directory itself (path `""`) and then every object below it, each
    /// directory before its children, siblings sorted by name bytes; files
    /// come with their content.
    pub fn walk<E, F>(&self, subdir: &str, mut f: F) -> Result<(), E>
    where
        E: From<IsoError>,
        F: FnMut(Entry, &mut dyn Read) -> Result<(), E>,
    {
        let top = self
            .lookup(subdir)?
            .ok_or_else(|| IsoError::NotFound(subdir.to_string()))?;
        if !top.is_dir() {
            return Err(IsoError::NotADirectory(subdir.to_string()).into());
        }
        let mut seen = HashSet::new();
        let mut ancestors = Vec::new();
        self.visit(&top, &top.path, &mut seen, &mut ancestors, &mut f)
    }

    fn visit<E, F>(
        &self,
        n: &IsoNode,
        top: &str,
        seen: &mut HashSet<u64>,
        ancestors: &mut Vec<u64>,
        f: &mut F,
    ) -> Result<(), E>
    where
        E: From<IsoError>,
        F: FnMut(Entry, &mut dyn Read) -> Result<(), E>,
    {
        let rel = n
            .path
            .strip_prefix(top)
            .map(|p| p.trim_start_matches('/'))
            .unwrap_or(&n.path)
            .to_string();
        let mut e = Entry::new(rel.clone(), n.kind);
        e.mode = n.mode;
        e.uid = n.uid;
        e.gid = n.gid;
        e.mtime = n.mtime;
        e.size = n.size;
        e.link = n.link.clone();
        (e.dev_major, e.dev_minor) = n.dev;
        match n.kind {
            EntryKind::File => {
                let mut r = Cursor::new(self.open_file(n)?, 0);
                f(e, &mut r)
            }
            EntryKind::Dir => {
                let key = n.extents.first().map_or(0, |x| x.0);
                if ancestors.contains(&key) {
                    return Err(IsoError::DirLoop {
                        offset: n.record_offset,
                        path: n.path.clone(),
                    }
                    .into());
                }
                if !seen.insert(key) {
                    return Err(IsoError::DirTwice {
                        offset: n.record_offset,
                        path: n.path.clone(),
                    }
                    .into());
                }
                if ancestors.len() >= MAX_DEPTH {
                    return Err(IsoError::TooDeep {
                        path: n.path.clone(),
                    }
                    .into());
                }
                f(e, &mut io::empty())?;
                let mut kids = self.read_dir(n)?;
                kids.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
                for w in kids.windows(2) {
                    if w[0].name == w[1].name {
                        return Err(IsoError::BadName {
                            offset: w[1].record_offset,
                            name: w[1].name.clone(),
                            why: "appears twice in its directory",
                        }
                        .into());
                    }
                }
                ancestors.push(key);
                for k in &kids {
                    self.visit(k, top, seen, ancestors, f)?;
                }
                ancestors.pop();
                Ok(())
            }
            _ => f(e, &mut io::empty()),
        }
    }
}

/// Assembles an SL component list into a path. Component flags: 0x01 the
/// component continues in the next one (no `/` between), 0x02 `.`, 0x04
/// `..`, 0x08 the root.
fn symlink_target(comps: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut sep = false;
    for (flags, data) in comps {
        if flags & 0x08 != 0 {
            out.clear();
            out.push(b'/');
            sep = false;
            continue;
        }
        if sep {
            out.push(b'/');
        }
        if flags & 0x02 != 0 {
            out.push(b'.');
        } else if flags & 0x04 != 0 {
            out.extend_from_slice(b"..");
        } else {
            out.extend_from_slice(data);
        }
        sep = flags & 0x01 == 0;
    }
    out
}

/// Opens `data` as an ISO and reads every file of it; for fuzzing. Never
/// panics.
#[doc(hidden)]
pub fn fuzz_input(data: &[u8]) {
    let Ok(iso) = Iso::open(Arc::new(data.to_vec())) else {
        return;
    };
    let _ = iso.describe();
    let _ = iso.lookup("a/b/c");
    let mut buf = Vec::new();
    let _ = iso.walk::<IsoError, _>("", |_, r| {
        buf.clear();
        r.read_to_end(&mut buf)
            .map_err(|source| IsoError::Io { offset: 0, source })?;
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_times() {
        assert_eq!(strip_version("README.TXT;1"), "README.TXT");
        assert_eq!(strip_version("MAKEFILE.;1"), "MAKEFILE");
        assert_eq!(strip_version(".profile"), ".profile");
        assert_eq!(ucs2(&[0, b'a', 0x00, 0xe9]), "aé");
        // 2024-02-29 12:00:00 at UTC+1 (4 quarter hours).
        assert_eq!(short_time(&[124, 2, 29, 13, 0, 0, 4]), Some(1_709_208_000));
        assert_eq!(long_time(b"2024022912000000\x00"), Some(1_709_208_000));
        assert_eq!(short_time(&[124, 13, 29, 13, 0, 0, 4]), None);
    }

    #[test]
    fn symlink_components() {
        let c = |f: u8, s: &str| (f, s.as_bytes().to_vec());
        assert_eq!(
            symlink_target(&[c(8, ""), c(0, "usr"), c(0, "lib")]),
            b"/usr/lib"
        );
        assert_eq!(
            symlink_target(&[c(4, ""), c(1, "lo"), c(0, "ng")]),
            b"../long"
        );
        assert_eq!(symlink_target(&[c(2, ""), c(0, "x")]), b"./x");
        assert_eq!(symlink_target(&[c(0, "a")]), b"a");
    }

    fn both32(v: u32) -> Vec<u8> {
        [v.to_le_bytes(), v.to_be_bytes()].concat()
    }

    fn rec(lba: u32, len: u32, flags: u8, name: &[u8], su: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; 33];
        r[2..10].copy_from_slice(&both32(lba));
        r[10..18].copy_from_slice(&both32(len));
        r[18..25].copy_from_slice(&[124, 1, 2, 3, 4, 5, 0]);
        r[25] = flags;
        r[28] = 1;
        r[31] = 1;
        r[32] = name.len() as u8;
        r.extend_from_slice(name);
        if name.len().is_multiple_of(2) {
            r.push(0);
        }
        r.extend_from_slice(su);
        if r.len() % 2 == 1 {
            r.push(0);
        }
        r[0] = r.len() as u8;
        r
    }

    fn entry(sig: &[u8; 2], data: &[u8]) -> Vec<u8> {
        let mut e = vec![sig[0], sig[1], (data.len() + 4) as u8, 1];
        e.extend_from_slice(data);
        e
    }

    fn px(mode: u32) -> Vec<u8> {
        let d: Vec<u8> = [mode, 1, 1000, 100, 7]
            .iter()
            .flat_map(|&v| both32(v))
            .collect();
        entry(b"PX", &d)
    }

    fn sp() -> Vec<u8> {
        [entry(b"SP", &[0xbe, 0xef, 0]), entry(b"ER", &[0, 0, 0, 1])].concat()
    }

    fn ce(lba: u32, off: u32, len: u32) -> Vec<u8> {
        entry(b"CE", &[both32(lba), both32(off), both32(len)].concat())
    }

    /// A 24-sector image: PVD at 16, terminator at 17, root dir at 18,
    /// then `extra` sectors.
    fn image(root: &[Vec<u8>], extra: &[(usize, Vec<u8>)]) -> Arc<dyn ReadAt> {
        let mut img = vec![0u8; 2048 * 24];
        let pvd = &mut img[16 * 2048..17 * 2048];
        pvd[..6].copy_from_slice(b"\x01CD001");
        pvd[6] = 1;
        pvd[40..44].copy_from_slice(b"TEST");
        pvd[80..88].copy_from_slice(&both32(24));
        pvd[128..130].copy_from_slice(&2048u16.to_le_bytes());
        pvd[130..132].copy_from_slice(&2048u16.to_be_bytes());
        pvd[156..190].copy_from_slice(&rec(18, 2048, 2, &[0], &[]));
        img[17 * 2048..17 * 2048 + 7].copy_from_slice(b"\xffCD001\x01");
        let dir: Vec<u8> = root.concat();
        img[18 * 2048..18 * 2048 + dir.len()].copy_from_slice(&dir);
        for (sec, data) in extra {
            img[sec * 2048..sec * 2048 + data.len()].copy_from_slice(data);
        }
        Arc::new(img)
    }

    fn walk_err(iso: &Iso) -> IsoError {
        iso.walk::<IsoError, _>("", |_, r| {
            io::copy(r, &mut io::sink()).unwrap();
            Ok(())
        })
        .unwrap_err()
    }

    #[test]
    fn multi_extent_file_is_one_source() {
        let root = [
            rec(18, 2048, 2, &[0], &[]),
            rec(18, 2048, 2, &[1], &[]),
            rec(20, 2048, 0x80, b"BIG.;1", &[]),
            rec(21, 100, 0, b"BIG.;1", &[]),
        ];
        let iso = Iso::open(image(
            &root,
            &[(20, vec![b'a'; 2048]), (21, vec![b'b'; 100])],
        ))
        .unwrap();
        assert_eq!(iso.name_mode(), NameMode::Plain);
        let n = iso.lookup("BIG").unwrap().unwrap();
        assert_eq!((n.size, n.extents().len(), n.mode), (2148, 2, 0o644));
        let f = iso.open_file(&n).unwrap();
        let mut b = [0u8; 16];
        f.read_exact_at(&mut b, 2040).unwrap();
        assert_eq!(&b, b"aaaaaaaabbbbbbbb");
        assert!(f.read_exact_at(&mut b, 2140).is_err());
        // A multi-extent file without its final record.
        let root = [
            rec(18, 2048, 2, &[0], &[]),
            rec(18, 2048, 2, &[1], &[]),
            rec(20, 2048, 0x80, b"BIG.;1", &[]),
        ];
        let iso = Iso::open(image(&root, &[])).unwrap();
        assert!(matches!(
            iso.read_dir(iso.root()).unwrap_err(),
            IsoError::BadRecord { .. }
        ));
    }

    #[test]
    fn hostile_trees() {
        let dots = || [rec(18, 2048, 2, &[0], &sp()), rec(18, 2048, 2, &[1], &[])];
        // A directory pointing at its ancestor (the root).
        let [a, b] = dots();
        let iso = Iso::open(image(&[a, b, rec(18, 2048, 2, b"LOOP", &[])], &[])).unwrap();
        let e = walk_err(&iso);
        assert!(
            matches!(&e, IsoError::DirLoop { offset, path } if *offset > 18 * 2048 && path == "LOOP"),
            "{e}"
        );
        // Two directories sharing one extent.
        let [a, b] = dots();
        let iso = Iso::open(image(
            &[
                a,
                b,
                rec(20, 2048, 2, b"D1", &[]),
                rec(20, 2048, 2, b"D2", &[]),
            ],
            &[],
        ))
        .unwrap();
        assert!(matches!(walk_err(&iso), IsoError::DirTwice { .. }));
        // An extent past the end of the image.
        let [a, b] = dots();
        let iso = Iso::open(image(&[a, b, rec(1000, 4096, 0, b"X.;1", &[])], &[])).unwrap();
        assert!(matches!(
            walk_err(&iso),
            IsoError::ExtentPastEnd {
                start: 2_048_000,
                ..
            }
        ));
        // A CE continuation pointing at itself.
        let [a, b] = dots();
        let su = [px(0o100644), ce(22, 0, 28)].concat();
        let iso = Iso::open(image(
            &[a, b, rec(19, 0, 0, b"F.;1", &su)],
            &[(22, ce(22, 0, 28))],
        ))
        .unwrap();
        assert_eq!(iso.name_mode(), NameMode::RockRidge);
        assert!(matches!(walk_err(&iso), IsoError::CeLoop { offset: 45056 }));
        // Rock Ridge names that are not path components.
        for bad in [&b".."[..], b"a/b", b"", b"\xff"] {
            let [a, b] = dots();
            let su = [px(0o100644), entry(b"NM", &[[0].as_slice(), bad].concat())].concat();
            let iso = Iso::open(image(&[a, b, rec(19, 0, 0, b"F.;1", &su)], &[])).unwrap();
            assert!(matches!(walk_err(&iso), IsoError::BadName { .. }));
        }
        // A record crossing the end of its (short) directory extent.
        let [a, b] = dots();
        let sub = [rec(19, 50, 2, &[0], &[]), rec(18, 2048, 2, &[1], &[])].concat();
        let iso = Iso::open(image(&[a, b, rec(19, 50, 2, b"D", &[])], &[(19, sub)])).unwrap();
        let d = iso.lookup("D").unwrap().unwrap();
        let e = iso.read_dir(&d).unwrap_err();
        assert!(
            matches!(&e, IsoError::BadRecord { offset, why } if why.contains("sector") && *offset == 19 * 2048 + 34),
            "{e}"
        );
    }

    #[test]
    fn rock_ridge_symlink_across_ce_and_long_tf() {
        let dot = rec(18, 2048, 2, &[0], &sp());
        let dotdot = rec(18, 2048, 2, &[1], &[]);
        let mut tf = vec![0x80 | 0x02];
        tf.extend_from_slice(b"2024022912000000\x00");
        let su = [
            px(0o120777),
            entry(b"NM", b"\x01lo"),
            entry(b"NM", b"\x00ng-name"),
            entry(b"TF", &tf),
            entry(b"SL", &[1, 8, 0, 0, 3, b'u', b's', b'r']),
            ce(22, 100, 14),
        ]
        .concat();
        let mut cont = vec![0u8; 100];
        cont.extend(entry(b"SL", &[0, 1, 2, b'l', b'o', 0, 3, b'c', b'a', b'l']));
        let dev = [
            px(0o020640),
            entry(b"NM", b"\x00null"),
            entry(b"PN", &[both32(1), both32(3)].concat()),
        ]
        .concat();
        let iso = Iso::open(image(
            &[
                dot,
                dotdot,
                rec(19, 0, 0, b"LONGNAME.;1", &su),
                rec(19, 0, 0, b"NULL.;1", &dev),
            ],
            &[(22, cont)],
        ))
        .unwrap();
        let mut seen = Vec::new();
        iso.walk::<IsoError, _>("", |e, _| {
            seen.push(e);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.len(), 3);
        let l = &seen[1];
        assert_eq!(l.path, "long-name");
        assert_eq!(l.kind, EntryKind::Symlink);
        assert_eq!(l.link.as_deref(), Some(&b"/usr/local"[..]));
        assert_eq!(
            (l.mode, l.uid, l.gid, l.mtime),
            (0o777, 1000, 100, 1_709_208_000)
        );
        let d = &seen[2];
        assert_eq!(
            (d.path.as_str(), d.kind, d.dev_major, d.dev_minor),
            ("null", EntryKind::Char, 1, 3)
        );
    }

    #[test]
    fn mutation_no_panic() {
        let dot = rec(18, 2048, 2, &[0], &sp());
        let dotdot = rec(18, 2048, 2, &[1], &[]);
        let su = [px(0o100644), entry(b"NM", b"\x00file"), ce(22, 0, 40)].concat();
        let sl = [
            px(0o120777),
            entry(b"SL", &[0, 8, 0, 0, 3, b'e', b't', b'c']),
        ]
        .concat();
        let cont = [entry(b"NM", b"\x00more"), entry(b"ST", &[])].concat();
        let seed = image(
            &[
                dot,
                dotdot,
                rec(20, 300, 0, b"F.;1", &su),
                rec(19, 2048, 2, b"D", &[]),
                rec(0, 0, 0, b"L.;1", &sl),
            ],
            &[
                (
                    19,
                    [
                        rec(19, 2048, 2, &[0], &[]),
                        rec(18, 2048, 2, &[1], &[]),
                        rec(21, 10, 0, b"G.;1", &[]),
                    ]
                    .concat(),
                ),
                (22, cont),
            ],
        );
        let mut base = vec![0u8; usize::try_from(seed.size()).unwrap()];
        seed.read_exact_at(&mut base, 0).unwrap();
        fuzz_input(&base);
        let mut x = 0x853c49e6748fea9bu64;
        let start = std::time::Instant::now();
        for round in 0..4000 {
            let mut d = base.clone();
            for _ in 0..1 + round % 4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // The metadata: descriptors (16-17), directories (18-19), CE (22).
                let sec = [16usize, 17, 18, 18, 18, 19, 22][(x % 7) as usize];
                let pos = sec * 2048 + (x >> 8) as usize % 300;
                d[pos] ^= (x >> 32) as u8 | 1;
            }
            fuzz_input(&d);
        }
        assert!(start.elapsed().as_secs() < 60);
    }

    #[test]
    fn not_an_iso() {
        let e = Iso::open(Arc::new(vec![0u8; 40_000])).unwrap_err();
        assert!(matches!(e, IsoError::NotIso { offset: 32768 }), "{e}");
        let e = Iso::open(Arc::new(vec![0u8; 100])).unwrap_err();
        assert!(matches!(e, IsoError::NotIso { .. }), "{e}");
    }
}
