//! The one channel between kiln and a run's guest agent: a virtio-serial
//! port (`kiln.ctl`) carrying frames, `[kind: u8][length: u32 LE][bytes]`.
//! One ordered stream for everything keeps stdout and stderr apart and
//! complete, and the exit status after the last byte of output.

use std::io::{self, Read, Write};

/// The name of the virtio-serial port.
pub(crate) const PORT: &str = "kiln.ctl";

/// Largest frame either side accepts (a job's JSON is the biggest).
pub(crate) const MAX_FRAME: usize = 16 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// Host to guest: the job, as JSON ([`Job`]).
    Job = 1,
    /// Host to guest: bytes for the command's stdin.
    Stdin = 2,
    /// Host to guest: the command's stdin has ended.
    StdinEof = 3,
    /// Host to guest: deliver this signal (i32 LE) to the command.
    Signal = 4,
    /// Host to guest: the caller's terminal has this size now (rows, then
    /// columns, u16 LE each), for the command's pty.
    Resize = 5,
    /// Guest to host: the command's stdout.
    Stdout = 10,
    /// Guest to host: the command's stderr.
    Stderr = 11,
    /// Guest to host: the command ended; its exit code (i32 LE, 128+N
    /// for signal N). Nothing follows.
    Exit = 12,
    /// Guest to host: the agent could not run the command (text).
    Error = 13,
    /// Guest to host: the root is set up and the command starts.
    Started = 14,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Job,
            2 => Kind::Stdin,
            3 => Kind::StdinEof,
            4 => Kind::Signal,
            5 => Kind::Resize,
            10 => Kind::Stdout,
            11 => Kind::Stderr,
            12 => Kind::Exit,
            13 => Kind::Error,
            14 => Kind::Started,
            _ => return None,
        })
    }
}

/// QEMU's user network as the guest sees it (QEMU's defaults): the
/// guest's address and prefix, the gateway (the host's loopback is
/// reached there) and the resolver.
pub(crate) const GUEST_ADDR: ([u8; 4], u8) = ([10, 0, 2, 15], 24);
/// The gateway of QEMU's user network.
pub(crate) const GUEST_GATEWAY: [u8; 4] = [10, 0, 2, 2];
/// The resolver of QEMU's user network.
pub(crate) const GUEST_DNS: &str = "10.0.2.3";

/// What the guest agent runs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Job {
    /// The command line.
    pub argv: Vec<String>,
    /// `KEY=VALUE` pairs, the whole environment.
    pub env: Vec<String>,
    /// Working directory in the image.
    pub workdir: String,
    /// User and group.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Host name of the guest.
    pub hostname: String,
    /// The image's root without a writable layer.
    pub read_only: bool,
    /// The image's tree is the first virtio disk (ext4; writable unless
    /// `read_only`, its writes kept by the host in a copy-on-write disk of
    /// the run); else the 9p share `kiln.root`, read-only, under an
    /// overlay in guest memory.
    pub root_disk: bool,
    /// Without `root_disk`: the tree is the virtiofs share `kiln.root`
    /// (else the 9p one).
    #[serde(default)]
    pub root_virtiofs: bool,
    /// The overlay's upper layer is the virtio disk `kiln-upper` (an empty
    /// ext4 file system; its `upper/` directory becomes the layer of a
    /// commit), with the image's tree read-only below it; the guest
    /// removes the mount points it made and unmounts it before the exit
    /// status is sent.
    #[serde(default)]
    pub upper_disk: bool,
    /// A scratch virtio disk `kiln-disk` for the command (`--disk`), shown
    /// as `/dev/disk/by-id/virtio-kiln-disk` and `$KILN_DISK`.
    #[serde(default)]
    pub scratch_disk: bool,
    /// The guest's network: `eth0` on QEMU's user network ([`GUEST_ADDR`],
    /// [`GUEST_GATEWAY`], [`GUEST_DNS`]); else loopback only.
    #[serde(default)]
    pub network: bool,
    /// A pty of this size (rows, columns) is the command's stdin, stdout,
    /// stderr and controlling terminal; its output comes as `Stdout`
    /// frames. Else pipes.
    #[serde(default)]
    pub tty: Option<[u16; 2]>,
    /// Whether input comes (`Stdin` frames); else /dev/null.
    pub stdin: bool,
    /// Size of the in-memory upper layer, `/tmp` and `/dev/shm` in bytes.
    pub upper_size: u64,
    /// Size of `/tmp`.
    pub tmp_size: u64,
    /// Size of `/dev/shm`.
    pub shm_size: u64,
    /// Where the kernel's module tree (the virtio disk `kiln-modules`)
    /// goes in the command's root, if there is one.
    pub modules: Option<String>,
    /// 9p shares to mount in the command's root, in order.
    pub mounts: Vec<Share>,
}

/// A host directory QEMU shares over 9p, and where the guest mounts it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Share {
    /// The 9p mount tag.
    pub tag: String,
    /// Absolute path in the command's root.
    pub target: String,
    /// Mounted read-only.
    pub read_only: bool,
    /// Device nodes under it open.
    pub dev: bool,
    /// setuid bits under it act.
    pub suid: bool,
    /// Created in the root when missing; else a missing target skips the
    /// share (the kernel's module tree on a read-only root).
    pub required: bool,
    /// Shared over virtiofs (a virtiofsd of the run); else 9p.
    #[serde(default)]
    pub virtiofs: bool,
}

/// Writes one frame.
pub(crate) fn write_frame(w: &mut impl Write, kind: Kind, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| io::Error::other("frame too long"))?;
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head)?;
    w.write_all(data)
}

/// Reassembles frames from bytes as they arrive.
#[derive(Default)]
pub(crate) struct Frames {
    buf: Vec<u8>,
}

impl Frames {
    /// Adds what was read.
    pub(crate) fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, if there is one. A frame of an unknown
    /// kind or longer than [`MAX_FRAME`] is an error: the stream is not
    /// kiln's.
    pub(crate) fn next(&mut self) -> io::Result<Option<(Kind, Vec<u8>)>> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let kind = Kind::from_u8(self.buf[0]).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown frame kind {}", self.buf[0]),
            )
        })?;
        let len = u32::from_le_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {len} bytes"),
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let data = self.buf[5..5 + len].to_vec();
        self.buf.drain(..5 + len);
        Ok(Some((kind, data)))
    }
}

/// Reads frames until one is complete (blocking).
pub(crate) fn read_frame(r: &mut impl Read, frames: &mut Frames) -> io::Result<(Kind, Vec<u8>)> {
    let mut buf = [0u8; 65536];
    loop {
        if let Some(f) = frames.next()? {
            return Ok(f);
        }
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the channel closed",
            ));
        }
        frames.push(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_pieces() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Stdout, b"hello").unwrap();
        write_frame(&mut wire, Kind::Stderr, b"").unwrap();
        write_frame(&mut wire, Kind::Exit, &3i32.to_le_bytes()).unwrap();
        let mut f = Frames::default();
        let mut got = Vec::new();
        for b in &wire {
            f.push(std::slice::from_ref(b));
            while let Some(fr) = f.next().unwrap() {
                got.push(fr);
            }
        }
        assert_eq!(
            got,
            [
                (Kind::Stdout, b"hello".to_vec()),
                (Kind::Stderr, Vec::new()),
                (Kind::Exit, 3i32.to_le_bytes().to_vec())
            ]
        );
        let mut bad = Frames::default();
        bad.push(&[99, 0, 0, 0, 0]);
        assert!(bad.next().is_err());
        let mut long = Frames::default();
        long.push(&[10, 0xff, 0xff, 0xff, 0xff]);
        assert!(long.next().is_err());
    }
}
