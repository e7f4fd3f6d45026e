//! The one tree walker: pre-order, descriptor-relative, never following a
//! symlink and never crossing a mount point unless asked.

use std::{
    ffi::{OsStr, OsString},
    fs::File,
    io,
    os::{
        fd::{AsFd, BorrowedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use nix::{dir::Dir, errno::Errno, fcntl::OFlag};

use super::{
    Kind, Meta, Root, clean_rel, open_beneath, open_dir_at, open_parent, open_regular_at,
    raise_nofile_limit, statx_at, statx_fd,
};

/// What to walk and what to leave alone.
#[derive(Debug, Clone, Default)]
pub struct WalkOptions {
    /// Enter directories on other mounts. Default `false`: a mount point is
    /// reported as [`Event::MountPoint`] and not entered. Mounts are detected
    /// by mount id, since a bind mount has the same `st_dev`.
    pub cross_mounts: bool,
    /// Root-relative paths that are neither reported nor entered.
    pub skip: Vec<PathBuf>,
    /// Deepest level reported, counted from `start` (its children are at
    /// depth 1). `None`: no limit.
    pub max_depth: Option<usize>,
}

/// One entry of the walk. Valid only during the callback.
pub struct Entry<'a> {
    /// Path relative to the root, no leading `/`.
    pub rel: &'a Path,
    /// The entry's own name (may not be UTF-8).
    pub name: &'a OsStr,
    pub meta: Meta,
    parent: BorrowedFd<'a>,
}

impl std::fmt::Debug for Entry<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("rel", &self.rel)
            .field("meta", &self.meta)
            .finish()
    }
}

impl<'a> Entry<'a> {
    /// Opens this entry for reading if it is a regular file: `openat(parent,
    /// name, O_RDONLY|O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC|O_NOCTTY)`, with
    /// `O_NOATIME` where permitted. Anything else (FIFO, socket, device,
    /// symlink, directory) is refused without being opened, and the opened
    /// file must still be the one that was walked.
    pub fn open_file(&self) -> io::Result<File> {
        if self.meta.kind != Kind::File {
            return Err(super::not_regular(self.meta.kind));
        }
        open_regular_at(self.parent, self.name, Some(&self.meta))
    }

    /// The target of a symlink entry, as stored (never resolved).
    pub fn read_link(&self) -> io::Result<OsString> {
        Ok(nix::fcntl::readlinkat(self.parent, self.name)?)
    }

    /// The directory holding this entry, for further `*at` calls.
    pub fn parent_fd(&self) -> BorrowedFd<'a> {
        self.parent
    }
}

/// What the walker reports.
#[derive(Debug)]
pub enum Event<'a> {
    Entry(&'a Entry<'a>),
    /// An entry or directory that could not be read; the walk goes on.
    Error {
        rel: &'a Path,
        error: &'a io::Error,
    },
    /// A directory (or file) on another mount; not entered.
    MountPoint {
        rel: &'a Path,
    },
}

/// The callback's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// For a directory entry: do not descend.
    SkipDir,
    Stop,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WalkStats {
    pub entries: u64,
    pub errors: u64,
    pub mounts_skipped: u64,
}

/// Walks the tree at `start` (root-relative; `""` is the root) in pre-order:
/// a directory is reported before its children, children in byte order of
/// their names. `start` itself is reported (depth 0) unless it is the root.
/// An entry that vanishes mid-walk is skipped quietly; any other failure is
/// reported as [`Event::Error`] and the walk continues. Returns an error only
/// when `start` cannot be resolved.
pub fn walk(
    root: &Root,
    start: &Path,
    opts: &WalkOptions,
    mut f: impl FnMut(Event<'_>) -> Control,
) -> io::Result<WalkStats> {
    struct Plain<F>(F);
    impl<F: FnMut(Event<'_>) -> Control> Visitor for Plain<F> {
        fn visit(&mut self, ev: Event<'_>) -> Visit {
            match (self.0)(ev) {
                Control::Continue => Visit::Continue,
                Control::SkipDir => Visit::SkipDir,
                Control::Stop => Visit::Stop,
            }
        }
    }
    walk_core(root, start, opts, &mut Plain(&mut f))
}

/// The walker's internal callback answer: [`Control`] plus `Kept`, "this
/// entry is still there" (so its parent directory cannot be removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Visit {
    Continue,
    SkipDir,
    Stop,
    Kept,
}

pub(crate) trait Visitor {
    fn visit(&mut self, ev: Event<'_>) -> Visit;
    /// Called after all children of a directory (other than the root) were
    /// visited. `emptied`: every child was visited and none was kept.
    /// Returns whether the directory is gone.
    fn leave_dir(
        &mut self,
        _parent: BorrowedFd<'_>,
        _name: &OsStr,
        _rel: &Path,
        _emptied: bool,
    ) -> bool {
        false
    }
}

struct Frame {
    dir: Dir,
    names: std::vec::IntoIter<OsString>,
    /// The directory's name in its parent; `None` for the root.
    name: Option<OsString>,
    depth: usize,
    emptied: bool,
}

fn read_names(dir: &mut Dir) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for e in dir.iter() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

fn is_vanished(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOENT)
}

/// Opens directory `name` in `parent` as a frame, checking that it is still
/// the directory `meta` describes (not swapped for another, not a new mount).
fn open_frame(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    meta: &Meta,
    depth: usize,
) -> io::Result<Frame> {
    let fd = open_dir_at(parent, name)?;
    let got = statx_fd(fd.as_fd())?;
    if !got.same_file(meta) || got.mnt_id != meta.mnt_id {
        return Err(io::Error::other("directory changed during the walk"));
    }
    let mut dir = Dir::from_fd(fd)?;
    let names = read_names(&mut dir)?;
    Ok(Frame {
        dir,
        names: names.into_iter(),
        name: Some(name.to_os_string()),
        depth,
        emptied: true,
    })
}

pub(crate) fn walk_core(
    root: &Root,
    start: &Path,
    opts: &WalkOptions,
    v: &mut dyn Visitor,
) -> io::Result<WalkStats> {
    raise_nofile_limit();
    let start = clean_rel(start)?;
    let skip: Vec<PathBuf> = opts
        .skip
        .iter()
        .map(|p| clean_rel(p))
        .collect::<io::Result<_>>()?;
    let mut stats = WalkStats::default();
    let mut rel = start.clone();
    let mut frames: Vec<Frame> = Vec::new();
    let within_depth = |d: usize| opts.max_depth.is_none_or(|m| d <= m);

    // The parent of `start`, kept open for the final `leave_dir`.
    let start_parent = if start.as_os_str().is_empty() {
        let fd = open_beneath(root, Path::new(""), OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
        let mut dir = Dir::from_fd(fd)?;
        let names = read_names(&mut dir)?;
        frames.push(Frame {
            dir,
            names: names.into_iter(),
            name: None,
            depth: 0,
            emptied: true,
        });
        None
    } else {
        let (pfd, name) = open_parent(root, &start)?;
        let meta = statx_at(pfd.as_fd(), &name).map_err(|e| super::with_context(e, &start))?;
        if meta.mnt_id != root.mnt_id && !opts.cross_mounts {
            stats.mounts_skipped += 1;
            v.visit(Event::MountPoint { rel: &rel });
            return Ok(stats);
        }
        stats.entries += 1;
        let entry = Entry {
            rel: &rel,
            name: &name,
            meta,
            parent: pfd.as_fd(),
        };
        let c = v.visit(Event::Entry(&entry));
        if meta.kind != Kind::Dir || c != Visit::Continue {
            return Ok(stats);
        }
        match open_frame(pfd.as_fd(), &name, &meta, 0) {
            Ok(fr) => frames.push(fr),
            Err(e) => {
                stats.errors += 1;
                v.visit(Event::Error {
                    rel: &rel,
                    error: &e,
                });
                return Ok(stats);
            }
        }
        Some(pfd)
    };

    while let Some(top) = frames.last_mut() {
        let Some(name) = top.names.next() else {
            // Directory done: hand it to `leave_dir`, then pop it.
            let Some(fr) = frames.pop() else { break };
            if let Some(name) = &fr.name {
                let parent = match frames.last() {
                    Some(p) => p.dir.as_fd(),
                    None => match &start_parent {
                        Some(p) => p.as_fd(),
                        None => break,
                    },
                };
                let gone = v.leave_dir(parent, name, &rel, fr.emptied);
                if !gone && let Some(p) = frames.last_mut() {
                    p.emptied = false;
                }
                rel.pop();
            }
            drop(fr);
            continue;
        };
        let depth = top.depth + 1;
        rel.push(&name);
        if !within_depth(depth) || skip.contains(&rel) {
            top.emptied = false;
            rel.pop();
            continue;
        }
        let meta = match statx_at(top.dir.as_fd(), &name) {
            Ok(m) => m,
            Err(e) if is_vanished(&e) => {
                rel.pop();
                continue;
            }
            Err(e) => {
                stats.errors += 1;
                top.emptied = false;
                if v.visit(Event::Error {
                    rel: &rel,
                    error: &e,
                }) == Visit::Stop
                {
                    return Ok(stats);
                }
                rel.pop();
                continue;
            }
        };
        if meta.mnt_id != root.mnt_id && !opts.cross_mounts {
            stats.mounts_skipped += 1;
            top.emptied = false;
            if v.visit(Event::MountPoint { rel: &rel }) == Visit::Stop {
                return Ok(stats);
            }
            rel.pop();
            continue;
        }
        stats.entries += 1;
        let entry = Entry {
            rel: &rel,
            name: &name,
            meta,
            parent: top.dir.as_fd(),
        };
        let c = v.visit(Event::Entry(&entry));
        match c {
            Visit::Stop => return Ok(stats),
            Visit::Kept => top.emptied = false,
            Visit::SkipDir if meta.kind == Kind::Dir => top.emptied = false,
            _ => {}
        }
        if meta.kind == Kind::Dir && c == Visit::Continue {
            if !within_depth(depth + 1) {
                // Its children are beyond the depth limit: not visited.
                top.emptied = false;
            } else {
                match open_frame(top.dir.as_fd(), &name, &meta, depth) {
                    Ok(fr) => {
                        frames.push(fr);
                        continue; // `rel` stays pushed while inside it
                    }
                    Err(e) if is_vanished(&e) => {}
                    Err(e) => {
                        let e = if e.raw_os_error() == Some(Errno::EMFILE as i32) {
                            io::Error::new(
                                e.kind(),
                                "too many open files (directory nesting exceeds the descriptor limit)",
                            )
                        } else {
                            e
                        };
                        stats.errors += 1;
                        top.emptied = false;
                        if v.visit(Event::Error {
                            rel: &rel,
                            error: &e,
                        }) == Visit::Stop
                        {
                            return Ok(stats);
                        }
                    }
                }
            }
        }
        rel.pop();
    }
    Ok(stats)
}
