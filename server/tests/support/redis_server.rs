//! Real `redis-server` processes: see `herald_testkit::redis`.

#![allow(unused_imports)]

pub use herald_testkit::redis::*;
