//! Checking logic shared by the fuzz targets and by the `fuzz_regressions` integration test,
//! so that a saved input is judged by exactly the code that fuzzed it.
//!
//! Only `gale-frame` and `std` are used here: the integration test builds this module on
//! stable Rust, without a fuzzer and without the fuzz crate's dependencies. Each submodule
//! documents how its target reads the raw input bytes, and every layout accepts any input.

pub mod decoder;
pub mod handshake;
pub mod mask;
pub mod roundtrip;
pub mod utf8;
