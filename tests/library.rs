//! The library used directly, as an embedder would: `Sandbox::run_with_events`.

mod common;

use common::*;
use kiln::sandbox::{RunEvent, Sandbox, Stream};
use kiln::spec::RunSpec;

#[test]
fn run_with_events_streams_output_and_state() {
    let k = Kiln::new();
    let tar = busybox_tar(k.dir.path());
    k.import(&tar, "bb", &[]);
    let store = kiln::Store::open(k.store()).expect("open store");
    let sandbox = Sandbox::new(store).with_helper(kiln_bin());
    let mut spec = RunSpec::new("bb");
    spec.argv = Some(vec![
        "sh".into(),
        "-c".into(),
        "echo out; echo err >&2; head -c 1000000 /dev/zero | tr '\\0' y; exit 3".into(),
    ]);
    let (mut out, mut err, mut started) = (Vec::new(), Vec::new(), false);
    let result = sandbox
        .run_with_events(&spec, &mut |e| match e {
            RunEvent::Started { pid } => started = pid > 0,
            RunEvent::Output {
                stream: Stream::Stdout,
                data,
            } => out.extend_from_slice(data),
            RunEvent::Output {
                stream: Stream::Stderr,
                data,
            } => err.extend_from_slice(data),
            _ => {}
        })
        .expect("run");
    assert!(started);
    assert_eq!(result.exit_code, 3);
    assert_eq!(out.len(), 4 + 1_000_000, "every byte of stdout arrives");
    assert!(out.starts_with(b"out\nyyy"));
    assert_eq!(err, b"err\n");
    // Invalid specs are refused before anything starts.
    let mut bad = RunSpec::new("bb");
    bad.workdir = Some("relative".into());
    assert!(sandbox.run(&bad).is_err());
}
