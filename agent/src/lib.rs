//! amiprep agent library: everything `amiprep-agent` does, as modules the
//! binary and the tests share.

pub mod cli;
pub mod policy;
pub mod prepare;
pub mod safefs;
pub mod scan;
pub mod steps;
