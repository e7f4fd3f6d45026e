#![allow(clippy::unwrap_used, clippy::undocumented_unsafe_blocks)]

use std::{
    collections::BTreeMap,
    ffi::{OsStr, OsString},
    fs,
    io::Read,
    os::{
        fd::{AsFd, OwnedFd},
        unix::{
            ffi::OsStrExt,
            fs::{MetadataExt, PermissionsExt, symlink},
            net::UnixListener,
        },
    },
    path::{Path, PathBuf},
};

use nix::{fcntl::OFlag, sys::stat::Mode};

use super::*;

fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let outside = t.path().join("outside");
    fs::create_dir_all(root.join("tmp")).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("precious"), b"do not touch").unwrap();
    (t, root, outside)
}

/// Every entry of a walk: rel path → kind.
fn collect(
    root: &Root,
    start: &str,
    opts: &WalkOptions,
) -> (BTreeMap<PathBuf, Kind>, Vec<PathBuf>) {
    let mut seen = BTreeMap::new();
    let mut mounts = Vec::new();
    walk(root, Path::new(start), opts, |ev| {
        match ev {
            Event::Entry(e) => {
                assert!(seen.insert(e.rel.to_path_buf(), e.meta.kind).is_none());
            }
            Event::MountPoint { rel } => mounts.push(rel.to_path_buf()),
            Event::Error { rel, error } => panic!("{}: {error}", rel.display()),
        }
        Control::Continue
    })
    .unwrap();
    (seen, mounts)
}

struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn bind(src: &Path, dst: &Path) -> Unmount {
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

#[test]
fn walk_is_preorder_sorted_and_reports_kinds() {
    let (_t, root, _) = setup();
    fs::create_dir_all(root.join("a/b")).unwrap();
    fs::write(root.join("a/b/f"), b"x").unwrap();
    fs::write(root.join("a/z"), b"yy").unwrap();
    symlink("b", root.join("a/l")).unwrap();
    nix::unistd::mkfifo(&root.join("a/fifo"), Mode::from_bits_truncate(0o600)).unwrap();
    let _sock = UnixListener::bind(root.join("a/sock")).unwrap();
    let r = Root::open(&root).unwrap();
    let mut order = Vec::new();
    walk(&r, Path::new("a"), &WalkOptions::default(), |ev| {
        if let Event::Entry(e) = ev {
            order.push((e.rel.to_path_buf(), e.meta.kind));
        }
        Control::Continue
    })
    .unwrap();
    let p = PathBuf::from;
    assert_eq!(
        order,
        vec![
            (p("a"), Kind::Dir),
            (p("a/b"), Kind::Dir),
            (p("a/b/f"), Kind::File),
            (p("a/fifo"), Kind::Fifo),
            (p("a/l"), Kind::Symlink),
            (p("a/sock"), Kind::Socket),
            (p("a/z"), Kind::File),
        ]
    );
}

#[test]
fn symlink_loops_and_escapes_are_not_followed() {
    let (_t, root, outside) = setup();
    symlink("loop2", root.join("tmp/loop1")).unwrap();
    symlink("loop1", root.join("tmp/loop2")).unwrap();
    symlink(".", root.join("tmp/self")).unwrap();
    symlink(&outside, root.join("tmp/abs_out")).unwrap();
    symlink("../../outside/precious", root.join("tmp/rel_out")).unwrap();
    symlink("/", root.join("tmp/slash")).unwrap();
    let r = Root::open(&root).unwrap();
    let (seen, _) = collect(&r, "", &WalkOptions::default());
    assert_eq!(seen.len(), 7, "{seen:?}");
    for n in ["loop1", "loop2", "self", "abs_out", "rel_out", "slash"] {
        assert_eq!(seen[&PathBuf::from("tmp").join(n)], Kind::Symlink);
    }
    // Resolving through any of them is refused.
    for n in ["tmp/self/loop1", "tmp/abs_out/precious", "tmp/slash/etc"] {
        let e = open_beneath(&r, Path::new(n), OFlag::O_RDONLY).unwrap_err();
        assert_eq!(os_error(&e), Some(libc::ELOOP), "{n}: {e}");
    }
    assert!(open_regular_beneath(&r, Path::new("tmp/rel_out")).is_err());
    assert!(open_beneath(&r, Path::new("../outside"), OFlag::O_RDONLY).is_err());
    // Removing the directory removes the links, never their targets.
    let rm = remove_beneath(&r, Path::new("tmp")).unwrap();
    assert!(rm.gone && rm.errors.is_empty(), "{rm:?}");
    assert_eq!(rm.entries_removed, 7);
    assert_eq!(fs::read(outside.join("precious")).unwrap(), b"do not touch");
}

#[test]
fn by_component_fallback_has_the_same_guarantees() {
    let (_t, root, outside) = setup();
    fs::create_dir_all(root.join("etc/ssh")).unwrap();
    fs::write(root.join("etc/ssh/key"), b"k").unwrap();
    symlink(&outside, root.join("tmp/out")).unwrap();
    let r = Root::open(&root).unwrap();
    let fd = open_beneath_by_component(&r, Path::new("etc/ssh/key"), OFlag::O_RDONLY).unwrap();
    let mut s = String::new();
    fs::File::from(fd).read_to_string(&mut s).unwrap();
    assert_eq!(s, "k");
    let e =
        open_beneath_by_component(&r, Path::new("tmp/out/precious"), OFlag::O_RDONLY).unwrap_err();
    assert_eq!(os_error(&e), Some(libc::ELOOP));
    let mnt = root.join("tmp/mnt");
    fs::create_dir(&mnt).unwrap();
    let _g = bind(&outside, &mnt);
    let e =
        open_beneath_by_component(&r, Path::new("tmp/mnt/precious"), OFlag::O_RDONLY).unwrap_err();
    assert_eq!(os_error(&e), Some(libc::EXDEV));
}

#[test]
fn bind_mount_inside_is_detected_and_survives_removal() {
    let (_t, root, outside) = setup();
    let mnt = root.join("tmp/sub/mnt");
    fs::create_dir_all(&mnt).unwrap();
    fs::write(root.join("tmp/sub/junk"), b"junk").unwrap();
    fs::write(root.join("tmp/other"), b"other").unwrap();
    let _g = bind(&outside, &mnt);
    // Same file system, same st_dev: only the mount id tells them apart.
    assert_eq!(
        fs::metadata(&mnt).unwrap().dev(),
        fs::metadata(root.join("tmp")).unwrap().dev()
    );
    let r = Root::open(&root).unwrap();
    let (seen, mounts) = collect(&r, "tmp", &WalkOptions::default());
    assert_eq!(mounts, vec![PathBuf::from("tmp/sub/mnt")]);
    assert!(!seen.contains_key(Path::new("tmp/sub/mnt/precious")));
    let (seen, _) = collect(
        &r,
        "tmp",
        &WalkOptions {
            cross_mounts: true,
            ..Default::default()
        },
    );
    assert!(seen.contains_key(Path::new("tmp/sub/mnt/precious")));

    let rm = remove_beneath(&r, Path::new("tmp")).unwrap();
    assert!(!rm.gone);
    assert!(rm.errors.is_empty(), "{rm:?}");
    assert_eq!(rm.mounts_skipped, vec![PathBuf::from("tmp/sub/mnt")]);
    assert!(!root.join("tmp/other").exists());
    assert!(!root.join("tmp/sub/junk").exists());
    assert_eq!(fs::read(mnt.join("precious")).unwrap(), b"do not touch");
    assert_eq!(fs::read(outside.join("precious")).unwrap(), b"do not touch");
}

#[test]
fn fifo_socket_and_devices_are_never_opened() {
    let (_t, root, _) = setup();
    nix::unistd::mkfifo(&root.join("tmp/fifo"), Mode::from_bits_truncate(0o644)).unwrap();
    let _sock = UnixListener::bind(root.join("tmp/sock")).unwrap();
    nix::sys::stat::mknod(
        &root.join("tmp/null"),
        nix::sys::stat::SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let r = Root::open(&root).unwrap();
    let mut refused = 0;
    walk(&r, Path::new("tmp"), &WalkOptions::default(), |ev| {
        if let Event::Entry(e) = ev
            && e.meta.kind != Kind::Dir
        {
            // Would block forever on the FIFO if it were opened.
            let err = e.open_file().unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
            refused += 1;
        }
        Control::Continue
    })
    .unwrap();
    assert_eq!(refused, 3);
    assert!(open_regular_beneath(&r, Path::new("tmp/fifo")).is_err());
    assert!(truncate_beneath(&r, Path::new("tmp/fifo")).is_err());
    let rm = remove_beneath(&r, Path::new("tmp")).unwrap();
    assert!(rm.gone, "{rm:?}");
}

fn make_deep(root: &Path, start: &str, depth: usize, name: &OsStr) -> usize {
    let mut fd: OwnedFd = nix::fcntl::open(
        &root.join(start),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Mode::empty(),
    )
    .unwrap();
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
    drop(f);
    depth * (name.len() + 1)
}

#[test]
fn tree_deeper_than_path_max() {
    let (_t, root, _) = setup();
    let name = OsString::from("d".repeat(200));
    let len = make_deep(&root, "tmp", 40, &name);
    assert!(len > libc::PATH_MAX as usize);
    let r = Root::open(&root).unwrap();
    let (seen, _) = collect(&r, "tmp", &WalkOptions::default());
    assert_eq!(seen.len(), 1 + 40 + 1);
    let deepest = seen.keys().map(|p| p.as_os_str().len()).max().unwrap();
    assert!(deepest > libc::PATH_MAX as usize);
    let u = usage_beneath(&r, Path::new("tmp")).unwrap().unwrap();
    assert_eq!(u.entries, 42);
    let rm = remove_beneath(&r, &Path::new("tmp").join(&name)).unwrap();
    assert!(rm.gone && rm.errors.is_empty(), "{rm:?}");
    assert_eq!(rm.entries_removed, 41);
}

#[test]
fn nesting_beyond_the_soft_descriptor_limit() {
    let (_t, root, _) = setup();
    make_deep(&root, "tmp", 1500, OsStr::new("d"));
    let r = Root::open(&root).unwrap();
    let rm = remove_beneath(&r, Path::new("tmp/d")).unwrap();
    assert!(rm.gone && rm.errors.is_empty(), "{:?}", rm.errors.first());
    assert_eq!(rm.entries_removed, 1501);
}

#[test]
fn odd_names() {
    let (_t, root, _) = setup();
    let names: Vec<OsString> = vec![
        OsStr::from_bytes(b"bad\xff\xfeutf8").into(),
        "new\nline".into(),
        "-rf".into(),
        " space ".into(),
        "*".into(),
        "..hidden".into(),
        "x".repeat(255).into(),
    ];
    for n in &names {
        fs::write(root.join("tmp").join(n), b"odd").unwrap();
    }
    let r = Root::open(&root).unwrap();
    let (seen, _) = collect(&r, "tmp", &WalkOptions::default());
    for n in &names {
        assert_eq!(seen[&Path::new("tmp").join(n)], Kind::File);
    }
    let mut read = 0;
    walk(&r, Path::new("tmp"), &WalkOptions::default(), |ev| {
        if let Event::Entry(e) = ev
            && e.meta.kind == Kind::File
        {
            let mut s = String::new();
            e.open_file().unwrap().read_to_string(&mut s).unwrap();
            assert_eq!(s, "odd");
            read += 1;
        }
        Control::Continue
    })
    .unwrap();
    assert_eq!(read, names.len());
    let rm = remove_beneath(&r, Path::new("tmp")).unwrap();
    assert!(rm.gone);
    assert_eq!(rm.bytes_freed, 3 * names.len() as u64);
}

#[test]
fn skip_max_depth_and_skipdir() {
    let (_t, root, _) = setup();
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir_all(root.join("a/keep/x")).unwrap();
    fs::write(root.join("a/b/c/f"), b"").unwrap();
    let r = Root::open(&root).unwrap();
    let (seen, _) = collect(
        &r,
        "/a",
        &WalkOptions {
            skip: vec!["/a/keep".into()],
            max_depth: Some(2),
            ..Default::default()
        },
    );
    let keys: Vec<_> = seen.keys().cloned().collect();
    assert_eq!(keys, vec![PathBuf::from("a"), "a/b".into(), "a/b/c".into()]);
    let mut n = 0;
    walk(&r, Path::new(""), &WalkOptions::default(), |ev| {
        n += 1;
        match ev {
            Event::Entry(e) if e.meta.kind == Kind::Dir => Control::SkipDir,
            _ => Control::Continue,
        }
    })
    .unwrap();
    assert_eq!(n, 2); // "a" and "tmp"
    let mut n = 0;
    walk(&r, Path::new(""), &WalkOptions::default(), |_| {
        n += 1;
        Control::Stop
    })
    .unwrap();
    assert_eq!(n, 1);
    assert_eq!(
        walk(&r, Path::new("nope"), &WalkOptions::default(), |_| {
            Control::Continue
        })
        .unwrap_err()
        .kind(),
        std::io::ErrorKind::NotFound
    );
}

#[test]
fn truncate_keeps_inode_owner_and_mode_and_refuses_links() {
    let (_t, root, outside) = setup();
    let log = root.join("tmp/syslog");
    fs::write(&log, b"0123456789").unwrap();
    fs::set_permissions(&log, fs::Permissions::from_mode(0o640)).unwrap();
    nix::unistd::chown(&log, Some(4.into()), Some(4.into())).unwrap();
    let before = fs::metadata(&log).unwrap();
    symlink(outside.join("precious"), root.join("tmp/link")).unwrap();
    let r = Root::open(&root).unwrap();
    assert_eq!(truncate_beneath(&r, Path::new("tmp/syslog")).unwrap(), 10);
    let after = fs::metadata(&log).unwrap();
    assert_eq!(after.len(), 0);
    assert_eq!(
        (after.ino(), after.mode(), after.uid(), after.gid()),
        (before.ino(), before.mode(), before.uid(), before.gid())
    );
    assert!(truncate_beneath(&r, Path::new("tmp/link")).is_err());
    assert_eq!(fs::read(outside.join("precious")).unwrap(), b"do not touch");
}

#[test]
fn atomic_write_keeps_owner_mode_and_replaces_links_not_targets() {
    let (_t, root, outside) = setup();
    fs::create_dir_all(root.join("etc")).unwrap();
    let mid = root.join("etc/machine-id");
    fs::write(&mid, b"0123\n").unwrap();
    fs::set_permissions(&mid, fs::Permissions::from_mode(0o444)).unwrap();
    nix::unistd::chown(&mid, Some(7.into()), Some(8.into())).unwrap();
    symlink(outside.join("precious"), root.join("etc/hostname")).unwrap();
    let r = Root::open(&root).unwrap();
    write_file_beneath(&r, Path::new("etc/machine-id"), b"uninitialized\n", 0o444).unwrap();
    let m = fs::metadata(&mid).unwrap();
    assert_eq!(fs::read(&mid).unwrap(), b"uninitialized\n");
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o444, 7, 8));
    write_file_beneath(&r, Path::new("etc/hostname"), b"localhost\n", 0o644).unwrap();
    assert!(
        fs::symlink_metadata(root.join("etc/hostname"))
            .unwrap()
            .is_file()
    );
    assert_eq!(fs::read(outside.join("precious")).unwrap(), b"do not touch");
    let left: Vec<_> = fs::read_dir(root.join("etc")).unwrap().collect();
    assert_eq!(left.len(), 2, "no temporary file left behind");
    assert!(write_file_beneath(&r, Path::new("tmp/out/x"), b"", 0o644).is_err());
}

#[test]
fn remove_refuses_root_and_parent_escapes() {
    let (_t, root, _) = setup();
    let r = Root::open(&root).unwrap();
    assert!(remove_beneath(&r, Path::new("")).is_err());
    assert!(remove_beneath(&r, Path::new("/")).is_err());
    assert!(remove_beneath(&r, Path::new("tmp/../..")).is_err());
    let rm = remove_beneath(&r, Path::new("does/not/exist")).unwrap();
    assert!(rm.gone && rm.entries_removed == 0);
    assert!(root.join("tmp").is_dir());
}

/// Runs `f` on a fresh thread whose effective capabilities lack
/// CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so root meets permission errors
/// like anyone else (capabilities are per thread on Linux).
fn without_dac_override<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    std::thread::spawn(move || {
        let mut h = Header {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let mut d = [Data::default(); 2];
        assert_eq!(
            unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) },
            0
        );
        // CAP_DAC_OVERRIDE = 1, CAP_DAC_READ_SEARCH = 2.
        d[0].effective &= !((1 << 1) | (1 << 2));
        assert_eq!(
            unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) },
            0
        );
        f()
    })
    .join()
    .unwrap()
}

#[test]
fn permission_errors_are_reported_and_the_walk_goes_on() {
    let (_t, root, _) = setup();
    fs::create_dir_all(root.join("a/locked/inner")).unwrap();
    fs::write(root.join("a/locked/inner/f"), b"x").unwrap();
    fs::write(root.join("a/z"), b"after").unwrap();
    fs::write(root.join("a/unreadable"), b"secret").unwrap();
    fs::set_permissions(root.join("a/unreadable"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::set_permissions(root.join("a/locked"), fs::Permissions::from_mode(0o000)).unwrap();
    let (seen, errors, read_err) = without_dac_override(move || {
        let r = Root::open(&root).unwrap();
        let mut seen = Vec::new();
        let mut errors = Vec::new();
        let mut read_err = None;
        let stats = walk(&r, Path::new("a"), &WalkOptions::default(), |ev| {
            match ev {
                Event::Entry(e) => {
                    if e.name == "unreadable" {
                        read_err = e.open_file().err().map(|e| e.kind());
                    }
                    seen.push(e.rel.to_path_buf());
                }
                Event::Error { rel, error } => errors.push((rel.to_path_buf(), error.kind())),
                Event::MountPoint { .. } => {}
            }
            Control::Continue
        })
        .unwrap();
        assert_eq!(stats.errors, 1);
        (seen, errors, read_err)
    });
    assert_eq!(
        errors,
        vec![(
            PathBuf::from("a/locked"),
            std::io::ErrorKind::PermissionDenied
        )]
    );
    assert_eq!(
        seen,
        vec![
            PathBuf::from("a"),
            "a/locked".into(),
            "a/unreadable".into(),
            "a/z".into()
        ]
    );
    assert_eq!(read_err, Some(std::io::ErrorKind::PermissionDenied));
}

#[test]
fn a_hard_link_in_var_log_to_etc_shadow_leaves_the_shadow_file_intact() {
    let (_t, root, _) = setup();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(root.join("var/log")).unwrap();
    let shadow = root.join("etc/shadow");
    fs::write(&shadow, b"root:$6$salt$hash:19000:0:99999:7:::\n").unwrap();
    fs::hard_link(&shadow, root.join("var/log/auth.log")).unwrap();
    fs::write(root.join("var/log/syslog"), b"ordinary log\n").unwrap();
    let r = Root::open(&root).unwrap();

    let e = truncate_beneath(&r, Path::new("var/log/auth.log")).unwrap_err();
    assert!(e.to_string().contains("2 hard links"), "{e}");
    assert!(e.to_string().contains("var/log/auth.log"), "{e}");
    assert_eq!(
        fs::read(&shadow).unwrap(),
        b"root:$6$salt$hash:19000:0:99999:7:::\n"
    );
    // An ordinary log is still truncated.
    assert_eq!(
        truncate_beneath(&r, Path::new("var/log/syslog")).unwrap(),
        13
    );

    let rm = remove_beneath(&r, Path::new("var/log")).unwrap();
    assert!(!rm.gone, "the directory holding the linked file stays");
    assert_eq!(rm.errors.len(), 1, "{:?}", rm.errors);
    assert_eq!(rm.errors[0].rel, Path::new("var/log/auth.log"));
    assert!(rm.errors[0].error.to_string().contains("hard links"));
    assert!(root.join("var/log/auth.log").exists());
    assert!(!root.join("var/log/syslog").exists());
    assert_eq!(fs::metadata(&shadow).unwrap().nlink(), 2);
    assert_eq!(
        fs::read(&shadow).unwrap(),
        b"root:$6$salt$hash:19000:0:99999:7:::\n"
    );
}
