//! The tree protocol: what each AMST message of a tree transfer means, encoded and decoded
//! without IO.
//!
//! ```text
//! sender                                     receiver
//!   Hello {version, block size, policy}  ->
//!   Manifest {entries, last} ...         ->   validate, mkdir, look at what is there
//!                                        <-   Plan {(id, want)}, last
//!   Data {records} ...                   ->   verify each block's BLAKE3, pwrite, journal
//!   End                                  ->
//!                                        <-   Results {(id, outcome)} ... (as files land)
//!                                        <-   Finished {totals}
//! ```
//!
//! Nothing waits for a reply per file: the plan for a manifest batch comes back while the
//! sender is already sending the next one, and data for planned files flows at once. Every
//! count and length read from the wire is checked against a named limit before it is used,
//! so a peer can neither make us allocate without bound nor panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The version of this protocol, sent in [`Hello`].
pub const TREE_PROTOCOL_VERSION: u16 = 1;
/// Longest path, in bytes, relative to the tree root.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest single name (path component), in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target, in bytes.
pub const MAX_LINK_TARGET_LEN: usize = 4096;
/// Most entries in one tree.
pub const MAX_ENTRIES: u64 = 1 << 26;
/// Longest control message (everything but Data).
pub const MAX_CONTROL_LEN: usize = 16 << 20;
/// Smallest and largest block size.
pub const MIN_BLOCK_SIZE: u32 = 64 << 10;
/// See [`MIN_BLOCK_SIZE`].
pub const MAX_BLOCK_SIZE: u32 = 16 << 20;
/// The default block: the unit of hashing, reading, writing and resume.
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// Longest reason text.
pub const MAX_REASON_LEN: usize = 4096;
/// Largest file.
pub const MAX_FILE_SIZE: u64 = 1 << 50;

/// A BLAKE3 hash or chaining value.
pub type Digest = [u8; 32];

const TAG_HELLO: u8 = 0x41;
const TAG_MANIFEST: u8 = 0x42;
const TAG_DATA: u8 = 0x43;
const TAG_END: u8 = 0x44;
const TAG_PLAN: u8 = 0x51;
const TAG_RESULTS: u8 = 0x52;
const TAG_FINISHED: u8 = 0x53;
const TAG_ABORT: u8 = 0x5f;

/// Whether a message's first byte belongs to this protocol (so a server can tell a tree
/// transfer from other traffic on the first message).
pub fn is_tree_message(msg: &[u8]) -> bool {
    matches!(msg.first(), Some(0x41..=0x44 | 0x51..=0x53 | 0x5f))
}

/// What to do with a file that already exists at the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ExistingPolicy {
    /// The default: a file with the same size and BLAKE3 is skipped; a different one is left
    /// alone and reported as an error. Nothing at the receiver is ever overwritten.
    #[default]
    Skip,
    /// Identical files are skipped; different ones are replaced (atomically, by rename).
    Overwrite,
    /// Any existing file is an error and is left alone.
    Refuse,
}

impl ExistingPolicy {
    /// The name as the command line spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ExistingPolicy::Skip => "skip",
            ExistingPolicy::Overwrite => "overwrite",
            ExistingPolicy::Refuse => "refuse",
        }
    }

    fn code(self) -> u8 {
        match self {
            ExistingPolicy::Skip => 1,
            ExistingPolicy::Overwrite => 2,
            ExistingPolicy::Refuse => 3,
        }
    }
}

/// Opens a tree transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// [`TREE_PROTOCOL_VERSION`] of the sender.
    pub version: u16,
    /// Bytes per block, a power of two in [`MIN_BLOCK_SIZE`]..=[`MAX_BLOCK_SIZE`].
    pub block_size: u32,
    /// What to do with existing files.
    pub policy: ExistingPolicy,
    /// Whether partial files from an earlier try may be resumed.
    pub resume: bool,
    /// Entries the manifest will hold.
    pub entries: u64,
    /// Bytes in all files (for progress).
    pub bytes: u64,
}

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file of this many bytes.
    File {
        /// Its length.
        size: u64,
    },
    /// A directory.
    Dir,
    /// A symbolic link, sent as a link and never followed.
    Symlink {
        /// Where it points, as stored.
        target: Vec<u8>,
    },
}

/// One entry of the manifest. Its id is its position in the manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The path below the tree root, `/`-separated, not yet validated.
    pub path: Vec<u8>,
    /// File, directory or link.
    pub kind: EntryKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime_sec: i64,
    /// Nanoseconds within that second.
    pub mtime_nsec: u32,
}

/// One record inside a Data message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A whole file of at most one block, with its BLAKE3.
    Whole {
        /// Entry id.
        id: u32,
        /// BLAKE3 of `data`.
        hash: Digest,
        /// The file's bytes.
        data: Bytes,
    },
    /// One block of a larger file, with its BLAKE3 chaining value.
    Block {
        /// Entry id.
        id: u32,
        /// Block number.
        index: u64,
        /// The block's chaining value (BLAKE3 non-root, at its offset).
        cv: Digest,
        /// The block's bytes.
        data: Bytes,
    },
    /// Every block of a larger file has been sent; the rest are holes.
    FileEnd {
        /// Entry id.
        id: u32,
        /// BLAKE3 of the whole file, as `b3sum` prints it.
        hash: Digest,
        /// Runs of blocks that are holes: (first, count).
        holes: Vec<(u64, u64)>,
    },
    /// The receiver's copy is identical; nothing to send.
    Skip {
        /// Entry id.
        id: u32,
    },
    /// The sender cannot send this file.
    Fail {
        /// Entry id.
        id: u32,
        /// Why.
        reason: String,
    },
    /// Forget the verified blocks of an earlier try: the file changed since.
    Restart {
        /// Entry id.
        id: u32,
    },
}

/// What the receiver wants for one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Want {
    /// Everything.
    Send,
    /// Only the blocks not listed: these are on disk, verified, with these chaining values.
    Resume {
        /// (block, chaining value) pairs already verified.
        verified: Vec<(u64, Digest)>,
    },
    /// A file of the same size exists with this BLAKE3; skip it if the sender's matches.
    Have {
        /// BLAKE3 of the receiver's file.
        hash: Digest,
    },
    /// Nothing, and why (the entry's result says so too).
    Refuse {
        /// Why.
        reason: String,
    },
}

/// How one entry ended at the receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stored, with this BLAKE3 (all zeroes for directories and links).
    Stored {
        /// BLAKE3 of the stored file.
        hash: Digest,
    },
    /// Already there and identical.
    Identical,
    /// Not stored.
    Failed {
        /// Why.
        reason: String,
    },
}

/// The receiver's totals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Finished {
    /// Entries stored.
    pub stored: u64,
    /// Files skipped as identical.
    pub identical: u64,
    /// Entries that failed.
    pub failed: u64,
    /// File bytes written.
    pub bytes_written: u64,
}

/// One message of the tree protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Opens the transfer.
    Hello(Hello),
    /// Some entries, in order; `last` ends the manifest.
    Manifest {
        /// The entries.
        entries: Vec<Entry>,
        /// No more entries follow.
        last: bool,
    },
    /// File content and per-file events.
    Data(Vec<Record>),
    /// The sender has sent everything.
    End,
    /// The receiver's wants for files, in manifest order; `last` ends the plan.
    Plan {
        /// (id, want) pairs.
        items: Vec<(u32, Want)>,
        /// No more items follow.
        last: bool,
    },
    /// How entries ended.
    Results(Vec<(u32, Outcome)>),
    /// Every entry has its result.
    Finished(Finished),
    /// Gives up, with a reason for the other side's user.
    Abort(String),
}

/// A message that does not belong to this protocol, or breaks one of its limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// An empty message.
    #[error("empty message")]
    Empty,
    /// A type byte this version does not define.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// The message ends inside a field.
    #[error("{message} message truncated in field {field}")]
    Truncated {
        /// Which message.
        message: &'static str,
        /// Which field.
        field: &'static str,
    },
    /// A field above its limit.
    #[error("{message}.{field} is {value}, above the limit of {limit}")]
    Limit {
        /// Which message.
        message: &'static str,
        /// Which field.
        field: &'static str,
        /// What arrived.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// A field with a value that means nothing.
    #[error("{message}.{field} is invalid: {reason}")]
    Invalid {
        /// Which message.
        message: &'static str,
        /// Which field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Bytes left over after the last field.
    #[error("{0} message has trailing bytes")]
    Trailing(&'static str),
}

/// Bytes before the payload of a one-block Data message: see [`block_message`].
pub const BLOCK_HEADER_LEN: usize = 1 + 4 + 1 + 4 + 8 + 32 + 4;

const REC_WHOLE: u8 = 1;
const REC_BLOCK: u8 = 2;
const REC_FILE_END: u8 = 3;
const REC_SKIP: u8 = 4;
const REC_FAIL: u8 = 5;
const REC_RESTART: u8 = 6;

/// A Data message holding one block, laid out so that the file can be read straight into
/// it: the returned buffer has [`BLOCK_HEADER_LEN`] header bytes followed by `len` zero bytes
/// to fill. Call [`seal_block`] with the chaining value once the bytes are in.
pub fn block_message(id: u32, index: u64, len: u32) -> BytesMut {
    let mut b = BytesMut::with_capacity(BLOCK_HEADER_LEN + len as usize);
    b.put_u8(TAG_DATA);
    b.put_u32(1);
    b.put_u8(REC_BLOCK);
    b.put_u32(id);
    b.put_u64(index);
    b.put_slice(&[0; 32]);
    b.put_u32(len);
    b.resize(BLOCK_HEADER_LEN + len as usize, 0);
    b
}

/// The [`BLOCK_HEADER_LEN`] bytes in front of a block's data in a one-block Data message, for
/// a sender that reads the file into its own (reused) buffer behind them.
pub fn block_header(id: u32, index: u64, len: u32, cv: &Digest) -> [u8; BLOCK_HEADER_LEN] {
    let mut h = [0u8; BLOCK_HEADER_LEN];
    h[0] = TAG_DATA;
    h[1..5].copy_from_slice(&1u32.to_be_bytes());
    h[5] = REC_BLOCK;
    h[6..10].copy_from_slice(&id.to_be_bytes());
    h[10..18].copy_from_slice(&index.to_be_bytes());
    h[18..50].copy_from_slice(cv);
    h[50..54].copy_from_slice(&len.to_be_bytes());
    h
}

/// A Data message of whole small files, built in a caller's (reused) buffer: each file is
/// read straight into its place in the message, so a batch of thousands of files costs no
/// allocation per file and no copy from a file buffer into the message.
#[derive(Debug)]
pub struct WholeBatch {
    buf: Vec<u8>,
    len: usize,
    records: u32,
}

/// Bytes of a Whole record before its data: tag, id, hash, length.
const WHOLE_HEADER_LEN: usize = 1 + 4 + 32 + 4;

impl WholeBatch {
    /// An empty batch in `buf` (its contents are overwritten; its length is kept for reuse).
    pub fn new(mut buf: Vec<u8>) -> Self {
        if buf.len() < 5 {
            buf.resize(5, 0);
        }
        buf[0] = TAG_DATA;
        WholeBatch {
            buf,
            len: 5,
            records: 0,
        }
    }

    /// The buffer a batch of files with these data slot sizes needs.
    pub fn bytes_for(slots: impl Iterator<Item = usize>) -> usize {
        5 + slots.map(|n| WHOLE_HEADER_LEN + n).sum::<usize>()
    }

    /// Records in the batch.
    pub fn records(&self) -> u32 {
        self.records
    }

    /// The `room` bytes where the next file's data goes. Nothing is added until
    /// [`commit_whole`](Self::commit_whole); reading something else next simply reuses them.
    pub fn data_slot(&mut self, room: usize) -> &mut [u8] {
        let at = self.len + WHOLE_HEADER_LEN;
        let end = at + room;
        if self.buf.len() < end {
            self.buf.resize(end.max(self.buf.len() * 2), 0);
        }
        &mut self.buf[at..end]
    }

    /// Adds file `id` whose first `len` bytes were put in [`data_slot`](Self::data_slot),
    /// with its BLAKE3.
    pub fn commit_whole(&mut self, id: u32, len: usize) {
        let at = self.len + WHOLE_HEADER_LEN;
        let hash = blake3::hash(&self.buf[at..at + len]);
        let h = &mut self.buf[self.len..at];
        h[0] = REC_WHOLE;
        h[1..5].copy_from_slice(&id.to_be_bytes());
        h[5..37].copy_from_slice(hash.as_bytes());
        h[37..41].copy_from_slice(&(len as u32).to_be_bytes());
        self.len = at + len;
        self.records += 1;
    }

    /// Adds any other record (a file that could not be read is a Fail).
    pub fn push(&mut self, r: &Record) {
        let mut b = BytesMut::with_capacity(record_len(r));
        put_record(&mut b, r);
        let end = self.len + b.len();
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        self.buf[self.len..end].copy_from_slice(&b);
        self.len = end;
        self.records += 1;
    }

    /// The buffer and the length of the encoded message in it.
    pub fn finish(mut self) -> (Vec<u8>, usize) {
        self.buf[1..5].copy_from_slice(&self.records.to_be_bytes());
        (self.buf, self.len)
    }
}

/// Writes the chaining value into a buffer from [`block_message`].
pub fn seal_block(buf: &mut BytesMut, cv: &Digest) {
    buf[BLOCK_HEADER_LEN - 36..BLOCK_HEADER_LEN - 4].copy_from_slice(cv);
}

impl Message {
    /// The message as it goes on the wire.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        match self {
            Message::Hello(h) => {
                b.put_u8(TAG_HELLO);
                b.put_u16(h.version);
                b.put_u32(h.block_size);
                b.put_u8(h.policy.code());
                b.put_u8(u8::from(h.resume));
                b.put_u64(h.entries);
                b.put_u64(h.bytes);
            }
            Message::Manifest { entries, last } => {
                b.put_u8(TAG_MANIFEST);
                b.put_u8(u8::from(*last));
                b.put_u32(entries.len() as u32);
                for e in entries {
                    put_bytes16(&mut b, &e.path);
                    b.put_u32(e.mode);
                    b.put_i64(e.mtime_sec);
                    b.put_u32(e.mtime_nsec);
                    match &e.kind {
                        EntryKind::File { size } => {
                            b.put_u8(1);
                            b.put_u64(*size);
                        }
                        EntryKind::Dir => b.put_u8(2),
                        EntryKind::Symlink { target } => {
                            b.put_u8(3);
                            put_bytes16(&mut b, target);
                        }
                    }
                }
            }
            Message::Data(records) => {
                let payload: usize = records.iter().map(record_len).sum();
                b.reserve(5 + payload);
                b.put_u8(TAG_DATA);
                b.put_u32(records.len() as u32);
                for r in records {
                    put_record(&mut b, r);
                }
            }
            Message::End => b.put_u8(TAG_END),
            Message::Plan { items, last } => {
                b.put_u8(TAG_PLAN);
                b.put_u8(u8::from(*last));
                b.put_u32(items.len() as u32);
                for (id, want) in items {
                    b.put_u32(*id);
                    match want {
                        Want::Send => b.put_u8(1),
                        Want::Resume { verified } => {
                            b.put_u8(2);
                            b.put_u32(verified.len() as u32);
                            for (i, cv) in verified {
                                b.put_u64(*i);
                                b.put_slice(cv);
                            }
                        }
                        Want::Have { hash } => {
                            b.put_u8(3);
                            b.put_slice(hash);
                        }
                        Want::Refuse { reason } => {
                            b.put_u8(4);
                            put_reason(&mut b, reason);
                        }
                    }
                }
            }
            Message::Results(items) => {
                b.put_u8(TAG_RESULTS);
                b.put_u32(items.len() as u32);
                for (id, outcome) in items {
                    b.put_u32(*id);
                    match outcome {
                        Outcome::Stored { hash } => {
                            b.put_u8(1);
                            b.put_slice(hash);
                        }
                        Outcome::Identical => b.put_u8(2),
                        Outcome::Failed { reason } => {
                            b.put_u8(3);
                            put_reason(&mut b, reason);
                        }
                    }
                }
            }
            Message::Finished(f) => {
                b.put_u8(TAG_FINISHED);
                b.put_u64(f.stored);
                b.put_u64(f.identical);
                b.put_u64(f.failed);
                b.put_u64(f.bytes_written);
            }
            Message::Abort(reason) => {
                b.put_u8(TAG_ABORT);
                put_reason(&mut b, reason);
            }
        }
        b.freeze()
    }

    /// Parses a message; file data stays a zero-copy slice of `msg`.
    pub fn decode(msg: Bytes) -> Result<Message, DecodeError> {
        let Some(&tag) = msg.first() else {
            return Err(DecodeError::Empty);
        };
        if tag != TAG_DATA && msg.len() > MAX_CONTROL_LEN {
            return Err(DecodeError::Limit {
                message: name_of(tag),
                field: "length",
                value: msg.len() as u64,
                limit: MAX_CONTROL_LEN as u64,
            });
        }
        let message = name_of(tag);
        let mut r = Reader {
            buf: msg.slice(1..),
            message,
        };
        let m = match tag {
            TAG_HELLO => {
                let version = r.u16("version")?;
                let block_size = r.u32("block_size")?;
                if !block_size.is_power_of_two()
                    || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
                {
                    return Err(r.invalid(
                        "block_size",
                        format!(
                            "{block_size} is not a power of two from {MIN_BLOCK_SIZE} to \
                             {MAX_BLOCK_SIZE}"
                        ),
                    ));
                }
                let policy = match r.u8("policy")? {
                    1 => ExistingPolicy::Skip,
                    2 => ExistingPolicy::Overwrite,
                    3 => ExistingPolicy::Refuse,
                    p => return Err(r.invalid("policy", format!("unknown code {p}"))),
                };
                let resume = r.bool("resume")?;
                let entries = r.u64("entries")?;
                r.limit("entries", entries, MAX_ENTRIES)?;
                let bytes = r.u64("bytes")?;
                Message::Hello(Hello {
                    version,
                    block_size,
                    policy,
                    resume,
                    entries,
                    bytes,
                })
            }
            TAG_MANIFEST => {
                let last = r.bool("last")?;
                // Each entry takes at least 20 bytes, which bounds the count by the length.
                let n = r.count("entries", 20)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let path = r.bytes16("path", MAX_PATH_LEN)?;
                    let mode = r.u32("mode")?;
                    let mtime_sec = r.i64("mtime_sec")?;
                    let mtime_nsec = r.u32("mtime_nsec")?;
                    r.limit("mtime_nsec", u64::from(mtime_nsec), 999_999_999)?;
                    let kind = match r.u8("kind")? {
                        1 => {
                            let size = r.u64("size")?;
                            r.limit("size", size, MAX_FILE_SIZE)?;
                            EntryKind::File { size }
                        }
                        2 => EntryKind::Dir,
                        3 => EntryKind::Symlink {
                            target: r.bytes16("target", MAX_LINK_TARGET_LEN)?,
                        },
                        k => return Err(r.invalid("kind", format!("unknown code {k}"))),
                    };
                    entries.push(Entry {
                        path,
                        kind,
                        mode,
                        mtime_sec,
                        mtime_nsec,
                    });
                }
                Message::Manifest { entries, last }
            }
            TAG_DATA => {
                let n = r.count("records", 5)?;
                let mut records = Vec::with_capacity(n);
                for _ in 0..n {
                    records.push(r.record()?);
                }
                Message::Data(records)
            }
            TAG_END => Message::End,
            TAG_PLAN => {
                let last = r.bool("last")?;
                let n = r.count("items", 5)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = r.u32("id")?;
                    let want = match r.u8("want")? {
                        1 => Want::Send,
                        2 => {
                            let k = r.count("verified", 40)?;
                            let mut verified = Vec::with_capacity(k);
                            for _ in 0..k {
                                verified.push((r.u64("block")?, r.digest("cv")?));
                            }
                            Want::Resume { verified }
                        }
                        3 => Want::Have {
                            hash: r.digest("hash")?,
                        },
                        4 => Want::Refuse {
                            reason: r.reason()?,
                        },
                        w => return Err(r.invalid("want", format!("unknown code {w}"))),
                    };
                    items.push((id, want));
                }
                Message::Plan { items, last }
            }
            TAG_RESULTS => {
                let n = r.count("items", 5)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = r.u32("id")?;
                    let outcome = match r.u8("outcome")? {
                        1 => Outcome::Stored {
                            hash: r.digest("hash")?,
                        },
                        2 => Outcome::Identical,
                        3 => Outcome::Failed {
                            reason: r.reason()?,
                        },
                        o => return Err(r.invalid("outcome", format!("unknown code {o}"))),
                    };
                    items.push((id, outcome));
                }
                Message::Results(items)
            }
            TAG_FINISHED => Message::Finished(Finished {
                stored: r.u64("stored")?,
                identical: r.u64("identical")?,
                failed: r.u64("failed")?,
                bytes_written: r.u64("bytes_written")?,
            }),
            TAG_ABORT => Message::Abort(r.reason()?),
            other => return Err(DecodeError::UnknownType(other)),
        };
        if r.buf.has_remaining() {
            return Err(DecodeError::Trailing(message));
        }
        Ok(m)
    }
}

fn name_of(tag: u8) -> &'static str {
    match tag {
        TAG_HELLO => "Hello",
        TAG_MANIFEST => "Manifest",
        TAG_DATA => "Data",
        TAG_END => "End",
        TAG_PLAN => "Plan",
        TAG_RESULTS => "Results",
        TAG_FINISHED => "Finished",
        TAG_ABORT => "Abort",
        _ => "unknown",
    }
}

fn record_len(r: &Record) -> usize {
    match r {
        Record::Whole { data, .. } => 1 + 4 + 32 + 4 + data.len(),
        Record::Block { data, .. } => 1 + 4 + 8 + 32 + 4 + data.len(),
        Record::FileEnd { holes, .. } => 1 + 4 + 32 + 4 + 16 * holes.len(),
        Record::Fail { reason, .. } => 1 + 4 + 2 + reason.len(),
        Record::Skip { .. } | Record::Restart { .. } => 5,
    }
}

fn put_record(b: &mut BytesMut, r: &Record) {
    match r {
        Record::Whole { id, hash, data } => {
            b.put_u8(REC_WHOLE);
            b.put_u32(*id);
            b.put_slice(hash);
            b.put_u32(data.len() as u32);
            b.put_slice(data);
        }
        Record::Block {
            id,
            index,
            cv,
            data,
        } => {
            b.put_u8(REC_BLOCK);
            b.put_u32(*id);
            b.put_u64(*index);
            b.put_slice(cv);
            b.put_u32(data.len() as u32);
            b.put_slice(data);
        }
        Record::FileEnd { id, hash, holes } => {
            b.put_u8(REC_FILE_END);
            b.put_u32(*id);
            b.put_slice(hash);
            b.put_u32(holes.len() as u32);
            for (first, count) in holes {
                b.put_u64(*first);
                b.put_u64(*count);
            }
        }
        Record::Skip { id } => {
            b.put_u8(REC_SKIP);
            b.put_u32(*id);
        }
        Record::Fail { id, reason } => {
            b.put_u8(REC_FAIL);
            b.put_u32(*id);
            put_reason(b, reason);
        }
        Record::Restart { id } => {
            b.put_u8(REC_RESTART);
            b.put_u32(*id);
        }
    }
}

fn put_bytes16(b: &mut BytesMut, v: &[u8]) {
    let n = v.len().min(u16::MAX as usize);
    b.put_u16(n as u16);
    b.put_slice(&v[..n]);
}

fn put_reason(b: &mut BytesMut, reason: &str) {
    let mut cut = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    put_bytes16(b, &reason.as_bytes()[..cut]);
}

struct Reader {
    buf: Bytes,
    message: &'static str,
}

impl Reader {
    fn need(&self, n: usize, field: &'static str) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            return Err(DecodeError::Truncated {
                message: self.message,
                field,
            });
        }
        Ok(())
    }

    fn u8(&mut self, f: &'static str) -> Result<u8, DecodeError> {
        self.need(1, f)?;
        Ok(self.buf.get_u8())
    }

    fn bool(&mut self, f: &'static str) -> Result<bool, DecodeError> {
        match self.u8(f)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.invalid(f, format!("{v} is not 0 or 1"))),
        }
    }

    fn u16(&mut self, f: &'static str) -> Result<u16, DecodeError> {
        self.need(2, f)?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self, f: &'static str) -> Result<u32, DecodeError> {
        self.need(4, f)?;
        Ok(self.buf.get_u32())
    }

    fn u64(&mut self, f: &'static str) -> Result<u64, DecodeError> {
        self.need(8, f)?;
        Ok(self.buf.get_u64())
    }

    fn i64(&mut self, f: &'static str) -> Result<i64, DecodeError> {
        self.need(8, f)?;
        Ok(self.buf.get_i64())
    }

    fn digest(&mut self, f: &'static str) -> Result<Digest, DecodeError> {
        self.need(32, f)?;
        let mut d = [0; 32];
        self.buf.copy_to_slice(&mut d);
        Ok(d)
    }

    fn take(&mut self, n: usize, f: &'static str) -> Result<Bytes, DecodeError> {
        self.need(n, f)?;
        Ok(self.buf.split_to(n))
    }

    fn bytes16(&mut self, f: &'static str, limit: usize) -> Result<Vec<u8>, DecodeError> {
        let n = usize::from(self.u16(f)?);
        self.limit(f, n as u64, limit as u64)?;
        Ok(self.take(n, f)?.to_vec())
    }

    fn reason(&mut self) -> Result<String, DecodeError> {
        let raw = self.bytes16("reason", MAX_REASON_LEN)?;
        Ok(String::from_utf8_lossy(&raw).into_owned())
    }

    /// A count of items each at least `min_item` bytes long, checked against what is left.
    fn count(&mut self, f: &'static str, min_item: usize) -> Result<usize, DecodeError> {
        let n = self.u32(f)? as usize;
        let most = self.buf.remaining() / min_item;
        self.limit(f, n as u64, most as u64)?;
        Ok(n)
    }

    fn limit(&self, f: &'static str, value: u64, limit: u64) -> Result<(), DecodeError> {
        if value > limit {
            return Err(DecodeError::Limit {
                message: self.message,
                field: f,
                value,
                limit,
            });
        }
        Ok(())
    }

    fn invalid(&self, f: &'static str, reason: String) -> DecodeError {
        DecodeError::Invalid {
            message: self.message,
            field: f,
            reason,
        }
    }

    fn record(&mut self) -> Result<Record, DecodeError> {
        Ok(match self.u8("record")? {
            REC_WHOLE => {
                let id = self.u32("id")?;
                let hash = self.digest("hash")?;
                let n = self.u32("length")?;
                self.limit("length", u64::from(n), u64::from(MAX_BLOCK_SIZE))?;
                Record::Whole {
                    id,
                    hash,
                    data: self.take(n as usize, "data")?,
                }
            }
            REC_BLOCK => {
                let id = self.u32("id")?;
                let index = self.u64("block")?;
                let cv = self.digest("cv")?;
                let n = self.u32("length")?;
                self.limit("length", u64::from(n), u64::from(MAX_BLOCK_SIZE))?;
                Record::Block {
                    id,
                    index,
                    cv,
                    data: self.take(n as usize, "data")?,
                }
            }
            REC_FILE_END => {
                let id = self.u32("id")?;
                let hash = self.digest("hash")?;
                let n = self.count("holes", 16)?;
                let mut holes = Vec::with_capacity(n);
                for _ in 0..n {
                    holes.push((self.u64("hole.first")?, self.u64("hole.count")?));
                }
                Record::FileEnd { id, hash, holes }
            }
            REC_SKIP => Record::Skip {
                id: self.u32("id")?,
            },
            REC_FAIL => Record::Fail {
                id: self.u32("id")?,
                reason: self.reason()?,
            },
            REC_RESTART => Record::Restart {
                id: self.u32("id")?,
            },
            other => return Err(self.invalid("record", format!("unknown record type {other}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                version: TREE_PROTOCOL_VERSION,
                block_size: DEFAULT_BLOCK_SIZE,
                policy: ExistingPolicy::Overwrite,
                resume: true,
                entries: 3,
                bytes: 1 << 40,
            }),
            Message::Manifest {
                entries: vec![
                    Entry {
                        path: b"d".to_vec(),
                        kind: EntryKind::Dir,
                        mode: 0o755,
                        mtime_sec: -5,
                        mtime_nsec: 7,
                    },
                    Entry {
                        path: b"d/f\xff".to_vec(),
                        kind: EntryKind::File { size: 12 },
                        mode: 0o644,
                        mtime_sec: 1_700_000_000,
                        mtime_nsec: 999_999_999,
                    },
                    Entry {
                        path: b"d/l".to_vec(),
                        kind: EntryKind::Symlink {
                            target: b"f\xff".to_vec(),
                        },
                        mode: 0o777,
                        mtime_sec: 0,
                        mtime_nsec: 0,
                    },
                ],
                last: true,
            },
            Message::Data(vec![
                Record::Whole {
                    id: 1,
                    hash: [1; 32],
                    data: Bytes::from_static(b"hello world!"),
                },
                Record::Block {
                    id: 9,
                    index: 3,
                    cv: [2; 32],
                    data: Bytes::from_static(b"xyz"),
                },
                Record::FileEnd {
                    id: 9,
                    hash: [3; 32],
                    holes: vec![(0, 2), (5, 100)],
                },
                Record::Skip { id: 4 },
                Record::Fail {
                    id: 5,
                    reason: "vanished".into(),
                },
                Record::Restart { id: 6 },
            ]),
            Message::End,
            Message::Plan {
                items: vec![
                    (1, Want::Send),
                    (
                        2,
                        Want::Resume {
                            verified: vec![(0, [4; 32]), (7, [5; 32])],
                        },
                    ),
                    (3, Want::Have { hash: [6; 32] }),
                    (
                        4,
                        Want::Refuse {
                            reason: "exists".into(),
                        },
                    ),
                ],
                last: false,
            },
            Message::Results(vec![
                (1, Outcome::Stored { hash: [7; 32] }),
                (2, Outcome::Identical),
                (
                    3,
                    Outcome::Failed {
                        reason: "no".into(),
                    },
                ),
            ]),
            Message::Finished(Finished {
                stored: 1,
                identical: 2,
                failed: 3,
                bytes_written: 4,
            }),
            Message::Abort("disk full".into()),
        ]
    }

    #[test]
    fn every_message_roundtrips() {
        for m in samples() {
            assert!(is_tree_message(&m.encode()));
            assert_eq!(Message::decode(m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn a_block_message_built_in_place_decodes_as_a_block_record() {
        let mut b = block_message(7, 42, 5);
        b[BLOCK_HEADER_LEN..].copy_from_slice(b"abcde");
        seal_block(&mut b, &[9; 32]);
        let b = b.freeze();
        assert_eq!(
            Message::decode(b.clone()).unwrap(),
            Message::Data(vec![Record::Block {
                id: 7,
                index: 42,
                cv: [9; 32],
                data: Bytes::from_static(b"abcde"),
            }])
        );
        let mut own = block_header(7, 42, 5, &[9; 32]).to_vec();
        own.extend_from_slice(b"abcde");
        assert_eq!(own, b.to_vec(), "block_header lays out the same bytes");
    }

    #[test]
    fn a_whole_batch_built_in_place_encodes_like_its_records() {
        // A small starting buffer with stale bytes: it grows, and nothing stale leaks.
        let mut batch = WholeBatch::new(vec![0xee; 8]);
        let slot = batch.data_slot(6);
        slot[..5].copy_from_slice(b"hello");
        batch.commit_whole(3, 5);
        // A file that could not be read: its slot is reused by the next record.
        batch.data_slot(100)[..4].copy_from_slice(b"junk");
        let fail = Record::Fail {
            id: 4,
            reason: "gone".into(),
        };
        batch.push(&fail);
        batch.data_slot(0);
        batch.commit_whole(5, 0);
        assert_eq!(batch.records(), 3);
        let (buf, len) = batch.finish();
        let want = Message::Data(vec![
            Record::Whole {
                id: 3,
                hash: *blake3::hash(b"hello").as_bytes(),
                data: Bytes::from_static(b"hello"),
            },
            fail,
            Record::Whole {
                id: 5,
                hash: *blake3::hash(b"").as_bytes(),
                data: Bytes::new(),
            },
        ]);
        assert_eq!(&buf[..len], &want.encode()[..]);
    }

    #[test]
    fn a_batch_sized_by_bytes_for_never_grows() {
        let sizes = [4096usize, 0, 17];
        let need = WholeBatch::bytes_for(sizes.iter().map(|n| n + 1));
        let mut batch = WholeBatch::new(vec![0; need]);
        for (id, &n) in sizes.iter().enumerate() {
            batch.data_slot(n + 1)[..n].fill(7);
            batch.commit_whole(id as u32, n);
        }
        let (buf, len) = batch.finish();
        assert_eq!(buf.len(), need, "no reallocation");
        assert_eq!(len, need - sizes.len(), "every slot's extra byte unused");
    }

    #[test]
    fn limits_are_named_in_errors() {
        let e = Message::decode(Bytes::from_static(&[TAG_PLAN, 0, 0xff, 0xff, 0xff, 0xff]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Plan.items is 4294967295, above the limit of 0"
        );
        let mut hello = Message::Hello(Hello {
            version: 1,
            block_size: DEFAULT_BLOCK_SIZE,
            policy: ExistingPolicy::Skip,
            resume: false,
            entries: 1,
            bytes: 1,
        })
        .encode()
        .to_vec();
        hello[3..7].copy_from_slice(&1000u32.to_be_bytes());
        let e = Message::decode(Bytes::from(hello)).unwrap_err();
        assert!(
            e.to_string().starts_with("Hello.block_size is invalid"),
            "{e}"
        );
        assert_eq!(Message::decode(Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(
            Message::decode(Bytes::from_static(&[0x60])),
            Err(DecodeError::UnknownType(0x60))
        );
        assert_eq!(
            Message::decode(Bytes::from_static(&[TAG_END, 0])),
            Err(DecodeError::Trailing("End"))
        );
    }

    proptest! {
        #[test]
        fn no_input_panics_or_overallocates(tag in prop::sample::select(vec![
            TAG_HELLO, TAG_MANIFEST, TAG_DATA, TAG_END, TAG_PLAN, TAG_RESULTS,
            TAG_FINISHED, TAG_ABORT]),
            body in prop::collection::vec(any::<u8>(), 0..256)) {
            let mut m = vec![tag];
            m.extend_from_slice(&body);
            let _ = Message::decode(Bytes::from(m));
        }

        #[test]
        fn truncating_a_valid_message_is_an_error_never_a_panic(cut in 0usize..400) {
            for m in samples() {
                let enc = m.encode();
                if cut < enc.len() {
                    prop_assert!(Message::decode(enc.slice(..cut)).is_err() || cut == enc.len());
                }
            }
        }
    }
}
