//! services: each unit the policy names is stopped (live host), disabled and
//! masked, so first-boot presets cannot enable it again. A unit that does not
//! exist fails the step: a typo must not pass as a disabled service.

use std::path::Path;

use super::{Action, Cmd, Ctx, Op, Plan, Step, exists};

pub struct Services;

const UNIT_DIRS: [&str; 4] = [
    "etc/systemd/system",
    "usr/lib/systemd/system",
    "lib/systemd/system",
    "usr/local/lib/systemd/system",
];

/// Where a unit's file would be: `foo@bar.service` is provided by
/// `foo@.service`.
fn unit_file_names(unit: &str) -> Vec<String> {
    let mut names = vec![unit.to_string()];
    if let Some((base, rest)) = unit.split_once('@')
        && let Some((_, suffix)) = rest.rsplit_once('.')
    {
        names.push(format!("{base}@.{suffix}"));
    }
    names
}

/// The systemctl invocation for `verb` on `unit`: `--root=DIR` offline.
pub fn systemctl(root: &Path, live: bool, verb: &str, unit: &str) -> Cmd {
    let mut argv = vec!["systemctl".to_string()];
    if !live {
        argv.push(format!("--root={}", root.display()));
    }
    argv.push(verb.into());
    argv.push("--".into());
    argv.push(unit.into());
    Cmd::new(argv)
}

impl Step for Services {
    fn name(&self) -> &'static str {
        "services"
    }

    fn plan(&self, cx: &Ctx<'_>) -> Plan {
        let mut plan = Plan::default();
        for unit in &cx.policy.services.disable {
            let found = unit_file_names(unit)
                .iter()
                .any(|n| UNIT_DIRS.iter().any(|d| exists(cx, &format!("{d}/{n}"))));
            if !found {
                plan.errors
                    .push(format!("unit {unit} does not exist in the target"));
                continue;
            }
            let verbs: &[&str] = if cx.live {
                &["stop", "disable", "mask"]
            } else {
                &["disable", "mask"]
            };
            for v in verbs {
                plan.actions.push(Action::new(
                    Op::Run(systemctl(cx.root.path(), cx.live, v, unit)),
                    0,
                ));
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_units() {
        assert_eq!(
            unit_file_names("getty@tty1.service"),
            ["getty@tty1.service", "getty@.service"]
        );
        assert_eq!(unit_file_names("cups.socket"), ["cups.socket"]);
    }

    #[test]
    fn offline_uses_root() {
        let c = systemctl(Path::new("/mnt/img"), false, "mask", "cups.service");
        assert_eq!(
            c.argv,
            ["systemctl", "--root=/mnt/img", "mask", "--", "cups.service"]
        );
        assert!(!c.chroot);
        let c = systemctl(Path::new("/"), true, "stop", "cups.service");
        assert_eq!(c.argv, ["systemctl", "stop", "--", "cups.service"]);
    }
}
