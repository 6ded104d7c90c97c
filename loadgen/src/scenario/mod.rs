//! Scenario drivers.

pub mod connect;
pub mod echo;
pub mod fanout;
