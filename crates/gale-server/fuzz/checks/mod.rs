//! Checking logic shared by the fuzz target and by the `fuzz_regressions` integration test,
//! so that a saved input is judged by exactly the code that fuzzed it.
//!
//! Only `gale-server` (with its `fuzzing` feature), `gale-frame` and `std` are used here: the
//! integration test builds this module on stable Rust, without a fuzzer.

pub mod conn;
