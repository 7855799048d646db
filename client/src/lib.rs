//! Herald's Rust SDK (work in progress, issue [3/6]).
