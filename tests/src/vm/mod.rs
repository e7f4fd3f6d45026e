//! The system tier's machinery: real qemu VMs in place of the directory
//! "instances" of [`crate::sim`].
//!
//! - [`image`]: the base disk, built once per test process from the cached
//!   Debian root shaped like a cloud image (`scripts/test-env.sh`), with
//!   amiprep's `.deb` installed and its configuration provisioned;
//! - [`qemu`]: one VM (KVM when it works, TCG otherwise), its serial console
//!   in a file, its QMP socket, user networking that reaches only the fake
//!   IMDS and the controller on host loopback;
//! - [`qmp`]: the few QMP commands the tests need;
//! - [`sim`]: the VM-backed instance simulator: moto stays EC2, and every
//!   instance moto reports is a VM.

pub mod image;
pub mod qemu;
pub mod qmp;
pub mod sim;
