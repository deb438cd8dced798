//! Which paths and links a receiver accepts, decided without touching the disk.
//!
//! A path from the wire is bytes. It is accepted only as a plain relative path: no leading
//! `/`, no empty, `.` or `..` component, no NUL, no name longer than
//! [`MAX_NAME_LEN`](crate::protocol::MAX_NAME_LEN), and no name that could be mistaken for
//! this crate's own partial or journal files. A link's target must stay inside the tree when
//! resolved from the link's directory. [`TreeIndex`] checks the manifest as a whole: every
//! entry's parent is a directory sent earlier, and no path comes twice, so a file cannot
//! turn into a directory (or back) in the middle of a tree.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::protocol::{MAX_NAME_LEN, MAX_PATH_LEN};

/// Suffix of a partial file, next to where the file will land.
pub const PARTIAL_SUFFIX: &str = ".amst-part";
/// Suffix of a partial file's journal.
pub const JOURNAL_SUFFIX: &str = ".amst-journal";

/// A path or link target that is refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// An empty path.
    #[error("the path is empty")]
    Empty,
    /// Longer than the limit.
    #[error("the path is {0} bytes, above the limit of {MAX_PATH_LEN}")]
    TooLong(usize),
    /// Starts with `/`.
    #[error("{0:?} is absolute; only paths relative to the output directory are accepted")]
    Absolute(String),
    /// Holds a NUL byte.
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    /// An empty, `.` or `..` component.
    #[error("{0:?} has an empty, '.' or '..' component")]
    BadComponent(String),
    /// A name above the limit.
    #[error("{path:?} has a name of {len} bytes, above the limit of {MAX_NAME_LEN}")]
    NameTooLong {
        /// The path.
        path: String,
        /// The name's length.
        len: usize,
    },
    /// A name reserved for partial files and journals.
    #[error("{0:?} ends like amst's partial files ({PARTIAL_SUFFIX}, {JOURNAL_SUFFIX})")]
    Reserved(String),
    /// A link whose target leaves the tree.
    #[error("the link {link:?} points to {target:?}, outside the output directory")]
    LinkEscapes {
        /// The link.
        link: String,
        /// Its target.
        target: String,
    },
    /// A second entry with the same path.
    #[error("{0:?} appears twice in the manifest")]
    Duplicate(String),
    /// The parent is not a directory of the manifest.
    #[error("{path:?} is inside {parent:?}, which is not a directory sent before it")]
    ParentNotDir {
        /// The path.
        path: String,
        /// Its parent.
        parent: String,
    },
    /// The parent was refused, so its children are too.
    #[error("{path:?} is inside {parent:?}, which was refused")]
    ParentRefused {
        /// The path.
        path: String,
        /// Its parent.
        parent: String,
    },
}

/// A validated relative path: `/`-separated names, none empty, `.` or `..`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RelPath(Vec<u8>);

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl RelPath {
    /// Validates a path from the wire.
    pub fn parse(raw: &[u8]) -> Result<RelPath, PathError> {
        if raw.is_empty() {
            return Err(PathError::Empty);
        }
        if raw.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong(raw.len()));
        }
        if raw[0] == b'/' {
            return Err(PathError::Absolute(show(raw)));
        }
        if raw.contains(&0) {
            return Err(PathError::Nul(show(raw)));
        }
        for name in raw.split(|&b| b == b'/') {
            if name.is_empty() || name == b"." || name == b".." {
                return Err(PathError::BadComponent(show(raw)));
            }
            if name.len() > MAX_NAME_LEN {
                return Err(PathError::NameTooLong {
                    path: show(raw),
                    len: name.len(),
                });
            }
            if name.ends_with(PARTIAL_SUFFIX.as_bytes())
                || name.ends_with(JOURNAL_SUFFIX.as_bytes())
            {
                return Err(PathError::Reserved(show(raw)));
            }
        }
        Ok(RelPath(raw.to_vec()))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The parent path, or `None` at the top of the tree.
    pub fn parent(&self) -> Option<&[u8]> {
        self.0
            .iter()
            .rposition(|&b| b == b'/')
            .map(|i| &self.0[..i])
    }

    /// The last name.
    pub fn name(&self) -> &[u8] {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// The path under `root`.
    pub fn under(&self, root: &Path) -> PathBuf {
        root.join(OsStr::from_bytes(&self.0))
    }

    /// Where this file's partial copy lives while it arrives: a hidden name beside it.
    pub fn partial_under(&self, root: &Path) -> PathBuf {
        self.sibling(root, PARTIAL_SUFFIX)
    }

    /// Where the partial copy's journal lives.
    pub fn journal_under(&self, root: &Path) -> PathBuf {
        self.sibling(root, JOURNAL_SUFFIX)
    }

    /// The partial copy's name in its directory.
    pub fn partial_name(&self) -> Vec<u8> {
        self.sibling_name(PARTIAL_SUFFIX)
    }

    fn sibling_name(&self, suffix: &str) -> Vec<u8> {
        let mut name = b".".to_vec();
        // Keep the hidden name within NAME_MAX whatever the original length.
        let keep = self.name().len().min(MAX_NAME_LEN - 1 - suffix.len());
        name.extend_from_slice(&self.name()[..keep]);
        name.extend_from_slice(suffix.as_bytes());
        name
    }

    fn sibling(&self, root: &Path, suffix: &str) -> PathBuf {
        let name = self.sibling_name(suffix);
        let dir = match self.parent() {
            Some(p) => root.join(OsStr::from_bytes(p)),
            None => root.to_path_buf(),
        };
        dir.join(OsStr::from_bytes(&name))
    }

    /// Lossy text for messages.
    pub fn display(&self) -> String {
        show(&self.0)
    }
}

/// Checks that a link at `link` pointing to `target` stays inside the tree: the target is
/// relative, its `..` names all come first, and they never climb above the root from the
/// link's directory.
pub fn check_link_target(link: &RelPath, target: &[u8]) -> Result<(), PathError> {
    let escapes = || PathError::LinkEscapes {
        link: link.display(),
        target: show(target),
    };
    if target.is_empty() || target[0] == b'/' || target.contains(&0) {
        return Err(escapes());
    }
    // `..` only as a prefix: after a name, which may itself be a link, the kernel's `..`
    // would not be the lexical one.
    let mut depth = link.parent().map_or(0, |p| p.split(|&b| b == b'/').count());
    let mut descended = false;
    for name in target.split(|&b| b == b'/') {
        match name {
            b"" | b"." => {}
            b".." if descended => return Err(escapes()),
            b".." => depth = depth.checked_sub(1).ok_or_else(escapes)?,
            _ => descended = true,
        }
    }
    Ok(())
}

/// What the manifest has said each path is, to check each new entry against.
#[derive(Debug, Default)]
pub struct TreeIndex {
    seen: HashMap<Vec<u8>, Seen>,
}

/// How the index knows a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// A directory that was accepted.
    Dir,
    /// A file or link.
    Leaf,
    /// Refused (its children are refused too).
    Refused,
}

impl TreeIndex {
    /// Checks a new entry: not seen before, parent an accepted directory (or the root). On
    /// success the entry is recorded as `what`; on failure as refused.
    pub fn admit(&mut self, path: &RelPath, what: Seen) -> Result<(), PathError> {
        if self.seen.contains_key(path.as_bytes()) {
            return Err(PathError::Duplicate(path.display()));
        }
        let verdict = match path.parent() {
            None => Ok(()),
            Some(parent) => match self.seen.get(parent) {
                Some(Seen::Dir) => Ok(()),
                Some(Seen::Refused) => Err(PathError::ParentRefused {
                    path: path.display(),
                    parent: show(parent),
                }),
                _ => Err(PathError::ParentNotDir {
                    path: path.display(),
                    parent: show(parent),
                }),
            },
        };
        let recorded = if verdict.is_ok() { what } else { Seen::Refused };
        self.seen.insert(path.as_bytes().to_vec(), recorded);
        verdict
    }

    /// Marks an admitted path as refused after all (its directory could not be created).
    pub fn refuse(&mut self, path: &RelPath) {
        self.seen.insert(path.as_bytes().to_vec(), Seen::Refused);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hostile_paths_are_refused_with_the_reason() {
        let bad: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"/etc/passwd", "absolute"),
            (b"../x", "'..'"),
            (b"a/../../x", "'..'"),
            (b"a//b", "empty"),
            (b"a/./b", "'.'"),
            (b"a/", "empty"),
            (b"a\0b", "NUL"),
            (b"d/.x.amst-part", "partial"),
            (b"x.amst-journal", "partial"),
        ];
        for (p, why) in bad {
            let e = RelPath::parse(p).unwrap_err();
            assert!(e.to_string().contains(why), "{p:?}: {e}");
        }
        let long = vec![b'n'; MAX_NAME_LEN + 1];
        assert!(matches!(
            RelPath::parse(&long),
            Err(PathError::NameTooLong { .. })
        ));
        assert!(matches!(
            RelPath::parse(&vec![b'a'; MAX_PATH_LEN + 1]),
            Err(PathError::TooLong(_))
        ));
        let ok = RelPath::parse(b"a b/\xffc/..d").unwrap();
        assert_eq!(ok.parent(), Some(&b"a b/\xffc"[..]));
        assert_eq!(ok.name(), b"..d");
        assert_eq!(
            ok.partial_under(Path::new("/o")),
            Path::new("/o/a b").join(OsStr::from_bytes(b"\xffc/...d.amst-part"))
        );
    }

    #[test]
    fn links_may_not_leave_the_tree() {
        let link = RelPath::parse(b"a/b/l").unwrap();
        check_link_target(&link, b"../x").unwrap();
        check_link_target(&link, b"../../x").unwrap();
        check_link_target(&link, b"./../c/./d").unwrap();
        for t in [
            &b"../../../x"[..],
            b"/etc",
            b"",
            b"a\0",
            b"c/../x",
            b"c/../../../../x",
        ] {
            assert!(check_link_target(&link, t).is_err(), "{t:?}");
        }
        let top = RelPath::parse(b"l").unwrap();
        assert!(check_link_target(&top, b"..").is_err());
        assert!(check_link_target(&top, b"x/..").is_err());
        check_link_target(&top, b"x/y").unwrap();
    }

    #[test]
    fn the_index_catches_type_changes_and_orphans() {
        let mut t = TreeIndex::default();
        let p = |s: &[u8]| RelPath::parse(s).unwrap();
        t.admit(&p(b"d"), Seen::Dir).unwrap();
        t.admit(&p(b"d/f"), Seen::Leaf).unwrap();
        assert!(matches!(
            t.admit(&p(b"d/f/g"), Seen::Leaf),
            Err(PathError::ParentNotDir { .. })
        ));
        assert!(matches!(
            t.admit(&p(b"d/f"), Seen::Dir),
            Err(PathError::Duplicate(_))
        ));
        assert!(matches!(
            t.admit(&p(b"x/y"), Seen::Leaf),
            Err(PathError::ParentNotDir { .. })
        ));
        t.refuse(&p(b"d"));
        assert!(matches!(
            t.admit(&p(b"d/h"), Seen::Leaf),
            Err(PathError::ParentRefused { .. })
        ));
    }

    proptest! {
        #[test]
        fn an_accepted_path_never_leaves_the_root(raw in prop::collection::vec(
            prop::sample::select(vec![b'a', b'.', b'/', 0u8, b'b']), 0..24)) {
            if let Ok(p) = RelPath::parse(&raw) {
                let joined = p.under(Path::new("/root"));
                prop_assert!(joined.starts_with("/root"));
                prop_assert!(joined.components().all(|c| matches!(
                    c, std::path::Component::RootDir | std::path::Component::Normal(_))));
            }
        }

        #[test]
        fn an_accepted_link_resolves_inside(target in prop::collection::vec(
            prop::sample::select(vec![b'a', b'.', b'/']), 1..16)) {
            let link = RelPath::parse(b"x/y/l").unwrap();
            if check_link_target(&link, &target).is_ok() {
                let mut depth: i64 = 2;
                let mut named = false;
                for n in target.split(|&b| b == b'/') {
                    match n {
                        b"" | b"." => {}
                        b".." => { prop_assert!(!named); depth -= 1 }
                        _ => named = true,
                    }
                    prop_assert!(depth >= 0);
                }
            }
        }
    }
}
