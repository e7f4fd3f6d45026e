//! logs: rotated and compressed logs removed, active logs (wtmp, btmp and
//! lastlog included) truncated in place so owner, mode and labels stay, the
//! journal rotated and vacuumed (live) or its files removed (offline), and
//! cloud-init's logs removed.

use std::{os::unix::ffi::OsStrExt, path::Path};

use super::{Action, Cmd, Ctx, Op, Plan, Step, is_exdev, other_mount, plan_contents, show};
use crate::safefs::{self, Control, Event, Kind, WalkOptions};

pub struct Logs;

/// `syslog.1`, `syslog.2.gz`, `auth.log-20240101`, `*.gz|xz|bz2|zst|lz4|Z`,
/// `*.old`.
pub fn is_rotated(name: &[u8]) -> bool {
    const COMPRESSED: [&[u8]; 7] = [b".gz", b".xz", b".bz2", b".zst", b".lz4", b".Z", b".old"];
    if COMPRESSED
        .iter()
        .any(|s| name.ends_with(s) && name.len() > s.len())
    {
        return true;
    }
    let digits = name.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits == name.len() {
        return false;
    }
    let sep = name[name.len() - digits - 1];
    (sep == b'.' && digits <= 3) || (sep == b'-' && digits == 8)
}

fn is_cloud_init_log(name: &[u8]) -> bool {
    name == b"cloud-init.log" || name == b"cloud-init-output.log"
}

impl Step for Logs {
    fn name(&self) -> &'static str {
        "logs"
    }

    fn plan(&self, cx: &Ctx<'_>) -> Plan {
        let p = &cx.policy.logs;
        let mut plan = Plan::default();
        for dir in &p.dirs {
            let dir = match safefs::clean_rel(dir) {
                Ok(d) => d,
                Err(e) => {
                    plan.errors.push(e.to_string());
                    continue;
                }
            };
            let journal = dir.join("journal");
            let opts = WalkOptions {
                skip: vec![journal.clone()],
                ..Default::default()
            };
            let r = safefs::walk(cx.root, &dir, &opts, |ev| {
                match ev {
                    Event::Entry(e) if e.meta.kind == Kind::File => {
                        let n = e.name.as_bytes();
                        let rel = e.rel.to_path_buf();
                        if (p.cloud_init && is_cloud_init_log(n))
                            || (p.remove_rotated && is_rotated(n))
                        {
                            plan.actions.push(Action::new(Op::Remove(rel), e.meta.size));
                        } else if p.truncate_active && e.meta.size > 0 {
                            plan.actions
                                .push(Action::new(Op::Truncate(rel), e.meta.size));
                        }
                    }
                    Event::Entry(e) if e.meta.kind == Kind::Dir && e.rel == dir => {}
                    Event::Entry(_) => {}
                    Event::MountPoint { rel } if rel == dir => other_mount(cx, rel, &mut plan),
                    Event::MountPoint { rel } => plan
                        .warnings
                        .push(format!("{} is a mount point; left alone", show(rel))),
                    Event::Error { rel, error } => {
                        plan.errors.push(format!("{}: {error}", show(rel)))
                    }
                }
                Control::Continue
            });
            match r {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) if is_exdev(&e) => {
                    other_mount(cx, &dir, &mut plan);
                    continue;
                }
                Err(e) => {
                    plan.errors.push(format!("{}: {e}", show(&dir)));
                    continue;
                }
            }
            if p.journal && dir == Path::new("var/log") {
                if cx.live {
                    plan.actions.push(Action::new(
                        Op::Run(Cmd::new(["journalctl", "--rotate"])),
                        0,
                    ));
                    plan.actions.push(Action::new(
                        Op::Run(Cmd::new(["journalctl", "--vacuum-time=1s"])),
                        0,
                    ));
                } else {
                    plan_contents(cx, &journal, &[], &mut plan);
                }
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names() {
        for n in [
            "syslog.1",
            "syslog.2.gz",
            "auth.log-20240101",
            "dpkg.log.12",
            "x.xz",
            "messages.old",
            "apt/history.log.1.gz",
        ] {
            assert!(is_rotated(n.as_bytes()), "{n}");
        }
        for n in [
            "syslog", "wtmp", "lastlog", "kern.log", "1", "a.gz.log", "log.2024", ".gz",
        ] {
            assert!(!is_rotated(n.as_bytes()), "{n}");
        }
    }
}
