//! packages: refresh and upgrade non-interactively (existing config files
//! kept, the package lock waited for, needrestart silenced), optionally from
//! security sources only; report every upgraded package (old → new) and
//! whether a reboot is required; then clean the package caches. apt and dnf
//! are supported, yum as a fallback. Offline, the package manager runs
//! chrooted into the target.

use std::{collections::BTreeMap, os::unix::ffi::OsStrExt, path::Path};

use serde::Serialize;

use super::{
    Action, Cmd, Ctx, Op, Plan, ProgressEvent, Step, StepReport, apply_actions, exists, list_dir,
    run,
};
use crate::{policy::PackagesPolicy, safefs};

pub struct Packages;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Manager {
    Apt,
    Dnf,
    Yum,
}

/// Where apt reads the security-only source list (inside the target; not in
/// `sources.list.d`, so apt ignores it otherwise). Removed after the upgrade.
pub const APT_SECURITY_LIST: &str = "etc/apt/amiprep-security.list";

pub fn detect(cx: &Ctx<'_>) -> Option<Manager> {
    if exists(cx, "usr/bin/apt-get") {
        Some(Manager::Apt)
    } else if exists(cx, "usr/bin/dnf") || exists(cx, "usr/bin/dnf5") {
        Some(Manager::Dnf)
    } else if exists(cx, "usr/bin/yum") {
        Some(Manager::Yum)
    } else {
        None
    }
}

const APT_ENV: [(&str, &str); 5] = [
    ("DEBIAN_FRONTEND", "noninteractive"),
    // needrestart: list only, never prompt or restart services.
    ("NEEDRESTART_MODE", "l"),
    ("NEEDRESTART_SUSPEND", "1"),
    ("APT_LISTCHANGES_FRONTEND", "none"),
    ("UCF_FORCE_CONFFOLD", "1"),
];

fn apt(args: &[&str], p: &PackagesPolicy) -> Cmd {
    let mut argv: Vec<String> = vec!["apt-get".into(), "-q".into()];
    argv.push("-o".into());
    argv.push(format!("DPkg::Lock::Timeout={}", p.lock_timeout_secs));
    if p.security_only {
        argv.push("-o".into());
        argv.push(format!("Dir::Etc::SourceList=/{APT_SECURITY_LIST}"));
        argv.push("-o".into());
        argv.push("Dir::Etc::SourceParts=-".into());
    }
    argv.extend(args.iter().map(|s| s.to_string()));
    let mut c = Cmd::new(argv).in_target();
    for (k, v) in APT_ENV {
        c = c.env(k, v);
    }
    c
}

/// The commands for `m` under policy `p`, in order: refresh (apt only),
/// upgrade, clean.
pub fn commands(m: Manager, p: &PackagesPolicy) -> Vec<Cmd> {
    let mut out = Vec::new();
    match m {
        Manager::Apt => {
            if p.upgrade {
                out.push(apt(&["update"], p));
                out.push(apt(
                    &[
                        "-y",
                        "-o",
                        "Dpkg::Options::=--force-confdef",
                        "-o",
                        "Dpkg::Options::=--force-confold",
                        "upgrade",
                        "--with-new-pkgs",
                    ],
                    p,
                ));
            }
            if p.clean_cache {
                out.push(apt(&["clean"], p));
            }
        }
        Manager::Dnf | Manager::Yum => {
            let bin = if m == Manager::Dnf { "dnf" } else { "yum" };
            if p.upgrade {
                // rpm keeps modified config files (.rpmnew) without asking.
                let mut argv = vec![bin, "-y", "--refresh", "upgrade"];
                if p.security_only {
                    argv.push("--security");
                }
                out.push(Cmd::new(argv).in_target());
            }
            if p.clean_cache {
                out.push(Cmd::new([bin, "clean", "all"]).in_target());
            }
        }
    }
    out
}

/// The command listing installed packages as `name<TAB>version` lines.
pub fn snapshot_cmd(m: Manager) -> Cmd {
    match m {
        Manager::Apt => Cmd::new([
            "dpkg-query",
            "-W",
            "-f=${db:Status-Abbrev}\t${Package}:${Architecture}\t${Version}\n",
        ])
        .in_target(),
        Manager::Dnf | Manager::Yum => Cmd::new([
            "rpm",
            "-qa",
            "--qf",
            "%{NAME}.%{ARCH}\t%{EPOCHNUM}:%{VERSION}-%{RELEASE}\n",
        ])
        .in_target(),
    }
}

/// Parses [`snapshot_cmd`] output into package → version. For dpkg only
/// installed packages (`ii`) count.
pub fn parse_snapshot(m: Manager, out: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in out.lines() {
        let mut f = line.split('\t');
        let (name, ver) = match m {
            Manager::Apt => match (f.next(), f.next(), f.next()) {
                (Some(st), Some(n), Some(v)) if st.trim_end() == "ii" => (n, v),
                _ => continue,
            },
            Manager::Dnf | Manager::Yum => match (f.next(), f.next()) {
                (Some(n), Some(v)) => (n, v),
                _ => continue,
            },
        };
        if !name.is_empty() && !ver.is_empty() {
            map.insert(name.to_string(), ver.to_string());
        }
    }
    map
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Upgrade {
    pub package: String,
    /// `None` for a newly installed package.
    pub old: Option<String>,
    pub new: String,
}

pub fn diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<Upgrade> {
    after
        .iter()
        .filter(|(n, v)| before.get(*n) != Some(v))
        .map(|(n, v)| Upgrade {
            package: n.clone(),
            old: before.get(n).cloned(),
            new: v.clone(),
        })
        .collect()
}

/// `needs-restarting -r`: exit 1 means a reboot is required, 0 that it is
/// not; anything else (missing tool) is unknown.
pub fn parse_needs_restarting(code: Option<i32>) -> Option<bool> {
    match code {
        Some(0) => Some(false),
        Some(1) => Some(true),
        _ => None,
    }
}

pub fn needs_restarting_cmd(cx: &Ctx<'_>) -> Cmd {
    if exists(cx, "usr/bin/needs-restarting") {
        Cmd::new(["needs-restarting", "-r"]).in_target()
    } else {
        Cmd::new(["dnf", "needs-restarting", "-r"]).in_target()
    }
}

/// Source lines (one-line format) or deb822 stanzas that name a security
/// suite.
pub fn security_sources(text: &str) -> String {
    let mut out = String::new();
    if text.lines().any(|l| l.trim_start().starts_with("Types:")) {
        for stanza in text.split("\n\n") {
            if stanza
                .lines()
                .any(|l| l.trim_start().starts_with("Suites:") && l.contains("security"))
            {
                out.push_str(stanza.trim());
                out.push_str("\n\n");
            }
        }
    } else {
        for l in text.lines() {
            let t = l.trim();
            if !t.starts_with('#') && t.starts_with("deb") && t.contains("security") {
                out.push_str(t);
                out.push('\n');
            }
        }
    }
    out
}

fn apt_security_list(cx: &Ctx<'_>) -> String {
    let mut all = String::new();
    let mut files = vec![Path::new("etc/apt/sources.list").to_path_buf()];
    files.extend(
        list_dir(cx, Path::new("etc/apt/sources.list.d"))
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| {
                let n = p.file_name().map(|n| n.as_bytes()).unwrap_or_default();
                n.ends_with(b".list") || n.ends_with(b".sources")
            }),
    );
    for f in files {
        if let Ok(b) = safefs::read_beneath(cx.root, &f, 1 << 20) {
            all.push_str(&security_sources(&String::from_utf8_lossy(&b)));
            all.push('\n');
        }
    }
    all
}

/// Every package-manager command gets the policy's time limit.
fn limited(cmds: Vec<Cmd>, p: &PackagesPolicy) -> Vec<Cmd> {
    let t = std::time::Duration::from_secs(p.command_timeout_secs.max(1));
    cmds.into_iter().map(|c| c.timeout(t)).collect()
}

impl Step for Packages {
    fn name(&self) -> &'static str {
        "packages"
    }

    fn plan(&self, cx: &Ctx<'_>) -> Plan {
        let p = &cx.policy.packages;
        let mut plan = Plan::default();
        let Some(m) = detect(cx) else {
            plan.errors
                .push("no supported package manager (apt-get, dnf, yum) in the target".into());
            return plan;
        };
        if m == Manager::Apt && p.security_only && p.upgrade {
            let list = apt_security_list(cx);
            if list.trim().is_empty() {
                plan.errors
                    .push("packages.security_only: no security source in the apt sources".into());
                return plan;
            }
            plan.actions.push(Action::new(
                Op::Write {
                    rel: APT_SECURITY_LIST.into(),
                    contents: list.into_bytes(),
                    mode: 0o644,
                },
                0,
            ));
        }
        for c in limited(commands(m, p), p) {
            plan.actions.push(Action::new(Op::Run(c), 0));
        }
        if m == Manager::Apt && p.security_only && p.upgrade {
            plan.actions
                .push(Action::new(Op::Remove(APT_SECURITY_LIST.into()), 0));
        }
        plan
    }

    fn apply(
        &self,
        cx: &Ctx<'_>,
        plan: Plan,
        out: &mut StepReport,
        progress: &mut dyn FnMut(ProgressEvent),
    ) {
        let Some(m) = detect(cx) else {
            return apply_actions(cx, plan.actions, self.name(), out, progress);
        };
        let snapshot = |what: &str, out: &mut StepReport| match run(cx, &snapshot_cmd(m)) {
            Ok(o) if o.success => Some(parse_snapshot(m, &o.stdout)),
            Ok(o) => {
                out.warnings
                    .push(format!("package list {what}: exited with {}", o.status));
                None
            }
            Err(e) => {
                out.warnings.push(format!("package list {what}: {e}"));
                None
            }
        };
        let before = snapshot("before", out);
        apply_actions(cx, plan.actions, self.name(), out, progress);
        let after = snapshot("after", out);
        out.details.insert("manager".into(), serde_json::json!(m));
        if let (Some(b), Some(a)) = (before, after) {
            out.details
                .insert("upgraded".into(), serde_json::json!(diff(&b, &a)));
        }
        let reboot = match m {
            Manager::Apt => {
                Some(exists(cx, "run/reboot-required") || exists(cx, "var/run/reboot-required"))
            }
            Manager::Dnf | Manager::Yum => run(cx, &needs_restarting_cmd(cx))
                .ok()
                .and_then(|o| parse_needs_restarting(o.code)),
        };
        out.details
            .insert("reboot_required".into(), serde_json::json!(reboot));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dnf_commands() {
        let mut p = PackagesPolicy::default();
        let c = commands(Manager::Dnf, &p);
        assert_eq!(c[0].argv, ["dnf", "-y", "--refresh", "upgrade"]);
        assert_eq!(c[1].argv, ["dnf", "clean", "all"]);
        assert!(c.iter().all(|c| c.chroot));
        p.security_only = true;
        let c = commands(Manager::Dnf, &p);
        assert_eq!(
            c[0].argv,
            ["dnf", "-y", "--refresh", "upgrade", "--security"]
        );
        let c = commands(Manager::Yum, &p);
        assert_eq!(
            c[0].argv,
            ["yum", "-y", "--refresh", "upgrade", "--security"]
        );
        p.upgrade = false;
        p.clean_cache = false;
        assert!(commands(Manager::Dnf, &p).is_empty());
    }

    #[test]
    fn apt_commands_are_noninteractive_and_wait_for_the_lock() {
        let p = PackagesPolicy {
            lock_timeout_secs: 42,
            ..Default::default()
        };
        let c = commands(Manager::Apt, &p);
        assert_eq!(c.len(), 3);
        let up = &c[1];
        assert!(up.argv.contains(&"DPkg::Lock::Timeout=42".to_string()));
        assert!(
            up.argv
                .contains(&"Dpkg::Options::=--force-confold".to_string())
        );
        assert!(up.argv.contains(&"-y".to_string()));
        assert!(
            up.env
                .contains(&("DEBIAN_FRONTEND".into(), "noninteractive".into()))
        );
        assert!(up.env.contains(&("NEEDRESTART_MODE".into(), "l".into())));
        assert_eq!(c[2].argv.last().unwrap(), "clean");
    }

    #[test]
    fn rpm_snapshot_and_diff() {
        let before = parse_snapshot(
            Manager::Dnf,
            "bash.x86_64\t0:5.2.15-5.el9\nopenssl.x86_64\t1:3.0.7-24.el9\ngpg-pubkey.(none)\t0:fd431d51-4ae0493b\n",
        );
        let after = parse_snapshot(
            Manager::Dnf,
            "bash.x86_64\t0:5.2.15-5.el9\nopenssl.x86_64\t1:3.0.7-27.el9\nkernel.x86_64\t0:5.14.0-1\nbroken line\n",
        );
        assert_eq!(before.len(), 3);
        assert_eq!(
            diff(&before, &after),
            vec![
                Upgrade {
                    package: "kernel.x86_64".into(),
                    old: None,
                    new: "0:5.14.0-1".into()
                },
                Upgrade {
                    package: "openssl.x86_64".into(),
                    old: Some("1:3.0.7-24.el9".into()),
                    new: "1:3.0.7-27.el9".into()
                },
            ]
        );
    }

    #[test]
    fn dpkg_snapshot_counts_installed_only() {
        let m = parse_snapshot(
            Manager::Apt,
            "ii \tbash:amd64\t5.2.15-2+b2\nrc \told:amd64\t1.0\nii \thello:all\t1.0\n",
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m["hello:all"], "1.0");
    }

    #[test]
    fn needs_restarting_exit_codes() {
        assert_eq!(parse_needs_restarting(Some(1)), Some(true));
        assert_eq!(parse_needs_restarting(Some(0)), Some(false));
        assert_eq!(parse_needs_restarting(Some(127)), None);
        assert_eq!(parse_needs_restarting(None), None);
    }

    #[test]
    fn security_source_selection() {
        let one = "deb http://deb.debian.org/debian bookworm main\n\
                   deb http://security.debian.org/debian-security bookworm-security main\n\
                   # deb http://security.debian.org/ x-security main\n";
        assert_eq!(
            security_sources(one),
            "deb http://security.debian.org/debian-security bookworm-security main\n"
        );
        let d822 = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\n\
                    Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        let s = security_sources(d822);
        assert!(
            s.contains("bookworm-security") && !s.contains("bookworm-updates"),
            "{s}"
        );
    }
}
