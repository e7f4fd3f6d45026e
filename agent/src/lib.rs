//! amiprep agent library: everything `amiprep-agent` does, as modules the
//! binary and the tests share.

pub mod cli;
pub mod config;
pub mod imds;
pub mod osinfo;
pub mod policy;
pub mod prepare;
pub mod requests;
pub mod safefs;
pub mod scan;
pub mod session;
pub mod steps;
pub mod verify;
