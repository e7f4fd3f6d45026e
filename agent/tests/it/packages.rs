//! The packages step against a local `file:` apt repository offering an
//! upgrade of a small package built here.

use std::{fs, path::Path, process::Command};

use crate::util::{Fixture, mounts_beneath};

fn build_deb(work: &Path, version: &str, conf: &str) -> std::path::PathBuf {
    let d = work.join(format!("pkg-{version}"));
    fs::create_dir_all(d.join("DEBIAN")).unwrap();
    fs::create_dir_all(d.join("etc")).unwrap();
    fs::create_dir_all(d.join("usr/share/amiprep-hello")).unwrap();
    fs::write(
        d.join("DEBIAN/control"),
        format!(
            "Package: amiprep-hello\nVersion: {version}\nArchitecture: all\n\
             Maintainer: amiprep tests <tests@amiprep.invalid>\nDescription: upgrade fixture\n"
        ),
    )
    .unwrap();
    fs::write(d.join("DEBIAN/conffiles"), "/etc/amiprep-hello.conf\n").unwrap();
    fs::write(d.join("etc/amiprep-hello.conf"), conf).unwrap();
    fs::write(d.join("usr/share/amiprep-hello/version"), version).unwrap();
    let deb = work.join(format!("amiprep-hello_{version}_all.deb"));
    let st = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&d)
        .arg(&deb)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    deb
}

fn sh(dir: &Path, cmd: &str) -> String {
    let o = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A root with amiprep-hello 1.0 installed (its conffile edited locally) and
/// a `file:` repository offering 2.0 as its only source.
fn fixture_with_repo() -> Fixture {
    let f = Fixture::new();
    let work = f.outside.clone();
    let v1 = build_deb(&work, "1.0", "setting = 1\n");
    let v2 = build_deb(&work, "2.0", "setting = 2\n");
    fs::copy(&v1, f.path("srv/amiprep-hello_1.0_all.deb")).unwrap();
    let o = Command::new("chroot")
        .arg(&f.root)
        .args(["dpkg", "-i", "/srv/amiprep-hello_1.0_all.deb"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    fs::remove_file(f.path("srv/amiprep-hello_1.0_all.deb")).unwrap();
    fs::write(f.path("etc/amiprep-hello.conf"), "setting = local\n").unwrap();

    let repo = f.path("srv/repo");
    fs::create_dir_all(&repo).unwrap();
    fs::copy(&v2, repo.join("amiprep-hello_2.0_all.deb")).unwrap();
    sh(
        &repo,
        "apt-ftparchive packages . > Packages && apt-ftparchive release . > Release",
    );
    fs::write(
        f.path("etc/apt/sources.list"),
        "deb [trusted=yes] file:/srv/repo ./\n",
    )
    .unwrap();
    for e in fs::read_dir(f.path("etc/apt/sources.list.d")).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
    }
    f
}

fn packages_step(r: &serde_json::Value) -> &serde_json::Value {
    r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "packages")
        .unwrap()
}

#[test]
fn apt_upgrade_from_a_local_repository() {
    let f = fixture_with_repo();
    let (code, r) = f.agent_json(&["--only", "packages"]);
    let p = packages_step(&r);
    assert_eq!(code, 0, "{p:#}");
    assert_eq!(p["status"], "ok");
    assert_eq!(p["details"]["manager"], "apt");
    let upgraded = p["details"]["upgraded"].as_array().unwrap();
    assert_eq!(
        upgraded,
        &vec![serde_json::json!({"package": "amiprep-hello:all", "old": "1.0", "new": "2.0"})],
        "{p:#}"
    );
    assert_eq!(p["details"]["reboot_required"], false);
    assert_eq!(
        fs::read_to_string(f.path("usr/share/amiprep-hello/version")).unwrap(),
        "2.0"
    );
    // --force-confold: the local edit of the conffile is kept.
    assert_eq!(
        fs::read_to_string(f.path("etc/amiprep-hello.conf")).unwrap(),
        "setting = local\n"
    );
    // Caches cleaned, and nothing left mounted in the root.
    let debs = fs::read_dir(f.path("var/cache/apt/archives"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".deb")
        })
        .count();
    assert_eq!(debs, 0);
    assert!(
        mounts_beneath(&f.root).is_empty(),
        "{:?}",
        mounts_beneath(&f.root)
    );
    // Every command was reported with its result.
    let actions = p["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 3);
    assert!(actions.iter().all(|a| a["result"]["ok"] == true), "{p:#}");
}

#[test]
fn failed_package_refresh_is_reported_and_mounts_are_undone() {
    let f = fixture_with_repo();
    fs::write(
        f.path("etc/apt/sources.list"),
        "deb [trusted=yes] file:/srv/missing ./\n",
    )
    .unwrap();
    let (code, r) = f.agent_json(&["--only", "packages"]);
    assert_eq!(code, 1, "{r:#}");
    let p = packages_step(&r);
    assert_eq!(p["status"], "failed");
    assert_eq!(p["actions"][0]["result"]["ok"], false, "{p:#}");
    assert!(
        mounts_beneath(&f.root).is_empty(),
        "{:?}",
        mounts_beneath(&f.root)
    );
    assert_eq!(
        fs::read_to_string(f.path("usr/share/amiprep-hello/version")).unwrap(),
        "1.0"
    );
}

#[test]
fn dry_run_runs_no_command() {
    let f = fixture_with_repo();
    let (code, r) = f.agent_json(&["--only", "packages", "--dry-run"]);
    assert_eq!(code, 0);
    let p = packages_step(&r);
    let targets: Vec<&str> = p["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["target"].as_str().unwrap())
        .collect();
    assert_eq!(targets.len(), 3);
    assert!(
        targets[1].contains("apt-get") && targets[1].contains("upgrade"),
        "{targets:?}"
    );
    assert!(!f.path("var/lib/apt/lists").read_dir().unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .contains("srv_repo")
    }));
    assert_eq!(
        fs::read_to_string(f.path("usr/share/amiprep-hello/version")).unwrap(),
        "1.0"
    );
}
