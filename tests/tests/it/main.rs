//! Cross-process tests: the real `amiprep` and `amiprep-agent` binaries over
//! real mTLS on 127.0.0.1. Helpers live in the `amiprep_tests` library.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod client;
mod config;
mod ec2;
mod ha;
mod identity;
mod packaging;
mod promote;
mod session;
mod system;
mod tls;
mod trust;
