//! `import --via-vm`: a file system kiln cannot read in userspace (xfs,
//! btrfs, ...) is mounted read-only inside a throwaway VM whose agent tars it
//! up; the tar is walked like any other source.

use std::io::Read;

use super::ImportError;
use crate::layer::{Entry, LayerError};
use crate::source::disk::ReadAt;

/// Boots a VM that tars the file system in `src` (of `mount` type `fstype`)
/// up, then walks the tar, calling `f` for every entry. `note` hears about
/// the slow steps (booting); `display` names the input in errors.
pub(crate) fn walk<E, F>(
    src: &dyn ReadAt,
    fstype: &str,
    vm: &crate::vm::VmOptions,
    display: &str,
    note: &mut dyn FnMut(&str),
    mut f: F,
) -> Result<(), E>
where
    E: From<ImportError>,
    F: FnMut(Entry, &mut dyn Read) -> Result<(), E>,
{
    let vm_err = |source: crate::vm::VmError| {
        E::from(ImportError::Vm {
            path: display.to_string(),
            source,
        })
    };
    let kernel = crate::vm::Kernel::find().map_err(vm_err)?;
    let mut out = crate::vm::export_tree(&kernel, src, fstype, vm, note).map_err(vm_err)?;
    let reader = out.reader().map_err(|e| {
        vm_err(crate::vm::VmError::Io {
            step: "read the guest's tar",
            path: "the VM's output disk".into(),
            source: e,
        })
    })?;
    let mut caller: Option<E> = None;
    let walked = crate::source::tarball::walk(reader, "the guest's tar", &mut |e, d, _| {
        // As with the ext reader: lost+found is housekeeping.
        if e.path == "lost+found" || e.path.starts_with("lost+found/") {
            return Ok(());
        }
        f(e, d).map_err(|err| {
            caller = Some(err);
            LayerError::Unsupported {
                path: "the guest's tar".into(),
                what: "stopped by the caller".into(),
            }
        })
    });
    if let Some(err) = caller {
        return Err(err);
    }
    walked.map_err(|e| E::from(ImportError::Layer(e)))
}
