//! Test support: a dirty-able copy of the Debian root, tree checksums that
//! cope with odd names and deep trees, mounts undone on drop, and running the
//! agent binary.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    io::Read,
    os::{
        fd::{AsFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
    process::{Command, Output},
};

use amiprep_agent::safefs::{self, Control, Event, Kind, Root, WalkOptions};
use nix::{fcntl::OFlag, sys::stat::Mode};
use sha2::{Digest, Sha256};

pub const DEFAULT_DEBIAN_ROOT: &str = "/root/.cache/amiprep-tests/debian-bookworm-minbase";

/// The cached Debian root. Missing is a failure, not a skip.
pub fn debian_root() -> PathBuf {
    let p = std::env::var_os("AMIPREP_DEBIAN_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DEBIAN_ROOT));
    assert!(
        p.join("etc/debian_version").is_file(),
        "no Debian root at {} (set AMIPREP_DEBIAN_ROOT); run scripts/test-env.sh to build it",
        p.display()
    );
    p
}

pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

pub fn bind(src: &Path, dst: &Path) -> Unmount {
    nix::mount::mount(
        Some(src),
        dst,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    Unmount(dst.to_path_buf())
}

/// A temp dir holding `root/` (a copy of the Debian root) and `outside/`
/// (files that must never be reached from the root).
pub struct Fixture {
    pub root: PathBuf,
    pub outside: PathBuf,
    // Mounts are dropped (unmounted) before the directory is removed.
    pub mounts: Vec<Unmount>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Fixture {
        let src = debian_root();
        let dir = tempfile::Builder::new()
            .prefix("amiprep-it-")
            .tempdir_in(std::env::var_os("AMIPREP_TEST_TMP").unwrap_or_else(|| "/var/tmp".into()))
            .unwrap();
        let root = dir.path().join("root");
        let st = Command::new("cp")
            .arg("-a")
            .arg(&src)
            .arg(&root)
            .status()
            .unwrap();
        assert!(st.success(), "cp -a {} failed", src.display());
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        Fixture {
            root,
            outside,
            mounts: Vec::new(),
            _dir: dir,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn write(&self, rel: &str, contents: &[u8]) -> PathBuf {
        let p = self.root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, contents).unwrap();
        p
    }

    /// Runs the agent on this root.
    pub fn agent(&self, args: &[&str]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_amiprep-agent"));
        c.arg("prepare").arg("--root").arg(&self.root).args(args);
        c.output().unwrap()
    }

    pub fn agent_json(&self, args: &[&str]) -> (i32, serde_json::Value) {
        let mut a = vec!["--format", "json"];
        a.extend_from_slice(args);
        let out = self.agent(&a);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), v)
    }
}

/// Files up to this size are hashed; larger ones are identified by inode,
/// size and ctime (hashing 200 MB unoptimised in every test is too slow).
const HASH_LIMIT: u64 = 256 * 1024;

/// A digest of every entry beneath `dir`, keyed by relative path: type,
/// mode, owner, and content (files) or target (links). Mounts are crossed so
/// bind-mounted data is covered; nothing is followed.
pub fn checksums(dir: &Path) -> BTreeMap<PathBuf, String> {
    let root = Root::open(dir).unwrap();
    let mut out = BTreeMap::new();
    let opts = WalkOptions {
        cross_mounts: true,
        ..Default::default()
    };
    safefs::walk(&root, Path::new(""), &opts, |ev| {
        match ev {
            Event::Entry(e) => {
                let m = &e.meta;
                let what = match m.kind {
                    Kind::File => {
                        let mut file = e.open_file().unwrap();
                        let fm = file.metadata().unwrap();
                        if fm.len() <= HASH_LIMIT {
                            let mut buf = Vec::new();
                            file.read_to_end(&mut buf).unwrap();
                            hex::encode(Sha256::digest(&buf))
                        } else {
                            // Large files (package archives, libraries): any
                            // write changes ctime, which cannot be set back.
                            format!(
                                "{} bytes, ino {}, ctime {}.{}",
                                fm.len(),
                                fm.ino(),
                                fm.ctime(),
                                fm.ctime_nsec()
                            )
                        }
                    }
                    Kind::Symlink => {
                        format!("-> {}", e.read_link().unwrap().to_string_lossy())
                    }
                    Kind::Dir => String::new(),
                    _ => format!("{:?}", m.kind),
                };
                out.insert(
                    e.rel.to_path_buf(),
                    format!("{:o} {}:{} {what}", m.mode, m.uid, m.gid),
                );
            }
            Event::Error { rel, error } => panic!("{}: {error}", rel.display()),
            Event::MountPoint { .. } => {}
        }
        Control::Continue
    })
    .unwrap();
    out
}

/// Creates `depth` nested directories named `name` under `dir` (descriptor-
/// relative, since the path exceeds PATH_MAX) with a file `leaf` at the
/// bottom holding `leaf`. Returns the length of the deepest path.
pub fn make_deep(dir: &Path, depth: usize, name: &OsStr, leaf: &[u8]) -> usize {
    let mut fd: OwnedFd =
        nix::fcntl::open(dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()).unwrap();
    for _ in 0..depth {
        nix::sys::stat::mkdirat(fd.as_fd(), name, Mode::from_bits_truncate(0o755)).unwrap();
        fd = nix::fcntl::openat(
            fd.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
    }
    let f = nix::fcntl::openat(
        fd.as_fd(),
        "leaf",
        OFlag::O_WRONLY | OFlag::O_CREAT,
        Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    nix::unistd::write(&f, leaf).unwrap();
    depth * (name.as_bytes().len() + 1) + 5
}

/// Mount points at or beneath `dir`, from /proc/self/mountinfo.
pub fn mounts_beneath(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let d = dir.to_string_lossy().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == d || m.starts_with(&format!("{d}/")))
        .map(str::to_string)
        .collect()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
