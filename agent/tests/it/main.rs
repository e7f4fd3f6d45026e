//! amiprep-agent integration tests: the real binary against copies of a
//! debootstrapped Debian root (see `scripts/test-env.sh`).

#![allow(clippy::unwrap_used, clippy::undocumented_unsafe_blocks)]

mod cli;
mod packages;
mod prepare;
mod util;
