//! `prepare` on a dirty copy of the Debian root: each step's effect, and the
//! traps that must survive untouched.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fs,
    os::unix::{
        ffi::OsStrExt,
        fs::{MetadataExt, PermissionsExt, symlink},
        net::UnixListener,
    },
    path::{Path, PathBuf},
};

use crate::util::{Fixture, bind, checksums, make_deep, mounts_beneath, stderr};

/// What the steps may change; everything else must keep its checksum.
const CLEANED: &[&str] = &[
    "tmp/",
    "var/tmp/",
    "var/crash/",
    "var/log/",
    "var/cache/apt/",
    "var/lib/cloud/",
    "var/lib/dhcp/",
    "var/lib/systemd/random-seed",
    "etc/machine-id",
    "var/lib/dbus/machine-id",
    "etc/ssh/ssh_host_",
    "etc/systemd/system/amiprep-ssh-keygen.service",
    "etc/systemd/system/multi-user.target.wants/amiprep-ssh-keygen.service",
    "etc/systemd/system/amiprep-test.service",
    "etc/systemd/system/multi-user.target.wants/amiprep-test.service",
    "root/.bash_history",
    "root/.python_history",
    "root/.ssh/authorized_keys",
    "home/alice/.bash_history",
    "home/alice/.local/share/fish/fish_history",
    "home/alice/.ssh/authorized_keys",
    "home/alice/.cache/pip/",
    "var/lib/postgresql/.psql_history",
];

fn in_cleaned_set(rel: &Path) -> bool {
    let b = rel.as_os_str().as_bytes();
    CLEANED.iter().any(|c| b.starts_with(c.as_bytes()))
}

struct Dirty {
    f: Fixture,
    _sock: UnixListener,
    deep_name: Vec<u8>,
}

/// Dirties the copy like a used host, and plants the traps.
fn dirty() -> Dirty {
    let mut f = Fixture::new();
    let out = f.outside.clone();
    fs::write(out.join("secret.txt"), b"outside the root").unwrap();
    fs::create_dir(out.join("bindsrc")).unwrap();
    fs::write(out.join("bindsrc/mounted.txt"), b"bind-mounted data").unwrap();

    // User data the links point at.
    f.write("home/alice/data/important.txt", b"alice's work");
    f.write("srv/data/report.csv", b"a,b\n1,2\n");
    fs::write(
        f.path("home/alice")
            .join(OsStr::from_bytes(b"\xfe odd name")),
        b"odd",
    )
    .unwrap();

    // temp: contents, traps, odd names, FIFO, socket, deep trees.
    f.write("tmp/junk.txt", b"junk");
    f.write("tmp/dir/sub/file", b"nested");
    symlink("/home/alice/data/important.txt", f.path("tmp/abs-user")).unwrap();
    symlink(out.join("secret.txt"), f.path("tmp/abs-outside")).unwrap();
    symlink("../home/alice/data/important.txt", f.path("tmp/rel-user")).unwrap();
    symlink("../../outside/secret.txt", f.path("tmp/rel-outside")).unwrap();
    symlink("/", f.path("tmp/slash")).unwrap();
    symlink("/etc", f.path("var/tmp/etc-abs")).unwrap();
    symlink("../../etc", f.path("var/tmp/etc-rel")).unwrap();
    f.write("var/tmp/cache.bin", &[7u8; 4096]);
    fs::create_dir(f.path("tmp/mnt")).unwrap();
    let g = bind(&out.join("bindsrc"), &f.path("tmp/mnt"));
    f.mounts.push(g);
    nix::unistd::mkfifo(
        &f.path("tmp/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    nix::unistd::mkfifo(
        &f.path("var/log/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let sock = UnixListener::bind(f.path("tmp/sock")).unwrap();
    fs::write(
        f.path("tmp").join(OsStr::from_bytes(b"bad\xffname\n")),
        b"x",
    )
    .unwrap();
    let deep_name = vec![b'd'; 200];
    assert!(make_deep(&f.path("tmp"), 30, OsStr::from_bytes(&deep_name), b"deep") > 4096);
    assert!(
        make_deep(
            &f.path("srv/data"),
            30,
            OsStr::from_bytes(&deep_name),
            b"keep"
        ) > 4096
    );

    // logs
    f.write("var/log/syslog", b"active log line\n");
    f.write("var/log/syslog.1", b"rotated");
    f.write("var/log/syslog.2.gz", b"\x1f\x8bcompressed");
    f.write("var/log/apt/history.log.1.gz", b"\x1f\x8b");
    f.write("var/log/cloud-init.log", b"ci");
    fs::write(
        f.path("var/log").join(OsStr::from_bytes(b"odd\nname.log")),
        b"odd log",
    )
    .unwrap();
    fs::write(f.path("var/log/wtmp"), [1u8; 384]).unwrap();
    fs::set_permissions(f.path("var/log/wtmp"), fs::Permissions::from_mode(0o664)).unwrap();
    nix::unistd::chown(&f.path("var/log/wtmp"), None, Some(43.into())).unwrap();
    f.write(
        "var/log/journal/0123456789abcdef/system.journal",
        &[0u8; 8192],
    );
    symlink(out.join("secret.txt"), f.path("var/log/evil.log")).unwrap();
    symlink(out.join("secret.txt"), f.path("var/log/evil.log.1")).unwrap();
    symlink(
        "../../home/alice/data/important.txt",
        f.path("var/log/user.log"),
    )
    .unwrap();

    // user traces
    f.write("root/.bash_history", b"export AWS_SECRET_ACCESS_KEY=...\n");
    f.write("root/.python_history", b"import os\n");
    symlink("/dev/null", f.path("root/.lesshst")).unwrap();
    f.write(
        "root/.ssh/authorized_keys",
        b"ssh-ed25519 AAAA root@laptop\n",
    );
    f.write("home/alice/.bash_history", b"ls\n");
    f.write("home/alice/.local/share/fish/fish_history", b"- cmd: ls\n");
    f.write(
        "home/alice/.ssh/authorized_keys",
        b"ssh-ed25519 AAAA alice@laptop\n",
    );
    f.write(
        "home/alice/.ssh/id_ed25519.pub",
        b"ssh-ed25519 AAAA alice\n",
    );
    f.write("home/alice/.cache/pip/http/abc", b"wheel");
    f.write("var/cache/apt/pkgcache.bin", b"cache");
    // A service account outside /home keeps histories too.
    let mut passwd = fs::read_to_string(f.path("etc/passwd")).unwrap();
    passwd.push_str("postgres:x:120:120::/var/lib/postgresql:/bin/bash\n");
    fs::write(f.path("etc/passwd"), passwd).unwrap();
    f.write("var/lib/postgresql/.psql_history", b"\\password\n");
    f.write("var/lib/postgresql/data/PG_VERSION", b"15\n");

    // identity
    f.write("etc/machine-id", b"4f2c0b1e9a8d4c7b8e6f5a4d3c2b1a09\n");
    f.write(
        "var/lib/dbus/machine-id",
        b"4f2c0b1e9a8d4c7b8e6f5a4d3c2b1a09\n",
    );
    f.write("etc/ssh/sshd_config", b"PermitRootLogin no\n");
    f.write("etc/ssh/ssh_host_ed25519_key", b"PRIVATE");
    f.write("etc/ssh/ssh_host_ed25519_key.pub", b"PUBLIC");
    // Make the image look like it has systemd and ssh-keygen, without cloud-init.
    f.write("usr/lib/systemd/systemd", b"");
    if !f.path("usr/bin/ssh-keygen").exists() {
        f.write("usr/bin/ssh-keygen", b"");
    }
    f.write(
        "var/lib/cloud/instances/i-0abc/user-data.txt",
        b"#cloud-config\n",
    );
    f.write("var/lib/cloud/data/instance-id", b"i-0abc\n");
    f.write(
        "var/lib/cloud/seed/nocloud/user-data",
        b"#cloud-config seed\n",
    );
    f.write("var/lib/dhcp/dhclient.eth0.leases", b"lease {}\n");
    f.write("var/lib/systemd/random-seed", &[9u8; 512]);

    // services: an enabled unit.
    f.write(
        "usr/lib/systemd/system/amiprep-test.service",
        b"[Unit]\nDescription=test\n[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n",
    );
    fs::create_dir_all(f.path("etc/systemd/system/multi-user.target.wants")).unwrap();
    symlink(
        "/usr/lib/systemd/system/amiprep-test.service",
        f.path("etc/systemd/system/multi-user.target.wants/amiprep-test.service"),
    )
    .unwrap();
    f.write(
        "etc/amiprep-policy.toml",
        b"[services]\ndisable = [\"amiprep-test.service\"]\n",
    );

    Dirty {
        f,
        _sock: sock,
        deep_name,
    }
}

fn policy(d: &Dirty) -> String {
    d.f.path("etc/amiprep-policy.toml").display().to_string()
}

fn step<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name}"))
}

#[test]
fn dry_run_changes_nothing_and_lists_the_actions() {
    let d = dirty();
    let before = checksums(&d.f.root);
    let outside = checksums(&d.f.outside);
    let p = policy(&d);
    let (code, r) =
        d.f.agent_json(&["--dry-run", "--skip", "packages", "--policy", &p]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["dry_run"], true);
    assert_eq!(checksums(&d.f.root), before);
    assert_eq!(checksums(&d.f.outside), outside);
    let temp = step(&r, "temp");
    assert_eq!(temp["status"], "planned");
    let targets: Vec<&str> = temp["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["target"].as_str().unwrap())
        .collect();
    assert!(targets.contains(&"/tmp/junk.txt"), "{targets:?}");
    assert!(targets.contains(&"/tmp/bad\\xffname\\n"), "{targets:?}");
    assert!(
        !targets.contains(&"/tmp/mnt"),
        "mount point must not be planned: {targets:?}"
    );
    assert!(
        temp["actions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a.get("result").is_none())
    );
    let junk = temp["actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["target"] == "/tmp/junk.txt")
        .unwrap();
    assert_eq!(junk["bytes"], 4);
    assert_eq!(step(&r, "packages")["status"], "skipped");
    let services = step(&r, "services")["actions"].as_array().unwrap().clone();
    assert_eq!(services.len(), 2);
    assert!(
        services[1]["target"]
            .as_str()
            .unwrap()
            .ends_with("mask -- amiprep-test.service")
    );
}

#[test]
fn prepare_cleans_and_every_trap_survives() {
    let d = dirty();
    let f = &d.f;
    let before = checksums(&f.root);
    let outside_before = checksums(&f.outside);
    let wtmp_before = fs::metadata(f.path("var/log/wtmp")).unwrap();
    let p = policy(&d);
    let (_, planned) = f.agent_json(&["--dry-run", "--skip", "packages", "--policy", &p]);
    let (code, r) = f.agent_json(&["--skip", "packages", "--policy", &p]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["ready"], true);
    // What the plan announced is what was freed.
    for s in ["logs", "temp", "user-traces", "identity"] {
        assert_eq!(
            step(&planned, s)["bytes_freed"],
            step(&r, s)["bytes_freed"],
            "{s}"
        );
    }
    for s in ["services", "logs", "temp", "user-traces", "identity"] {
        assert_eq!(step(&r, s)["status"], "ok", "{s}: {:#}", step(&r, s));
    }
    assert!(r["bytes_freed"].as_u64().unwrap() > 8192);

    // Nothing outside the root changed; nothing outside the cleaned set
    // changed (symlink targets, /etc behind the var/tmp links, user data,
    // bind-mounted data, the deep tree in /srv, odd names).
    assert_eq!(checksums(&f.outside), outside_before);
    let after = checksums(&f.root);
    let mut changed = Vec::new();
    for (k, v) in &before {
        if after.get(k) != Some(v) && !in_cleaned_set(k) {
            changed.push(k.clone());
        }
    }
    for k in after.keys() {
        if !before.contains_key(k) && !in_cleaned_set(k) {
            changed.push(k.clone());
        }
    }
    assert!(
        changed.is_empty(),
        "changed outside the cleaned set: {changed:?}"
    );
    let deep_kept: Vec<&PathBuf> = after
        .keys()
        .filter(|k| k.starts_with("srv/data") && k.ends_with("leaf"))
        .collect();
    assert_eq!(deep_kept.len(), 1);
    assert!(deep_kept[0].as_os_str().len() > 4096);

    // temp: contents gone, directories and the mount kept.
    let left: Vec<PathBuf> = fs::read_dir(f.path("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into())
        .collect();
    assert_eq!(
        left,
        vec![PathBuf::from("mnt")],
        "only the mount point stays"
    );
    assert_eq!(
        mounts_beneath(&f.root),
        vec![f.path("tmp/mnt").display().to_string()]
    );
    assert_eq!(
        fs::read(f.path("tmp/mnt/mounted.txt")).unwrap(),
        b"bind-mounted data"
    );
    assert_eq!(fs::read_dir(f.path("var/tmp")).unwrap().count(), 0);
    assert_eq!(fs::metadata(f.path("tmp")).unwrap().mode() & 0o7777, 0o1777);
    assert!(!d.deep_name.is_empty());

    // logs
    assert_eq!(fs::read(f.path("var/log/syslog")).unwrap(), b"");
    assert!(!f.path("var/log/syslog.1").exists());
    assert!(!f.path("var/log/syslog.2.gz").exists());
    assert!(!f.path("var/log/apt/history.log.1.gz").exists());
    assert!(!f.path("var/log/cloud-init.log").exists());
    assert_eq!(
        fs::read(f.path("var/log").join(OsStr::from_bytes(b"odd\nname.log"))).unwrap(),
        b""
    );
    let wtmp = fs::metadata(f.path("var/log/wtmp")).unwrap();
    assert_eq!(wtmp.len(), 0);
    assert_eq!(
        (wtmp.ino(), wtmp.mode(), wtmp.uid(), wtmp.gid()),
        (
            wtmp_before.ino(),
            wtmp_before.mode(),
            wtmp_before.uid(),
            wtmp_before.gid()
        )
    );
    assert!(f.path("var/log/journal").is_dir());
    assert_eq!(fs::read_dir(f.path("var/log/journal")).unwrap().count(), 0);
    for l in ["var/log/evil.log", "var/log/evil.log.1", "var/log/user.log"] {
        assert!(fs::symlink_metadata(f.path(l)).unwrap().is_symlink(), "{l}");
    }
    assert!(
        fs::symlink_metadata(f.path("var/log/fifo"))
            .unwrap()
            .file_type()
            .is_fifo_like()
    );

    // user traces
    for gone in [
        "root/.bash_history",
        "root/.python_history",
        "root/.ssh/authorized_keys",
        "home/alice/.bash_history",
        "home/alice/.local/share/fish/fish_history",
        "home/alice/.ssh/authorized_keys",
        "home/alice/.cache/pip/http",
        "var/cache/apt/pkgcache.bin",
        "var/lib/postgresql/.psql_history",
    ] {
        assert!(
            fs::symlink_metadata(f.path(gone)).is_err(),
            "{gone} still there"
        );
    }
    assert!(f.path("home/alice/.ssh/id_ed25519.pub").exists());
    assert!(f.path("var/lib/postgresql/data/PG_VERSION").exists());
    assert!(f.path("home/alice/.cache/pip").is_dir());
    assert!(
        fs::symlink_metadata(f.path("root/.lesshst"))
            .unwrap()
            .is_symlink()
    );

    // identity
    assert_eq!(
        fs::read(f.path("etc/machine-id")).unwrap(),
        b"uninitialized\n"
    );
    assert!(!f.path("var/lib/dbus/machine-id").exists());
    assert!(!f.path("etc/ssh/ssh_host_ed25519_key").exists());
    assert!(!f.path("etc/ssh/ssh_host_ed25519_key.pub").exists());
    assert!(f.path("etc/ssh/sshd_config").exists());
    let unit = fs::read_to_string(f.path("etc/systemd/system/amiprep-ssh-keygen.service")).unwrap();
    assert!(unit.contains("ssh-keygen -A"));
    assert_eq!(
        fs::read_link(
            f.path("etc/systemd/system/multi-user.target.wants/amiprep-ssh-keygen.service")
        )
        .unwrap(),
        Path::new("/etc/systemd/system/amiprep-ssh-keygen.service")
    );
    assert!(!f.path("var/lib/cloud/instances").exists());
    assert!(!f.path("var/lib/cloud/data").exists());
    assert_eq!(
        fs::read(f.path("var/lib/cloud/seed/nocloud/user-data")).unwrap(),
        b"#cloud-config seed\n"
    );
    assert!(!f.path("var/lib/dhcp/dhclient.eth0.leases").exists());
    assert!(!f.path("var/lib/systemd/random-seed").exists());

    // services: disabled and masked.
    assert!(
        !f.path("etc/systemd/system/multi-user.target.wants/amiprep-test.service")
            .exists()
    );
    assert_eq!(
        fs::read_link(f.path("etc/systemd/system/amiprep-test.service")).unwrap(),
        Path::new("/dev/null")
    );

    // A second run finds nothing left to do in temp and identity.
    let (code, r) = f.agent_json(&["--dry-run", "--only", "temp", "--only", "identity"]);
    assert_eq!(code, 0);
    assert_eq!(
        step(&r, "temp")["actions"].as_array().unwrap().len(),
        0,
        "{r:#}"
    );
    assert_eq!(
        step(&r, "identity")["actions"].as_array().unwrap().len(),
        0,
        "{r:#}"
    );
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
}

#[test]
fn missing_unit_fails_the_step_and_the_exit_code() {
    let f = Fixture::new();
    let p = f.write(
        "policy.toml",
        b"[services]\ndisable = [\"no-such-unit.service\"]\n",
    );
    let (code, r) = f.agent_json(&["--only", "services", "--policy", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["ready"], false);
    let s = step(&r, "services");
    assert_eq!(s["status"], "failed");
    assert!(
        s["errors"][0]
            .as_str()
            .unwrap()
            .contains("no-such-unit.service")
    );
}

#[test]
fn ssh_keys_are_kept_when_nothing_would_regenerate_them() {
    let f = Fixture::new();
    f.write("etc/ssh/sshd_config", b"");
    f.write("etc/ssh/ssh_host_rsa_key", b"PRIVATE");
    // No systemd binary in a minbase root: no first-boot unit possible.
    assert!(!f.path("usr/lib/systemd/systemd").exists());
    let out = f.agent(&["--only", "identity"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nothing regenerates them"), "{text}");
    assert!(f.path("etc/ssh/ssh_host_rsa_key").exists());
    // The rest of the step still ran.
    assert_eq!(
        fs::read(f.path("etc/machine-id")).unwrap(),
        b"uninitialized\n"
    );
}

#[test]
fn checksums_see_a_change_in_the_cleaned_set_only_where_expected() {
    // Guard for the guard: the checksum map notices a one-byte change.
    let f = Fixture::new();
    let a: BTreeMap<_, _> = checksums(&f.root);
    fs::write(f.path("etc/hostname"), b"changed\n").unwrap();
    let b = checksums(&f.root);
    assert_ne!(
        a.get(Path::new("etc/hostname")),
        b.get(Path::new("etc/hostname"))
    );
    assert!(!in_cleaned_set(Path::new("etc/hostname")));
}

/// Clears the immutable flag so the fixture can be removed.
struct Mutable(PathBuf);
impl Drop for Mutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn permission_error_is_reported_and_the_rest_is_still_cleaned() {
    let f = Fixture::new();
    f.write("tmp/a-before", b"a");
    let locked = f.write("tmp/dir/locked", b"immutable");
    f.write("tmp/dir/other", b"o");
    f.write("tmp/z-after", b"z");
    let st = std::process::Command::new("chattr")
        .arg("+i")
        .arg(&locked)
        .status()
        .unwrap();
    assert!(st.success());
    let _g = Mutable(locked.clone());
    let (code, r) = f.agent_json(&["--only", "temp"]);
    assert_eq!(code, 1, "{r:#}");
    let t = step(&r, "temp");
    assert_eq!(t["status"], "failed");
    let errors = t["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{t:#}");
    assert!(
        errors[0].as_str().unwrap().contains("/tmp/dir/locked"),
        "{t:#}"
    );
    assert!(locked.exists());
    for gone in ["tmp/a-before", "tmp/dir/other", "tmp/z-after"] {
        assert!(!f.path(gone).exists(), "{gone}");
    }
}

#[test]
fn policy_dir_on_a_separate_mount_is_not_crossed() {
    let mut f = Fixture::new();
    // An in-memory /var/tmp: never part of an image, a warning only.
    nix::mount::mount(
        Some("tmpfs"),
        &f.path("var/tmp"),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    f.mounts.push(crate::util::Unmount(f.path("var/tmp")));
    fs::write(f.path("var/tmp/in-memory"), b"x").unwrap();
    let (code, r) = f.agent_json(&["--only", "temp"]);
    assert_eq!(code, 0, "{r:#}");
    let t = step(&r, "temp");
    assert!(
        t["warnings"][0]
            .as_str()
            .unwrap()
            .contains("/var/tmp is on a separate in-memory mount"),
        "{t:#}"
    );
    assert!(f.path("var/tmp/in-memory").exists());

    // A persistent volume at /var/crash: left alone, and the step fails.
    fs::create_dir_all(f.path("var/crash")).unwrap();
    fs::create_dir(f.outside.join("crash")).unwrap();
    fs::write(f.outside.join("crash/core.1"), b"core").unwrap();
    let g = bind(&f.outside.join("crash"), &f.path("var/crash"));
    f.mounts.push(g);
    let (code, r) = f.agent_json(&["--only", "temp"]);
    assert_eq!(code, 1, "{r:#}");
    let t = step(&r, "temp");
    assert!(
        t["errors"][0]
            .as_str()
            .unwrap()
            .contains("/var/crash is on a separate mount"),
        "{t:#}"
    );
    assert_eq!(fs::read(f.outside.join("crash/core.1")).unwrap(), b"core");
}

#[test]
fn hostname_is_set_per_policy_keeping_owner_and_mode() {
    let f = Fixture::new();
    let before = fs::metadata(f.path("etc/hostname")).unwrap();
    let p = f.write("policy.toml", b"[identity]\nhostname = \"golden-base\"\n");
    let (code, r) = f.agent_json(&["--only", "identity", "--policy", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(fs::read(f.path("etc/hostname")).unwrap(), b"golden-base\n");
    let after = fs::metadata(f.path("etc/hostname")).unwrap();
    assert_eq!(
        (after.mode(), after.uid(), after.gid()),
        (before.mode(), before.uid(), before.gid())
    );
    // Without a hostname in the policy, /etc/hostname is kept.
    let (code, _) = f.agent_json(&["--only", "identity"]);
    assert_eq!(code, 0);
    assert_eq!(fs::read(f.path("etc/hostname")).unwrap(), b"golden-base\n");
}

#[test]
fn the_agents_own_key_is_expected_but_a_copy_of_it_is_a_finding() {
    // A PKCS#8 body the private-key rules accept (not a usable key).
    let key = b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgVcB/UNPxalR9zDYA\njQIfjojUDiQuGnSJrFEEzZPT/92hRANCAASc7UJtgnF/abqWM60T3XNJEzBv5ez9\n-----END PRIVATE KEY-----\n";
    let f = Fixture::new();
    f.write("etc/amiprep/pki/agent.key", key);
    let (code, r) = f.agent_json(&["--only", "scan"]);
    assert_eq!(code, 0, "{r:#}");
    let s = step(&r, "scan");
    assert_eq!(
        s["details"]["findings"].as_array().unwrap().len(),
        0,
        "{s:#}"
    );
    assert_eq!(
        s["details"]["expected_keys"][0]["path"],
        "etc/amiprep/pki/agent.key"
    );
    // The same key copied elsewhere blocks readiness.
    f.write("root/backup/agent.key", key);
    let (code, r) = f.agent_json(&["--only", "scan"]);
    assert_eq!(code, 1, "{r:#}");
    let s = step(&r, "scan");
    assert_eq!(
        s["details"]["findings"][0]["path"], "root/backup/agent.key",
        "{s:#}"
    );
    // A policy that expects nothing reports the agent's key too.
    let p = f.write("policy.toml", b"[scan]\nexpected_keys = []\n");
    let (code, r) = f.agent_json(&["--only", "scan", "--policy", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(
        step(&r, "scan")["details"]["findings"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

/// Issue 14: a path the scan cannot read makes the host not ready, and is
/// listed, unless the policy accepts it by path.
#[test]
fn an_unscannable_path_blocks_readiness_unless_the_policy_accepts_it() {
    let f = Fixture::new();
    // A rotated log whose gzip stream is cut short: it cannot be read to
    // its end, so what it holds past the damage is unknown.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &vec![b'x'; 1 << 20]).unwrap();
    let mut gz = gz.finish().unwrap();
    gz.truncate(gz.len() - 8);
    f.write("var/log/app.log.2.gz", &gz);
    let (code, r) = f.agent_json(&["--only", "scan"]);
    assert_eq!(code, 1, "{r:#}");
    let s = step(&r, "scan");
    assert_eq!(
        s["details"]["unscanned"][0]["path"], "var/log/app.log.2.gz",
        "{s:#}"
    );
    assert!(
        s["details"]["unscanned"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("gzip"),
        "{s:#}"
    );
    assert!(
        s["errors"][0]
            .as_str()
            .unwrap()
            .contains("could not be scanned"),
        "{s:#}"
    );
    let p = f.write(
        "policy.toml",
        b"[scan]\naccept_unscanned = [\"/var/log/app.log.2.gz\"]\n",
    );
    let (code, r) = f.agent_json(&["--only", "scan", "--policy", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{r:#}");
    let s = step(&r, "scan");
    assert_eq!(s["details"]["unscanned"].as_array().unwrap().len(), 0);
    assert_eq!(
        s["details"]["accepted_unscanned"][0]["path"],
        "var/log/app.log.2.gz"
    );
    // An explicit size cap in the policy: a larger file is not read, and
    // blocks readiness like an unreadable one.
    let p = f.write(
        "policy.toml",
        b"[scan]\nmax_file_size = 4096\naccept_unscanned = [\"/var/log/app.log.2.gz\"]\n",
    );
    f.write("var/lib/app/data.bin", &vec![b'y'; 8192]);
    let (code, r) = f.agent_json(&["--only", "scan", "--policy", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{r:#}");
    let s = step(&r, "scan");
    let capped: Vec<&serde_json::Value> = s["details"]["unscanned"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["path"] == "var/lib/app/data.bin")
        .collect();
    assert_eq!(capped.len(), 1, "{s:#}");
    assert!(
        capped[0]["reason"].as_str().unwrap().contains("size cap"),
        "{s:#}"
    );
}

/// Issue 14: `prepare --fingerprint-key-file` fingerprints under that key, so
/// a policy baseline written under it applies; under another key (or none)
/// the scan step refuses the baseline and the host is not ready.
#[test]
fn prepare_applies_a_baseline_only_under_its_fingerprint_key() {
    let f = Fixture::new();
    f.write("etc/app.conf", b"client_secret = Vd4KyZk3Qp9Vt7Lw2Xr5\n");
    let keys = tempfile::tempdir().unwrap();
    let key = |name: &str, fill: u8| {
        let p = keys.path().join(name);
        fs::write(&p, hex::encode([fill; 32])).unwrap();
        p
    };
    let (k1, k2) = (key("one", 1), key("two", 2));
    let base = keys.path().join("baseline.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_amiprep-agent"))
        .args(["scan", "--root"])
        .arg(f.path(""))
        .arg("--fingerprint-key-file")
        .arg(&k1)
        .arg("--write-baseline")
        .arg(&base)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let policy = f.write(
        "policy.toml",
        format!("[scan]\nbaseline = \"{}\"\n", base.display()).as_bytes(),
    );
    let policy = policy.to_str().unwrap();
    let with = |k: &Path| {
        f.agent_json(&[
            "--only",
            "scan",
            "--policy",
            policy,
            "--fingerprint-key-file",
            k.to_str().unwrap(),
        ])
    };
    let (code, r) = with(&k1);
    assert_eq!(code, 0, "{r:#}");
    let s = step(&r, "scan");
    assert_eq!(
        s["details"]["accepted"].as_array().unwrap().len(),
        1,
        "{s:#}"
    );
    let (code, r) = with(&k2);
    assert_eq!(code, 1, "{r:#}");
    assert!(
        step(&r, "scan")["errors"][0]
            .as_str()
            .unwrap()
            .contains("cannot match"),
        "{r:#}"
    );
    let (code, r) = f.agent_json(&["--only", "scan", "--policy", policy]);
    assert_eq!(code, 1, "{r:#}");
    let s = step(&r, "scan");
    assert!(
        s["errors"][0]
            .as_str()
            .unwrap()
            .contains("no fingerprint key"),
        "{s:#}"
    );
}
