//! `herald-loadtest` (work in progress, issue [4/6]).

fn main() {}
