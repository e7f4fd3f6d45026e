//! Safe file-system access beneath a target root.
//!
//! Every step that touches the target (and the secret scanner) goes through
//! this module, so the rules that keep amiprep from harming a host live in one
//! place:
//!
//! - Everything is descriptor-relative. A [`Root`] holds an `O_PATH` descriptor
//!   of the target root; multi-component paths are resolved with `openat2`
//!   (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV`), or, on kernels
//!   without it, one `O_NOFOLLOW` component at a time with a mount check per
//!   component. An absolute path is never built to open anything, so trees
//!   deeper than `PATH_MAX` are fine and an absolute symlink in an offline root
//!   can never lead to the host's own files.
//! - A symlink is never followed: it is reported, or removed, as a link.
//! - Mount points are detected by mount id (`statx` `STATX_MNT_ID`), because a
//!   bind mount of the same file system has the same `st_dev`. They are never
//!   crossed unless asked for.
//! - FIFOs, sockets and device nodes are never opened; removing them is an
//!   `unlinkat`.
//! - Directories are removed with `unlinkat(AT_REMOVEDIR)` after their
//!   contents, which the kernel refuses for anything non-empty: a directory
//!   that still holds something the walk did not remove (a mount point, an
//!   unreadable entry) is left in place and reported, never force-removed.
//!
//! [`walk`] is the one tree walker; [`ops`] holds the removal, truncation and
//! atomic-write primitives built on it.

mod ops;
mod walk;

pub use ops::{
    Removal, RemoveError, Usage, read_beneath, read_link_beneath, remove_beneath, stat_beneath,
    symlink_beneath, truncate_beneath, usage_beneath, write_file_beneath,
};
pub use walk::{Control, Entry, Event, WalkOptions, WalkStats, walk};

use std::{
    ffi::{CString, OsStr, OsString},
    fs::File,
    io,
    mem::MaybeUninit,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Component, Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use nix::{
    errno::Errno,
    fcntl::{OFlag, OpenHow, ResolveFlag},
    sys::stat::Mode,
};

/// An opened target root: the directory everything else is resolved beneath.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
    mnt_id: u64,
}

impl Root {
    /// Opens `path` as a target root. The path itself is resolved normally
    /// (it is the operator's choice); nothing beneath it ever is.
    ///
    /// Fails when the kernel does not report mount ids (`statx` `STATX_MNT_ID`,
    /// Linux 5.8): without them a bind mount inside the root could not be told
    /// apart, and amiprep refuses rather than risk crossing one.
    pub fn open(path: &Path) -> io::Result<Root> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| with_context(e.into(), path))?;
        let meta = statx_fd(fd.as_fd())?;
        Ok(Root {
            fd,
            path: path.to_path_buf(),
            mnt_id: meta.mnt_id,
        })
    }

    /// The path the root was opened with (for messages only; never used to
    /// open anything).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The mount id of the root directory; entries on any other mount are
    /// beyond a mount point.
    pub fn mnt_id(&self) -> u64 {
        self.mnt_id
    }

    /// The root's `O_PATH` descriptor.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `rel` shown under the root path, for messages.
    pub fn display(&self, rel: &Path) -> PathBuf {
        self.path.join(rel)
    }
}

/// File type of an entry, from `lstat` semantics (a symlink is a `Symlink`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    Other,
}

impl Kind {
    fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDevice,
            libc::S_IFBLK => Kind::BlockDevice,
            _ => Kind::Other,
        }
    }
}

/// Metadata of an entry, never following a symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    /// Full `st_mode` (type and permission bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mnt_id: u64,
}

impl Meta {
    fn same_file(&self, other: &Meta) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }
}

/// An I/O error with the root-relative path it concerns; the original error
/// (and its errno, see [`os_error`]) stays reachable.
#[derive(Debug)]
struct PathError {
    path: PathBuf,
    source: io::Error,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.source)
    }
}

impl std::error::Error for PathError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

fn with_context(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(
        e.kind(),
        PathError {
            path: path.to_path_buf(),
            source: e,
        },
    )
}

/// The errno behind `e`, also when it was wrapped with a path.
pub fn os_error(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|i| i.downcast_ref::<PathError>())
            .and_then(|p| os_error(&p.source))
    })
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))
}

fn statx_raw(dirfd: BorrowedFd<'_>, name: &CString, flags: libc::c_int) -> io::Result<Meta> {
    let mut buf = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `name` is a valid NUL-terminated string, `dirfd` a live
    // descriptor, and `buf` points to writable memory of the right size that
    // the kernel fills on success.
    let rc = unsafe {
        libc::statx(
            dirfd.as_raw_fd(),
            name.as_ptr(),
            flags | libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT,
            libc::STATX_BASIC_STATS | libc::STATX_MNT_ID,
            buf.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statx returned 0, so it initialised the buffer (which was also
    // zeroed beforehand).
    let stx = unsafe { buf.assume_init() };
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "kernel does not report mount ids (statx STATX_MNT_ID needs Linux 5.8); \
             refusing to work without mount-point detection",
        ));
    }
    Ok(Meta {
        kind: Kind::from_mode(u32::from(stx.stx_mode)),
        size: stx.stx_size,
        dev: libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
        ino: stx.stx_ino,
        nlink: u64::from(stx.stx_nlink),
        mode: u32::from(stx.stx_mode),
        uid: stx.stx_uid,
        gid: stx.stx_gid,
        mnt_id: stx.stx_mnt_id,
    })
}

/// `statx` of `name` in `dirfd`, never following a symlink or an automount.
pub(crate) fn statx_at(dirfd: BorrowedFd<'_>, name: &OsStr) -> io::Result<Meta> {
    statx_raw(dirfd, &cstr(name)?, 0)
}

/// `statx` of an open descriptor.
pub(crate) fn statx_fd(fd: BorrowedFd<'_>) -> io::Result<Meta> {
    statx_raw(fd, &CString::default(), libc::AT_EMPTY_PATH)
}

/// Opens directory `name` in `parent` for reading, refusing symlinks.
pub(crate) fn open_dir_at(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(nix::fcntl::openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens regular file `name` in `parent` read-only, without following a
/// symlink, without blocking on a FIFO and, where permitted, without
/// updating its access time. If `expect` is given, the opened file must be
/// that file (same device and inode) — it guards against a swap between the
/// `statx` that chose it and the open.
pub(crate) fn open_regular_at(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    expect: Option<&Meta>,
) -> io::Result<File> {
    let base = OFlag::O_RDONLY
        | OFlag::O_NOFOLLOW
        | OFlag::O_NONBLOCK
        | OFlag::O_CLOEXEC
        | OFlag::O_NOCTTY;
    let fd = match nix::fcntl::openat(parent, name, base | OFlag::O_NOATIME, Mode::empty()) {
        // O_NOATIME needs ownership or CAP_FOWNER.
        Err(Errno::EPERM) => nix::fcntl::openat(parent, name, base, Mode::empty())?,
        r => r?,
    };
    check_regular(&fd, expect)?;
    Ok(File::from(fd))
}

fn check_regular(fd: &OwnedFd, expect: Option<&Meta>) -> io::Result<Meta> {
    let meta = statx_fd(fd.as_fd())?;
    if meta.kind != Kind::File {
        return Err(not_regular(meta.kind));
    }
    if let Some(expect) = expect
        && !expect.same_file(&meta)
    {
        return Err(io::Error::other("file was replaced while being opened"));
    }
    Ok(meta)
}

fn not_regular(kind: Kind) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a regular file ({kind:?}); left alone"),
    )
}

/// Normalises a root-relative path: a leading `/` is dropped (policy paths
/// read naturally as `/var/log`), `.` components are dropped, and `..` is
/// refused outright.
pub fn clean_rel(rel: &Path) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{}: '..' is not allowed in a root-relative path",
                        rel.display()
                    ),
                ));
            }
        }
    }
    Ok(out)
}

static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Opens `rel` beneath `root` with `flags`: no symlink anywhere in the path
/// (including the last component, unless `O_PATH|O_NOFOLLOW` asks for the
/// link itself), no `..` escape, no mount crossing.
pub fn open_beneath(root: &Root, rel: &Path, flags: OFlag) -> io::Result<OwnedFd> {
    let rel = clean_rel(rel)?;
    let target: &Path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        &rel
    };
    let flags = flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        let how = OpenHow::new().flags(flags).resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
        match nix::fcntl::openat2(root.as_fd(), target, how) {
            Err(Errno::ENOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
            // openat2 retries are possible under heavy rename activity.
            Err(Errno::EAGAIN) => {}
            r => return r.map_err(|e| with_context(e.into(), &rel)),
        }
    }
    open_beneath_by_component(root, &rel, flags).map_err(|e| with_context(e, &rel))
}

/// The same guarantees as `openat2` with `RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV`, one component at a time.
fn open_beneath_by_component(root: &Root, rel: &Path, flags: OFlag) -> io::Result<OwnedFd> {
    let mut cur: OwnedFd = nix::fcntl::openat(
        root.as_fd(),
        ".",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut comps = rel.components().peekable();
    if comps.peek().is_none() {
        return Ok(nix::fcntl::openat(cur.as_fd(), ".", flags, Mode::empty())?);
    }
    while let Some(c) = comps.next() {
        let Component::Normal(name) = c else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad component"));
        };
        let last = comps.peek().is_none();
        let meta = statx_at(cur.as_fd(), name)?;
        if meta.mnt_id != root.mnt_id {
            return Err(io::Error::from_raw_os_error(libc::EXDEV));
        }
        if meta.kind == Kind::Symlink && !(last && flags.contains(OFlag::O_PATH)) {
            return Err(io::Error::from_raw_os_error(libc::ELOOP));
        }
        let f = if last {
            flags
        } else {
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
        };
        let next = nix::fcntl::openat(cur.as_fd(), name, f, Mode::empty())?;
        let got = statx_fd(next.as_fd())?;
        if !got.same_file(&meta) || got.mnt_id != root.mnt_id {
            return Err(io::Error::other("path changed while being resolved"));
        }
        cur = next;
    }
    Ok(cur)
}

/// Whether `rel` lives on a file system that keeps its data in memory only
/// (tmpfs, ramfs), so nothing in it can end up in an image. `rel` is
/// resolved beneath the root without symlinks but, unlike everything else
/// here, across mount points: it only looks, it never opens for I/O.
pub fn is_memory_fs_beneath(root: &Root, rel: &Path) -> io::Result<bool> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let rel = clean_rel(rel)?;
    let target: &Path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        &rel
    };
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    let fd =
        nix::fcntl::openat2(root.as_fd(), target, how).map_err(|e| with_context(e.into(), &rel))?;
    let mut buf = MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `fd` is a live descriptor and `buf` writable memory of the
    // right size, filled by the kernel on success.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), buf.as_mut_ptr()) } != 0 {
        return Err(with_context(io::Error::last_os_error(), &rel));
    }
    // SAFETY: fstatfs returned 0, so the buffer is initialised.
    let st = unsafe { buf.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs per target
    let magic = st.f_type as i64;
    Ok(magic == TMPFS_MAGIC || magic == RAMFS_MAGIC)
}

/// Resolves the parent directory of `rel` beneath `root` (as an `O_PATH`
/// descriptor usable with the `*at` calls) and returns it with the last
/// component's name. `rel` must not be the root itself.
pub fn open_parent(root: &Root, rel: &Path) -> io::Result<(OwnedFd, OsString)> {
    let rel = clean_rel(rel)?;
    let Some(name) = rel.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the root itself has no parent",
        ));
    };
    let parent = rel.parent().unwrap_or(Path::new(""));
    let fd = open_beneath(root, parent, OFlag::O_PATH | OFlag::O_DIRECTORY)?;
    Ok((fd, name.to_os_string()))
}

/// Opens regular file `rel` beneath `root` for reading (see
/// [`Entry::open_file`] for the flags). Anything but a regular file is
/// refused without being opened.
pub fn open_regular_beneath(root: &Root, rel: &Path) -> io::Result<File> {
    let (parent, name) = open_parent(root, rel)?;
    let meta = statx_at(parent.as_fd(), &name).map_err(|e| with_context(e, rel))?;
    if meta.kind != Kind::File {
        return Err(with_context(not_regular(meta.kind), rel));
    }
    if meta.mnt_id != root.mnt_id {
        return Err(with_context(io::Error::from_raw_os_error(libc::EXDEV), rel));
    }
    open_regular_at(parent.as_fd(), &name, Some(&meta)).map_err(|e| with_context(e, rel))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, once: the walker holds
/// one descriptor per directory level, and a tree deeper than `PATH_MAX`
/// needs more than the usual 1024.
fn raise_nofile_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid, writable rlimit struct.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0
            && lim.rlim_cur < lim.rlim_max
        {
            lim.rlim_cur = lim.rlim_max;
            // SAFETY: `lim` is a valid rlimit struct; failure leaves the limit
            // unchanged, and the walker then reports EMFILE per directory.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
        }
    });
}

#[cfg(test)]
mod tests;
