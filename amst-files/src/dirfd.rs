//! Directories held open (`O_PATH`), so that the files in them are opened, created and
//! linked by name rather than by walking their whole path again: both ends handle thousands
//! of small files a second, and each walk of a long path costs more than a 4 KiB file.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Opens the directory at `path`; a link in its last component is followed only when
/// `follow_link`.
pub(crate) fn open_dir(path: &Path, follow_link: bool) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    if !follow_link {
        flags |= libc::O_NOFOLLOW;
    }
    // SAFETY: a valid NUL-terminated path; the returned descriptor is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
