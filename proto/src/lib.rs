//! The amiprep wire protocol and the TLS plumbing both ends share.
//!
//! Agent and controller speak gRPC over TLS 1.3 with client certificates on
//! both sides; keeping the rustls configuration here means the agent and the
//! controller cannot drift apart on versions, ALPN or certificate checks.

pub mod config;
pub mod logging;
pub mod tls;

/// Generated protobuf and gRPC code for package `amiprep.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("amiprep.v1");

    /// Encoded `FileDescriptorSet` of the protocol, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/amiprep_descriptor.bin"));
}

/// Version of this build, sent in `Hello` and shown by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
