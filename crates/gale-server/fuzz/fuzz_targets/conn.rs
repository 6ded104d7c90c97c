//! Fuzz target `conn`: arbitrary client bytes, cut at arbitrary points, through one
//! connection's state machine; see `checks::conn` for the input layout and the invariants.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks/mod.rs"]
mod checks;

fuzz_target!(|data: &[u8]| {
    checks::conn::check(data);
});
