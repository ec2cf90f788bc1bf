//! Shared pieces of the examples: a small simulated mesh that hosts plugins
//! the way `pim-daemon` does.

pub mod mesh;
