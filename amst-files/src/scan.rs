//! Walking the paths to send into a manifest. Links are recorded as links and never
//! followed; special files (FIFOs, sockets, devices) are left out and listed.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::protocol::{Entry, EntryKind, MAX_ENTRIES};

/// A scanned tree, ready to send.
#[derive(Debug, Clone)]
pub struct Tree {
    /// The manifest, parents before children; an entry's id is its index.
    pub entries: Vec<Entry>,
    /// Each path given, with the id of its entry (its tree's entries follow it): an entry's
    /// place on this host is found from these (see [`source`](Self::source)) rather than kept
    /// for every entry, which cost a million-file tree about 100 MB.
    tops: Vec<(u32, PathBuf)>,
    /// Special files left out.
    pub skipped: Vec<PathBuf>,
    /// Bytes in all files.
    pub bytes: u64,
}

impl Tree {
    /// Walks `paths`. Each lands at the top of the receiver's output directory under its own
    /// name (`dir` arrives as `OUTPUT/dir/...`), like `rsync -a dir OUTPUT`.
    pub fn scan(paths: &[PathBuf]) -> Result<Tree> {
        let mut tree = Tree {
            entries: Vec::new(),
            tops: Vec::new(),
            skipped: Vec::new(),
            bytes: 0,
        };
        let mut tops = HashSet::new();
        for p in paths {
            let meta = std::fs::symlink_metadata(p).map_err(|e| input(p, e))?;
            let name = match p.file_name() {
                Some(n) => n.to_owned(),
                None => p
                    .canonicalize()
                    .map_err(|e| input(p, e))?
                    .file_name()
                    .map(ToOwned::to_owned)
                    .ok_or_else(|| {
                        Error::Usage(format!("cannot send {}: it has no name", p.display()))
                    })?,
            };
            if !tops.insert(name.clone()) {
                return Err(Error::Usage(format!(
                    "two paths to send are both named {:?}; they would land on the same name",
                    name
                )));
            }
            tree.tops.push((tree.entries.len() as u32, p.clone()));
            tree.walk(p, name.as_bytes().to_vec(), meta)?;
        }
        Ok(tree)
    }

    /// Where entry `id` is on this host: the path given for its tree, joined with the
    /// entry's path below the tree's name.
    pub fn source(&self, id: u32) -> PathBuf {
        let at = self.tops.partition_point(|(first, _)| *first <= id);
        let top = &self.tops[at.saturating_sub(1)].1;
        let rel = &self.entries[id as usize].path;
        match rel.iter().position(|&b| b == b'/') {
            Some(slash) => top.join(OsStr::from_bytes(&rel[slash + 1..])),
            None => top.clone(),
        }
    }

    fn walk(&mut self, path: &Path, rel: Vec<u8>, meta: Metadata) -> Result<()> {
        if self.entries.len() as u64 >= MAX_ENTRIES {
            return Err(Error::Usage(format!(
                "the tree has more than {MAX_ENTRIES} entries"
            )));
        }
        let ft = meta.file_type();
        let kind = if ft.is_file() {
            self.bytes += meta.len();
            EntryKind::File { size: meta.len() }
        } else if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_symlink() {
            let target = std::fs::read_link(path).map_err(|e| input(path, e))?;
            EntryKind::Symlink {
                target: target.as_os_str().as_bytes().to_vec(),
            }
        } else {
            self.skipped.push(path.to_path_buf());
            return Ok(());
        };
        self.entries.push(entry_of(rel.clone(), kind, &meta));
        if ft.is_dir() {
            let mut children: Vec<_> = std::fs::read_dir(path)
                .map_err(|e| input(path, e))?
                .collect::<std::io::Result<_>>()
                .map_err(|e| input(path, e))?;
            children.sort_by_key(|c| c.file_name());
            for c in children {
                let cpath = c.path();
                // Relative to the open directory (fstatat), without following links: not a
                // walk of the whole path from the root for every entry.
                let cmeta = c.metadata().map_err(|e| input(&cpath, e))?;
                let mut crel = rel.clone();
                crel.push(b'/');
                crel.extend_from_slice(OsStr::as_bytes(&c.file_name()));
                self.walk(&cpath, crel, cmeta)?;
            }
        }
        Ok(())
    }
}

/// The manifest entry for a path with `meta`.
pub fn entry_of(path: Vec<u8>, kind: EntryKind, meta: &Metadata) -> Entry {
    Entry {
        path,
        kind,
        mode: meta.mode() & 0o7777,
        mtime_sec: meta.mtime(),
        mtime_nsec: meta.mtime_nsec().clamp(0, 999_999_999) as u32,
    }
}

fn input(path: &Path, source: std::io::Error) -> Error {
    Error::Input {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_is_walked_parents_first_with_links_as_links() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("top");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/b.txt"), b"bb").unwrap();
        std::fs::write(root.join("a.txt"), b"a").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        let t = Tree::scan(std::slice::from_ref(&root)).unwrap();
        let paths: Vec<_> = t
            .entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.path).into_owned())
            .collect();
        assert_eq!(
            paths,
            ["top", "top/a.txt", "top/link", "top/sub", "top/sub/b.txt"]
        );
        assert_eq!(t.bytes, 3);
        assert_eq!(
            t.entries[2].kind,
            EntryKind::Symlink {
                target: b"/etc/passwd".to_vec()
            }
        );
        for (id, rel) in ["", "a.txt", "link", "sub", "sub/b.txt"].iter().enumerate() {
            let want = if rel.is_empty() {
                root.clone()
            } else {
                root.join(rel)
            };
            assert_eq!(t.source(id as u32), want);
        }
        // Several paths, one of them ending in `.`: each entry maps back to its own.
        let other = d.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("c"), b"c").unwrap();
        let two = Tree::scan(&[root.join("a.txt"), other.clone()]).unwrap();
        assert_eq!(two.source(0), root.join("a.txt"));
        assert_eq!(two.source(1), other);
        assert_eq!(two.source(2), other.join("c"));
        let here = Tree::scan(&[other.join(".")]).unwrap();
        assert_eq!(here.entries[1].path, b"other/c");
        assert_eq!(here.source(1), other.join(".").join("c"));
        let e = Tree::scan(&[d.path().join("missing")]).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        assert!(Tree::scan(&[root.clone(), root]).is_err());
    }
}
