//! A minimal writer of the `newc` cpio format, which the Linux kernel
//! unpacks as an initramfs.

use std::io::{self, Write};

/// Writes cpio `newc` entries; [`Cpio::finish`] adds the trailer.
pub(crate) struct Cpio<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> Cpio<W> {
    pub fn new(out: W) -> Self {
        Cpio {
            out,
            ino: 1,
            written: 0,
        }
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            self.put(&[0u8; 4][..4 - rem])?;
        }
        Ok(())
    }

    fn header(&mut self, name: &str, mode: u32, size: u64, rdev: (u32, u32)) -> io::Result<()> {
        let size = u32::try_from(size)
            .map_err(|_| io::Error::other(format!("{name}: too big for a cpio archive")))?;
        let namesize = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime: fixed, the archive is reproducible
            size,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            namesize as u32,
            0, // check
        ];
        self.ino += 1;
        let mut h = String::with_capacity(110);
        h.push_str("070701");
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        self.put(h.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad4()
    }

    /// A directory (parents must come first).
    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.header(name, 0o040_755, 0, (0, 0))
    }

    /// A regular file with `mode` permission bits.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.header(name, 0o100_000 | (mode & 0o7777), data.len() as u64, (0, 0))?;
        self.put(data)?;
        self.pad4()
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> io::Result<()> {
        self.header(name, 0o020_600, 0, (major, minor))
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        // The kernel reads the archive in 512-byte blocks.
        let rem = (self.written % 512) as usize;
        if rem != 0 {
            self.put(&vec![0u8; 512 - rem])?;
        }
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_reads_back_with_the_cpio_tool() {
        let mut c = Cpio::new(Vec::new());
        c.dir("dev").unwrap();
        c.char_dev("dev/console", 5, 1).unwrap();
        c.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        c.file("odd", 0o644, b"12345").unwrap();
        let out = c.finish().unwrap();
        assert_eq!(out.len() % 512, 0);
        assert!(out.starts_with(b"070701"));
        // Entries parse back: names and sizes where the format puts them.
        let text = String::from_utf8_lossy(&out);
        for name in ["dev\0", "dev/console\0", "init\0", "odd\0", "TRAILER!!!\0"] {
            assert!(text.contains(name), "{name:?} missing");
        }
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_ok()
        {
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join("a.cpio");
            std::fs::write(&f, &out).unwrap();
            let list = std::process::Command::new("cpio")
                .args(["-t", "-F"])
                .arg(&f)
                .output()
                .unwrap();
            let names = String::from_utf8_lossy(&list.stdout);
            assert_eq!(
                names.lines().collect::<Vec<_>>(),
                ["dev", "dev/console", "init", "odd"]
            );
        }
    }
}
