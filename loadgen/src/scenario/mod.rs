//! The scenarios, one folder each: `mod.rs` turns the command-line options into a run and a
//! report, `driver.rs` is what every connection does during the run.

pub mod connect;
pub mod echo;
pub mod fanout;
pub mod storm;
