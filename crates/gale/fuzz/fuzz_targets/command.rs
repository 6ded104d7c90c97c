//! Fuzz target `command`: arbitrary text through the gateway's command parser and the
//! replies built from it; see `checks::command`.

#![no_main]

use libfuzzer_sys::fuzz_target;

/// The gateway's client protocol, as `gale serve` compiles it.
#[allow(dead_code)]
#[path = "../../src/serve/protocol.rs"]
mod protocol;

#[path = "../checks/mod.rs"]
mod checks;

fuzz_target!(|data: &[u8]| {
    checks::command::check(data);
});
