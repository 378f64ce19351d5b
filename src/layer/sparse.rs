//! Sparse files: the data map an [`Entry`](super::Entry) may carry, the
//! GNU/PAX sparse map formats, and a reader that turns a map plus its data
//! back into the whole content.
//!
//! Layers store a sparse file in GNU tar's *PAX sparse format 1.0* (what
//! `tar --sparse --format=pax` writes; read by GNU tar, bsdtar/libarchive,
//! Python's `tarfile` and Go's `archive/tar`, hence umoci, skopeo, podman and
//! containerd):
//!
//! * PAX records `GNU.sparse.major=1`, `GNU.sparse.minor=0`,
//!   `GNU.sparse.name=<real path>`, `GNU.sparse.realsize=<size>`;
//! * a ustar header of type `0` named `<dir>/GNUSparseFile.0/<base>` whose
//!   size is the map block plus the stored data;
//! * the data starts with the map in decimal text — the number of
//!   segments, then offset and length of each, every number followed by
//!   `\n` — padded with NULs to a 512-byte boundary, followed by the
//!   segments' bytes.
//!
//! Reading also accepts the older PAX sparse formats 0.0
//! (`GNU.sparse.offset`/`GNU.sparse.numbytes` record pairs) and 0.1
//! (`GNU.sparse.map`). Every map read from an archive is checked: sorted,
//! non-overlapping, inside the real size, bounded in length.

use std::io::{self, Read};

/// One stored piece of a sparse file: `(offset, length)` in bytes.
pub type Segment = (u64, u64);

/// A file is written as a sparse entry only when its holes total at least
/// this many bytes (64 KiB). Below that the sparse encoding saves next to
/// nothing (holes compress to almost nothing) and would only expose the
/// format to more readers; such files are written as plain entries with
/// their holes as zeros, exactly as before sparse support.
pub const MIN_HOLES: u64 = 64 << 10;

/// Most segments a sparse map read from an archive may list (a map of
/// this length takes 64 MiB of memory).
pub const MAX_SEGMENTS: u64 = 1 << 22;

/// Longest decimal number in a map: `u64::MAX` has 20 digits.
const MAX_DIGITS: usize = 20;

const BLOCK: usize = 512;

/// Total bytes of data the segments hold (saturating).
pub fn data_len(map: &[Segment]) -> u64 {
    map.iter().fold(0u64, |a, s| a.saturating_add(s.1))
}

/// Checks that `map` is a data map of a `size`-byte file: segments in
/// ascending order, not overlapping, each inside the file. Empty segments
/// are allowed (and meaningless).
pub fn check(map: &[Segment], size: u64) -> Result<(), String> {
    let mut prev_end = 0u64;
    for (i, &(off, len)) in map.iter().enumerate() {
        let end = off
            .checked_add(len)
            .ok_or_else(|| format!("segment {i} ({off}+{len}) overflows"))?;
        if end > size {
            return Err(format!(
                "segment {i} ({off}+{len}) ends past the file size {size}"
            ));
        }
        if off < prev_end {
            return Err(format!(
                "segment {i} at offset {off} overlaps or precedes the previous one (which ends at {prev_end})"
            ));
        }
        prev_end = end;
    }
    Ok(())
}

/// Drops empty segments and merges touching ones. The data stream of the
/// map is unchanged; equal files get equal maps however they were cut.
pub fn normalize(map: &[Segment]) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::with_capacity(map.len());
    for &(off, len) in map {
        push_merged(&mut out, off, len);
    }
    out
}

fn push_merged(out: &mut Vec<Segment>, off: u64, len: u64) {
    if len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.0.saturating_add(last.1) == off {
            last.1 = last.1.saturating_add(len);
            return;
        }
    }
    out.push((off, len));
}

/// Whether a file of `size` bytes with data `map` is worth a sparse entry:
/// its holes total at least [`MIN_HOLES`].
pub fn worth_storing(map: &[Segment], size: u64) -> bool {
    size.saturating_sub(data_len(map)) >= MIN_HOLES
}

/// The PAX 1.0 map block for `map` (valid and normalized) of a `size`-byte
/// file: as GNU tar writes it, the map always ends with an empty segment at
/// the end of the file, and the text is padded with NULs to 512 bytes.
pub fn encode_map(map: &[Segment], size: u64) -> Vec<u8> {
    let mut s = String::new();
    s.push_str(&(map.len() + 1).to_string());
    s.push('\n');
    for (off, len) in map.iter().chain(std::iter::once(&(size, 0))) {
        s.push_str(&off.to_string());
        s.push('\n');
        s.push_str(&len.to_string());
        s.push('\n');
    }
    let mut v = s.into_bytes();
    v.resize(v.len().div_ceil(BLOCK) * BLOCK, 0);
    v
}

/// Checks segments one at a time as a map is read, keeping the normalized
/// map; refuses maps longer than [`MAX_SEGMENTS`].
struct MapBuilder {
    size: u64,
    prev_end: u64,
    seen: u64,
    map: Vec<Segment>,
}

impl MapBuilder {
    fn new(size: u64) -> Self {
        MapBuilder {
            size,
            prev_end: 0,
            seen: 0,
            map: Vec::new(),
        }
    }

    fn push(&mut self, off: u64, len: u64) -> Result<(), String> {
        let i = self.seen;
        self.seen += 1;
        if self.seen > MAX_SEGMENTS + 1 {
            return Err(format!("the map has more than {MAX_SEGMENTS} segments"));
        }
        let end = off
            .checked_add(len)
            .ok_or_else(|| format!("segment {i} ({off}+{len}) overflows"))?;
        if end > self.size {
            return Err(format!(
                "segment {i} ({off}+{len}) ends past the real size {}",
                self.size
            ));
        }
        if off < self.prev_end {
            return Err(format!(
                "segment {i} at offset {off} overlaps or precedes the previous one (which ends at {})",
                self.prev_end
            ));
        }
        self.prev_end = end;
        push_merged(&mut self.map, off, len);
        Ok(())
    }
}

/// Parses one decimal number of a map.
fn number(tok: &[u8], what: &str) -> Result<u64, String> {
    if tok.is_empty() || tok.len() > MAX_DIGITS || !tok.iter().all(u8::is_ascii_digit) {
        return Err(format!(
            "{what} {:?} is not a decimal number",
            String::from_utf8_lossy(&tok[..tok.len().min(40)])
        ));
    }
    std::str::from_utf8(tok)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            format!(
                "{what} {} does not fit 64 bits",
                String::from_utf8_lossy(tok)
            )
        })
}

/// Reads the PAX 1.0 sparse map at the start of an entry's data.
///
/// `size` is the real file size (`GNU.sparse.realsize`) and `stored` the
/// entry's data size: the map must fit in it, and the data after the map
/// must be exactly the segments' total. Returns the normalized map and the
/// bytes the map took (whole 512-byte blocks), after which `r` is at the
/// first segment's data. Never allocates more than the segments read.
pub fn read_map(r: &mut dyn Read, size: u64, stored: u64) -> Result<(Vec<Segment>, u64), String> {
    let mut block = [0u8; BLOCK];
    let mut consumed = 0u64;
    let mut tok: Vec<u8> = Vec::with_capacity(MAX_DIGITS);
    // The count, then offset/length pairs.
    let mut count: Option<u64> = None;
    let mut pending_off: Option<u64> = None;
    let mut b = MapBuilder::new(size);
    let mut numbers_left: Option<u64> = None;
    while numbers_left != Some(0) {
        if consumed + BLOCK as u64 > stored {
            return Err(format!(
                "the sparse map runs past the entry's {stored} bytes of data"
            ));
        }
        r.read_exact(&mut block)
            .map_err(|e| format!("reading the sparse map at byte {consumed} of the entry: {e}"))?;
        consumed += BLOCK as u64;
        for &c in &block {
            if numbers_left == Some(0) {
                break; // the rest of the block is padding
            }
            if c != b'\n' {
                if !c.is_ascii_digit() {
                    return Err(format!(
                        "the sparse map has a byte {c:#04x} where a digit or a newline belongs"
                    ));
                }
                if tok.len() >= MAX_DIGITS {
                    return Err(format!(
                        "a number of the sparse map has more than {MAX_DIGITS} digits"
                    ));
                }
                tok.push(c);
                continue;
            }
            match count {
                None => {
                    let n = number(&tok, "the segment count")?;
                    // Each segment takes at least 4 bytes of text ("0\n0\n").
                    if n > MAX_SEGMENTS + 1 || n > stored / 4 {
                        return Err(format!(
                            "the sparse map claims {n} segments, more than {} allowed in {stored} bytes",
                            (MAX_SEGMENTS + 1).min(stored / 4)
                        ));
                    }
                    count = Some(n);
                    numbers_left = Some(2 * n);
                }
                Some(_) => {
                    let v = number(&tok, "a sparse map entry")?;
                    match pending_off.take() {
                        None => pending_off = Some(v),
                        Some(off) => b.push(off, v)?,
                    }
                    numbers_left = numbers_left.map(|n| n - 1);
                }
            }
            tok.clear();
        }
    }
    let have = stored - consumed;
    let want = data_len(&b.map);
    if want != have {
        return Err(format!(
            "the sparse map lists {want} bytes of data but the entry holds {have}"
        ));
    }
    Ok((b.map, consumed))
}

/// What an entry's PAX records say about it being a sparse file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaxSparse {
    /// The real path (`GNU.sparse.name`), when recorded.
    pub name: Option<Vec<u8>>,
    /// The real file size.
    pub size: u64,
    /// The map, for formats 0.0 and 0.1 (in the records); `None` for 1.0,
    /// whose map starts the entry's data (see [`read_map`]).
    pub map: Option<Vec<Segment>>,
}

fn text<'a>(key: &str, v: &'a [u8]) -> Result<&'a str, String> {
    std::str::from_utf8(v)
        .map(str::trim)
        .map_err(|_| format!("{key} is not text"))
}

fn num_record(key: &str, v: &[u8]) -> Result<u64, String> {
    number(text(key, v)?.as_bytes(), key)
}

/// Reads the `GNU.sparse.*` records among an entry's PAX records: `None`
/// when there are none (not a sparse file), an error naming what is wrong
/// for an unknown version or a bad map.
pub fn from_pax<'a, I>(records: I) -> Result<Option<PaxSparse>, String>
where
    I: IntoIterator<Item = (&'a str, &'a [u8])>,
{
    let mut any = false;
    let (mut major, mut minor) = (None, None);
    let (mut name, mut realsize, mut size, mut numblocks) = (None, None, None, None);
    let mut map01: Option<&[u8]> = None;
    let mut pairs: Vec<(u64, Option<u64>)> = Vec::new();
    for (key, v) in records {
        let Some(k) = key.strip_prefix("GNU.sparse.") else {
            continue;
        };
        any = true;
        match k {
            "major" => major = Some(num_record(key, v)?),
            "minor" => minor = Some(num_record(key, v)?),
            "name" => name = Some(v.to_vec()),
            "realsize" => realsize = Some(num_record(key, v)?),
            "size" => size = Some(num_record(key, v)?),
            "numblocks" => numblocks = Some(num_record(key, v)?),
            "map" => map01 = Some(v),
            "offset" => {
                if pairs.len() as u64 > MAX_SEGMENTS {
                    return Err(format!("the map has more than {MAX_SEGMENTS} segments"));
                }
                pairs.push((num_record(key, v)?, None));
            }
            "numbytes" => match pairs.last_mut() {
                Some((_, n @ None)) => *n = Some(num_record(key, v)?),
                _ => return Err("GNU.sparse.numbytes without a GNU.sparse.offset".into()),
            },
            // Unknown GNU.sparse.* keys are ignored, as GNU tar does.
            _ => {}
        }
    }
    if !any {
        return Ok(None);
    }
    let size = realsize
        .or(size)
        .ok_or("GNU.sparse records without GNU.sparse.realsize or GNU.sparse.size")?;
    match (major, minor) {
        (Some(1), Some(0)) => {
            return Ok(Some(PaxSparse {
                name,
                size,
                map: None,
            }))
        }
        (None, None) | (Some(0), _) => {}
        (ma, mi) => {
            return Err(format!(
                "unsupported GNU sparse format version {}.{}",
                ma.map_or("?".into(), |v| v.to_string()),
                mi.map_or("?".into(), |v| v.to_string())
            ))
        }
    }
    let mut b = MapBuilder::new(size);
    if let Some(m) = map01 {
        // 0.1: "offset,length,offset,length,..."
        let m = text("GNU.sparse.map", m)?;
        let mut it = m.split(',');
        while let Some(off) = it.next() {
            if off.is_empty() && b.seen == 0 {
                break; // an empty map
            }
            let len = it
                .next()
                .ok_or("GNU.sparse.map has an odd number of values")?;
            b.push(
                number(off.as_bytes(), "a GNU.sparse.map offset")?,
                number(len.as_bytes(), "a GNU.sparse.map length")?,
            )?;
        }
    } else if !pairs.is_empty() {
        // 0.0: GNU.sparse.offset / GNU.sparse.numbytes pairs.
        for (off, len) in pairs {
            let len = len.ok_or("GNU.sparse.offset without a GNU.sparse.numbytes")?;
            b.push(off, len)?;
        }
    } else if numblocks != Some(0) {
        return Err("GNU.sparse records without a map".into());
    }
    if let Some(n) = numblocks {
        if n != b.seen {
            return Err(format!(
                "GNU.sparse.numblocks is {n} but the map has {} segments",
                b.seen
            ));
        }
    }
    Ok(Some(PaxSparse {
        name,
        size,
        map: Some(b.map),
    }))
}

/// Expands the data of a sparse file (its segments' bytes, concatenated)
/// into the whole content: `size` bytes, zeros in the holes.
///
/// ```
/// use std::io::Read;
/// use kiln::import::sparse::DenseReader;
/// let mut r = DenseReader::new(&b"abXY"[..], &[(1, 2), (5, 2)], 8);
/// let mut out = Vec::new();
/// r.read_to_end(&mut out).unwrap();
/// assert_eq!(out, b"\0ab\0\0XY\0");
/// ```
pub struct DenseReader<R> {
    inner: R,
    map: Vec<Segment>,
    size: u64,
    pos: u64,
    idx: usize,
}

impl<R: Read> DenseReader<R> {
    /// Reads `size` bytes: the data of `map` (a valid map, see [`check`])
    /// from `inner`, zeros elsewhere.
    pub fn new(inner: R, map: &[Segment], size: u64) -> Self {
        DenseReader {
            inner,
            map: normalize(map),
            size,
            pos: 0,
            idx: 0,
        }
    }
}

impl<R: Read> Read for DenseReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        while self
            .map
            .get(self.idx)
            .is_some_and(|s| s.0.saturating_add(s.1) <= self.pos)
        {
            self.idx += 1;
        }
        let left = self.size - self.pos;
        let cap = |n: u64| {
            buf.len()
                .min(usize::try_from(n.min(left)).unwrap_or(usize::MAX))
        };
        match self.map.get(self.idx).copied() {
            Some((off, len)) if off <= self.pos => {
                let n = cap(off.saturating_add(len) - self.pos);
                let got = self.inner.read(&mut buf[..n])?;
                if got == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("sparse file data ended inside the segment at offset {off}"),
                    ));
                }
                self.pos += got as u64;
                Ok(got)
            }
            next => {
                let end = next.map_or(self.size, |s| s.0);
                let n = cap(end - self.pos);
                buf[..n].fill(0);
                self.pos += n as u64;
                Ok(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_text(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.resize(v.len().div_ceil(BLOCK) * BLOCK, 0);
        v
    }

    #[test]
    fn encode_matches_gnu_tar_and_round_trips() {
        // What GNU tar 1.34 writes for a 1 MiB file with 4 KiB at 0 and 512 KiB.
        let map = [(0, 4096), (524_288, 4096)];
        let enc = encode_map(&map, 1 << 20);
        assert_eq!(enc, map_text("3\n0\n4096\n524288\n4096\n1048576\n0\n"));
        let mut data = enc.clone();
        data.extend(vec![7u8; 8192]);
        let stored = data.len() as u64;
        let (got, used) = read_map(&mut &data[..], 1 << 20, stored).unwrap();
        assert_eq!(got, map);
        assert_eq!(used, 512);
        // All hole: only the terminating empty segment.
        assert_eq!(encode_map(&[], 5), map_text("1\n5\n0\n"));
        // A map longer than one block.
        let long: Vec<Segment> = (0..200u64).map(|i| (i * 1_000_000, 10)).collect();
        let enc = encode_map(&long, 300_000_000);
        assert!(enc.len() > 512 && enc.len().is_multiple_of(512));
        let mut data = enc.clone();
        data.extend(vec![1u8; 2000]);
        let (got, used) = read_map(&mut &data[..], 300_000_000, data.len() as u64).unwrap();
        assert_eq!((got, used), (long, enc.len() as u64));
    }

    #[test]
    fn normalize_merges_and_drops_empty_segments() {
        assert_eq!(
            normalize(&[(0, 0), (0, 10), (10, 5), (20, 0), (30, 1)]),
            vec![(0, 15), (30, 1)]
        );
        assert!(check(&[(0, 10), (10, 5), (15, 0)], 15).is_ok());
        assert!(check(&[(0, 10), (5, 5)], 15).is_err());
        assert!(check(&[(10, 1), (0, 1)], 15).is_err());
        assert!(check(&[(10, 6)], 15).is_err());
        assert!(check(&[(u64::MAX, 2)], u64::MAX).is_err());
        assert!(worth_storing(&[(0, 10)], 10 + MIN_HOLES));
        assert!(!worth_storing(&[(0, 10)], 9 + MIN_HOLES));
    }

    #[test]
    fn hostile_maps_are_refused_with_a_reason() {
        let read = |text: &str, size: u64, data: usize| {
            let mut v = map_text(text);
            let stored = (v.len() + data) as u64;
            v.extend(vec![0u8; data]);
            read_map(&mut &v[..], size, stored).map(|x| x.0)
        };
        let cases: &[(&str, u64, usize, &str)] = &[
            ("2\n100\n10\n0\n10\n", 1000, 20, "overlaps or precedes"),
            ("2\n0\n10\n5\n10\n", 1000, 20, "overlaps or precedes"),
            ("1\n995\n10\n", 1000, 10, "past the real size"),
            ("1\n18446744073709551615\n2\n", u64::MAX, 2, "overflows"),
            (
                "1\n18446744073709551616\n2\n",
                u64::MAX,
                2,
                "does not fit 64 bits",
            ),
            (
                "1\n123456789012345678901234\n2\n",
                u64::MAX,
                2,
                "more than 20 digits",
            ),
            ("99999999999\n", 1000, 0, "claims 99999999999 segments"),
            ("1\n-1\n2\n", 1000, 2, "byte 0x2d where a digit"),
            ("1\n\n2\n", 1000, 2, "not a decimal number"),
            ("1\n0\n", 1000, 0, "byte 0x00 where a digit"),
            (
                "1\n0\n10\n",
                1000,
                5,
                "lists 10 bytes of data but the entry holds 5",
            ),
            (
                "1\n0\n10\n",
                1000,
                15,
                "lists 10 bytes of data but the entry holds 15",
            ),
            ("x", 1000, 0, "byte 0x78 where a digit"),
        ];
        for (text, size, data, want) in cases {
            let err = read(text, *size, *data).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        // A map block the data cannot hold.
        let err = read_map(&mut &b"1\n0\n"[..], 10, 4).unwrap_err();
        assert!(err.contains("runs past"), "{err}");
        // A truncated stream.
        let err = read_map(&mut &[b'1'; 100][..], 10, 1 << 20).unwrap_err();
        assert!(err.contains("reading the sparse map"), "{err}");
    }

    #[test]
    fn pax_records_of_every_version() {
        let rec = |v: &[(&'static str, &'static str)]| {
            from_pax(v.iter().map(|(k, v)| (*k, v.as_bytes())))
        };
        assert_eq!(rec(&[("path", "x"), ("uid", "1")]), Ok(None));
        let v1 = rec(&[
            ("GNU.sparse.major", "1"),
            ("GNU.sparse.minor", "0"),
            ("GNU.sparse.name", "sub/f"),
            ("GNU.sparse.realsize", "1048576"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(v1.name.as_deref(), Some(&b"sub/f"[..]));
        assert_eq!((v1.size, v1.map), (1 << 20, None));
        // 0.1 as GNU tar writes it.
        let v01 = rec(&[
            ("GNU.sparse.size", "1048576"),
            ("GNU.sparse.numblocks", "3"),
            ("GNU.sparse.name", "sub/f"),
            ("GNU.sparse.map", "0,4096,524288,4096,1048576,0"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(v01.map, Some(vec![(0, 4096), (524_288, 4096)]));
        // 0.0 as GNU tar writes it.
        let v00 = rec(&[
            ("GNU.sparse.size", "1048576"),
            ("GNU.sparse.numblocks", "3"),
            ("GNU.sparse.offset", "0"),
            ("GNU.sparse.numbytes", "4096"),
            ("GNU.sparse.offset", "524288"),
            ("GNU.sparse.numbytes", "4096"),
            ("GNU.sparse.offset", "1048576"),
            ("GNU.sparse.numbytes", "0"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((v00.name, v00.map), (None, v01.map));
        for (bad, want) in [
            (
                &[
                    ("GNU.sparse.major", "2"),
                    ("GNU.sparse.minor", "0"),
                    ("GNU.sparse.realsize", "1"),
                ][..],
                "unsupported GNU sparse format version 2.0",
            ),
            (
                &[("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0")][..],
                "without GNU.sparse.realsize",
            ),
            (
                &[("GNU.sparse.size", "10"), ("GNU.sparse.map", "0,4,2")][..],
                "odd number",
            ),
            (
                &[("GNU.sparse.size", "10"), ("GNU.sparse.map", "4,4,0,2")][..],
                "overlaps or precedes",
            ),
            (
                &[("GNU.sparse.size", "10"), ("GNU.sparse.map", "8,4")][..],
                "past the real size",
            ),
            (
                &[("GNU.sparse.size", "10"), ("GNU.sparse.numbytes", "4")][..],
                "without a GNU.sparse.offset",
            ),
            (
                &[("GNU.sparse.size", "10"), ("GNU.sparse.offset", "4")][..],
                "without a GNU.sparse.numbytes",
            ),
            (&[("GNU.sparse.size", "10")][..], "without a map"),
            (&[("GNU.sparse.size", "ten")][..], "not a decimal number"),
            (
                &[
                    ("GNU.sparse.size", "10"),
                    ("GNU.sparse.numblocks", "2"),
                    ("GNU.sparse.map", "0,4"),
                ][..],
                "numblocks is 2",
            ),
        ] {
            let err = rec(bad).unwrap_err();
            assert!(err.contains(want), "{bad:?}: {err}");
        }
    }

    #[test]
    fn dense_reader_fills_holes_and_notices_short_data() {
        let mut out = Vec::new();
        DenseReader::new(&b"abcd"[..], &[(0, 2), (6, 2)], 10)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"ab\0\0\0\0cd\0\0");
        let mut out = Vec::new();
        DenseReader::new(&b""[..], &[], 3)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"\0\0\0");
        let err = DenseReader::new(&b"ab"[..], &[(0, 4)], 4)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
