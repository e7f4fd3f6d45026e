//! identity: everything that makes a host *this* host. machine-id to
//! first-boot state, D-Bus machine-id, SSH host keys (with regeneration at
//! first boot guaranteed), cloud-init instance state, DHCP leases, udev
//! persistent-net rules, systemd random seed and credential secret, and the
//! hostname per policy.

use std::{
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use super::{Action, Ctx, Op, Plan, Step, exists, list_dir, plan_contents, plan_remove_file};
use crate::safefs::{self, Kind};

pub struct Identity;

/// systemd's first-boot marker: with it, systemd treats the boot as the
/// first (presets applied, `ConditionFirstBoot=` true) and writes a fresh id.
/// An empty file also yields a fresh id but is not treated as first boot by
/// every systemd version; see docs/PREPARE.md.
pub const MACHINE_ID_FIRST_BOOT: &[u8] = b"uninitialized\n";

pub const KEYGEN_UNIT: &str = "amiprep-ssh-keygen.service";
pub const KEYGEN_UNIT_TEXT: &str = "\
# Installed by amiprep: this image had its SSH host keys removed, and nothing
# else on it regenerates them at first boot.
[Unit]
Description=Generate SSH host keys (first boot of an amiprep image)
Before=ssh.service sshd.service
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
";

fn is_host_key(name: &[u8]) -> bool {
    name.starts_with(b"ssh_host_")
        && (name.ends_with(b"_key") || name.ends_with(b"_key.pub") || name.ends_with(b"-cert.pub"))
}

/// Who regenerates SSH host keys at first boot, if anyone.
fn key_regenerator(cx: &Ctx<'_>) -> Option<&'static str> {
    let any = |paths: &[&str]| paths.iter().any(|p| exists(cx, p));
    if any(&["usr/bin/cloud-init"]) && any(&["etc/cloud/cloud.cfg"]) {
        return Some("cloud-init");
    }
    if any(&[
        "usr/lib/systemd/system/sshd-keygen@.service",
        "usr/lib/systemd/system/sshd-keygen.service",
        "usr/lib/systemd/system/sshd-keygen.target",
    ]) {
        return Some("sshd-keygen");
    }
    if any(&[&format!("etc/systemd/system/{KEYGEN_UNIT}")]) {
        return Some("amiprep first-boot unit");
    }
    None
}

impl Step for Identity {
    fn name(&self) -> &'static str {
        "identity"
    }

    fn plan(&self, cx: &Ctx<'_>) -> Plan {
        let p = &cx.policy.identity;
        let mut plan = Plan::default();

        if p.machine_id {
            let rel = Path::new("etc/machine-id");
            match safefs::read_beneath(cx.root, rel, 64) {
                Ok(c) if c == MACHINE_ID_FIRST_BOOT => {}
                _ => plan.actions.push(Action::new(
                    Op::Write {
                        rel: rel.into(),
                        contents: MACHINE_ID_FIRST_BOOT.to_vec(),
                        mode: 0o444,
                    },
                    MACHINE_ID_FIRST_BOOT.len() as u64,
                )),
            }
            // Often a link to /etc/machine-id: a link is left alone.
            plan_remove_file(cx, Path::new("var/lib/dbus/machine-id"), false, &mut plan);
        }

        if p.ssh_host_keys {
            plan_ssh(cx, &mut plan);
        }

        if p.cloud_init {
            plan_contents(cx, Path::new("var/lib/cloud"), &["seed"], &mut plan);
        }

        if p.dhcp_leases {
            for dir in [
                "var/lib/dhcp",
                "var/lib/dhclient",
                "var/lib/NetworkManager",
                "var/lib/systemd/network",
                "run/systemd/netif/leases",
            ] {
                for (rel, m) in list_dir(cx, Path::new(dir)) {
                    let name = rel.file_name().map(|n| n.as_bytes()).unwrap_or_default();
                    let is_lease =
                        dir.ends_with("leases") || name.windows(5).any(|w| w == b"lease");
                    if is_lease && m.kind == Kind::File {
                        plan.actions.push(Action::new(Op::Remove(rel), m.size));
                    }
                }
            }
        }

        if p.udev_persistent_net {
            for f in [
                "etc/udev/rules.d/70-persistent-net.rules",
                "etc/udev/rules.d/75-persistent-net-generator.rules",
            ] {
                plan_remove_file(cx, Path::new(f), true, &mut plan);
            }
        }

        if p.random_seed {
            for f in [
                "var/lib/systemd/random-seed",
                "var/lib/systemd/credential.secret",
            ] {
                plan_remove_file(cx, Path::new(f), false, &mut plan);
            }
        }

        if let Some(h) = &p.hostname {
            let want = format!("{h}\n").into_bytes();
            let rel = Path::new("etc/hostname");
            if safefs::read_beneath(cx.root, rel, 256).ok().as_deref() != Some(&want[..]) {
                let n = want.len() as u64;
                plan.actions.push(Action::new(
                    Op::Write {
                        rel: rel.into(),
                        contents: want,
                        mode: 0o644,
                    },
                    n,
                ));
            }
        }
        plan
    }
}

fn plan_ssh(cx: &Ctx<'_>, plan: &mut Plan) {
    let keys: Vec<PathBuf> = list_dir(cx, Path::new("etc/ssh"))
        .into_iter()
        .filter(|(rel, m)| {
            matches!(m.kind, Kind::File | Kind::Symlink)
                && rel.file_name().is_some_and(|n| is_host_key(n.as_bytes()))
        })
        .map(|(rel, _)| rel)
        .collect();
    let sshd = exists(cx, "etc/ssh/sshd_config") || exists(cx, "usr/sbin/sshd");
    if keys.is_empty() && !sshd {
        return;
    }
    if key_regenerator(cx).is_none() {
        let systemd = exists(cx, "usr/lib/systemd/systemd") || exists(cx, "lib/systemd/systemd");
        let keygen = exists(cx, "usr/bin/ssh-keygen");
        if cx.policy.identity.install_ssh_keygen_unit && systemd && keygen {
            let unit = PathBuf::from("etc/systemd/system").join(KEYGEN_UNIT);
            plan.actions.push(
                Action::new(
                    Op::Write {
                        rel: unit.clone(),
                        contents: KEYGEN_UNIT_TEXT.as_bytes().to_vec(),
                        mode: 0o644,
                    },
                    KEYGEN_UNIT_TEXT.len() as u64,
                )
                .note("first-boot SSH host key generation"),
            );
            plan.actions.push(Action::new(
                Op::Symlink {
                    rel: PathBuf::from("etc/systemd/system/multi-user.target.wants")
                        .join(KEYGEN_UNIT),
                    target: PathBuf::from("/").join(&unit),
                },
                0,
            ));
        } else if !keys.is_empty() {
            let why = if !systemd {
                "the image has no systemd to run a first-boot unit"
            } else if !keygen {
                "the image has no /usr/bin/ssh-keygen"
            } else {
                "identity.install_ssh_keygen_unit is false"
            };
            plan.errors.push(format!(
                "SSH host keys not removed: nothing regenerates them at first boot \
                 (no cloud-init, no sshd-keygen) and {why}; install cloud-init, or set \
                 identity.ssh_host_keys = false"
            ));
            return;
        }
    }
    for k in keys {
        plan_remove_file(cx, &k, true, plan);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_key_names() {
        for n in [
            "ssh_host_rsa_key",
            "ssh_host_ed25519_key.pub",
            "ssh_host_rsa_key-cert.pub",
        ] {
            assert!(is_host_key(n.as_bytes()), "{n}");
        }
        for n in [
            "sshd_config",
            "ssh_config",
            "moduli",
            "ssh_host_rsa_key.bak",
        ] {
            assert!(!is_host_key(n.as_bytes()), "{n}");
        }
    }
}
