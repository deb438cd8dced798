//! The sending driver: manifest out, plan in, then blocks and batches of small files from
//! several reader tasks at once, all pipelined over one channel.
//!
//! Files of at most one block are read whole and packed many to a message. Larger files are
//! cut into blocks; each block is read with `pread` by whichever worker takes it, straight
//! into the message buffer, hashed there, and sent without another copy. Holes (found with
//! SEEK_DATA/SEEK_HOLE) are hashed as zeroes but never read or sent.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Mutex as AsyncMutex, Notify, mpsc};

use crate::channel::Channel;
use crate::error::{Error, Result, joined};
use crate::hash::{
    BlockHasher, HASH_PIECE, block_count, block_cv, block_len, file_hash, zero_block_cv,
};
use crate::plan::{BlockPlan, HaveAnswer, answer_have};
use crate::protocol::{
    BLOCK_HEADER_LEN, DEFAULT_BLOCK_SIZE, Digest, Entry, EntryKind, ExistingPolicy, Finished,
    Hello, Message, Outcome, Record, TREE_PROTOCOL_VERSION, Want, WholeBatch, block_header,
};
use crate::scan::Tree;

/// Most payload bytes in one batch of small files.
const BATCH_BYTES: usize = 1 << 20;
/// Most files in one batch.
const BATCH_FILES: usize = 1024;
/// Most entries in one Manifest message.
const MANIFEST_BATCH: usize = 2048;
/// The default [`SendOptions::manifest_window`].
pub const MANIFEST_WINDOW: u64 = 16_384;
/// How long a part-filled batch of small files waits for more planned files before it is
/// sent as it is: with the manifest windowed, the files that would fill it may only be
/// announced once the files already in it have landed.
const BATCH_WAIT: Duration = Duration::from_millis(2);
/// Hole blocks hashed per job.
const HOLE_JOB: u64 = 64;
/// Plan items taken at once: files the receiver already has are checked in parallel and
/// answered in one message per chunk.
const PLAN_CHUNK: usize = 4096;
/// Block buffers kept for reuse once the transport lets go of them.
const POOL_BUFFERS: usize = 64;

/// How to send.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// Block size: the unit of hashing, reading and resume.
    pub block_size: u32,
    /// What the receiver does with files it already has.
    pub policy: ExistingPolicy,
    /// Resume partial files left by an earlier try (the default).
    pub resume: bool,
    /// Reader tasks working at once.
    pub readers: usize,
    /// Most entries announced to the receiver ahead of its results. The receiver keeps
    /// state for each announced file until it lands (its plan, its partial name, what
    /// landing needs): announced all at once, a tree of a million empty files made
    /// `amst serve` hold 850 MiB; windowed, 295 MiB. The default keeps far more files in
    /// flight than a long path needs to stay busy.
    pub manifest_window: u64,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            block_size: DEFAULT_BLOCK_SIZE,
            policy: ExistingPolicy::default(),
            resume: true,
            readers: 8,
            manifest_window: MANIFEST_WINDOW,
        }
    }
}

/// How one entry ended, as the receiver reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryReport {
    /// The path below the tree root.
    pub path: String,
    /// How it ended.
    pub outcome: Outcome,
}

/// What a finished [`send_tree`] knows.
#[derive(Clone, Debug)]
pub struct SendReport {
    /// Every entry, in manifest order.
    pub entries: Vec<EntryReport>,
    /// The receiver's totals.
    pub finished: Finished,
    /// Bytes in all files of the tree.
    pub tree_bytes: u64,
    /// File bytes put into messages (what resume, holes and identical files saved is the
    /// difference).
    pub data_bytes_sent: u64,
    /// Blocks the receiver already held, verified, from an earlier try.
    pub blocks_resumed: u64,
    /// Special files left out.
    pub skipped: Vec<std::path::PathBuf>,
    /// From Hello to Finished.
    pub elapsed: Duration,
}

impl SendReport {
    /// Entries that failed, with the receiver's or sender's reason.
    pub fn failures(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().filter_map(|e| match &e.outcome {
            Outcome::Failed { reason } => Some((e.path.as_str(), reason.as_str())),
            _ => None,
        })
    }
}

/// Counters the caller can watch while a transfer runs.
#[derive(Debug, Default)]
pub struct SendProgress {
    /// File bytes handed to the channel (shared, so a progress display can watch it).
    pub bytes: Arc<AtomicU64>,
    /// Entries with a result.
    pub done: AtomicU64,
}

struct Shared {
    ch: Arc<dyn Channel>,
    tree: Tree,
    opts: SendOptions,
    progress: Arc<SendProgress>,
    sent: AtomicU64,
    resumed: AtomicU64,
    buffers: Arc<BufferPool>,
    /// Message buffers of small-file batches, likewise.
    batch_buffers: Arc<BufferPool>,
    /// By entry id: the receiver reported the entry failed, so what is left of it is
    /// neither read nor sent (a full disk there must not cost the rest of a 100 GB file on
    /// the wire).
    given_up: Arc<[AtomicBool]>,
}

/// Block buffers the transport has finished with, kept for the next blocks: a fresh buffer
/// per block costs page faults and zeroing for every megabyte sent.
#[derive(Default)]
struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

/// One block's message in a pooled buffer; dropping the last `Bytes` returns the buffer.
struct PooledMessage {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for PooledMessage {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for PooledMessage {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut free = self.pool.free.lock().expect("not poisoned");
        if free.len() < POOL_BUFFERS {
            free.push(buf);
        }
    }
}

enum Job {
    Small(Vec<u32>),
    Block(Arc<BigFile>, u64),
    Holes(Arc<BigFile>, u64, u64),
}

struct BigFile {
    id: u32,
    file: File,
    size: u64,
    holes: Vec<(u64, u64)>,
    cvs: Mutex<Vec<Option<Digest>>>,
    remaining: AtomicU64,
    failed: Mutex<Option<String>>,
}

/// Sends `tree` over `ch` and waits until the receiver has reported on every entry.
pub async fn send_tree(
    ch: Arc<dyn Channel>,
    tree: Tree,
    opts: &SendOptions,
    progress: Arc<SendProgress>,
) -> Result<SendReport> {
    let start = Instant::now();
    let hello = Hello {
        version: TREE_PROTOCOL_VERSION,
        block_size: opts.block_size,
        policy: opts.policy,
        resume: opts.resume,
        entries: tree.entries.len() as u64,
        bytes: tree.bytes,
    };
    ch.send(Message::Hello(hello).encode())
        .await
        .map_err(|e| Error::channel("sending the hello", e))?;
    let n = tree.entries.len();
    let given_up: Arc<[AtomicBool]> = (0..n).map(|_| AtomicBool::new(false)).collect();
    let shared = Arc::new(Shared {
        ch: ch.clone(),
        tree,
        opts: opts.clone(),
        progress,
        sent: AtomicU64::new(0),
        resumed: AtomicU64::new(0),
        buffers: Arc::default(),
        batch_buffers: Arc::default(),
        given_up: given_up.clone(),
    });
    let (plan_tx, plan_rx) = mpsc::unbounded_channel();
    let results_seen = Arc::new(Notify::new());
    let router = tokio::spawn(route(
        ch.clone(),
        plan_tx,
        shared.progress.clone(),
        given_up,
        results_seen.clone(),
    ));
    // Dropping this future (a cancelled or killed transfer) must stop the router too, so the
    // session's last handle goes and the receiver sees the end.
    let _stop_router = AbortOnDrop(router.abort_handle());
    let work = async {
        // Files are sent as their part of the manifest is planned, while the rest of the
        // manifest follows within its window.
        tokio::try_join!(
            send_manifest(&shared, &results_seen),
            schedule(&shared, plan_rx)
        )?;
        ch.send(Message::End.encode())
            .await
            .map_err(|e| Error::channel("sending the end", e))
    };
    tokio::pin!(router);
    let routed = tokio::select! {
        r = work => {
            r?;
            (&mut router).await
        }
        r = &mut router => r,
    };
    let (outcomes, finished) = routed.map_err(|e| Error::Protocol(format!("router: {e}")))??;
    // The receiver waits for this goodbye, so that neither side drops a session the other
    // still needs.
    let _ = ch.close().await;
    let data_bytes_sent = shared.sent.load(Ordering::Relaxed);
    let blocks_resumed = shared.resumed.load(Ordering::Relaxed);
    // The manifest's paths become the report's: moved, not copied, once no reader is left
    // (for a million files, copying them raised the sender's peak by about 50 MB).
    let tree = match Arc::try_unwrap(shared) {
        Ok(s) => s.tree,
        Err(s) => s.tree.clone(),
    };
    let entries = tree
        .entries
        .into_iter()
        .zip(outcomes)
        .map(|(e, o)| EntryReport {
            path: String::from_utf8(e.path)
                .unwrap_or_else(|bad| String::from_utf8_lossy(bad.as_bytes()).into_owned()),
            outcome: o.unwrap_or(Outcome::Failed {
                reason: "the receiver reported no result".into(),
            }),
        })
        .collect();
    Ok(SendReport {
        entries,
        finished,
        tree_bytes: tree.bytes,
        data_bytes_sent,
        blocks_resumed,
        skipped: tree.skipped,
        elapsed: start.elapsed(),
    })
}

async fn send_manifest(s: &Shared, results_seen: &Notify) -> Result<()> {
    let entries = &s.tree.entries;
    let window = s.opts.manifest_window.max(1);
    let batch = MANIFEST_BATCH.min(usize::try_from(window).unwrap_or(usize::MAX));
    let mut at = 0;
    loop {
        let end = (at + batch).min(entries.len());
        while end as u64 > s.progress.done.load(Ordering::Acquire) + window {
            results_seen.notified().await;
        }
        let last = end == entries.len();
        let msg = Message::Manifest {
            entries: entries[at..end].to_vec(),
            last,
        };
        s.ch.send(msg.encode())
            .await
            .map_err(|e| Error::channel("sending the manifest", e))?;
        if last {
            return Ok(());
        }
        at = end;
    }
}

type Routed = (Vec<Option<Outcome>>, Finished);

/// Reads everything the receiver says: plan items go to the scheduler, results are kept.
async fn route(
    ch: Arc<dyn Channel>,
    plan_tx: mpsc::UnboundedSender<(u32, Want)>,
    progress: Arc<SendProgress>,
    given_up: Arc<[AtomicBool]>,
    results_seen: Arc<Notify>,
) -> Result<Routed> {
    let n = given_up.len();
    let mut plan_tx = Some(plan_tx);
    let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
    loop {
        let msg = ch
            .recv()
            .await
            .map_err(|e| Error::channel("receiving from the receiver", e))?
            .ok_or(Error::Closed)?;
        match Message::decode(msg).map_err(|e| Error::Protocol(e.to_string()))? {
            Message::Plan { items, last } => {
                let Some(tx) = &plan_tx else {
                    return Err(Error::Protocol("plan items after the last".into()));
                };
                for item in items {
                    if item.0 as usize >= n {
                        return Err(Error::Protocol(format!(
                            "plan for unknown entry {}",
                            item.0
                        )));
                    }
                    let _ = tx.send(item);
                }
                if last {
                    plan_tx = None;
                }
            }
            Message::Results(items) => {
                for (id, o) in items {
                    let slot = outcomes
                        .get_mut(id as usize)
                        .ok_or_else(|| Error::Protocol(format!("result for unknown entry {id}")))?;
                    if matches!(o, Outcome::Failed { .. }) {
                        given_up[id as usize].store(true, Ordering::Relaxed);
                    }
                    *slot = Some(o);
                    progress.done.fetch_add(1, Ordering::Release);
                }
                results_seen.notify_one();
            }
            Message::Finished(f) => return Ok((outcomes, f)),
            Message::Abort(reason) => return Err(Error::Aborted(reason)),
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected message from the receiver: {other:?}"
                )));
            }
        }
    }
}

/// Turns plan items into jobs for the workers, in plan order.
async fn schedule(s: &Arc<Shared>, mut plan: mpsc::UnboundedReceiver<(u32, Want)>) -> Result<()> {
    let workers = s.opts.readers.max(1);
    let (job_tx, job_rx) = mpsc::channel::<Job>(workers * 2);
    let job_rx = Arc::new(AsyncMutex::new(job_rx));
    let mut pool = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let s = s.clone();
        let rx = job_rx.clone();
        pool.spawn(async move {
            loop {
                let job = rx.lock().await.recv().await;
                let Some(job) = job else { return Ok(()) };
                run_job(&s, job).await?;
            }
        });
    }
    let bs = u64::from(s.opts.block_size);
    let mut batch: Vec<u32> = Vec::new();
    let mut batch_bytes = 0usize;
    let fed = async {
        let mut chunk = Vec::new();
        loop {
            let got = if batch.is_empty() {
                plan.recv_many(&mut chunk, PLAN_CHUNK).await
            } else {
                // recv_many is cancel-safe: nothing is lost when the wait runs out.
                match tokio::time::timeout(BATCH_WAIT, plan.recv_many(&mut chunk, PLAN_CHUNK)).await
                {
                    Ok(n) => n,
                    Err(_) => {
                        if !send_batch(&job_tx, &mut batch, &mut batch_bytes).await {
                            return Ok(());
                        }
                        continue;
                    }
                }
            };
            if got == 0 {
                break;
            }
            let (wanted, answered) = check_haves(s, std::mem::take(&mut chunk)).await;
            if !answered.is_empty() {
                send_records(s, answered).await?;
            }
            for (id, size, verified) in wanted {
                if size <= bs {
                    batch.push(id);
                    batch_bytes += size as usize + 64;
                    if (batch_bytes >= BATCH_BYTES || batch.len() >= BATCH_FILES)
                        && !send_batch(&job_tx, &mut batch, &mut batch_bytes).await
                    {
                        return Ok(());
                    }
                    continue;
                }
                let prepared = {
                    let s = s.clone();
                    joined(
                        tokio::task::spawn_blocking(move || prepare_big(&s, id, size, verified))
                            .await,
                    )
                    .ok_or(Error::Closed)?
                };
                let (big, restart, to_send) = match prepared {
                    Ok(p) => p,
                    Err(reason) => {
                        send_records(s, vec![Record::Fail { id, reason }]).await?;
                        continue;
                    }
                };
                if restart {
                    send_records(s, vec![Record::Restart { id }]).await?;
                }
                if big.remaining.load(Ordering::Acquire) == 0 {
                    finish_big(s, &big).await?;
                    continue;
                }
                for &(first, count) in &big.holes {
                    let mut at = first;
                    while at < first + count {
                        let n = HOLE_JOB.min(first + count - at);
                        if job_tx.send(Job::Holes(big.clone(), at, n)).await.is_err() {
                            return Ok(());
                        }
                        at += n;
                    }
                }
                for index in to_send {
                    if job_tx.send(Job::Block(big.clone(), index)).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        if !batch.is_empty() {
            let _ = job_tx.send(Job::Small(std::mem::take(&mut batch))).await;
        }
        Ok::<(), Error>(())
    };
    let fed = fed.await;
    drop(job_tx);
    let mut result = fed;
    while let Some(r) = pool.join_next().await {
        let r = r.unwrap_or_else(|e| Err(Error::Protocol(format!("reader task: {e}"))));
        if result.is_ok() {
            result = r;
        }
    }
    result
}

/// Hands the batch of small files to the readers and starts a new one; false once the
/// readers are gone.
async fn send_batch(
    job_tx: &mpsc::Sender<Job>,
    batch: &mut Vec<u32>,
    batch_bytes: &mut usize,
) -> bool {
    *batch_bytes = 0;
    job_tx.send(Job::Small(std::mem::take(batch))).await.is_ok()
}

/// Files to send (id, size, blocks the receiver verified) and the records that answer the
/// rest.
type Checked = (Vec<(u32, u64, Vec<(u64, Digest)>)>, Vec<Record>);

/// Sorts a chunk of plan items: files the receiver already has (same size) are hashed here,
/// several at once, and answered together in one message; the rest are to be sent.
async fn check_haves(s: &Arc<Shared>, items: Vec<(u32, Want)>) -> Checked {
    let mut wanted = Vec::with_capacity(items.len());
    let mut haves = Vec::new();
    for (id, want) in items {
        let Some(size) = file_size(&s.tree.entries[id as usize]) else {
            continue;
        };
        match want {
            Want::Refuse { .. } => {}
            Want::Send => wanted.push((id, size, Vec::new())),
            Want::Resume { verified } => wanted.push((id, size, verified)),
            Want::Have { hash } => haves.push((id, size, hash)),
        }
    }
    let mut answered = Vec::new();
    if haves.is_empty() {
        return (wanted, answered);
    }
    let workers = s.opts.readers.clamp(1, haves.len());
    let per = haves.len().div_ceil(workers);
    let mut pool = tokio::task::JoinSet::new();
    for part in haves.chunks(per) {
        let part = part.to_vec();
        let s = s.clone();
        pool.spawn_blocking(move || {
            part.into_iter()
                .map(|(id, size, theirs)| {
                    let answer =
                        own_hash(&s, id).map(|ours| answer_have(s.opts.policy, &ours, &theirs));
                    (id, size, answer)
                })
                .collect::<Vec<_>>()
        });
    }
    while let Some(done) = pool.join_next().await {
        let Some(done) = joined(done) else { continue };
        for (id, size, answer) in done {
            match answer {
                Ok(HaveAnswer::Send) => wanted.push((id, size, Vec::new())),
                Ok(HaveAnswer::Skip) => answered.push(Record::Skip { id }),
                Ok(HaveAnswer::Refuse(reason)) | Err(reason) => {
                    answered.push(Record::Fail { id, reason })
                }
            }
        }
    }
    (wanted, answered)
}

fn file_size(e: &Entry) -> Option<u64> {
    match e.kind {
        EntryKind::File { size } => Some(size),
        _ => None,
    }
}

async fn send_records(s: &Shared, records: Vec<Record>) -> Result<()> {
    s.ch.send(Message::Data(records).encode())
        .await
        .map_err(|e| Error::channel("sending data", e))
}

async fn run_job(s: &Arc<Shared>, job: Job) -> Result<()> {
    match job {
        Job::Small(ids) => {
            let s2 = s.clone();
            let reading = tokio::task::spawn_blocking(move || read_small(&s2, &ids));
            let (msg, bytes) = joined(reading.await).ok_or(Error::Closed)?;
            s.ch.send(msg)
                .await
                .map_err(|e| Error::channel("sending data", e))?;
            s.sent.fetch_add(bytes, Ordering::Relaxed);
            s.progress.bytes.fetch_add(bytes, Ordering::Relaxed);
            Ok(())
        }
        Job::Block(big, _) if s.given_up[big.id as usize].load(Ordering::Relaxed) => {
            fail_big(&big, "the receiver gave the file up".into());
            block_done(s, &big, 1).await
        }
        Job::Block(big, index) => {
            let bs = s.opts.block_size;
            let b2 = big.clone();
            let pool = s.buffers.clone();
            let reading = tokio::task::spawn_blocking(move || read_block(&b2, bs, index, &pool));
            let read = joined(reading.await).ok_or(Error::Closed)?;
            match read {
                Ok((msg, cv)) => {
                    let n = (msg.len() - BLOCK_HEADER_LEN) as u64;
                    if big.failed.lock().expect("not poisoned").is_none() {
                        s.ch.send(msg)
                            .await
                            .map_err(|e| Error::channel("sending data", e))?;
                        s.sent.fetch_add(n, Ordering::Relaxed);
                        s.progress.bytes.fetch_add(n, Ordering::Relaxed);
                    }
                    big.cvs.lock().expect("not poisoned")[index as usize] = Some(cv);
                }
                Err(e) => fail_big(&big, e),
            }
            block_done(s, &big, 1).await
        }
        Job::Holes(big, first, count) => {
            let bs = s.opts.block_size;
            let b2 = big.clone();
            let hashing = tokio::task::spawn_blocking(move || {
                for i in first..first + count {
                    let cv = zero_block_cv(block_len(b2.size, bs, i), bs, i);
                    b2.cvs.lock().expect("not poisoned")[i as usize] = Some(cv);
                }
            });
            joined(hashing.await).ok_or(Error::Closed)?;
            block_done(s, &big, count).await
        }
    }
}

fn fail_big(big: &BigFile, why: String) {
    let mut f = big.failed.lock().expect("not poisoned");
    if f.is_none() {
        *f = Some(why);
    }
}

async fn block_done(s: &Arc<Shared>, big: &Arc<BigFile>, n: u64) -> Result<()> {
    if big.remaining.fetch_sub(n, Ordering::AcqRel) == n {
        finish_big(s, big).await?;
    }
    Ok(())
}

/// Every block of a big file is sent or hashed: check the file did not change, then send its
/// hash (or why it failed).
async fn finish_big(s: &Arc<Shared>, big: &Arc<BigFile>) -> Result<()> {
    let id = big.id;
    let failed = big.failed.lock().expect("not poisoned").take();
    let record = match failed {
        Some(reason) => Record::Fail { id, reason },
        None => {
            let cvs: Option<Vec<Digest>> = big
                .cvs
                .lock()
                .expect("not poisoned")
                .iter()
                .copied()
                .collect();
            let entry = &s.tree.entries[id as usize];
            match (cvs, unchanged(&big.file, entry)) {
                (_, Err(reason)) => Record::Fail { id, reason },
                (Some(cvs), Ok(())) => match file_hash(big.size, s.opts.block_size, &cvs) {
                    Some(hash) => Record::FileEnd {
                        id,
                        hash,
                        holes: big.holes.clone(),
                    },
                    None => Record::Fail {
                        id,
                        reason: "internal error: block hashes incomplete".into(),
                    },
                },
                (None, Ok(())) => Record::Fail {
                    id,
                    reason: "internal error: block hashes incomplete".into(),
                },
            }
        }
    };
    send_records(s, vec![record]).await
}

/// Whether the open file still has the size and mtime the manifest announced.
fn unchanged(file: &File, e: &Entry) -> std::result::Result<(), String> {
    let m = file
        .metadata()
        .map_err(|e| format!("cannot stat the file: {e}"))?;
    if Some(m.len()) != file_size(e)
        || m.mtime() != e.mtime_sec
        || m.mtime_nsec() as u32 != e.mtime_nsec
    {
        return Err("the file changed while it was being sent; send it again".into());
    }
    Ok(())
}

fn open_checked(s: &Shared, id: u32) -> std::result::Result<File, String> {
    let path = &s.tree.source(id);
    let f = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let m = f
        .metadata()
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    if !m.is_file() {
        return Err(format!("{} is no longer a regular file", path.display()));
    }
    unchanged(&f, &s.tree.entries[id as usize])?;
    Ok(f)
}

fn own_hash(s: &Shared, id: u32) -> std::result::Result<Digest, String> {
    let size = file_size(&s.tree.entries[id as usize]).unwrap_or(0);
    let bs = s.opts.block_size;
    let f = open_checked(s, id)?;
    let read_err = |e: std::io::Error| format!("reading failed: {e}");
    if size <= u64::from(bs) {
        let mut buf = Vec::with_capacity(size as usize);
        (&f).take(size).read_to_end(&mut buf).map_err(read_err)?;
        return Ok(*blake3::hash(&buf).as_bytes());
    }
    let mut cvs = Vec::new();
    let mut buf = vec![0u8; bs as usize];
    for i in 0..block_count(size, bs) {
        let n = block_len(size, bs, i) as usize;
        f.read_exact_at(&mut buf[..n], i * u64::from(bs))
            .map_err(read_err)?;
        cvs.push(block_cv(&buf[..n], bs, i));
    }
    file_hash(size, bs, &cvs).ok_or_else(|| "internal error: hashing".into())
}

/// Reads a batch of small files straight into one pooled message buffer.
fn read_small(s: &Shared, ids: &[u32]) -> (Bytes, u64) {
    // Sized once for the whole batch (each file's record and the byte that reveals growth):
    // grown file by file it was copied at every doubling, and a fresh zeroed allocation of
    // this size comes from the kernel already zeroed, without a memset.
    let need = WholeBatch::bytes_for(
        ids.iter()
            .map(|&id| file_size(&s.tree.entries[id as usize]).map_or(0, |n| n as usize + 1)),
    );
    let pooled = s.batch_buffers.free.lock().expect("not poisoned").pop();
    let buf = pooled
        .filter(|b| b.len() >= need)
        .unwrap_or_else(|| vec![0u8; need]);
    let mut batch = WholeBatch::new(buf);
    let mut dir = ParentDir::default();
    let mut bytes = 0;
    for &id in ids {
        match read_small_file(s, id, &mut dir, &mut batch) {
            Ok(n) => bytes += n as u64,
            Err(reason) => batch.push(&Record::Fail { id, reason }),
        }
    }
    let (buf, len) = batch.finish();
    let msg = PooledMessage {
        buf,
        len,
        pool: s.batch_buffers.clone(),
    };
    (Bytes::from_owner(msg), bytes)
}

/// One small file in four system calls (open, read, fstat, close) into its place in `batch`:
/// thousands of them are read per second, so each call counts. The one `fstat`, taken after
/// the read, checks the same things as [`open_checked`] before and [`unchanged`] after: a
/// regular file that still has the size and mtime of the manifest, so what was read is what
/// the manifest announced.
fn read_small_file(
    s: &Shared,
    id: u32,
    dir: &mut ParentDir,
    batch: &mut WholeBatch,
) -> std::result::Result<usize, String> {
    let path = &s.tree.source(id);
    let entry = &s.tree.entries[id as usize];
    let size = file_size(entry).unwrap_or(0);
    let f = dir.open(path).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => format!(
            "{} is no longer a regular file (now a link)",
            path.display()
        ),
        _ => format!("cannot open {}: {e}", path.display()),
    })?;
    // One byte more than announced reveals a file that grew.
    let buf = batch.data_slot(size as usize + 1);
    let mut got = 0;
    while got < buf.len() {
        match (&f).read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading failed: {e}")),
        }
        // A regular file returns less than asked only at its end: the size is checked below.
        if got as u64 == size {
            break;
        }
    }
    let m = f
        .metadata()
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    if !m.is_file() {
        return Err(format!("{} is no longer a regular file", path.display()));
    }
    if got as u64 != size
        || m.len() != size
        || m.mtime() != entry.mtime_sec
        || m.mtime_nsec() as u32 != entry.mtime_nsec
    {
        return Err("the file changed while it was being sent; send it again".into());
    }
    batch.commit_whole(id, got);
    Ok(got)
}

/// The directory of the files a batch reads, kept open while they come from it: each file is
/// then opened by its name, not by walking its whole path from the root again (a batch holds
/// up to a thousand files, mostly from one directory).
#[derive(Default)]
struct ParentDir {
    path: PathBuf,
    fd: Option<OwnedFd>,
}

impl ParentDir {
    /// Opens `path` for reading, without following a link in its last component: the scan
    /// saw a regular file there.
    fn open(&mut self, path: &Path) -> std::io::Result<File> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return File::open(path);
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if self.fd.is_none() || self.path != parent {
            self.fd = Some(crate::dirfd::open_dir(parent, true)?);
            self.path = parent.to_path_buf();
        }
        let dir = self.fd.as_ref().expect("opened above");
        let c = CString::new(name.as_bytes())?;
        // SAFETY: an open directory descriptor and a NUL-terminated name; the descriptor
        // returned is owned by the File.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: as above.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

type Prepared = (Arc<BigFile>, bool, Vec<u64>);

/// Opens a big file, finds its holes, and checks the receiver's verified blocks against the
/// file as it is now: one mismatch and the whole file is sent anew (`restart`).
fn prepare_big(
    s: &Shared,
    id: u32,
    size: u64,
    verified: Vec<(u64, Digest)>,
) -> std::result::Result<Prepared, String> {
    let bs = s.opts.block_size;
    let file = open_checked(s, id)?;
    let extents = data_extents(&file, size);
    let n = block_count(size, bs);
    let mut cvs = vec![None; n as usize];
    let mut restart = false;
    let mut kept = HashSet::new();
    let mut buf = vec![0u8; bs as usize];
    for &(i, cv) in &verified {
        if i >= n {
            restart = true;
            break;
        }
        let len = block_len(size, bs, i) as usize;
        if file
            .read_exact_at(&mut buf[..len], i * u64::from(bs))
            .is_err()
            || block_cv(&buf[..len], bs, i) != cv
        {
            restart = true;
            break;
        }
        cvs[i as usize] = Some(cv);
        kept.insert(i);
    }
    if restart {
        kept.clear();
        cvs = vec![None; n as usize];
    }
    s.resumed.fetch_add(kept.len() as u64, Ordering::Relaxed);
    let plan = BlockPlan::new(size, bs, &extents, &kept);
    let hole_blocks: u64 = plan.holes.iter().map(|h| h.1).sum();
    let big = Arc::new(BigFile {
        id,
        file,
        size,
        holes: plan.holes,
        cvs: Mutex::new(cvs),
        remaining: AtomicU64::new(plan.send.len() as u64 + hole_blocks),
        failed: Mutex::new(None),
    });
    Ok((big, restart, plan.send))
}

/// The file's data extents, from SEEK_DATA/SEEK_HOLE; all of it when the file system cannot
/// say.
fn data_extents(file: &File, size: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut at: i64 = 0;
    let end = size as i64;
    while at < end {
        // SAFETY: lseek on a descriptor we own; it only moves the (unused) file offset.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no more data: the rest is a hole
            }
            return vec![(0, size)];
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { hole.min(end) };
        if hole <= data {
            return vec![(0, size)];
        }
        out.push((data as u64, (hole - data) as u64));
        at = hole;
    }
    out
}

/// Reads block `index` straight behind its message header, in a reused buffer.
fn read_block(
    big: &BigFile,
    bs: u32,
    index: u64,
    pool: &Arc<BufferPool>,
) -> std::result::Result<(Bytes, Digest), String> {
    let len = block_len(big.size, bs, index);
    let end = BLOCK_HEADER_LEN + len as usize;
    let full = BLOCK_HEADER_LEN + bs as usize;
    let mut buf = pool
        .free
        .lock()
        .expect("not poisoned")
        .pop()
        .filter(|b| b.len() == full)
        .unwrap_or_else(|| vec![0u8; full]);
    // Each piece is hashed as soon as it is read, while it is still in the cache.
    let mut hasher = BlockHasher::new(bs, index);
    let at = index * u64::from(bs);
    for (i, piece) in buf[BLOCK_HEADER_LEN..end]
        .chunks_mut(HASH_PIECE)
        .enumerate()
    {
        big.file
            .read_exact_at(piece, at + (i * HASH_PIECE) as u64)
            .map_err(|e| format!("reading block {index} failed: {e}"))?;
        hasher.update(piece);
    }
    let cv = hasher.finish();
    buf[..BLOCK_HEADER_LEN].copy_from_slice(&block_header(big.id, index, len, &cv));
    let msg = PooledMessage {
        buf,
        len: end,
        pool: pool.clone(),
    };
    Ok((Bytes::from_owner(msg), cv))
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Outcomes by path, for tests and reports.
pub fn outcomes_by_path(r: &SendReport) -> HashMap<&str, &Outcome> {
    r.entries
        .iter()
        .map(|e| (e.path.as_str(), &e.outcome))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parent_dir_opens_files_by_name_across_directories_and_never_through_a_link() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        std::fs::write(a.join("1"), b"one").unwrap();
        std::fs::write(a.join("2"), b"two").unwrap();
        std::fs::write(b.join("3"), b"three").unwrap();
        std::os::unix::fs::symlink(a.join("1"), b.join("link")).unwrap();
        let mut dir = ParentDir::default();
        let read = |dir: &mut ParentDir, p: &Path| {
            let mut s = String::new();
            dir.open(p)?.read_to_string(&mut s)?;
            Ok::<_, std::io::Error>(s)
        };
        assert_eq!(read(&mut dir, &a.join("1")).unwrap(), "one");
        assert_eq!(read(&mut dir, &a.join("2")).unwrap(), "two");
        assert_eq!(read(&mut dir, &b.join("3")).unwrap(), "three");
        let link = dir.open(&b.join("link")).unwrap_err();
        assert_eq!(link.raw_os_error(), Some(libc::ELOOP));
        assert!(dir.open(&a.join("missing")).is_err());
    }
}
