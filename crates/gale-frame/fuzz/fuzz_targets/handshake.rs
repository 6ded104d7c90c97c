//! Fuzz target `handshake`: arbitrary bytes as an upgrade request and as a handshake
//! response; see `checks::handshake`.

#![no_main]

use libfuzzer_sys::fuzz_target;

/// The checks shared with the regression test; each target uses only its own.
#[allow(dead_code)]
#[path = "../checks/mod.rs"]
mod checks;

fuzz_target!(|data: &[u8]| {
    checks::handshake::check(data);
});
