//! # kiln
//!
//! A rootless, embeddable image-build sandbox runtime.
//!
//! kiln turns a toolchain root file system (a directory, a tarball, a
//! `docker save` or OCI archive) into an OCI image in a local store, so CI
//! jobs can build VM images and unikernels without root, loop devices or
//! mounts. The library is the product; the `kiln` binary is a thin layer over
//! it.
//!
//! The data flows as the modules are laid out:
//! [`source`] (inputs to entries) -> [`import`] (entries to a normalized,
//! compressed layer) -> [`store`] (an OCI image layout; export, gc).
//!
//! ```no_run
//! use kiln::{ImportOptions, ImportSource, Store};
//!
//! let store = Store::open(Store::default_path()?)?;
//! let report = store.import(ImportSource::Path("rootfs.tar".into()), &ImportOptions::new("toolchain"))?;
//! println!("imported {} as {}", report.name, report.manifest_digest);
//! store.export_to_path("toolchain", kiln::ExportFormat::OciArchive, "toolchain.tar".as_ref())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Running a build step in that image, in Linux namespaces:
//!
//! ```no_run
//! use kiln::{RunSpec, Sandbox, Store};
//!
//! // First thing in main(): kiln re-executes the program's own binary for
//! // the sandbox's setup, for work in the caller's id mapping and as a VM's
//! // guest agent; dispatch() hands such a start to its entry point and
//! // returns at once for an ordinary one.
//! kiln::helper::dispatch();
//!
//! let store = Store::open(Store::default_path()?)?;
//! let mut spec = RunSpec::new("toolchain");
//! spec.argv = Some(vec!["make".into(), "-C".into(), "/src".into()]);
//! spec.volumes.push("/srv/src:/src".parse()?);
//! let result = Sandbox::new(store).run(&spec)?;
//! println!("exit {} ({} warnings)", result.exit_code, result.warnings.len());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The library never prints: long operations report through a
//! callback (`Store::import_with_events`, `Sandbox::run_with_events`:
//! one style, `&mut dyn FnMut(EVENT)`) and `tracing`.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod digest;
mod gc;
pub mod helper;

pub mod import;
pub mod layer;
pub mod progress;
pub mod sandbox;
pub mod source;
pub mod spec;
pub mod store;
mod sys;
pub mod unpack;
pub mod userns;
pub mod vm;
pub mod words;

pub use import::{Compression, ImportError, ImportOptions, ImportReport, ImportSource};
pub use layer::codec::{Expansion, ExpansionLimits};
pub use progress::Event;
pub use sandbox::{RunError, RunEvent, RunResult, Sandbox, Stream};
/// The disk-image readers (ISO 9660, chunks, XVA, VHD, qcow2, MBR/GPT,
/// ext2/3/4) and their chain, which live in [`source::disk`].
pub use source::disk;
pub use spec::{Backend, NsOptions, RunSpec, SpecError, ValidSpec};
pub use store::{ExportFormat, Store, StoreError, StoreOptions};
