//! Where `amst serve` puts what arrives: a file in the output directory, or nowhere.
//!
//! A writer thread hashes and writes each piece, so the network task never blocks on the
//! disk. The file is written under a hidden temporary name and linked to its final name only
//! once the checksum matches, so a reader of the output directory never sees a partial or
//! corrupt file under the real name.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use bytes::Bytes;
use ring::digest;
use tokio::sync::mpsc;

use crate::error::{Failure, FailureKind};

const QUEUE: usize = 16;

/// The longest file name we create, in bytes.
const MAX_NAME: usize = 200;

/// A name from the peer made safe to use inside the output directory: the last path
/// component only (no `..`, no absolute paths, no `\` tricks), no control characters, no
/// leading dots (no hidden files, no `.`/`..`), at most 200 bytes, never empty.
pub fn sanitize_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = base.chars().filter(|c| !c.is_control()).collect();
    let mut cleaned = cleaned.trim().trim_start_matches('.').trim().to_string();
    if cleaned.len() > MAX_NAME {
        let mut cut = MAX_NAME;
        while !cleaned.is_char_boundary(cut) {
            cut -= 1;
        }
        cleaned.truncate(cut);
    }
    if cleaned.is_empty() {
        "unnamed".into()
    } else {
        cleaned
    }
}

#[derive(Debug)]
struct Written {
    bytes: u64,
    sha256: [u8; 32],
}

/// One transfer being received.
#[derive(Debug)]
pub struct Sink {
    tx: Option<mpsc::Sender<Bytes>>,
    thread: Option<JoinHandle<io::Result<Written>>>,
    /// The temporary file and the name it should end up with.
    file: Option<(PathBuf, PathBuf)>,
}

/// A transfer that arrived whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// Bytes received.
    pub bytes: u64,
    /// Their SHA-256.
    pub sha256: [u8; 32],
}

impl Sink {
    /// Starts receiving into a temporary file in `dir` named after `name`, or into nothing
    /// when `dir` is `None`.
    pub fn create(dir: Option<&Path>, name: &str) -> Result<Sink, Failure> {
        let (out, file) = match dir {
            None => (None, None),
            Some(dir) => {
                let final_name = sanitize_name(name);
                let tmp = dir.join(format!(
                    ".{final_name}.amst-part-{}",
                    crate::protocol::hex(&amst_core::codec::random_bytes::<6>())
                ));
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&tmp)
                    .map_err(|e| disk_failure(&tmp, 0, &e))?;
                (Some(f), Some((tmp, dir.join(final_name))))
            }
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("amst-write".into())
            .spawn(move || write_all(rx, out))
            .expect("spawning a thread");
        Ok(Sink {
            tx: Some(tx),
            thread: Some(thread),
            file,
        })
    }

    /// Hands a piece to the writer. Fails when the writer has stopped (disk full, IO error).
    pub async fn push(&mut self, data: Bytes) -> Result<(), Failure> {
        let ok = match &self.tx {
            Some(tx) => tx.send(data).await.is_ok(),
            None => false,
        };
        if ok {
            Ok(())
        } else {
            Err(self.join_error().await)
        }
    }

    /// Waits for the writer to finish and returns what it wrote.
    pub async fn finish(&mut self) -> Result<Finished, Failure> {
        self.tx = None;
        let Some(thread) = self.thread.take() else {
            return Err(Failure::new(
                FailureKind::Other,
                "transfer already finished",
            ));
        };
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(Ok(w))) => Ok(Finished {
                bytes: w.bytes,
                sha256: w.sha256,
            }),
            Ok(Ok(Err(e))) => Err(self.io_failure(&e)),
            _ => Err(Failure::new(
                FailureKind::Other,
                "the writer thread panicked",
            )),
        }
    }

    async fn join_error(&mut self) -> Failure {
        match self.finish().await {
            Err(f) => f,
            Ok(_) => Failure::new(FailureKind::Other, "the writer stopped early"),
        }
    }

    fn io_failure(&self, e: &io::Error) -> Failure {
        match &self.file {
            Some((tmp, _)) => {
                let written = std::fs::metadata(tmp).map_or(0, |m| m.len());
                disk_failure(tmp, written, e)
            }
            None => disk_failure_text(e.kind(), "discarding", 0, &e.to_string()),
        }
    }

    /// Moves the finished file to its final name, never overwriting an existing file:
    /// `name`, then `name.1`, `name.2`, ... Returns the final path, or `None` for discard.
    pub fn commit(&mut self) -> Result<Option<PathBuf>, Failure> {
        let Some((tmp, wanted)) = self.file.take() else {
            return Ok(None);
        };
        for i in 0..1000u32 {
            let candidate = if i == 0 {
                wanted.clone()
            } else {
                let mut s = wanted.clone().into_os_string();
                s.push(format!(".{i}"));
                PathBuf::from(s)
            };
            // A hard link fails if the name exists, so two sessions never clobber each other.
            match std::fs::hard_link(&tmp, &candidate) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Ok(Some(candidate));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(disk_failure(&candidate, 0, &e));
                }
            }
        }
        let _ = std::fs::remove_file(&tmp);
        Err(Failure::new(
            FailureKind::Disk,
            format!(
                "{} and 999 numbered variants already exist",
                wanted.display()
            ),
        ))
    }

    /// Drops what was received: deletes the temporary file.
    pub fn discard(&mut self) {
        self.tx = None;
        if let Some((tmp, _)) = self.file.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.discard();
    }
}

fn write_all(mut rx: mpsc::Receiver<Bytes>, mut out: Option<File>) -> io::Result<Written> {
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut bytes = 0u64;
    while let Some(piece) = rx.blocking_recv() {
        hash.update(&piece);
        if let Some(f) = out.as_mut() {
            f.write_all(&piece)?;
        }
        bytes += piece.len() as u64;
    }
    if let Some(f) = out.as_mut() {
        f.flush()?;
        // The Receipt says "stored": make it true across a crash before saying it.
        f.sync_data()?;
    }
    Ok(Written {
        bytes,
        sha256: hash.finish().as_ref().try_into().expect("32 bytes"),
    })
}

fn disk_failure(path: &Path, written: u64, e: &io::Error) -> Failure {
    disk_failure_text(
        e.kind(),
        &format!("writing {}", path.display()),
        written,
        &e.to_string(),
    )
}

fn disk_failure_text(kind: io::ErrorKind, what: &str, written: u64, why: &str) -> Failure {
    let after = crate::size::human_bytes(written);
    let message = if kind == io::ErrorKind::StorageFull || kind == io::ErrorKind::QuotaExceeded {
        format!(
            "the receiver's disk is full: {what} failed after {after} ({why}); the partial file was removed"
        )
    } else {
        format!("the receiver cannot store the file: {what} failed after {after} ({why})")
    };
    Failure::new(FailureKind::Disk, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_the_peer_cannot_escape_the_output_directory() {
        for (input, want) in [
            ("report.pdf", "report.pdf"),
            ("../../etc/passwd", "passwd"),
            ("/etc/shadow", "shadow"),
            ("..", "unnamed"),
            (".", "unnamed"),
            ("", "unnamed"),
            ("dir/", "unnamed"),
            ("..\\..\\windows\\system.ini", "system.ini"),
            (".bashrc", "bashrc"),
            ("a\nb\0c", "abc"),
            ("  spaced  ", "spaced"),
        ] {
            assert_eq!(sanitize_name(input), want, "{input:?}");
        }
        let long = "é".repeat(300);
        let s = sanitize_name(&long);
        assert!(s.len() <= MAX_NAME && s.starts_with('é'));
    }

    #[tokio::test]
    async fn a_file_is_written_hashed_and_never_clobbers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.bin"), b"old").unwrap();
        let mut sink = Sink::create(Some(dir.path()), "../f.bin").unwrap();
        sink.push(Bytes::from_static(b"hello ")).await.unwrap();
        sink.push(Bytes::from_static(b"world")).await.unwrap();
        let fin = sink.finish().await.unwrap();
        assert_eq!(fin.bytes, 11);
        assert_eq!(
            fin.sha256.as_slice(),
            digest::digest(&digest::SHA256, b"hello world").as_ref()
        );
        let path = sink.commit().unwrap().unwrap();
        assert_eq!(path, dir.path().join("f.bin.1"));
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
        assert_eq!(std::fs::read(dir.path().join("f.bin")).unwrap(), b"old");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "no temp file left"
        );
    }

    #[tokio::test]
    async fn a_discarded_transfer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = Sink::create(Some(dir.path()), "x").unwrap();
        sink.push(Bytes::from_static(b"abc")).await.unwrap();
        drop(sink);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut none = Sink::create(None, "x").unwrap();
        none.push(Bytes::from_static(b"abc")).await.unwrap();
        assert_eq!(none.finish().await.unwrap().bytes, 3);
        assert_eq!(none.commit().unwrap(), None);
    }

    #[tokio::test]
    async fn a_full_disk_is_reported_as_such() {
        // /dev/full fails every write with ENOSPC, exactly like a full filesystem.
        let Ok(full) = OpenOptions::new().write(true).open("/dev/full") else {
            eprintln!("skipping: no /dev/full here");
            return;
        };
        let (tx, rx) = mpsc::channel(1);
        let t = std::thread::spawn(move || write_all(rx, Some(full)));
        tx.send(Bytes::from(vec![0u8; 1 << 16])).await.unwrap();
        drop(tx);
        let e = t.join().unwrap().expect_err("ENOSPC");
        let f = disk_failure_text(e.kind(), "writing /x", 0, &e.to_string());
        assert_eq!(f.kind, FailureKind::Disk);
        assert!(f.message.starts_with("the receiver's disk is full"), "{f}");
    }
}
