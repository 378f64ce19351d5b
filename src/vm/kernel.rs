//! The kernel a VM boots: where it is found (the caller's file, the image's
//! own `/boot`, the host's), its module tree, and the uncompressed
//! `vmlinux` kiln boots through the PVH entry point when the kernel has one
//! (under TCG the guest decompressing a bzImage is most of its boot time).

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::cache::{key_name, made_once, stamp};
use super::{io_err, VmError};

/// A kernel to boot and the modules directory that belongs to it.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The `vmlinuz` file.
    pub image: PathBuf,
    /// `/lib/modules/RELEASE` (it may not exist: a kernel with its drivers
    /// built in needs none).
    pub modules: PathBuf,
    /// The kernel is an image's: its module files are opened without
    /// following a symlink (a hostile image must not name host files).
    in_tree: bool,
}

impl Kernel {
    /// `KILN_VM_KERNEL`, else the newest `/boot/vmlinuz-*` of the host
    /// that has a modules directory.
    pub fn find() -> Result<Kernel, VmError> {
        if let Some(k) = std::env::var_os("KILN_VM_KERNEL") {
            let image = PathBuf::from(k);
            let release = image
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
                .ok_or_else(|| {
                    VmError::NoKernel(format!(
                        "KILN_VM_KERNEL={} is not named vmlinuz-RELEASE",
                        image.display()
                    ))
                })?;
            return Ok(Kernel {
                image,
                modules: Path::new("/lib/modules").join(release),
                in_tree: false,
            });
        }
        Kernel::newest_in(Path::new("/"))?
            .ok_or_else(|| VmError::NoKernel("no /boot/vmlinuz-* with /lib/modules".into()))
    }

    /// The newest `ROOT/boot/vmlinuz-*` that has `ROOT/lib/modules/RELEASE`
    /// (`None` when there is none), checked to be readable: Ubuntu ships
    /// `/boot/vmlinuz-*` mode 0600, which is worth saying clearly.
    pub fn newest_in(root: &Path) -> Result<Option<Kernel>, VmError> {
        let Some((image, modules)) = newest(&root.join("boot"), |e, release| {
            let modules = root.join("lib/modules").join(release);
            (e.path().exists() && modules.join("modules.dep").exists()).then_some(modules)
        }) else {
            return Ok(None);
        };
        if let Err(e) = fs::File::open(&image) {
            return Err(VmError::NoKernel(format!(
                "{}: {e}{}",
                image.display(),
                if e.kind() == io::ErrorKind::PermissionDenied {
                    " (the distribution keeps its kernels readable by root only: copy one somewhere readable and pass it with --kernel, or make it readable)"
                } else {
                    ""
                }
            )));
        }
        Ok(Some(Kernel {
            image,
            modules,
            in_tree: false,
        }))
    }

    /// The newest kernel of an image's tree at `root`: a regular file
    /// `/boot/vmlinuz-RELEASE` with a module tree `/lib/modules/RELEASE`
    /// holding a regular `modules.dep`, the directories resolved inside
    /// the tree (its symlinks, absolute ones included, stay in it), so
    /// nothing of the host is named. `None` when the image has none.
    ///
    /// ```no_run
    /// let tree = std::path::Path::new("/var/tmp/rootfs"); // an unpacked image
    /// match kiln::vm::Kernel::of_image(tree)? {
    ///     Some(k) => println!("boots {} with {}", k.image.display(), k.modules.display()),
    ///     None => println!("no kernel of its own: the host's boots"),
    /// }
    /// # Ok::<(), kiln::vm::VmError>(())
    /// ```
    pub fn of_image(root: &Path) -> Result<Option<Kernel>, VmError> {
        use rustix::fs::{Mode, OFlags, ResolveFlags};
        let tree = match rustix::fs::open(
            root,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(e) => return Err(io_err("open", root)(e.into())),
        };
        // A directory of the tree, resolved in it, as a host path.
        let dir_in = |path: &str| -> Option<PathBuf> {
            let fd = rustix::fs::openat2(
                &tree,
                path,
                OFlags::DIRECTORY | OFlags::PATH | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            )
            .ok()?;
            use std::os::fd::AsRawFd;
            fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()
        };
        let regular = |p: &Path| fs::symlink_metadata(p).is_ok_and(|m| m.is_file());
        let Some(boot) = dir_in("boot") else {
            return Ok(None);
        };
        let Some((image, modules)) = newest(&boot, |e, release| {
            if !regular(&e.path()) {
                return None;
            }
            let modules = dir_in(&format!("lib/modules/{release}"))?;
            regular(&modules.join("modules.dep")).then_some(modules)
        }) else {
            return Ok(None);
        };
        if let Err(e) = fs::File::open(&image) {
            return Err(VmError::NoKernel(format!(
                "the image's kernel {}: {e} (pass a kernel with --kernel)",
                image.display()
            )));
        }
        Ok(Some(Kernel {
            image,
            modules,
            in_tree: true,
        }))
    }

    /// Whether this is an image's own kernel ([`Kernel::of_image`]).
    pub fn is_the_images(&self) -> bool {
        self.in_tree
    }

    /// A file of the module tree (`rel` as `modules.dep` names it); an
    /// image's is opened beneath the tree without following symlinks.
    fn open_in_modules(&self, rel: &str) -> io::Result<fs::File> {
        if !self.in_tree {
            return fs::File::open(self.modules.join(rel));
        }
        use rustix::fs::{Mode, OFlags, ResolveFlags};
        let dir = rustix::fs::open(
            &self.modules,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let fd = rustix::fs::openat2(
            &dir,
            rel,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )?;
        Ok(fs::File::from(fd))
    }

    /// A module's ELF bytes (`rel` as `modules.dep` names it), unpacked.
    pub(crate) fn read_module(&self, rel: &str) -> Result<Vec<u8>, VmError> {
        let path = self.modules.join(rel);
        let mut raw = Vec::new();
        self.open_in_modules(rel)
            .and_then(|mut f| f.read_to_end(&mut raw))
            .map_err(io_err("read module", &path))?;
        unpack_module(&path, raw)
    }

    /// A kernel file the caller names; its modules are looked for under
    /// `/lib/modules/RELEASE`, the release read from the bzImage header.
    pub fn from_file(image: &Path) -> Result<Kernel, VmError> {
        let head = read_head(image, 64 << 10)
            .map_err(|e| VmError::NoKernel(format!("{}: {e}", image.display())))?;
        // No release, no module tree: the kernel must have what it needs
        // built in.
        let modules = bzimage_release(&head)
            .map(|r| Path::new("/lib/modules").join(r))
            .unwrap_or_default();
        Ok(Kernel {
            image: image.to_path_buf(),
            modules,
            in_tree: false,
        })
    }

    /// The file to hand QEMU's `-kernel`: the uncompressed `vmlinux` when
    /// the kernel can boot through PVH (extracted once into `cache`, named
    /// by the kernel file's identity, so a run after the first reads
    /// nothing), else the kernel file itself.
    pub fn boot_file(&self, cache: &Path) -> Result<PathBuf, VmError> {
        let name = key_name(&format!(
            "vmlinux v1\n{}\n{}",
            self.image.display(),
            stamp(&self.image)
        ));
        let elf = cache.join(format!("vmlinux-{name}"));
        let none = cache.join(format!("vmlinux-{name}.none"));
        if elf.exists() {
            return Ok(elf);
        }
        if none.exists() {
            return Ok(self.image.clone());
        }
        let raw = fs::read(&self.image).map_err(io_err("read the kernel", &self.image))?;
        let (path, data) = match vmlinux_of(&raw) {
            Some(vmlinux) if has_pvh_note(&vmlinux) => (elf, vmlinux),
            _ => (none, Vec::new()),
        };
        made_once(&path, |tmp| {
            fs::write(tmp, &data).map_err(io_err("write", tmp))
        })?;
        Ok(if data.is_empty() {
            self.image.clone()
        } else {
            path
        })
    }

    /// The module files (relative to `modules`) needed for `names`, each
    /// after its dependencies; none when the kernel has no module tree.
    pub(crate) fn modules_for(&self, names: &[&str]) -> Result<Vec<String>, VmError> {
        let dep_path = self.modules.join("modules.dep");
        let text = match self.open_in_modules("modules.dep").and_then(|mut f| {
            let mut s = String::new();
            f.read_to_string(&mut s).map(|_| s)
        }) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !self.modules.exists() => {
                return Ok(Vec::new())
            }
            Err(e) => return Err(io_err("read", &dep_path)(e)),
        };
        let deps: std::collections::HashMap<&str, Vec<&str>> = text
            .lines()
            .filter_map(|l| {
                let (m, d) = l.split_once(':')?;
                Some((m.trim(), d.split_whitespace().collect()))
            })
            .collect();
        let by_name = |n: &str| {
            deps.keys()
                .find(|k| {
                    let base = k.rsplit('/').next().unwrap_or(k);
                    let stem = base.split(".ko").next().unwrap_or(base);
                    stem.replace('-', "_") == n.replace('-', "_")
                })
                .copied()
        };
        fn visit<'a>(
            m: &'a str,
            deps: &std::collections::HashMap<&'a str, Vec<&'a str>>,
            out: &mut Vec<String>,
        ) {
            if out.iter().any(|o| o == m) {
                return;
            }
            for d in deps.get(m).into_iter().flatten() {
                visit(d, deps, out);
            }
            out.push(m.to_string());
        }
        let mut out = Vec::new();
        for n in names {
            if let Some(m) = by_name(n) {
                visit(m, &deps, &mut out);
            }
        }
        Ok(out)
    }
}

/// The newest `vmlinuz-RELEASE` in `boot` (by release, numerically:
/// 6.1.0-56 is newer than 6.1.0-9) that `modules_of` gives a module tree
/// for, and that tree.
fn newest(
    boot: &Path,
    modules_of: impl Fn(&fs::DirEntry, &str) -> Option<PathBuf>,
) -> Option<(PathBuf, PathBuf)> {
    let mut found: Vec<(PathBuf, PathBuf)> = fs::read_dir(boot)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let release = name.strip_prefix("vmlinuz-")?;
            if release.is_empty() || release.contains('/') {
                return None;
            }
            modules_of(&e, release).map(|m| (e.path(), m))
        })
        .collect();
    found.sort_by_key(|(image, _)| release_key(image));
    found.pop()
}

fn read_head(path: &Path, n: u64) -> io::Result<Vec<u8>> {
    let mut head = Vec::new();
    fs::File::open(path)?.take(n).read_to_end(&mut head)?;
    Ok(head)
}

/// A sort key for `vmlinuz-RELEASE`: the release's numbers in order.
fn release_key(image: &Path) -> Vec<u64> {
    image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or(0))
        .collect()
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The release a bzImage names in its setup header (`kernel_version`),
/// its first word: `6.1.0-57-amd64`.
fn bzimage_release(img: &[u8]) -> Option<String> {
    if img.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let at = usize::from(u16_at(img, 0x20e)?) + 0x200;
    let s = img.get(at..)?;
    let end = s.iter().position(|&b| b == 0 || b == b' ')?;
    String::from_utf8(s[..end].to_vec()).ok()
}

/// The uncompressed ELF kernel inside a bzImage (boot protocol 2.08+:
/// `payload_offset`/`payload_length` after the setup sectors), for the
/// gzip, xz, zstd and lz4 payloads; `None` for others (bzip2, lzma, lzo:
/// the bzImage boots as it is) or anything malformed.
fn vmlinux_of(img: &[u8]) -> Option<Vec<u8>> {
    if img.get(0x202..0x206)? != b"HdrS" || u16_at(img, 0x206)? < 0x208 {
        return None;
    }
    let setup = match img.get(0x1f1)? {
        0 => 4,
        n => usize::from(*n),
    };
    let start = (setup + 1) * 512 + u32_at(img, 0x248)? as usize;
    let len = u32_at(img, 0x24c)? as usize;
    let payload = img.get(start..start.checked_add(len)?)?;
    // At most 1 GiB: a kernel, not a bomb.
    let limit = 1u64 << 30;
    let mut out = Vec::new();
    let got = if payload.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(payload)
            .take(limit)
            .read_to_end(&mut out)
    } else if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        xz2::read::XzDecoder::new(payload)
            .take(limit)
            .read_to_end(&mut out)
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::read::Decoder::new(payload).and_then(|d| d.take(limit).read_to_end(&mut out))
    } else if payload.starts_with(&LZ4_LEGACY.to_le_bytes()) {
        out = unlz4_legacy(payload, limit as usize)?;
        Ok(out.len())
    } else {
        return None;
    };
    // The kernel's own decompressor stops at the stream's end; a trailing
    // size word is not an error.
    if got.is_err() && out.len() < 4096 {
        return None;
    }
    out.starts_with(b"\x7fELF").then_some(out)
}

/// The magic of the lz4 "legacy" framing the kernel's `unlz4` reads.
const LZ4_LEGACY: u32 = 0x184C_2102;

/// The kernel's lz4 framing: the magic, then blocks, each a little-endian
/// compressed length and an lz4 block of at most 8 MiB uncompressed (a
/// repeated magic between concatenated streams is skipped), then the
/// uncompressed size the build appends, which must match (lz4 blocks carry
/// no checksum: a cut or a changed length shows there). At most `limit`
/// bytes come out; anything else is `None`.
fn unlz4_legacy(data: &[u8], limit: usize) -> Option<Vec<u8>> {
    const CHUNK: usize = 8 << 20;
    let mut at = 4;
    let mut out = Vec::new();
    let mut block = vec![0u8; CHUNK];
    while let Some(len) = data.get(at..at + 4) {
        let len = u32::from_le_bytes(len.try_into().ok()?);
        at += 4;
        if len == LZ4_LEGACY {
            continue;
        }
        if at == data.len() {
            // The last word: the size of what came out.
            return (len as usize == out.len()).then_some(out);
        }
        let input = data.get(at..at.checked_add(len as usize)?)?;
        at += len as usize;
        let n = lz4_flex::block::decompress_into(input, &mut block).ok()?;
        if out.len() + n > limit {
            return None;
        }
        out.extend_from_slice(&block[..n]);
    }
    (at == data.len()).then_some(out)
}

/// Whether an ELF kernel has the Xen PVH entry note (`Xen`, type 18,
/// `XEN_ELFNOTE_PHYS32_ENTRY`), which QEMU boots directly.
fn has_pvh_note(elf: &[u8]) -> bool {
    (|| -> Option<bool> {
        if elf.get(4) != Some(&2) {
            return Some(false);
        }
        let phoff = usize::try_from(u64_at(elf, 0x20)?).ok()?;
        let (size, count) = (usize::from(u16_at(elf, 0x36)?), u16_at(elf, 0x38)?);
        for i in 0..usize::from(count) {
            let ph = phoff.checked_add(i.checked_mul(size)?)?;
            if u32_at(elf, ph)? != 4 {
                continue; // not PT_NOTE
            }
            let off = usize::try_from(u64_at(elf, ph + 8)?).ok()?;
            let len = usize::try_from(u64_at(elf, ph + 32)?).ok()?;
            let notes = elf.get(off..off.checked_add(len)?)?;
            let mut at = 0;
            while at + 12 <= notes.len() {
                let namesz = u32_at(notes, at)? as usize;
                let descsz = u32_at(notes, at + 4)? as usize;
                let ty = u32_at(notes, at + 8)?;
                let name = notes.get(at + 12..at + 12 + namesz)?;
                if ty == 18 && name.starts_with(b"Xen") {
                    return Some(true);
                }
                let pad = |n: usize| (n + 3) & !3;
                at += 12 + pad(namesz) + pad(descsz);
            }
        }
        Some(false)
    })()
    .unwrap_or(false)
}

/// A module file's ELF bytes: distributions ship them plain or
/// compressed (`.ko.xz`, `.ko.zst`, `.ko.gz`); the guest gets them plain.
fn unpack_module(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>, VmError> {
    let name = path.to_string_lossy();
    let plain = if name.ends_with(".ko.xz") {
        let mut out = Vec::new();
        xz2::read::XzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map(|_| out)
    } else if name.ends_with(".ko.zst") {
        zstd::decode_all(&raw[..])
    } else if name.ends_with(".ko.gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map(|_| out)
    } else {
        Ok(raw)
    };
    plain.map_err(io_err("decompress module", path))
}

/// The marker the kernel's `sign-file` appends after a module's signature.
const SIGNATURE_MAGIC: &[u8] = b"~Module signature appended~\n";

/// A module without its appended signature, when it has a well-formed one:
/// the guest kernel then skips hashing and checking it (which under TCG
/// costs a noticeable part of a boot), loading it as an unsigned module
/// (allowed unless the kernel enforces signatures, which the guest kernel
/// of a run does not: the modules come from the same kernel package).
/// Anything else comes back as it is.
pub(crate) fn without_signature(mut ko: Vec<u8>) -> Vec<u8> {
    // struct module_signature: algo, hash, id_type, signer_len,
    // key_id_len, 3 pad bytes, sig_len (big-endian u32).
    const INFO: usize = 12;
    let Some(body) = ko.len().checked_sub(SIGNATURE_MAGIC.len()) else {
        return ko;
    };
    if &ko[body..] != SIGNATURE_MAGIC || body < INFO {
        return ko;
    }
    let info = &ko[body - INFO..body];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    let extra = usize::from(info[3]) + usize::from(info[4]);
    match (body - INFO).checked_sub(sig_len + extra) {
        Some(end) if ko.get(..4) == Some(b"\x7fELF") => {
            ko.truncate(end);
            ko
        }
        _ => ko,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_signature_is_cut_off_and_anything_else_kept() {
        let mut ko = b"\x7fELF module body".to_vec();
        let body = ko.clone();
        let sig = vec![0xab; 40];
        ko.extend(&sig);
        ko.extend([0, 0, 2, 0, 0, 0, 0, 0]);
        ko.extend((sig.len() as u32).to_be_bytes());
        ko.extend(SIGNATURE_MAGIC);
        assert_eq!(without_signature(ko.clone()), body);
        // A signature longer than the file, no marker, not ELF: unchanged.
        let mut bad = ko.clone();
        let n = bad.len() - SIGNATURE_MAGIC.len() - 4;
        bad[n..n + 4].copy_from_slice(&1000u32.to_be_bytes());
        assert_eq!(without_signature(bad.clone()), bad);
        assert_eq!(without_signature(body.clone()), body);
        let mut not_elf = ko.clone();
        not_elf[0] = b'X';
        assert_eq!(without_signature(not_elf.clone()), not_elf);
    }

    #[test]
    fn modules_come_after_their_dependencies() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/fs/btrfs/btrfs.ko: kernel/crypto/xor.ko kernel/lib/libcrc32c.ko\nkernel/crypto/xor.ko:\nkernel/lib/libcrc32c.ko: kernel/crypto/crc32c_generic.ko\nkernel/crypto/crc32c_generic.ko:\nkernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio.ko:\n",
        )
        .expect("write");
        let k = Kernel {
            image: PathBuf::from("/nonexistent"),
            modules: dir.path().to_path_buf(),
            in_tree: false,
        };
        let order = k
            .modules_for(&["virtio_blk", "btrfs", "no_such"])
            .expect("order");
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/block/virtio_blk.ko",
                "kernel/crypto/xor.ko",
                "kernel/crypto/crc32c_generic.ko",
                "kernel/lib/libcrc32c.ko",
                "kernel/fs/btrfs/btrfs.ko",
            ]
        );
        let none = Kernel {
            image: PathBuf::from("/nonexistent"),
            modules: dir.path().join("absent"),
            in_tree: false,
        };
        assert!(none.modules_for(&["virtio_blk"]).expect("none").is_empty());
    }

    /// The host's Debian kernel (xz payload) gives an ELF with the PVH
    /// note; garbage and a truncated header give nothing.
    #[test]
    fn the_host_kernel_unpacks_to_a_pvh_vmlinux() {
        let Ok(Some(k)) = Kernel::newest_in(Path::new("/")) else {
            panic!("this test needs the host's kernel in /boot (linux-image-amd64)");
        };
        let raw = fs::read(&k.image).expect("read kernel");
        let release = bzimage_release(&raw).expect("release");
        assert!(
            k.modules.ends_with(&release),
            "{release} vs {:?}",
            k.modules
        );
        let elf = vmlinux_of(&raw).expect("vmlinux");
        assert!(elf.len() > raw.len(), "uncompressed is bigger");
        assert!(has_pvh_note(&elf));
        assert!(vmlinux_of(&raw[..0x300]).is_none());
        assert!(vmlinux_of(b"not a kernel").is_none());
        assert!(!has_pvh_note(b"\x7fELF\x02garbage"));
        // The same kernel with a gzip, zstd or lz4 payload (as kernels
        // built with those compressors are: the stream, then its size)
        // gives the same vmlinux.
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, &elf).expect("gzip");
            e.finish().expect("gzip")
        };
        let zst = zstd::encode_all(&elf[..], 3).expect("zstd");
        for payload in [gz, zst] {
            let repacked = with_payload(&raw, &payload, elf.len());
            assert_eq!(vmlinux_of(&repacked).as_deref(), Some(&elf[..]));
        }
        // lz4 as the kernel frames it: blocks of 8 MiB at most.
        let mut lz4 = LZ4_LEGACY.to_le_bytes().to_vec();
        for chunk in elf.chunks(8 << 20) {
            let block = lz4_flex::block::compress(chunk);
            lz4.extend((block.len() as u32).to_le_bytes());
            lz4.extend(block);
        }
        let repacked = with_payload(&raw, &lz4, elf.len());
        assert_eq!(vmlinux_of(&repacked).as_deref(), Some(&elf[..]));
        // lz4 cut short, or with a wrong size word, and an unknown payload
        // (bzip2): booted as they are.
        let n = lz4.len();
        assert!(vmlinux_of(&with_payload(&raw, &lz4[..n / 2], elf.len())).is_none());
        assert!(vmlinux_of(&with_payload(&raw, &lz4, elf.len() - 1)).is_none());
        assert!(vmlinux_of(&with_payload(&raw, b"BZh91AY&SY", elf.len())).is_none());
    }

    /// `img` with its payload replaced by `payload` and the size word.
    fn with_payload(img: &[u8], payload: &[u8], size: usize) -> Vec<u8> {
        let setup = match img[0x1f1] {
            0 => 4,
            n => usize::from(n),
        };
        let start = (setup + 1) * 512 + u32_at(img, 0x248).expect("offset") as usize;
        let mut out = img[..start].to_vec();
        out.extend_from_slice(payload);
        out.extend_from_slice(&(size as u32).to_le_bytes());
        let len = (payload.len() + 4) as u32;
        out[0x24c..0x250].copy_from_slice(&len.to_le_bytes());
        out
    }
}
