//! amiprep controller: holds agent sessions and (in later versions) drives
//! promotions. The `amiprep` binary is a thin CLI over these modules.

pub mod admin;
pub mod attest;
pub mod certs;
pub mod client;
pub mod cloud;
pub mod config;
/// The module's former name, kept for callers not yet moved to [`cloud`].
pub use cloud as ec2;
pub mod gateway;
pub mod metrics;
pub mod naming;
pub mod pipeline;
pub mod registry;
pub mod server;
pub mod state;
pub mod store;
