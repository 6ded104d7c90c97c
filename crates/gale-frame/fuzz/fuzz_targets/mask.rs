//! Fuzz target `mask`: every masking kernel against the byte-by-byte definition; see
//! `checks::mask` for the input layout.

#![no_main]

use libfuzzer_sys::fuzz_target;

/// The checks shared with the regression test; each target uses only its own.
#[allow(dead_code)]
#[path = "../checks/mod.rs"]
mod checks;

fuzz_target!(|data: &[u8]| {
    checks::mask::check(data);
});
