//! Support for the packaging tests: the `.deb` and `.rpm` files built by
//! `scripts/package` (once per test process), and throwaway copies of the
//! cached Debian root to install them into.
//!
//! The packages are release builds. Unless `AMIPREP_PACKAGES_DIR` names a
//! directory that already holds them (e.g. from an earlier
//! `scripts/package --out DIR`), the first test that needs them runs
//! `scripts/package --out TARGET/packages`, niced so the tests running
//! alongside keep their timing.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
};

use tempfile::TempDir;

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests.parent().unwrap_or(tests).to_path_buf()
}

/// The target directory the running test binary was built in
/// (`TARGET/debug/deps/it-HASH` → `TARGET`).
pub(crate) fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("test executable directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("profile directory");
    }
    dir.parent().expect("target directory").to_path_buf()
}

/// The four packages of one build.
#[derive(Debug)]
pub struct Packages {
    pub dir: PathBuf,
    pub agent_deb: PathBuf,
    pub controller_deb: PathBuf,
    pub agent_rpm: PathBuf,
    pub controller_rpm: PathBuf,
}

/// The packages, built on first use (see the module docs).
pub fn packages() -> &'static Packages {
    static PACKAGES: OnceLock<Packages> = OnceLock::new();
    PACKAGES.get_or_init(|| {
        let dir = match std::env::var_os("AMIPREP_PACKAGES_DIR").filter(|d| !d.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => build_packages(),
        };
        Packages {
            agent_deb: find_one(&dir, "amiprep-agent_", ".deb"),
            controller_deb: find_one(&dir, "amiprep-controller_", ".deb"),
            agent_rpm: find_one(&dir, "amiprep-agent-", ".rpm"),
            controller_rpm: find_one(&dir, "amiprep-controller-", ".rpm"),
            dir,
        }
    })
}

fn build_packages() -> PathBuf {
    let target = target_dir();
    let out = target.join("packages");
    let mut cmd = Command::new("nice");
    cmd.args(["-n", "19"])
        .arg(workspace_root().join("scripts/package"))
        .arg("--out")
        .arg(&out)
        .env("CARGO_TARGET_DIR", &target);
    // Cargo sets these for the test process. Left in place, build scripts
    // that track them (ring's tracks CARGO_MANIFEST_DIR) would see a change
    // and the release build would start over every time.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key == "OUT_DIR"
            || key == "CARGO_MANIFEST_DIR"
            || key == "CARGO_MANIFEST_PATH"
            || key == "CARGO_CRATE_NAME"
            || key == "CARGO_PRIMARY_PACKAGE"
            || key == "CARGO_TARGET_TMPDIR"
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
        {
            cmd.env_remove(key);
        }
    }
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("running scripts/package");
    assert!(
        status.success(),
        "scripts/package failed ({status}); run it by hand to see why"
    );
    out
}

/// The single file in `dir` named `prefix…suffix`.
fn find_one(dir: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {prefix}*{suffix} in {}, found {found:?}",
        dir.display()
    );
    found.into_iter().next().expect("one package")
}

/// The cached Debian root with systemd (`AMIPREP_DEBIAN_SYSTEMD_ROOT`, set by
/// `scripts/test-env.sh`). Never modified: tests work on copies.
pub fn cached_systemd_root() -> PathBuf {
    std::env::var_os("AMIPREP_DEBIAN_SYSTEMD_ROOT")
        .map(PathBuf::from)
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            Some(PathBuf::from(home).join(".cache/amiprep-tests/debian-bookworm-systemd"))
        })
        .filter(|p| p.join(".amiprep-complete").exists())
        .expect(
            "the Debian root with systemd is missing: run scripts/test-env.sh \
             (or set AMIPREP_DEBIAN_SYSTEMD_ROOT)",
        )
}

const CHROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A private copy of the cached Debian root, removed when dropped. Nothing is
/// ever mounted in it that outlives a single command: `/proc` is mounted only
/// inside a private mount namespace (see [`DebianRoot::chroot_with_proc`]).
pub struct DebianRoot {
    dir: TempDir,
}

impl DebianRoot {
    pub fn copy() -> DebianRoot {
        let src = cached_systemd_root();
        let dir = tempfile::Builder::new()
            .prefix("amiprep-debroot-")
            .tempdir()
            .expect("temp dir");
        let out = crate::run(
            Command::new("cp")
                .arg("-a")
                .arg(&src)
                .arg(dir.path().join("root")),
        );
        assert!(
            out.status.success(),
            "copying {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        DebianRoot { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// `path` inside the root, e.g. `join("/etc/passwd")`.
    pub fn join(&self, path: &str) -> PathBuf {
        self.path().join(path.trim_start_matches('/'))
    }

    /// Runs a command chrooted into the root.
    pub fn chroot(&self, args: &[&str]) -> Output {
        crate::run(
            Command::new("chroot")
                .arg(self.path())
                .args(args)
                .env_clear()
                .env("PATH", CHROOT_PATH)
                .env("LANG", "C.UTF-8")
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    }

    /// Runs a command chrooted into the root with `/proc` mounted, in a
    /// private mount namespace that ends (and so unmounts) with the command.
    pub fn chroot_with_proc(&self, args: &[&str]) -> Output {
        crate::run(
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "--fork", "--pid"])
                .args([
                    "sh",
                    "-c",
                    r#"root="$1"; shift; mount -t proc proc "$root/proc" && exec chroot "$root" "$@""#,
                    "sh",
                ])
                .arg(self.path())
                .args(args)
                .env_clear()
                .env("PATH", CHROOT_PATH)
                .env("LANG", "C.UTF-8"),
        )
    }

    /// Copies `debs` into the root's /tmp and installs them with `dpkg -i`.
    pub fn dpkg_install(&self, debs: &[&Path]) -> Output {
        let mut args = vec!["dpkg".to_owned(), "-i".to_owned()];
        for deb in debs {
            let name = deb
                .file_name()
                .and_then(|n| n.to_str())
                .expect("package file name");
            fs::copy(deb, self.join("/tmp").join(name)).expect("copying a package into the root");
            args.push(format!("/tmp/{name}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.chroot(&args)
    }
}

/// `out`'s stdout and stderr, for assertion messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
