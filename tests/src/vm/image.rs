//! The system tier's base disk: a copy of the cached Debian root shaped like
//! a cloud image (`AMIPREP_VM_ROOT`, from `scripts/test-env.sh`), with
//! amiprep's `.deb` installed and enabled as its packaged unit, turned into
//! an ext4 filesystem by `mkfs.ext4 -d` (no loop mount, no root-only mount)
//! and then into a qcow2 file that every instance's disk is a copy-on-write
//! overlay of.
//!
//! Built once per test process, in `TARGET/vm-image`, together with the PKI
//! its agent trusts: each test copies that PKI ([`crate::Pki::copy_of`]) and
//! runs its own controller with it.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{Context, ensure};

use crate::{Pki, PkiFiles, packages, run};

/// Size of the root filesystem: the root is ~1 GB; prepare and the logs of a
/// few boots need room on top of it.
const DISK_SIZE: &str = "3G";

/// Where the guest reaches the controller: qemu's `guestfwd` turns this
/// address into a connection to the controller on host loopback.
pub const GUEST_CONTROLLER: &str = "169.254.0.100:7443";

/// The base disk and what boots it.
pub struct BaseImage {
    pub dir: PathBuf,
    /// qcow2 with the whole root filesystem (no partition table).
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The PKI the image's agent trusts (CA, its certificate, the identity
    /// signer the controller checks documents against).
    pub pki: Pki,
}

/// The cached VM root (see the module docs).
pub fn cached_vm_root() -> PathBuf {
    std::env::var_os("AMIPREP_VM_ROOT")
        .map(PathBuf::from)
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            Some(PathBuf::from(home).join(".cache/amiprep-tests/debian-bookworm-vm"))
        })
        .filter(|p| p.join(".amiprep-complete").exists())
        .expect("the VM root is missing: run scripts/test-env.sh (or set AMIPREP_VM_ROOT)")
}

/// The base image, built on first use (see the module docs).
pub fn base_image() -> &'static BaseImage {
    static IMAGE: OnceLock<BaseImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = packages::target_dir().join("vm-image");
        build(&dir, &packages::packages().agent_deb)
            .unwrap_or_else(|e| panic!("building the VM image in {}: {e:#}", dir.display()))
    })
}

fn checked(cmd: &mut Command) -> anyhow::Result<()> {
    let out = run(cmd);
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        packages::output_text(&out)
    );
    Ok(())
}

/// Builds the image in `dir` (emptied first) with `agent_deb` installed.
pub fn build(dir: &Path, agent_deb: &Path) -> anyhow::Result<BaseImage> {
    let src = cached_vm_root();
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir)?;
    let pki = Pki::new();
    let root = dir.join("root");
    checked(Command::new("cp").arg("-a").arg(&src).arg(&root))?;
    // The image is what boots: no build markers in it.
    for marker in [".amiprep-complete", ".amiprep-debootstrapped"] {
        let _ = fs::remove_file(root.join(marker));
    }
    let boot = root.join(".amiprep-boot");
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.img");
    fs::rename(boot.join("vmlinuz"), &kernel)?;
    fs::rename(boot.join("initrd.img"), &initrd)?;
    fs::remove_dir_all(&boot)?;

    let name = agent_deb
        .file_name()
        .and_then(|n| n.to_str())
        .context("package file name")?;
    fs::copy(agent_deb, root.join("tmp").join(name))?;
    chroot(&root, &["dpkg", "-i", &format!("/tmp/{name}")])?;
    fs::remove_file(root.join("tmp").join(name))?;
    provision_agent(&root, &pki)?;
    // The package leaves its unit disabled until it is configured; this
    // image is configured, as an operator's base image would be.
    chroot(&root, &["systemctl", "enable", "amiprep-agent.service"])?;

    let raw = dir.join("root.raw");
    checked(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-E", "root_owner=0:0", "-d"])
            .arg(&root)
            .arg(&raw)
            .arg(DISK_SIZE),
    )?;
    let disk = dir.join("base.qcow2");
    checked(
        Command::new("qemu-img")
            .args(["convert", "-q", "-O", "qcow2"])
            .arg(&raw)
            .arg(&disk),
    )?;
    fs::remove_file(&raw)?;
    fs::remove_dir_all(&root)?;
    Ok(BaseImage {
        dir: dir.to_owned(),
        disk,
        kernel,
        initrd,
        pki,
    })
}

fn chroot(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    checked(
        Command::new("chroot")
            .arg(root)
            .args(args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LANG", "C.UTF-8")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Everything the image's agent is given to reach its controller: the
/// configuration (controller address as the guest sees it, the name in the
/// controller's certificate) and the TLS material. The one place that
/// decides what an image carries for the agent.
pub fn provision_agent(root: &Path, pki: &impl PkiFiles) -> anyhow::Result<()> {
    let etc = root.join("etc/amiprep");
    let pki_dir = etc.join("pki");
    fs::create_dir_all(&pki_dir)?;
    for (from, to) in [
        ("ca.pem", "ca.pem"),
        ("agent.pem", "agent.pem"),
        ("agent.key", "agent.key"),
    ] {
        fs::copy(pki.file(from), pki_dir.join(to))
            .with_context(|| format!("copying {from} into the image"))?;
    }
    fs::set_permissions(pki_dir.join("agent.key"), fs::Permissions::from_mode(0o600))?;
    fs::write(
        etc.join("agent.toml"),
        format!(
            "# Written by the system tests' image builder.\n\
             controller = \"{GUEST_CONTROLLER}\"\n\
             server_name = \"localhost\"\n\
             [tls]\nca = \"/etc/amiprep/pki/ca.pem\"\n\
             cert = \"/etc/amiprep/pki/agent.pem\"\n\
             key = \"/etc/amiprep/pki/agent.key\"\n\
             [identity]\nsource = \"imds\"\n\
             [session]\nreconnect_initial_ms = 500\nreconnect_max_ms = 5000\n"
        ),
    )?;
    Ok(())
}

/// `disk` as a new copy-on-write overlay of `backing`.
pub fn overlay(backing: &Path, disk: &Path) -> anyhow::Result<()> {
    checked(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(backing)
            .arg(disk),
    )
}
