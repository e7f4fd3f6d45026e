//! user traces: shell and REPL histories of root and every user,
//! `authorized_keys`, per-user caches and package-manager caches.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
};

use super::{
    Action, Ctx, Op, Plan, Step, is_exdev, list_dir, other_mount, plan_contents, plan_remove_file,
    show,
};
use crate::safefs::{self, Control, Event, Kind, WalkOptions};

pub struct UserTraces;

/// Home directories: `/root`, every directory in `/home`, and the home of
/// every account in the target's `/etc/passwd` (service accounts keep
/// histories too, e.g. postgres' `.psql_history`). A symlinked or mounted
/// home is not a directory on the root's mount and is left alone.
pub fn homes(cx: &Ctx<'_>) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from("root")];
    for (rel, m) in list_dir(cx, Path::new("home")) {
        if m.kind == Kind::Dir && m.mnt_id == cx.root.mnt_id() {
            out.push(rel);
        }
    }
    let passwd =
        safefs::read_beneath(cx.root, Path::new("etc/passwd"), 4 << 20).unwrap_or_default();
    for line in String::from_utf8_lossy(&passwd).lines() {
        let Some(home) = line.split(':').nth(5) else {
            continue;
        };
        let Ok(rel) = safefs::clean_rel(Path::new(home)) else {
            continue;
        };
        if rel.as_os_str().is_empty() || out.contains(&rel) {
            continue;
        }
        if let Ok(Some(m)) = safefs::stat_beneath(cx.root, &rel)
            && m.kind == Kind::Dir
            && m.mnt_id == cx.root.mnt_id()
        {
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
fn plan_cache_files(cx: &Ctx<'_>, dir: &Path, plan: &mut Plan) {
    let dir = match safefs::clean_rel(dir) {
        Ok(d) => d,
        Err(e) => return plan.errors.push(e.to_string()),
    };
    let dir = dir.as_path();
    let r = safefs::walk(cx.root, dir, &WalkOptions::default(), |ev| {
        match ev {
            Event::Entry(e) if e.meta.kind == Kind::File && e.name != OsStr::new("lock") => plan
                .actions
                .push(Action::new(Op::Remove(e.rel.to_path_buf()), e.meta.size)),
            Event::Entry(_) => {}
            Event::MountPoint { rel } if rel == dir => other_mount(cx, rel, &mut *plan),
            Event::MountPoint { rel } => plan
                .warnings
                .push(format!("{} is a mount point; left alone", show(rel))),
            Event::Error { rel, error } => plan.errors.push(format!("{}: {error}", show(rel))),
        }
        Control::Continue
    });
    match r {
        Ok(_) => {}
        Err(e) if is_exdev(&e) => other_mount(cx, dir, plan),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || super::is_not_dir_or_link(&e) => {}
        Err(e) => plan.errors.push(format!("{}: {e}", show(dir))),
    }
}
