//! user traces: shell and REPL histories of root and every user,
//! `authorized_keys`, per-user caches and package-manager caches.

use std::{ffi::OsStr, path::PathBuf};

use super::{Action, Ctx, Op, Plan, Step, list_dir, plan_contents, plan_remove_file, show};
use crate::safefs::{self, Control, Event, Kind, WalkOptions};

pub struct UserTraces;

/// Home directories: `/root` and every directory in `/home` (a symlinked or
/// mounted home is not a directory on the root's mount and is left alone).
pub fn homes(cx: &Ctx<'_>) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from("root")];
    for (rel, m) in list_dir(cx, std::path::Path::new("home")) {
        if m.kind == Kind::Dir && m.mnt_id == cx.root.mnt_id() {
            out.push(rel);
        }
    }
    out
}

impl Step for UserTraces {
    fn name(&self) -> &'static str {
        "user-traces"
    }

    fn plan(&self, cx: &Ctx<'_>) -> Plan {
        let p = &cx.policy.user_traces;
        let mut plan = Plan::default();
        for home in homes(cx) {
            for h in &p.histories {
                let Ok(h) = safefs::clean_rel(h) else {
                    continue;
                };
                // A history linked to /dev/null is deliberate: leave links.
                plan_remove_file(cx, &home.join(h), false, &mut plan);
            }
            if p.remove_authorized_keys {
                for k in ["authorized_keys", "authorized_keys2"] {
                    plan_remove_file(cx, &home.join(".ssh").join(k), true, &mut plan);
                }
            }
            for c in &p.home_caches {
                let Ok(c) = safefs::clean_rel(c) else {
                    continue;
                };
                plan_contents(cx, &home.join(c), &[], &mut plan);
            }
        }
        for dir in &p.package_caches {
            plan_cache_files(cx, dir, &mut plan);
        }
        plan
    }
}

/// Every regular file in a package cache except its `lock`; the directory
/// structure stays (apt expects `archives/partial`).
fn plan_cache_files(cx: &Ctx<'_>, dir: &std::path::Path, plan: &mut Plan) {
    let r = safefs::walk(cx.root, dir, &WalkOptions::default(), |ev| {
        match ev {
            Event::Entry(e) if e.meta.kind == Kind::File && e.name != OsStr::new("lock") => plan
                .actions
                .push(Action::new(Op::Remove(e.rel.to_path_buf()), e.meta.size)),
            Event::Entry(_) => {}
            Event::MountPoint { rel } => plan
                .warnings
                .push(format!("{} is a mount point; left alone", show(rel))),
            Event::Error { rel, error } => plan.errors.push(format!("{}: {error}", show(rel))),
        }
        Control::Continue
    });
    match r {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || super::is_not_dir_or_link(&e) => {}
        Err(e) => plan.errors.push(format!("{}: {e}", show(dir))),
    }
}
