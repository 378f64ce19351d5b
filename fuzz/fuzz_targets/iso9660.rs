//! Fuzz target: `kiln::disk::iso9660::fuzz_input` (opens the bytes and reads
//! everything, ignoring errors; any panic, hang or runaway allocation is a bug).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kiln::disk::iso9660::fuzz_input(data);
});
