//! What `amst send` sends: a file or stdin streamed from disk in pieces, or generated data.
//!
//! A reader thread reads, hashes and frames each piece while the async side sends the
//! previous one, so disk, SHA-256 and network overlap. The channel between them is short, so
//! memory stays a few pieces whatever the size of the file.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use ring::digest;
use tokio::sync::mpsc;

use crate::error::{CliResult, Failure, FailureKind};
use crate::protocol::{FILE_PROTOCOL_VERSION, Header, Kind, data_buffer};

/// Default size of one Data message.
pub const DEFAULT_PIECE: usize = 1 << 20;

/// Pieces buffered between the reader thread and the network.
const QUEUE: usize = 8;

/// Where the bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A file on disk.
    File(PathBuf),
    /// Standard input (`-`), size unknown.
    Stdin,
    /// This many bytes of generated data.
    Generated(u64),
}

/// One item from the reader thread.
#[derive(Debug)]
pub enum Piece {
    /// An encoded Data message and how many payload bytes it carries.
    Data(Bytes, usize),
    /// The end: total bytes and their SHA-256.
    Done(u64, [u8; 32]),
    /// Reading failed.
    Failed(Failure),
}

/// A source, opened and checked, ready to stream.
#[derive(Debug)]
pub struct OpenSource {
    /// What the Header says.
    pub header: Header,
    input: Input,
}

#[derive(Debug)]
enum Input {
    File(File, PathBuf),
    Stdin,
    Generated(u64),
}

impl Source {
    /// Opens the source now, so that a missing file is reported before any connection.
    pub fn open(&self) -> CliResult<OpenSource> {
        match self {
            Source::File(path) => {
                let file = File::open(path).map_err(|e| open_error(path, &e))?;
                let meta = file.metadata().map_err(|e| open_error(path, &e))?;
                if meta.is_dir() {
                    return Err(Failure::new(
                        FailureKind::Input,
                        format!(
                            "cannot send {}: it is a directory (send one file at a time)",
                            path.display()
                        ),
                    ));
                }
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "unnamed".into());
                // A FIFO or device has no meaningful length: stream it like stdin.
                let size = meta.is_file().then_some(meta.len());
                Ok(OpenSource {
                    header: header(name, size, Kind::File),
                    input: Input::File(file, path.clone()),
                })
            }
            Source::Stdin => Ok(OpenSource {
                header: header("stdin".into(), None, Kind::File),
                input: Input::Stdin,
            }),
            Source::Generated(n) => Ok(OpenSource {
                header: header(format!("generated-{n}"), Some(*n), Kind::Generated),
                input: Input::Generated(*n),
            }),
        }
    }
}

fn header(name: String, size: Option<u64>, kind: Kind) -> Header {
    Header {
        version: FILE_PROTOCOL_VERSION,
        name,
        size,
        kind,
    }
}

fn open_error(path: &Path, e: &io::Error) -> Failure {
    let why = match e.kind() {
        io::ErrorKind::NotFound => "no such file".to_string(),
        io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    };
    Failure::new(
        FailureKind::Input,
        format!("cannot read {}: {why}", path.display()),
    )
}

impl OpenSource {
    /// Starts the reader thread; pieces of `piece` bytes arrive on the returned channel,
    /// ending with [`Piece::Done`] or [`Piece::Failed`].
    pub fn stream(self, piece: usize) -> mpsc::Receiver<Piece> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let piece = piece.max(1);
        std::thread::Builder::new()
            .name("amst-read".into())
            .spawn(move || {
                let last = match self.input {
                    Input::File(f, path) => read_all(f, piece, &tx, |e| {
                        Failure::new(
                            FailureKind::Input,
                            format!("reading {} failed: {e}", path.display()),
                        )
                    }),
                    Input::Stdin => read_all(io::stdin().lock(), piece, &tx, |e| {
                        Failure::new(FailureKind::Input, format!("reading stdin failed: {e}"))
                    }),
                    Input::Generated(n) => generate(n, piece, &tx),
                };
                // The receiver is gone only if the send side already failed; nothing to say.
                let _ = tx.blocking_send(last);
            })
            .expect("spawning a thread");
        rx
    }
}

fn read_all(
    mut r: impl Read,
    piece: usize,
    tx: &mpsc::Sender<Piece>,
    on_err: impl Fn(io::Error) -> Failure,
) -> Piece {
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut total = 0u64;
    loop {
        let mut buf = data_buffer(piece);
        buf.resize(1 + piece, 0);
        let mut filled = 1;
        // Fill the whole piece (short reads from pipes are common) unless the input ends.
        while filled < buf.len() {
            match r.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Piece::Failed(on_err(e)),
            }
        }
        let n = filled - 1;
        if n == 0 {
            return Piece::Done(total, hash.finish().as_ref().try_into().expect("32 bytes"));
        }
        buf.truncate(filled);
        hash.update(&buf[1..]);
        total += n as u64;
        if tx.blocking_send(Piece::Data(buf.freeze(), n)).is_err() {
            return Piece::Done(total, [0; 32]);
        }
    }
}

/// Generated data: one random block, with the piece number stamped into each copy so that a
/// reordered or repeated piece changes the checksum.
fn generate(total: u64, piece: usize, tx: &mpsc::Sender<Piece>) -> Piece {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut block = vec![0u8; piece];
    SystemRandom::new()
        .fill(&mut block)
        .expect("the OS random generator works");
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut sent = 0u64;
    let mut index = 0u64;
    while sent < total {
        let n = (total - sent).min(piece as u64) as usize;
        let mut buf = data_buffer(n);
        buf.extend_from_slice(&block[..n]);
        let stamp = index.to_le_bytes();
        for (b, s) in buf[1..].iter_mut().zip(stamp) {
            *b ^= s;
        }
        hash.update(&buf[1..]);
        sent += n as u64;
        index += 1;
        if tx.blocking_send(Piece::Data(buf.freeze(), n)).is_err() {
            return Piece::Done(sent, [0; 32]);
        }
    }
    Piece::Done(sent, hash.finish().as_ref().try_into().expect("32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Message;

    fn drain(mut rx: mpsc::Receiver<Piece>) -> (Vec<u8>, u64, [u8; 32]) {
        let mut out = Vec::new();
        loop {
            match rx.blocking_recv().expect("reader ends with Done") {
                Piece::Data(msg, n) => {
                    let Message::Data(d) = Message::decode(msg).unwrap() else {
                        panic!("not data")
                    };
                    assert_eq!(d.len(), n);
                    out.extend_from_slice(&d);
                }
                Piece::Done(total, sha) => return (out, total, sha),
                Piece::Failed(f) => panic!("{f}"),
            }
        }
    }

    #[test]
    fn a_file_streams_whole_with_its_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        let data: Vec<u8> = (0..100_003u32).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let src = Source::File(path).open().unwrap();
        assert_eq!(src.header.name, "x.bin");
        assert_eq!(src.header.size, Some(100_003));
        assert_eq!(src.header.kind, Kind::File);
        let (out, total, sha) = drain(src.stream(4096));
        assert_eq!(out, data);
        assert_eq!(total, 100_003);
        assert_eq!(
            sha.as_slice(),
            digest::digest(&digest::SHA256, &data).as_ref()
        );
    }

    #[test]
    fn generated_data_has_the_size_asked_and_distinct_pieces() {
        let src = Source::Generated(10_000).open().unwrap();
        assert_eq!(src.header.kind, Kind::Generated);
        let (out, total, sha) = drain(src.stream(4096));
        assert_eq!(out.len(), 10_000);
        assert_eq!(total, 10_000);
        assert_ne!(out[..4096], out[4096..8192]);
        assert_eq!(
            sha.as_slice(),
            digest::digest(&digest::SHA256, &out).as_ref()
        );
    }

    #[test]
    fn a_missing_file_or_a_directory_is_refused_clearly() {
        let e = Source::File("/nonexistent/data.bin".into())
            .open()
            .unwrap_err();
        assert_eq!(e.kind, FailureKind::Input);
        assert_eq!(e.message, "cannot read /nonexistent/data.bin: no such file");
        let dir = tempfile::tempdir().unwrap();
        let e = Source::File(dir.path().into()).open().unwrap_err();
        assert!(e.message.contains("is a directory"), "{e}");
    }
}
