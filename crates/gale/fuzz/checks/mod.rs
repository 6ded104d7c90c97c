//! Checking logic shared by the fuzz target and by the `fuzz_regressions` integration test
//! of `gale`, so that a saved input is judged by exactly the code that fuzzed it.
//!
//! The includer compiles `src/serve/protocol.rs` as `crate::protocol`; only its dependencies
//! (serde, serde_json, base64) and `std` are used here.

pub mod command;
