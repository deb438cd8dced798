//! Landing small files (one block or less) with as few system calls and path walks as
//! possible: a receiver lands thousands a second, and each walk of a long path from the root
//! costs more than the 4 KiB it writes.
//!
//! Each parent directory is opened once (`O_PATH`) and kept; a file is then created,
//! written, timed and linked in relative to it: `openat(O_TMPFILE)`, `write`, `futimens`,
//! `linkat`, `close`. The file has no name until it is complete, so a kill leaves nothing
//! behind, and the link fails if the name is taken (no replacing). Where unnamed files are
//! not available, and when replacing is allowed, a hidden partial name is created and renamed
//! into place instead, as for large files. The mode is set by `openat` itself when the umask
//! lets every bit through (else one `fchmod`). Data is verified before it is written.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::SystemTime;

use crate::path::RelPath;

/// Directories kept open at once; a tree with more starts over (they are cheap to reopen).
const MAX_OPEN_DIRS: usize = 256;

/// Open parent directories of a session's output, by their path below the root.
#[derive(Default)]
pub(crate) struct Dirs {
    open: Mutex<HashMap<Vec<u8>, Arc<OwnedFd>>>,
}

impl Dirs {
    /// The directory `parent` (the root when `None`) under `root`, opened once.
    fn get(&self, root: &Path, parent: Option<&[u8]>) -> std::io::Result<Arc<OwnedFd>> {
        let key = parent.unwrap_or_default().to_vec();
        if let Some(fd) = self.open.lock().expect("not poisoned").get(&key) {
            return Ok(fd.clone());
        }
        let path = match parent {
            Some(p) => root.join(std::ffi::OsStr::from_bytes(p)),
            None => root.to_path_buf(),
        };
        // Never through a link: the output tree is ours, a link in it is not a directory.
        let fd = Arc::new(crate::dirfd::open_dir(&path, false)?);
        let mut open = self.open.lock().expect("not poisoned");
        if open.len() >= MAX_OPEN_DIRS {
            open.clear();
        }
        open.insert(key, fd.clone());
        Ok(fd)
    }
}

/// The process umask, read once without changing it (`umask(2)` can only set it, which
/// would race with other threads creating files).
static UMASK: LazyLock<Option<u32>> = LazyLock::new(|| {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Umask:"))?;
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
});

/// How landing failed: in the rename (the target appeared meanwhile) or before.
pub(crate) enum LandError {
    /// The final name was taken and replacing was not allowed.
    Exists,
    /// Anything else, while `doing`.
    Io(&'static str, std::io::Error),
}

/// Lands verified `data` as `rel` with `mode` and `mtime`: as an unnamed file linked in
/// where it can, else under its hidden partial name renamed into place; replaces an existing
/// file only when `replace`.
pub(crate) fn land_small(
    dirs: &Dirs,
    root: &Path,
    rel: &RelPath,
    data: &[u8],
    mode: u32,
    mtime: SystemTime,
    replace: bool,
) -> Result<(), LandError> {
    let io = |doing| move |e| LandError::Io(doing, e);
    let dir = dirs
        .get(root, rel.parent())
        .map_err(io("opening the directory"))?;
    let name = CString::new(rel.name()).map_err(|e| io("naming")(e.into()))?;
    let mode = mode & 0o7777;
    if !replace && UNNAMED_WORKS.load(Ordering::Relaxed) {
        match land_unnamed(&dir, &name, data, mode, mtime) {
            Ok(()) => return Ok(()),
            Err(Unnamed::Land(e)) => return Err(e),
            // Named like any other partial file below, from now on.
            Err(Unnamed::Unsupported) => UNNAMED_WORKS.store(false, Ordering::Relaxed),
        }
    }
    land_named(&dir, rel, &name, data, mode, mtime, replace)
}

/// Writes `data` to the hidden partial name of `rel` in `dir` and renames it to `name`.
fn land_named(
    dir: &OwnedFd,
    rel: &RelPath,
    name: &CString,
    data: &[u8],
    mode: u32,
    mtime: SystemTime,
    replace: bool,
) -> Result<(), LandError> {
    let io = |doing| move |e| LandError::Io(doing, e);
    let part = CString::new(rel.partial_name()).map_err(|e| io("naming")(e.into()))?;
    let file = create_excl(dir, &part, mode).map_err(io("creating"))?;
    let written = (|| {
        (&file).write_all(data)?;
        set_mode_and_time(&file, mode, mtime)
    })();
    drop(file);
    let unlink_part = || {
        // SAFETY: a valid directory descriptor and NUL-terminated name.
        unsafe { libc::unlinkat(dir.as_raw_fd(), part.as_ptr(), 0) };
    };
    if let Err(e) = written {
        unlink_part();
        return Err(LandError::Io("writing", e));
    }
    match rename_at(dir, &part, name, replace) {
        Ok(()) => Ok(()),
        Err(e) => {
            unlink_part();
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Err(LandError::Exists)
            } else {
                Err(LandError::Io("moving the file into place", e))
            }
        }
    }
}

/// Whether this file system and process can create unnamed files and link them in; cleared
/// the first time that turns out not to be so.
static UNNAMED_WORKS: AtomicBool = AtomicBool::new(true);

enum Unnamed {
    Land(LandError),
    Unsupported,
}

/// Lands a file that does not replace another as an unnamed file (`O_TMPFILE`), linked in
/// under its final name once complete: one directory operation per file instead of a
/// create and a rename (which together were a third of a receiver's time on 10,000 small
/// files; the link alone costs about 40% of that pair), and nothing at all is left behind by
/// a kill. The link fails if the name is taken, which is the no-replace rule.
fn land_unnamed(
    dir: &OwnedFd,
    name: &CString,
    data: &[u8],
    mode: u32,
    mtime: SystemTime,
) -> Result<(), Unnamed> {
    let here = c".";
    let flags = libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC;
    // SAFETY: a valid directory descriptor and NUL-terminated name; the result is owned.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), here.as_ptr(), flags, mode) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL) => Unnamed::Unsupported,
            _ => Unnamed::Land(LandError::Io("creating", e)),
        });
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let written = (|| {
        (&file).write_all(data)?;
        set_mode_and_time(&file, mode, mtime)
    })();
    written.map_err(|e| Unnamed::Land(LandError::Io("writing", e)))?;
    let d = dir.as_raw_fd();
    // SAFETY: valid descriptors and NUL-terminated names.
    if unsafe { libc::linkat(fd, c"".as_ptr(), d, name.as_ptr(), libc::AT_EMPTY_PATH) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    let linked = match e.raw_os_error() {
        // Linking by descriptor needs CAP_DAC_READ_SEARCH; through /proc it does not.
        Some(libc::ENOENT | libc::EPERM) => {
            let proc = CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL");
            // SAFETY: as above.
            let r = unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    proc.as_ptr(),
                    d,
                    name.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            };
            if r == 0 {
                return Ok(());
            }
            std::io::Error::last_os_error()
        }
        _ => e,
    };
    Err(match linked.raw_os_error() {
        Some(libc::EEXIST) => Unnamed::Land(LandError::Exists),
        Some(libc::ENOENT | libc::EPERM | libc::EOPNOTSUPP | libc::EXDEV) => Unnamed::Unsupported,
        _ => Unnamed::Land(LandError::Io("moving the file into place", linked)),
    })
}

/// Gives a new file `mode` (when `openat` could not, through the umask) and `mtime`.
fn set_mode_and_time(file: &std::fs::File, mode: u32, mtime: SystemTime) -> std::io::Result<()> {
    let umask = UMASK.unwrap_or(0o777);
    if mode & 0o7000 != 0 || mode & umask != 0 {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    file.set_modified(mtime)
}

/// Creates `name` in `dir` with `mode`, removing a stale partial file of that name first so
/// that the mode given to `openat` is the one the file gets.
fn create_excl(dir: &OwnedFd, name: &CString, mode: u32) -> std::io::Result<std::fs::File> {
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    for _ in 0..2 {
        // SAFETY: a valid directory descriptor and NUL-terminated name; the result is owned.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode) };
        if fd >= 0 {
            // SAFETY: a fresh descriptor nobody else owns.
            return Ok(unsafe { std::fs::File::from_raw_fd(fd) });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
        // A partial file left by an earlier try: it is ours to replace (not a symlink
        // followed: unlinkat removes the name itself).
        // SAFETY: as above.
        if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Err(std::io::ErrorKind::AlreadyExists.into())
}

fn rename_at(dir: &OwnedFd, from: &CString, to: &CString, replace: bool) -> std::io::Result<()> {
    let d = dir.as_raw_fd();
    let flags = if replace { 0 } else { libc::RENAME_NOREPLACE };
    // SAFETY: a valid directory descriptor and two NUL-terminated names.
    if unsafe { libc::renameat2(d, from.as_ptr(), d, to.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !replace && matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
        // A file system without RENAME_NOREPLACE: check, then rename (a small race).
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: as above; `st` is written by the call and not read.
        let there =
            unsafe { libc::fstatat(d, to.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) }
                == 0;
        if there {
            return Err(std::io::ErrorKind::AlreadyExists.into());
        }
        // SAFETY: as above.
        if unsafe { libc::renameat(d, from.as_ptr(), d, to.as_ptr()) } == 0 {
            return Ok(());
        }
        return Err(std::io::Error::last_os_error());
    }
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    /// Lands through `land_small` (unnamed first), or through the named path alone.
    fn land(
        unnamed: bool,
        root: &Path,
        rel: &RelPath,
        data: &[u8],
        mode: u32,
        mtime: SystemTime,
        replace: bool,
    ) -> Result<(), LandError> {
        let dirs = Dirs::default();
        if unnamed {
            return land_small(&dirs, root, rel, data, mode, mtime, replace);
        }
        let dir = dirs.get(root, rel.parent()).unwrap();
        let name = CString::new(rel.name()).unwrap();
        land_named(&dir, rel, &name, data, mode, mtime, replace)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn both_ways_land_content_mode_and_mtime_and_leave_no_partial_name() {
        for unnamed in [true, false] {
            let root = tempfile::tempdir().unwrap();
            std::fs::create_dir(root.path().join("d")).unwrap();
            let rel = RelPath::parse(b"d/f").unwrap();
            let mtime = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
            let landed = land(unnamed, root.path(), &rel, b"data", 0o640, mtime, false);
            assert!(landed.is_ok(), "unnamed {unnamed}");
            let target = root.path().join("d/f");
            assert_eq!(std::fs::read(&target).unwrap(), b"data");
            let m = std::fs::metadata(&target).unwrap();
            assert_eq!(m.permissions().mode() & 0o7777, 0o640);
            assert_eq!(m.modified().unwrap(), mtime);
            assert_eq!(
                names(&root.path().join("d")),
                vec!["f"],
                "unnamed {unnamed}"
            );
        }
    }

    #[test]
    fn an_existing_file_is_left_alone_unless_replacing_is_allowed() {
        for unnamed in [true, false] {
            let root = tempfile::tempdir().unwrap();
            let rel = RelPath::parse(b"f").unwrap();
            let target = root.path().join("f");
            std::fs::write(&target, b"theirs").unwrap();
            let now = SystemTime::now();
            let kept = land(unnamed, root.path(), &rel, b"ours", 0o644, now, false);
            assert!(matches!(kept, Err(LandError::Exists)), "unnamed {unnamed}");
            assert_eq!(std::fs::read(&target).unwrap(), b"theirs");
            assert_eq!(names(root.path()), vec!["f"], "nothing left behind");
            let replaced = land(unnamed, root.path(), &rel, b"ours", 0o644, now, true);
            assert!(replaced.is_ok());
            assert_eq!(std::fs::read(&target).unwrap(), b"ours");
            assert_eq!(names(root.path()), vec!["f"]);
        }
    }

    #[test]
    fn a_symlink_at_the_target_is_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"safe").unwrap();
        std::os::unix::fs::symlink(&victim, root.path().join("f")).unwrap();
        let rel = RelPath::parse(b"f").unwrap();
        let now = SystemTime::now();
        let r = land_small(
            &Dirs::default(),
            root.path(),
            &rel,
            b"evil",
            0o644,
            now,
            false,
        );
        assert!(matches!(r, Err(LandError::Exists)));
        assert_eq!(std::fs::read(&victim).unwrap(), b"safe");
    }
}
