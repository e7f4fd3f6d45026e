//! One qemu VM: direct kernel boot of a qcow2 disk, serial console to a
//! file, a QMP socket, and user networking with `restrict=on`, so the guest
//! reaches nothing but what is forwarded:
//! - `169.254.169.254:80` → the instance's fake IMDS on host loopback,
//!   through `guestfwd-relay`, one process per guest connection,
//! - [`GUEST_CONTROLLER`] → the controller's agent port on host loopback,
//! - guest port 22 ← `127.0.0.1:PORT` on the host (`hostfwd`).
//!
//! The virtual network is 169.254.0.0/16 (not slirp's default 10.0.2.0/24):
//! qemu only forwards guest connections to addresses inside its own network,
//! and the metadata address must be the real one.
//!
//! KVM is used when a KVM vCPU with `-cpu host` can be created (probed once
//! per process); otherwise TCG. Nested KVM whose host hides MSRs fails that
//! probe, and a KVM vCPU with those features masked was seen to hang before
//! the kernel's first line, so there is no half-way mode. The process is
//! killed by its pid when the [`Vm`] is dropped.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use anyhow::Context;

use super::{image::GUEST_CONTROLLER, qmp::Qmp};
use crate::{Proc, free_port, wait_for};

/// How the kernel mounts the root before systemd remounts it from fstab:
/// Debian's cloud images boot `ro`; some images boot `rw`. First boot must
/// end the same either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootMode {
    Ro,
    Rw,
}

/// What one VM boots and where it is reachable.
pub struct VmSpec<'a> {
    pub name: &'a str,
    /// The instance's own disk (an overlay).
    pub disk: &'a Path,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub root_mode: RootMode,
    /// Host loopback ports the guest's forwards lead to.
    pub imds_port: u16,
    pub controller_port: u16,
    /// Serial log, QMP socket and qemu's own log go here.
    pub dir: &'a Path,
    pub memory_mb: u32,
}

pub struct Vm {
    pub name: String,
    pub proc: Proc,
    pub qmp: PathBuf,
    pub serial: PathBuf,
    /// Host port forwarded to the guest's port 22 (on 127.0.0.1).
    pub ssh_port: u16,
}

/// `-accel` and `-cpu` for this machine (see the module docs).
pub fn accel() -> &'static [&'static str] {
    static ACCEL: OnceLock<&'static [&'static str]> = OnceLock::new();
    ACCEL.get_or_init(|| {
        if kvm_works() {
            &["-accel", "kvm", "-cpu", "host"]
        } else {
            &["-accel", "tcg", "-cpu", "max"]
        }
    })
}

/// Creates a paused KVM VM with `-cpu host` and quits it through QMP.
fn kvm_works() -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let child = Command::new("qemu-system-x86_64")
        .args(["-accel", "kvm", "-cpu", "host", "-m", "128", "-S"])
        .args(["-display", "none", "-nodefaults", "-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
    }
    let done = wait_for(Duration::from_secs(60), || child.try_wait().ok().flatten());
    match done {
        Some(status) => status.success(),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            false
        }
    }
}

/// An SMBIOS system UUID starting with `ec2`, as on EC2's Xen and Nitro
/// instances. cloud-init identifies AWS (and then speaks IMDSv2) when the
/// UUID starts with `ec2` and equals the system serial number.
fn ec2_uuid() -> String {
    let hex = format!("{:032x}", rand::random::<u128>());
    format!(
        "ec2{}-{}-{}-{}-{}",
        &hex[3..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

impl Vm {
    pub fn start(spec: &VmSpec<'_>) -> anyhow::Result<Vm> {
        std::fs::create_dir_all(spec.dir)?;
        let serial = spec.dir.join(format!("{}-serial.log", spec.name));
        let qmp = spec.dir.join(format!("{}-qmp.sock", spec.name));
        let _ = std::fs::remove_file(&qmp);
        let ssh_port = free_port();
        let mode = match spec.root_mode {
            RootMode::Ro => "ro",
            RootMode::Rw => "rw",
        };
        let netdev = format!(
            "user,id=net0,restrict=on,\
             net=169.254.0.0/16,host=169.254.0.1,dns=169.254.0.3,dhcpstart=169.254.0.15,\
             hostfwd=tcp:127.0.0.1:{ssh_port}-:22,\
             guestfwd=tcp:169.254.169.254:80-cmd:{relay} 127.0.0.1:{imds},\
             guestfwd=tcp:{GUEST_CONTROLLER}-cmd:{relay} 127.0.0.1:{ctl}",
            relay = crate::bin("guestfwd-relay").display(),
            imds = spec.imds_port,
            ctl = spec.controller_port,
        );
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(accel())
            .args(["-m", &spec.memory_mb.to_string(), "-smp", "1"])
            .args(["-display", "none", "-no-reboot", "-nodefaults"])
            .arg("-kernel")
            .arg(spec.kernel)
            .arg("-initrd")
            .arg(spec.initrd)
            .arg("-append")
            .arg(format!(
                "root=/dev/vda {mode} console=ttyS0 net.ifnames=0 systemd.show_status=1"
            ))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2,cache=unsafe",
                spec.disk.display()
            ))
            .args(["-netdev", &netdev, "-device", "virtio-net-pci,netdev=net0"])
            .args(["-device", "virtio-rng-pci"])
            .arg("-smbios")
            .arg({
                let uuid = ec2_uuid();
                format!("type=1,manufacturer=Amazon EC2,product=t3.micro,uuid={uuid},serial={uuid}")
            })
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        let mut proc = Proc::spawn(
            &format!("qemu {}", spec.name),
            cmd,
            spec.dir.join(format!("{}-qemu.log", spec.name)),
        );
        let up = wait_for(Duration::from_secs(60), || {
            if !proc.is_running() {
                return Some(false);
            }
            qmp.exists().then_some(true)
        });
        anyhow::ensure!(
            up == Some(true),
            "qemu for {} did not start:\n{}",
            spec.name,
            proc.log_text()
        );
        Ok(Vm {
            name: spec.name.to_owned(),
            proc,
            qmp,
            serial,
            ssh_port,
        })
    }

    pub fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// ACPI power button through QMP, then waits for qemu to exit (the guest
    /// shut down cleanly: `-no-reboot`, and poweroff ends qemu).
    pub fn shutdown(&mut self, timeout: Duration) -> anyhow::Result<()> {
        Qmp::connect(&self.qmp)
            .and_then(|mut q| q.execute("system_powerdown", None))
            .with_context(|| format!("powering down {}", self.name))?;
        self.proc
            .wait_exit(timeout)
            .with_context(|| format!("{} did not power off within {timeout:?}", self.name))?;
        Ok(())
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }
}
