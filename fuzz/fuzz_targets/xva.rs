//! Fuzz target: `kiln::disk::xva::fuzz_input` (opens the bytes and reads
//! everything, ignoring errors; any panic, hang or runaway allocation is a bug).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kiln::disk::xva::fuzz_input(data);
});
