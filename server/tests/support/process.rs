//! The real `herald` binary as a child process: see `herald_testkit::process`.

#![allow(unused_imports)]

pub use herald_testkit::process::*;
