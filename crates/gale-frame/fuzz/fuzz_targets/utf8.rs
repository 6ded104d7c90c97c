//! Fuzz target `utf8`: streaming UTF-8 validation of text cut into pieces against
//! `std::str::from_utf8`; see `checks::utf8` for the input layout.

#![no_main]

use libfuzzer_sys::fuzz_target;

/// The checks shared with the regression test; each target uses only its own.
#[allow(dead_code)]
#[path = "../checks/mod.rs"]
mod checks;

fuzz_target!(|data: &[u8]| {
    checks::utf8::check(data);
});
