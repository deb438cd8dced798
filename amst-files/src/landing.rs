//! Landing small files (one block or less) with as few system calls and path walks as
//! possible: a receiver lands thousands a second, and each walk of a long path from the root
//! costs more than the 4 KiB it writes.
//!
//! Each parent directory is opened once (`O_PATH`) and kept; a file is then created,
//! written, timed and renamed relative to it: `openat`, `write`, `futimens`, `close`,
//! `renameat2`. The mode is set by `openat` itself when the umask lets every bit through
//! (else one `fchmod`). Partial name, verification before the write, and the rename into
//! place are as for every file, so a kill leaves at most a hidden partial file, never a
//! short file under the final name.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
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
        let c = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: a valid NUL-terminated path; the returned descriptor is owned below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
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

/// Writes verified `data` to the hidden partial name of `rel` and renames it into place,
/// with `mode` and `mtime`; replaces an existing file only when `replace`.
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
    let part = CString::new(rel.partial_name()).map_err(|e| io("naming")(e.into()))?;
    let name = CString::new(rel.name()).map_err(|e| io("naming")(e.into()))?;
    let mode = mode & 0o7777;
    let file = create_excl(&dir, &part, mode).map_err(io("creating"))?;
    let written = (|| {
        (&file).write_all(data)?;
        let umask = UMASK.unwrap_or(0o777);
        if mode & 0o7000 != 0 || mode & umask != 0 {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        file.set_modified(mtime)
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
    match rename_at(&dir, &part, &name, replace) {
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
