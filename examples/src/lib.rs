//! Shared pieces of the examples: a small simulated mesh that hosts plugins
//! the way `pim-daemon` does.

pub mod mesh;

/// The README's Rust samples, compiled by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
