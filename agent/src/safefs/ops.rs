//! Changing things beneath a root: remove, truncate, write atomically. Every
//! step uses these; none does its own file-system surgery.

use std::{
    ffi::OsStr,
    io::{self, Read, Write},
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use nix::{
    errno::Errno,
    fcntl::OFlag,
    sys::stat::Mode,
    unistd::{Gid, Uid, UnlinkatFlags},
};

use super::{
    Kind, Meta, Root, check_regular, clean_rel, not_regular, open_beneath, open_parent, statx_at,
    walk::{Event, Visit, Visitor, WalkOptions, walk_core},
    with_context,
};

/// Size of a tree, as [`remove_beneath`] would free it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Entries (the start included).
    pub entries: u64,
    /// Bytes of regular files.
    pub bytes: u64,
    pub mounts_skipped: u64,
    pub errors: u64,
}

/// Measures the tree at `rel` without changing anything. `Ok(None)` when it
/// does not exist.
pub fn usage_beneath(root: &Root, rel: &Path) -> io::Result<Option<Usage>> {
    let mut u = Usage::default();
    let r = super::walk(root, rel, &WalkOptions::default(), |ev| {
        match ev {
            Event::Entry(e) => {
                u.entries += 1;
                if e.meta.kind == Kind::File {
                    u.bytes += e.meta.size;
                }
            }
            Event::MountPoint { .. } => u.mounts_skipped += 1,
            Event::Error { .. } => u.errors += 1,
        }
        super::Control::Continue
    });
    match r {
        Ok(_) => Ok(Some(u)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[derive(Debug)]
pub struct RemoveError {
    pub rel: PathBuf,
    pub error: io::Error,
}

/// The outcome of [`remove_beneath`].
#[derive(Debug, Default)]
pub struct Removal {
    pub entries_removed: u64,
    /// Bytes of regular files unlinked.
    pub bytes_freed: u64,
    /// Mount points found (and left alone) inside the tree.
    pub mounts_skipped: Vec<PathBuf>,
    pub errors: Vec<RemoveError>,
    /// Whether `rel` itself is gone (or never existed).
    pub gone: bool,
}

struct Remover {
    out: Removal,
}

impl Visitor for Remover {
    fn visit(&mut self, ev: Event<'_>) -> Visit {
        match ev {
            Event::Entry(e) if e.meta.kind == Kind::Dir => Visit::Continue,
            Event::Entry(e) if e.meta.kind == Kind::File && e.meta.nlink > 1 => {
                // Another name shares this inode (perhaps outside the tree):
                // leave it, and say so.
                self.out.errors.push(RemoveError {
                    rel: e.rel.to_path_buf(),
                    error: hard_linked(e.meta.nlink),
                });
                Visit::Kept
            }
            Event::Entry(e) => {
                // Symlinks, FIFOs, sockets and devices are unlinked as names;
                // nothing is ever opened.
                match nix::unistd::unlinkat(e.parent_fd(), e.name, UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => {
                        self.out.entries_removed += 1;
                        if e.meta.kind == Kind::File {
                            self.out.bytes_freed += e.meta.size;
                        }
                        Visit::Continue
                    }
                    Err(err) => {
                        self.out.errors.push(RemoveError {
                            rel: e.rel.to_path_buf(),
                            error: err.into(),
                        });
                        Visit::Kept
                    }
                }
            }
            Event::MountPoint { rel } => {
                self.out.mounts_skipped.push(rel.to_path_buf());
                Visit::Continue
            }
            Event::Error { rel, error } => {
                self.out.errors.push(RemoveError {
                    rel: rel.to_path_buf(),
                    error: io::Error::new(error.kind(), error.to_string()),
                });
                Visit::Continue
            }
        }
    }

    fn leave_dir(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        rel: &Path,
        emptied: bool,
    ) -> bool {
        if !emptied {
            return false;
        }
        // AT_REMOVEDIR only removes an empty directory: if anything appeared
        // meanwhile it stays, and that is reported.
        match nix::unistd::unlinkat(parent, name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {
                self.out.entries_removed += 1;
                true
            }
            Err(err) => {
                self.out.errors.push(RemoveError {
                    rel: rel.to_path_buf(),
                    error: err.into(),
                });
                false
            }
        }
    }
}

/// The refusal for a regular file with other names: truncating it would
/// empty those too (a link in `/var/log` to `/etc/shadow`), and removing
/// this name would not free anything anyway.
fn hard_linked(nlink: u64) -> io::Error {
    io::Error::other(format!(
        "has {nlink} hard links; left alone (changing it would change the other names' content)"
    ))
}

/// Removes `rel` and everything beneath it, never following a symlink (a
/// link is removed as a link) and never entering another mount (a mount
/// point and the directories holding it stay, listed in `mounts_skipped`).
/// A regular file with more than one hard link stays and is reported in
/// `errors` (so is the directory holding it).
/// Failures are collected per entry; the rest is still removed. A missing
/// `rel` is not an error. The root itself cannot be removed.
pub fn remove_beneath(root: &Root, rel: &Path) -> io::Result<Removal> {
    let rel = clean_rel(rel)?;
    if rel.as_os_str().is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "refusing to remove the root itself",
        ));
    }
    let mut r = Remover {
        out: Removal::default(),
    };
    match walk_core(root, &rel, &WalkOptions::default(), &mut r) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            r.out.gone = true;
            return Ok(r.out);
        }
        Err(e) => return Err(e),
    }
    r.out.gone = match open_parent(root, &rel) {
        Ok((p, name)) => {
            matches!(statx_at(p.as_fd(), &name), Err(e) if e.kind() == io::ErrorKind::NotFound)
        }
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    };
    Ok(r.out)
}

/// `statx` of `rel` beneath `root`, never following a symlink. `Ok(None)`
/// when it does not exist.
pub fn stat_beneath(root: &Root, rel: &Path) -> io::Result<Option<Meta>> {
    let rel = clean_rel(rel)?;
    if rel.as_os_str().is_empty() {
        return super::statx_fd(root.as_fd()).map(Some);
    }
    let (parent, name) = match open_parent(root, &rel) {
        Ok(x) => x,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match statx_at(parent.as_fd(), &name) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(with_context(e, &rel)),
    }
}

/// The target of symlink `rel` beneath `root`, as stored (never resolved).
/// `Ok(None)` when `rel` does not exist; an error when it is not a symlink.
pub fn read_link_beneath(root: &Root, rel: &Path) -> io::Result<Option<PathBuf>> {
    let rel = clean_rel(rel)?;
    let (parent, name) = match open_parent(root, &rel) {
        Ok(x) => x,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match nix::fcntl::readlinkat(parent.as_fd(), name.as_os_str()) {
        Ok(t) => Ok(Some(PathBuf::from(t))),
        Err(nix::errno::Errno::ENOENT) => Ok(None),
        Err(e) => Err(with_context(e.into(), &rel)),
    }
}

/// Reads regular file `rel` beneath `root`, at most `limit` bytes.
pub fn read_beneath(root: &Root, rel: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let f = super::open_regular_beneath(root, rel)?;
    let mut buf = Vec::new();
    f.take(limit).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Truncates regular file `rel` beneath `root` to zero bytes, in place: the
/// inode stays, so owner, mode, extended attributes and security labels are
/// kept, and a process holding it open keeps writing to the same file.
/// Anything but a regular file (a symlink above all) is refused, and so is a
/// file with more than one hard link. Returns the bytes freed.
pub fn truncate_beneath(root: &Root, rel: &Path) -> io::Result<u64> {
    let rel = clean_rel(rel)?;
    let (parent, name) = open_parent(root, &rel)?;
    let meta = statx_at(parent.as_fd(), &name).map_err(|e| with_context(e, &rel))?;
    if meta.kind != Kind::File {
        return Err(with_context(not_regular(meta.kind), &rel));
    }
    if meta.mnt_id != root.mnt_id() {
        return Err(with_context(
            io::Error::from_raw_os_error(libc::EXDEV),
            &rel,
        ));
    }
    let fd = nix::fcntl::openat(
        parent.as_fd(),
        name.as_os_str(),
        OFlag::O_WRONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| with_context(e.into(), &rel))?;
    let got = check_regular(&fd, Some(&meta)).map_err(|e| with_context(e, &rel))?;
    // Checked on the open descriptor: a link made after the `statx` counts.
    if got.nlink > 1 {
        return Err(with_context(hard_linked(got.nlink), &rel));
    }
    nix::unistd::ftruncate(&fd, 0).map_err(|e| with_context(e.into(), &rel))?;
    Ok(got.size)
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes `contents` to `rel` beneath `root` atomically: a temporary file in
/// the same directory, fsync, rename over the target, fsync the directory. An
/// existing regular file's owner and mode are kept; otherwise the file gets
/// `mode` and root ownership. A symlink at `rel` is replaced as a link (its
/// target is never written).
pub fn write_file_beneath(root: &Root, rel: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let rel = clean_rel(rel)?;
    let (parent_path, name) = match (rel.parent(), rel.file_name()) {
        (Some(p), Some(n)) => (p.to_path_buf(), n.to_os_string()),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot write the root itself",
            ));
        }
    };
    let dir = open_beneath(root, &parent_path, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
    let (uid, gid, mode) = match statx_at(dir.as_fd(), &name) {
        Ok(m) if m.kind == Kind::File => (m.uid, m.gid, m.mode & 0o7777),
        Ok(m) if m.kind == Kind::Dir => {
            return Err(with_context(
                io::Error::new(io::ErrorKind::InvalidInput, "is a directory"),
                &rel,
            ));
        }
        Ok(_) => (0, 0, mode),
        Err(e) if e.kind() == io::ErrorKind::NotFound => (0, 0, mode),
        Err(e) => return Err(with_context(e, &rel)),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(&name);
    tmp_name.push(format!(
        ".amiprep-{}-{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let fd = nix::fcntl::openat(
        dir.as_fd(),
        tmp_name.as_os_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| with_context(e.into(), &rel))?;
    let cleanup = |e: io::Error| {
        let _ = nix::unistd::unlinkat(
            dir.as_fd(),
            tmp_name.as_os_str(),
            UnlinkatFlags::NoRemoveDir,
        );
        with_context(e, &rel)
    };
    let mut f = std::fs::File::from(fd);
    let res = (|| -> io::Result<()> {
        f.write_all(contents)?;
        nix::unistd::fchown(&f, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
        nix::sys::stat::fchmod(&f, Mode::from_bits_truncate(mode))?;
        f.sync_all()?;
        nix::fcntl::renameat(
            dir.as_fd(),
            tmp_name.as_os_str(),
            dir.as_fd(),
            name.as_os_str(),
        )?;
        Ok(())
    })();
    res.map_err(cleanup)?;
    nix::unistd::fsync(&dir).map_err(|e| with_context(e.into(), &rel))?;
    Ok(())
}

/// Creates symlink `rel` → `target` beneath `root`, atomically replacing a
/// file or link already there (never a directory). The target is stored as
/// given and never resolved here.
pub fn symlink_beneath(root: &Root, rel: &Path, target: &Path) -> io::Result<()> {
    let rel = clean_rel(rel)?;
    let (parent, name) = open_parent(root, &rel)?;
    if let Ok(m) = statx_at(parent.as_fd(), &name)
        && m.kind == Kind::Dir
    {
        return Err(with_context(
            io::Error::new(io::ErrorKind::InvalidInput, "is a directory"),
            &rel,
        ));
    }
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(&name);
    tmp_name.push(format!(
        ".amiprep-{}-{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    nix::unistd::symlinkat(target, parent.as_fd(), tmp_name.as_os_str())
        .map_err(|e| with_context(e.into(), &rel))?;
    if let Err(e) = nix::fcntl::renameat(
        parent.as_fd(),
        tmp_name.as_os_str(),
        parent.as_fd(),
        name.as_os_str(),
    ) {
        let _ = nix::unistd::unlinkat(
            parent.as_fd(),
            tmp_name.as_os_str(),
            UnlinkatFlags::NoRemoveDir,
        );
        return Err(with_context(e.into(), &rel));
    }
    Ok(())
}
