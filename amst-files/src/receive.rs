//! The receiving driver: validate the manifest, make directories and links, answer with a
//! plan, then verify and write blocks from several writer threads with `pwrite`, journaling
//! each verified block so that a killed transfer resumes where it stopped.
//!
//! Memory is bounded in bytes: a message is taken off the channel only when the budget has
//! room for it, so a slow disk slows the sender down instead of filling RAM.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};

use crate::channel::Channel;
use crate::error::{Error, Result, joined};
use crate::hash::{
    BlockHasher, HASH_PIECE, block_count, block_cv, block_len, file_hash, zero_block_cvs,
};
use crate::journal::{self, Identity};
use crate::landing::{self, Dirs, LandError};
use crate::path::{RelPath, Seen, TreeIndex, check_link_target};
use crate::plan::{AtTarget, receiver_want, wants_existing_hash};
use crate::protocol::{
    Digest, Entry, EntryKind, ExistingPolicy, Finished, Hello, Message, Outcome, Record,
    TREE_PROTOCOL_VERSION, Want,
};

/// The default memory budget for data waiting to be written.
pub const DEFAULT_MEMORY_BUDGET: usize = 128 << 20;

/// The default [`ReceiveOptions::max_files_in_flight`]: 64 times the sender's default
/// manifest window.
pub const MAX_FILES_IN_FLIGHT: usize = 1 << 20;

/// How long the receiver waits for the sender to close after the totals.
const SENDER_GOODBYE: Duration = Duration::from_secs(10);

/// Where and how to receive.
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    /// The output directory (must exist).
    pub output: PathBuf,
    /// Bytes of received data that may wait for the disk.
    pub memory_budget: usize,
    /// Writer threads working at once.
    pub writers: usize,
    /// Most files the sender may have announced and not yet seen land (or fail) at once.
    /// The receiver keeps state for each of them; a sender keeps its manifest window (16,384
    /// by default) far below this, and one that announces more is stopped with a clear
    /// error instead of growing the receiver's memory with the tree.
    pub max_files_in_flight: usize,
}

impl ReceiveOptions {
    /// Defaults for `output`.
    pub fn new(output: impl Into<PathBuf>) -> Self {
        ReceiveOptions {
            output: output.into(),
            memory_budget: DEFAULT_MEMORY_BUDGET,
            writers: 4,
            max_files_in_flight: MAX_FILES_IN_FLIGHT,
        }
    }
}

/// What a finished (or broken) [`receive_tree`] did.
#[derive(Clone, Debug, Default)]
pub struct ReceiveReport {
    /// Every entry with its path and outcome, in manifest order.
    pub entries: Vec<(String, Outcome)>,
    /// Totals.
    pub finished: Finished,
    /// File bytes received in this session.
    pub bytes_received: u64,
    /// From Hello to Finished.
    pub elapsed: Duration,
}

/// Counters the caller can watch while a transfer runs.
#[derive(Debug, Default)]
pub struct ReceiveProgress {
    /// File bytes received.
    pub bytes: AtomicU64,
    /// The most files planned and not yet landed (or given up) at any one time: what the
    /// sender's manifest window bounds.
    pub files_in_flight_peak: AtomicU64,
}

struct Session {
    root: PathBuf,
    hello: Hello,
    /// Outcomes on their way to the sender; a batch of records reports in one send, so the
    /// sender hears of 10,000 small files in a few messages, not 10,000.
    results: mpsc::UnboundedSender<Vec<(u32, Outcome)>>,
    written: AtomicU64,
    live: Arc<Liveness>,
    /// Parent directories kept open for landing small files.
    dirs: Dirs,
    /// Directories this session created (below the root): empty when made, so a file planned
    /// into one has nothing at its destination and no journal to look for. Anything that
    /// appears there meanwhile is still caught when the file lands (no-replace rename).
    fresh: Mutex<HashSet<Vec<u8>>>,
    /// Ids of the directory entries that are directories here (made or found): the only
    /// ones whose mode and mtime are set at the end.
    dirs_in_place: Mutex<Vec<u32>>,
}

/// Partial files some session in this process is receiving into, and which session. A
/// sender killed mid-tree leaves its session waiting for a reconnect that never comes; a
/// second try must not resume a file that session might still write.
static HELD: std::sync::LazyLock<Mutex<HashMap<PathBuf, Arc<Liveness>>>> =
    std::sync::LazyLock::new(Default::default);

/// How long a new session waits for an older one to let go of a partial file.
const HELD_WAIT: Duration = Duration::from_secs(90);

/// An older session that has received nothing for this long is asked to stop when a newer
/// one wants its partial files: it finishes the writes it has, makes its journals durable,
/// and lets go. A live sender never goes this quiet while it has data to send.
const QUIET_TAKEOVER: Duration = Duration::from_secs(1);

/// When a session last heard from its sender, and whether a newer session asked it to stop.
#[derive(Debug)]
struct Liveness {
    born: Instant,
    /// Milliseconds after `born` of the last message.
    last_message_ms: AtomicU64,
    stop: tokio::sync::Notify,
}

impl Liveness {
    fn new() -> Self {
        Liveness {
            born: Instant::now(),
            last_message_ms: AtomicU64::new(0),
            stop: tokio::sync::Notify::new(),
        }
    }

    fn heard(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.last_message_ms.store(ms, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_message_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last)
    }
}

struct Hold(PathBuf);

impl Hold {
    /// Takes `part` for the session `me`. An older session holding it is asked to stop once
    /// it has been quiet for [`QUIET_TAKEOVER`]; it lets go after its last write. `None`
    /// after [`HELD_WAIT`].
    fn take(part: PathBuf, me: &Arc<Liveness>) -> Option<Hold> {
        let deadline = Instant::now() + HELD_WAIT;
        loop {
            {
                let mut held = HELD.lock().expect("not poisoned");
                match held.get(&part) {
                    None => {
                        held.insert(part.clone(), me.clone());
                        return Some(Hold(part));
                    }
                    Some(owner) if Arc::ptr_eq(owner, me) => return None,
                    Some(owner) if owner.quiet_for() >= QUIET_TAKEOVER => owner.stop.notify_one(),
                    Some(_) => {}
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        HELD.lock().expect("not poisoned").remove(&self.0);
    }
}

/// Kept from plan to landing for every file in flight (up to the sender's manifest window,
/// 16,384 by default), so only what landing needs: not the manifest entry, whose path `rel`
/// already holds.
struct RecvFile {
    _hold: Hold,
    id: u32,
    rel: RelPath,
    /// Permission bits to set.
    mode: u32,
    /// The sender's version of the file: its size and mtime.
    offered: Identity,
    /// Replacing an existing file is allowed.
    replace: bool,
    state: Mutex<FileState>,
}

#[derive(Default)]
struct FileState {
    /// Verified blocks from an earlier try, until the file is opened.
    resume: Option<Vec<(u64, Digest)>>,
    open: Option<Arc<OpenPartial>>,
    cvs: Vec<Option<Digest>>,
    pending: usize,
    end: Option<(Digest, Vec<(u64, u64)>)>,
    done: bool,
}

/// A partial file being written, and its journal. A block's record waits in `pending` until
/// a batch of them is due: then the data is synced, and only then are the records appended
/// to the journal and the journal synced, so a record on disk always names durable data.
struct OpenPartial {
    file: File,
    /// One `pwrite` at a time per file: the kernel takes the inode's lock for every buffered
    /// write anyway (tmpfs, ext4, XFS), and writers queued here sleep, where in the kernel
    /// they spin on that lock (`rwsem_spin_on_owner`: 9% of a receiver's time on one large
    /// file, taken from the threads reading the sockets). Verifying stays parallel.
    writing: Mutex<()>,
    journal: Mutex<JournalState>,
    /// One batch at a time, so records reach the journal in the order they were made durable.
    syncing: Mutex<File>,
}

struct JournalState {
    pending: Vec<u8>,
    pending_data: u64,
    last_sync: Instant,
}

/// Data written since the last sync that makes a batch due.
const SYNC_BYTES: u64 = 64 << 20;
/// Time since the last sync that makes a batch due (checked as blocks land).
const SYNC_INTERVAL: Duration = Duration::from_millis(500);

impl OpenPartial {
    fn new(file: File, journal: File) -> Self {
        OpenPartial {
            file,
            writing: Mutex::new(()),
            journal: Mutex::new(JournalState {
                pending: Vec::new(),
                pending_data: 0,
                last_sync: Instant::now(),
            }),
            syncing: Mutex::new(journal),
        }
    }

    /// Notes a written, verified block; makes the batch durable when one is due.
    fn verified(&self, index: u64, cv: &Digest, len: u64) -> std::io::Result<()> {
        let due = {
            let mut j = self.journal.lock().expect("not poisoned");
            j.pending.extend_from_slice(&journal::record(index, cv));
            j.pending_data += len;
            j.pending_data >= SYNC_BYTES || j.last_sync.elapsed() >= SYNC_INTERVAL
        };
        if due { self.make_durable() } else { Ok(()) }
    }

    /// Syncs the data written so far, then appends and syncs the records waiting for it.
    fn make_durable(&self) -> std::io::Result<()> {
        let mut journal = self.syncing.lock().expect("not poisoned");
        let batch = {
            let mut j = self.journal.lock().expect("not poisoned");
            j.pending_data = 0;
            j.last_sync = Instant::now();
            std::mem::take(&mut j.pending)
        };
        if batch.is_empty() {
            return Ok(());
        }
        // Every record in the batch was made after its block's pwrite returned.
        self.file.sync_data()?;
        journal.write_all(&batch)?;
        journal.sync_data()
    }
}

/// Receives one tree whose Hello is `first` (already read to tell it from other traffic),
/// and returns once every entry has a result, or the session broke.
pub async fn receive_tree(
    ch: Arc<dyn Channel>,
    first: Bytes,
    opts: &ReceiveOptions,
    progress: Arc<ReceiveProgress>,
) -> Result<ReceiveReport> {
    let start = Instant::now();
    let hello = match Message::decode(first).map_err(|e| Error::Protocol(e.to_string()))? {
        Message::Hello(h) => h,
        other => {
            return Err(Error::Protocol(format!("expected a Hello, got {other:?}")));
        }
    };
    if hello.version != TREE_PROTOCOL_VERSION {
        let why = format!(
            "tree protocol version {} is not supported (this receiver speaks {TREE_PROTOCOL_VERSION})",
            hello.version
        );
        let _ = ch.send(Message::Abort(why.clone()).encode()).await;
        return Err(Error::Protocol(why));
    }
    let root = opts.output.canonicalize().map_err(|e| Error::Output {
        path: opts.output.clone(),
        source: e,
    })?;
    let (results_tx, results_rx) = mpsc::unbounded_channel();
    let session = Arc::new(Session {
        root,
        hello,
        results: results_tx,
        written: AtomicU64::new(0),
        live: Arc::new(Liveness::new()),
        dirs: Dirs::default(),
        fresh: Mutex::default(),
        dirs_in_place: Mutex::default(),
    });
    session.live.heard();
    let total = hello.entries;
    let reporter = tokio::spawn(report_results(ch.clone(), results_rx));
    let mut files: HashMap<u32, Arc<RecvFile>> = HashMap::new();
    let mut index = TreeIndex::default();
    // Every entry's name, for the report; the whole entry only for directories, whose mode
    // and mtime are set at the end (a tree of a million files keeps no more than this).
    let mut names: Vec<String> = Vec::new();
    let mut dir_entries: HashMap<u32, (RelPath, Entry)> = HashMap::new();
    let mut manifest_done = false;
    let budget = Arc::new(Semaphore::new(opts.memory_budget.max(1 << 20)));
    let writers = Arc::new(Semaphore::new(opts.writers.max(1)));
    let mut writes = tokio::task::JoinSet::new();
    let broke = loop {
        let received = tokio::select! {
            r = ch.recv() => r,
            () = session.live.stop.notified() => break Some(Error::Superseded),
        };
        let msg = match received {
            Ok(Some(m)) => m,
            Ok(None) => break Some(Error::Closed),
            Err(e) => break Some(Error::channel("receiving", e)),
        };
        session.live.heard();
        let len = msg.len();
        let msg = match Message::decode(msg) {
            Ok(m) => m,
            Err(e) => break Some(Error::Protocol(e.to_string())),
        };
        match msg {
            Message::Manifest {
                entries: batch,
                last,
            } if !manifest_done => {
                if names.len() as u64 + batch.len() as u64 > total {
                    break Some(Error::Protocol(format!(
                        "the manifest holds more than the {total} entries announced"
                    )));
                }
                if last && names.len() as u64 + batch.len() as u64 != total {
                    break Some(Error::Protocol(format!(
                        "the manifest holds fewer than the {total} entries announced"
                    )));
                }
                if files.len() + batch.len() > opts.max_files_in_flight {
                    let why = format!(
                        "the sender has {} files in flight and announces {} more entries, above \
                         this receiver's limit of {} files announced and not yet landed; a \
                         sender keeps at most its manifest window ahead of the results",
                        files.len(),
                        batch.len(),
                        opts.max_files_in_flight
                    );
                    let _ = ch.send(Message::Abort(why.clone()).encode()).await;
                    break Some(Error::Protocol(why));
                }
                let first_id = names.len() as u32;
                let s = session.clone();
                let moved = std::mem::take(&mut index);
                let admitting = tokio::task::spawn_blocking(move || {
                    let mut index = moved;
                    let r = admit_batch(&s, &mut index, first_id, batch);
                    (r.0, r.1, r.2, index)
                });
                let Some((items, new_files, admitted, back)) = joined(admitting.await) else {
                    break Some(Error::Closed);
                };
                index = back;
                for f in new_files {
                    files.insert(f.id, f);
                }
                progress
                    .files_in_flight_peak
                    .fetch_max(files.len() as u64, Ordering::Relaxed);
                for (id, (rel, e)) in (first_id..).zip(admitted) {
                    names.push(rel.display());
                    if e.kind == EntryKind::Dir {
                        dir_entries.insert(id, (rel, e));
                    }
                }
                manifest_done = last;
                if let Err(e) = ch.send(Message::Plan { items, last }.encode()).await {
                    break Some(Error::channel("sending the plan", e));
                }
            }
            Message::Data(records) => {
                progress
                    .bytes
                    .fetch_add(data_len(&records), Ordering::Relaxed);
                let mut work = Vec::new();
                let mut skipped = Vec::new();
                for r in records {
                    match r {
                        Record::Whole { id, .. } | Record::Block { id, .. } => {
                            // A whole file has no other record: the session lets go of it
                            // (and of its partial name) as soon as it is written, so that a
                            // tree of many small files does not hold them all to the end.
                            let f = if matches!(r, Record::Whole { .. }) {
                                files.remove(&id)
                            } else {
                                files.get(&id).cloned()
                            };
                            let Some(f) = f else {
                                session.fail(
                                    id,
                                    "data for a file that was not planned, or was already \
                                     received whole"
                                        .into(),
                                );
                                continue;
                            };
                            if matches!(r, Record::Block { .. }) {
                                f.state.lock().expect("not poisoned").pending += 1;
                            }
                            work.push((f, r));
                        }
                        Record::FileEnd { id, hash, holes } => {
                            // Its last block's writer, or the finalize spawned here, lands
                            // it; both are joined before the session ends.
                            let Some(f) = files.remove(&id) else {
                                continue;
                            };
                            let ready = {
                                let mut st = f.state.lock().expect("not poisoned");
                                st.end = Some((hash, holes));
                                st.pending == 0
                            };
                            if ready {
                                let s = session.clone();
                                writes.spawn_blocking(move || finalize(&s, &f));
                            }
                        }
                        Record::Skip { id } => {
                            if let Some(f) = files.remove(&id) {
                                f.state.lock().expect("not poisoned").done = true;
                                skipped.push((id, Outcome::Identical));
                            }
                        }
                        Record::Fail { id, reason } => {
                            if let Some(f) = files.remove(&id) {
                                // A file that failed here first has its result already: the
                                // sender stopped sending it because we said so.
                                let first = !std::mem::replace(
                                    &mut f.state.lock().expect("not poisoned").done,
                                    true,
                                );
                                if first {
                                    session.fail(id, format!("not sent: {reason}"));
                                }
                            }
                        }
                        Record::Restart { id } => {
                            if let Some(f) = files.get(&id) {
                                let mut st = f.state.lock().expect("not poisoned");
                                st.resume = None;
                                st.cvs.clear();
                                st.open = None;
                            }
                        }
                    }
                }
                if !skipped.is_empty() {
                    let _ = session.results.send(skipped);
                }
                if work.is_empty() {
                    continue;
                }
                let permits = len.min(opts.memory_budget.max(1 << 20)) as u32;
                let Ok(mem) = budget.clone().acquire_many_owned(permits).await else {
                    break Some(Error::Protocol("memory budget closed".into()));
                };
                let writers = writers.clone();
                let s = session.clone();
                writes.spawn(async move {
                    let _w = writers.acquire_owned().await;
                    let writing = tokio::task::spawn_blocking(move || {
                        let mut done = Vec::new();
                        for (f, r) in work {
                            write_record(&s, &f, r, &mut done);
                        }
                        drop(mem);
                        if !done.is_empty() {
                            let _ = s.results.send(done);
                        }
                    });
                    joined(writing.await);
                });
                while writes.try_join_next().is_some() {}
            }
            Message::End if manifest_done => break None,
            Message::Abort(reason) => break Some(Error::Aborted(reason)),
            other => {
                break Some(Error::Protocol(format!(
                    "unexpected {} from the sender",
                    message_name(&other)
                )));
            }
        }
    };
    while writes.join_next().await.is_some() {}
    if let Some(e) = broke {
        reporter.abort();
        // What was written and verified counts for a resume once it is durable.
        let open: Vec<Arc<RecvFile>> = files.into_values().collect();
        let _ = tokio::task::spawn_blocking(move || {
            for f in open {
                let o = f.state.lock().expect("not poisoned").open.clone();
                if let Some(o) = o {
                    let _ = o.make_durable();
                }
            }
        })
        .await;
        return Err(e);
    }
    // Every file is written and renamed into place: let go of the partial names now. The
    // totals below go to a sender that may already be dead, and a new session resuming
    // the same tree must not wait for that to time out.
    drop(files);
    // Directories last, deepest first, so that writing into them does not move their mtime.
    // Only those that were directories here when admitted, and never through a link: a
    // refused entry's path may hold someone's file, or a link out of the output directory.
    let s = session.clone();
    let mut ids = std::mem::take(&mut *session.dirs_in_place.lock().expect("not poisoned"));
    ids.sort_unstable();
    let dirs: Vec<(RelPath, Entry)> = ids.iter().filter_map(|id| dir_entries.remove(id)).collect();
    let setting = tokio::task::spawn_blocking(move || {
        for (rel, e) in dirs.iter().rev() {
            let _ = set_dir_metadata(&rel.under(&s.root), e);
        }
    });
    joined(setting.await).ok_or(Error::Closed)?;
    drop(session);
    let mut outcomes = reporter
        .await
        .map_err(|e| Error::Protocol(format!("reporter: {e}")))??;
    outcomes.resize(names.len(), None);
    let outcomes: Vec<Outcome> = outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or(Outcome::Failed {
                reason: "the sender never finished this entry".into(),
            })
        })
        .collect();
    let mut finished = Finished::default();
    for o in &outcomes {
        match o {
            Outcome::Stored { .. } => finished.stored += 1,
            Outcome::Identical => finished.identical += 1,
            Outcome::Failed { .. } => finished.failed += 1,
        }
    }
    finished.bytes_written = progress.bytes.load(Ordering::Relaxed);
    ch.send(Message::Finished(finished).encode())
        .await
        .map_err(|e| Error::channel("sending the totals", e))?;
    // The sender closes once it has the totals; wait for that (bounded) rather than for an
    // acknowledgement a sender that is already gone cannot give.
    let _ = tokio::time::timeout(SENDER_GOODBYE, async {
        while let Ok(Some(_)) = ch.recv().await {}
    })
    .await;
    let entries = names.into_iter().zip(outcomes).collect();
    Ok(ReceiveReport {
        entries,
        finished,
        bytes_received: progress.bytes.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
    })
}

fn message_name(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "Hello",
        Message::Manifest { .. } => "Manifest",
        Message::Data(_) => "Data",
        Message::End => "End (before the manifest ended)",
        Message::Plan { .. } => "Plan",
        Message::Results(_) => "Results",
        Message::Finished(_) => "Finished",
        Message::Abort(_) => "Abort",
    }
}

fn data_len(records: &[Record]) -> u64 {
    records
        .iter()
        .map(|r| match r {
            Record::Whole { data, .. } | Record::Block { data, .. } => data.len() as u64,
            _ => 0,
        })
        .sum()
}

impl Session {
    fn fail(&self, id: u32, reason: String) {
        self.report(id, Outcome::Failed { reason });
    }

    fn report(&self, id: u32, outcome: Outcome) {
        let _ = self.results.send(vec![(id, outcome)]);
    }
}

/// Collects results in batches and sends them; returns all outcomes once every entry has
/// one and the session is done with them.
async fn report_results(
    ch: Arc<dyn Channel>,
    mut rx: mpsc::UnboundedReceiver<Vec<(u32, Outcome)>>,
) -> Result<Vec<Option<Outcome>>> {
    // Grown by id: ids come from entries that actually arrived, never from a count the peer
    // announced.
    let mut outcomes: Vec<Option<Outcome>> = Vec::new();
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.extend(first);
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(items) => batch.extend(items),
                Err(_) => break,
            }
        }
        for (id, o) in &batch {
            let i = *id as usize;
            if outcomes.len() <= i {
                outcomes.resize(i + 1, None);
            }
            if outcomes[i].is_none() {
                outcomes[i] = Some(o.clone());
            }
        }
        ch.send(Message::Results(std::mem::take(&mut batch)).encode())
            .await
            .map_err(|e| Error::channel("sending results", e))?;
    }
    Ok(outcomes)
}

type Admitted = (Vec<(u32, Want)>, Vec<Arc<RecvFile>>, Vec<(RelPath, Entry)>);

/// Validates a manifest batch and prepares each entry: directories and links are made now,
/// files get a want.
fn admit_batch(s: &Session, index: &mut TreeIndex, first_id: u32, batch: Vec<Entry>) -> Admitted {
    let mut items = Vec::new();
    let mut files = Vec::new();
    let mut admitted = Vec::new();
    let mut to_plan = Vec::new();
    for (i, entry) in batch.into_iter().enumerate() {
        let id = first_id + i as u32;
        let rel = match RelPath::parse(&entry.path) {
            Ok(r) => r,
            Err(e) => {
                // Keep a placeholder so ids stay aligned; it can never be created.
                let shown = String::from_utf8_lossy(&entry.path).into_owned();
                s.fail(id, e.to_string());
                if let EntryKind::File { .. } = entry.kind {
                    items.push((
                        id,
                        Want::Refuse {
                            reason: e.to_string(),
                        },
                    ));
                }
                admitted.push((placeholder(&shown), entry));
                continue;
            }
        };
        let seen = if entry.kind == EntryKind::Dir {
            Seen::Dir
        } else {
            Seen::Leaf
        };
        if let Err(e) = index.admit(&rel, seen) {
            refuse(s, &mut items, id, &entry, e.to_string());
            admitted.push((rel, entry));
            continue;
        }
        let target = rel.under(&s.root);
        match &entry.kind {
            EntryKind::Dir => match make_dir(&target) {
                Ok(created) => {
                    if created {
                        s.fresh
                            .lock()
                            .expect("not poisoned")
                            .insert(rel.as_bytes().to_vec());
                    }
                    s.dirs_in_place.lock().expect("not poisoned").push(id);
                    s.report(id, Outcome::Stored { hash: [0; 32] });
                }
                Err(why) => {
                    index.refuse(&rel);
                    s.fail(id, why);
                }
            },
            EntryKind::Symlink { target: to } => {
                let r = check_link_target(&rel, to)
                    .map_err(|e| e.to_string())
                    .and_then(|()| make_link(&target, to, s.hello.policy));
                s.report(
                    id,
                    match r {
                        Ok(o) => o,
                        Err(reason) => Outcome::Failed { reason },
                    },
                );
            }
            EntryKind::File { size } => to_plan.push((id, rel.clone(), entry.clone(), *size)),
        }
        admitted.push((rel, entry));
    }
    // Files last, once their directories exist: looking at (and hashing) what is already
    // at the destination runs on several threads.
    // Each partial file is ours before its destination is looked at: an older session that
    // still held it may land the file while we wait, and then it is there to be seen.
    let holds: Vec<Option<Hold>> = to_plan
        .iter()
        .map(|(_, rel, _, _)| Hold::take(rel.partial_under(&s.root), &s.live))
        .collect();
    // A file whose directory this session made has nothing to look at: two system calls
    // (a stat and a journal open, each walking the whole path) saved per file.
    let fresh: Vec<bool> = {
        let made = s.fresh.lock().expect("not poisoned");
        to_plan
            .iter()
            .map(|(_, rel, _, _)| rel.parent().is_some_and(|p| made.contains(p)))
            .collect()
    };
    let at_targets = look_at_targets(s, &to_plan, &fresh);
    for ((((id, rel, entry, size), at_target), hold), fresh) in
        to_plan.into_iter().zip(at_targets).zip(holds).zip(fresh)
    {
        let (want, file) = plan_file(s, id, &rel, &entry, size, at_target, hold, fresh);
        if let Want::Refuse { reason } = &want {
            s.fail(id, reason.clone());
        }
        if let Some(f) = file {
            files.push(f);
        }
        items.push((id, want));
    }
    (items, files, admitted)
}

fn placeholder(shown: &str) -> RelPath {
    RelPath::parse(format!("(refused) {}", shown.replace(['/', '\0'], "_")).as_bytes())
        .unwrap_or_else(|_| RelPath::parse(b"(refused)").expect("a valid name"))
}

fn refuse(s: &Session, items: &mut Vec<(u32, Want)>, id: u32, entry: &Entry, reason: String) {
    if let EntryKind::File { .. } = entry.kind {
        items.push((
            id,
            Want::Refuse {
                reason: reason.clone(),
            },
        ));
    }
    s.fail(id, reason);
}

/// Sets a directory's mode and mtime through a descriptor opened without following a link
/// in its last component.
fn set_dir_metadata(path: &Path, e: &Entry) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)?;
    dir.set_permissions(std::fs::Permissions::from_mode(e.mode & 0o7777))?;
    dir.set_modified(mtime_of(e))
}

/// Makes the directory `target` unless one is there; `Ok(true)` when this call created it.
fn make_dir(target: &Path) -> std::result::Result<bool, String> {
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => Ok(false),
        Ok(m) if m.file_type().is_symlink() => Err(format!(
            "{} is a symbolic link here; not following it to make a directory",
            target.display()
        )),
        Ok(_) => Err(format!(
            "{} is a file here; not replacing a file with a directory",
            target.display()
        )),
        Err(_) => std::fs::create_dir(target)
            .map(|()| true)
            .map_err(|e| format!("cannot create the directory {}: {e}", target.display())),
    }
}

fn make_link(
    target: &Path,
    to: &[u8],
    policy: ExistingPolicy,
) -> std::result::Result<Outcome, String> {
    let to = Path::new(OsStr::from_bytes(to));
    match std::fs::symlink_metadata(target) {
        Ok(m)
            if m.file_type().is_symlink()
                && std::fs::read_link(target).ok().as_deref() == Some(to) =>
        {
            return Ok(Outcome::Identical);
        }
        Ok(m) if m.is_dir() => {
            return Err("a directory is in the way; not replacing it with a link".into());
        }
        Ok(_) if policy != ExistingPolicy::Overwrite => {
            return Err(format!(
                "something else exists here (policy {})",
                policy.as_str()
            ));
        }
        Ok(_) => std::fs::remove_file(target).map_err(|e| format!("cannot replace it: {e}"))?,
        Err(_) => {}
    }
    std::os::unix::fs::symlink(to, target).map_err(|e| format!("cannot create the link: {e}"))?;
    Ok(Outcome::Stored { hash: [0; 32] })
}

fn identity(s: &Session, entry: &Entry, size: u64) -> Identity {
    Identity {
        block_size: s.hello.block_size,
        size,
        mtime_sec: entry.mtime_sec,
        mtime_nsec: entry.mtime_nsec,
    }
}

/// What is at a file's destination now, hashed when the policy needs it.
fn look_at_target(s: &Session, rel: &RelPath, size: u64) -> AtTarget {
    let target = rel.under(&s.root);
    match std::fs::symlink_metadata(&target) {
        Err(_) => AtTarget::Missing,
        Ok(m) if m.is_file() => AtTarget::File {
            size: m.len(),
            hash: wants_existing_hash(s.hello.policy, m.len(), size)
                .then(|| hash_existing(&target, s.hello.block_size))
                .flatten(),
        },
        Ok(_) => AtTarget::Other,
    }
}

/// Threads that look at (and hash) existing destination files at once.
const LOOKERS: usize = 4;

/// [`look_at_target`] for many files, several at once, in order; a file in a `fresh`
/// directory (one this session made) is missing without looking.
fn look_at_targets(
    s: &Session,
    files: &[(u32, RelPath, Entry, u64)],
    fresh: &[bool],
) -> Vec<AtTarget> {
    let look = |(f, fresh): (&(u32, RelPath, Entry, u64), &bool)| {
        if *fresh {
            AtTarget::Missing
        } else {
            look_at_target(s, &f.1, f.3)
        }
    };
    let to_look = fresh.iter().filter(|f| !**f).count();
    if to_look < 64 {
        return files.iter().zip(fresh).map(look).collect();
    }
    let per = files.len().div_ceil(LOOKERS);
    std::thread::scope(|scope| {
        let parts: Vec<_> = files
            .chunks(per)
            .zip(fresh.chunks(per))
            .map(|(part, fresh)| {
                scope.spawn(move || part.iter().zip(fresh).map(look).collect::<Vec<_>>())
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().expect("looking does not panic"))
            .collect()
    })
}

#[allow(clippy::too_many_arguments)] // each is one fact about the file, from a different step
fn plan_file(
    s: &Session,
    id: u32,
    rel: &RelPath,
    entry: &Entry,
    size: u64,
    at_target: AtTarget,
    hold: Option<Hold>,
    fresh: bool,
) -> (Want, Option<Arc<RecvFile>>) {
    let policy = s.hello.policy;
    let Some(hold) = hold else {
        return (
            Want::Refuse {
                reason: "another session is still receiving this file; send again to resume it"
                    .into(),
            },
            None,
        );
    };
    let jpath = rel.journal_under(&s.root);
    // A directory this session made holds no journal.
    let journal = if fresh {
        None
    } else {
        std::fs::read(&jpath).ok().and_then(|b| journal::parse(&b))
    };
    let offered = identity(s, entry, size);
    let want = receiver_want(
        policy,
        s.hello.resume,
        &offered,
        at_target,
        journal.as_ref(),
    );
    let resume = match &want {
        Want::Resume { verified } => Some(verified.clone()),
        _ => None,
    };
    if resume.is_none() && journal.is_some() && !matches!(want, Want::Refuse { .. }) {
        let _ = std::fs::remove_file(&jpath);
        let _ = std::fs::remove_file(rel.partial_under(&s.root));
    }
    let file = match want {
        Want::Refuse { .. } => None,
        _ => Some(Arc::new(RecvFile {
            _hold: hold,
            id,
            rel: rel.clone(),
            mode: entry.mode,
            offered,
            replace: policy == ExistingPolicy::Overwrite,
            state: Mutex::new(FileState {
                resume,
                ..FileState::default()
            }),
        })),
    };
    (want, file)
}

/// BLAKE3 of an existing file, as the block-wise hash computes it.
fn hash_existing(path: &Path, bs: u32) -> Option<Digest> {
    use std::os::unix::fs::OpenOptionsExt;
    // Looked at as a regular file just before; a link swapped in since is not followed.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    let meta = f.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let size = meta.len();
    if size <= u64::from(bs) {
        let mut buf = Vec::with_capacity(size as usize);
        (&f).take(size).read_to_end(&mut buf).ok()?;
        return Some(*blake3::hash(&buf).as_bytes());
    }
    let mut h = blake3::Hasher::new();
    h.update_reader(&f).ok()?;
    Some(*h.finalize().as_bytes())
}

/// Writes one record; a whole file's outcome goes to `done`, for the batch to report.
fn write_record(s: &Session, f: &RecvFile, r: Record, done: &mut Vec<(u32, Outcome)>) {
    match r {
        Record::Whole { hash, data, .. } => {
            let o = write_whole(s, f, &hash, &data);
            f.state.lock().expect("not poisoned").done = true;
            done.push((f.id, o));
        }
        Record::Block {
            index, cv, data, ..
        } => {
            let r = write_block(s, f, index, &cv, &data);
            let (finish, failed) = {
                let mut st = f.state.lock().expect("not poisoned");
                st.pending -= 1;
                let mut failed = None;
                if let Err(reason) = r
                    && !st.done
                {
                    st.done = true;
                    s.fail(f.id, reason);
                    failed = st.open.clone();
                }
                (st.pending == 0 && st.end.is_some(), failed)
            };
            // The blocks verified before the failure count for a retry.
            if let Some(open) = failed {
                let _ = open.make_durable();
            }
            if finish {
                finalize(s, f);
            }
        }
        _ => {}
    }
}

fn write_whole(s: &Session, f: &RecvFile, hash: &Digest, data: &[u8]) -> Outcome {
    if data.len() as u64 != f.offered.size {
        return failed(format!(
            "{} bytes arrived for a file of {} bytes",
            data.len(),
            f.offered.size
        ));
    }
    if blake3::hash(data).as_bytes() != hash {
        return failed("the data failed its BLAKE3 check; nothing was kept".into());
    }
    let landed = landing::land_small(&s.dirs, &s.root, &f.rel, data, f.mode, f.mtime(), f.replace);
    match landed {
        Ok(()) => {
            s.written.fetch_add(data.len() as u64, Ordering::Relaxed);
            Outcome::Stored { hash: *hash }
        }
        Err(LandError::Exists) => failed(APPEARED.into()),
        Err(LandError::Io(doing, e))
            if doing == "writing" || e.raw_os_error() == Some(libc::ENOSPC) =>
        {
            failed(write_error(&e))
        }
        Err(LandError::Io(doing, e)) => failed(format!("{doing} failed: {e}")),
    }
}

/// Why a file that arrived was not put in place.
const APPEARED: &str =
    "a file appeared at the destination while this one arrived; it was left alone";

/// The words a user needs for a write error; a full disk says so plainly (the CLI maps it
/// to its disk exit code).
pub const DISK_FULL: &str = "the receiver's disk is full; the partial file was removed";

fn write_error(e: &std::io::Error) -> String {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        DISK_FULL.to_string()
    } else {
        format!("cannot write: {e}")
    }
}

fn failed(reason: String) -> Outcome {
    Outcome::Failed { reason }
}

/// Opens (or reopens, to resume) the partial file and its journal.
fn open_partial(
    s: &Session,
    f: &RecvFile,
    st: &mut FileState,
) -> std::io::Result<Arc<OpenPartial>> {
    if let Some(o) = &st.open {
        return Ok(o.clone());
    }
    let part = f.rel.partial_under(&s.root);
    let jpath = f.rel.journal_under(&s.root);
    let n = block_count(f.offered.size, s.hello.block_size) as usize;
    st.cvs = vec![None; n];
    let o = match st.resume.take() {
        Some(verified) => {
            let named = |what: &str, p: &Path, e: std::io::Error| {
                std::io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
            };
            let file = OpenOptions::new()
                .write(true)
                .read(true)
                .open(&part)
                .map_err(|e| named("reopening", &part, e))?;
            let mut jbytes = std::fs::read(&jpath).map_err(|e| named("reading", &jpath, e))?;
            let valid = journal::parse(&jbytes).map_or(0, |j| j.valid_len);
            jbytes.truncate(valid);
            let j = OpenOptions::new().write(true).open(&jpath)?;
            j.set_len(valid as u64)?;
            let mut j = j;
            use std::io::Seek;
            j.seek(std::io::SeekFrom::End(0))?;
            for (i, cv) in verified {
                if let Some(slot) = st.cvs.get_mut(i as usize) {
                    *slot = Some(cv);
                }
            }
            OpenPartial::new(file, j)
        }
        None => {
            let file = OpenOptions::new()
                .write(true)
                .read(true)
                .create(true)
                .truncate(true)
                .open(&part)?;
            file.set_len(f.offered.size)?;
            let mut j = File::create(&jpath)?;
            j.write_all(&journal::header(&f.offered))?;
            OpenPartial::new(file, j)
        }
    };
    let o = Arc::new(o);
    st.open = Some(o.clone());
    Ok(o)
}

fn write_block(
    s: &Session,
    f: &RecvFile,
    index: u64,
    cv: &Digest,
    data: &[u8],
) -> std::result::Result<(), String> {
    let bs = s.hello.block_size;
    if index >= block_count(f.offered.size, bs) {
        return Err(format!("block {index} is past the end of the file"));
    }
    let expect = block_len(f.offered.size, bs, index);
    if data.len() != expect as usize {
        return Err(format!(
            "block {index} has {} bytes, expected {expect}",
            data.len()
        ));
    }
    let (open, verified_before) = {
        let mut st = f.state.lock().expect("not poisoned");
        if st.done {
            return Ok(());
        }
        let verified_before = st.cvs.get(index as usize).is_some_and(Option::is_some);
        let open = open_partial(s, f, &mut st)
            .map_err(|e| format!("cannot open the partial file: {e}"))?;
        (open, verified_before)
    };
    let at = index * u64::from(bs);
    let written = if verified_before {
        // A range the journal already vouches for is overwritten only by data checked first.
        if &block_cv(data, bs, index) != cv {
            return Err(format!(
                "block {index} failed its BLAKE3 check; the partial file is kept for a retry"
            ));
        }
        let _one_at_a_time = open.writing.lock().expect("not poisoned");
        open.file.write_all_at(data, at)
    } else {
        // Each piece is hashed just before its write, so the write copies it from the cache
        // instead of memory. A bad block is then on disk, where a good copy of it may already
        // have been written and journaled by another writer: nothing in the partial file can
        // be trusted any more, so it goes, with its journal.
        let mut hasher = BlockHasher::new(bs, index);
        let mut written = Ok(());
        for (i, piece) in data.chunks(HASH_PIECE).enumerate() {
            hasher.update(piece);
            let _one_at_a_time = open.writing.lock().expect("not poisoned");
            written = open.file.write_all_at(piece, at + (i * HASH_PIECE) as u64);
            if written.is_err() {
                break;
            }
        }
        if written.is_ok() && &hasher.finish() != cv {
            let _ = std::fs::remove_file(f.rel.partial_under(&s.root));
            let _ = std::fs::remove_file(f.rel.journal_under(&s.root));
            return Err(format!(
                "block {index} failed its BLAKE3 check; the partial file was discarded"
            ));
        }
        written
    };
    if let Err(e) = written {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            // Nothing to resume into on a full disk: give the space back.
            let _ = std::fs::remove_file(f.rel.partial_under(&s.root));
            let _ = std::fs::remove_file(f.rel.journal_under(&s.root));
        }
        return Err(write_error(&e));
    }
    s.written.fetch_add(data.len() as u64, Ordering::Relaxed);
    open.verified(index, cv, data.len() as u64)
        .map_err(|e| format!("cannot make the partial file and its journal durable: {e}"))?;
    let mut st = f.state.lock().expect("not poisoned");
    if let Some(slot) = st.cvs.get_mut(index as usize) {
        *slot = Some(*cv);
    }
    Ok(())
}

/// The last block is in and the sender's hash known: fill in the holes, check the whole
/// file's BLAKE3, and move it into place.
fn finalize(s: &Session, f: &RecvFile) {
    let (open, cvs, hash, holes) = {
        let mut st = f.state.lock().expect("not poisoned");
        if st.done {
            return;
        }
        st.done = true;
        let Some((hash, holes)) = st.end.take() else {
            return;
        };
        let open = match open_partial(s, f, &mut st) {
            Ok(o) => o,
            Err(e) => {
                s.fail(f.id, format!("cannot open the partial file: {e}"));
                return;
            }
        };
        (open, std::mem::take(&mut st.cvs), hash, holes)
    };
    let bs = s.hello.block_size;
    let mut cvs = cvs;
    let mut zeroes = Vec::new();
    for (first, count) in holes {
        for i in first..first.saturating_add(count) {
            match cvs.get(i as usize) {
                Some(None) => zeroes.push(i),
                Some(Some(_)) => {}
                None => {
                    s.fail(f.id, format!("hole block {i} is past the end of the file"));
                    return;
                }
            }
        }
    }
    for (i, cv) in zeroes
        .iter()
        .zip(zero_block_cvs(f.offered.size, bs, &zeroes))
    {
        cvs[*i as usize] = Some(cv);
    }
    if let Some(missing) = cvs.iter().position(Option::is_none) {
        s.fail(
            f.id,
            format!("block {missing} never arrived; the partial file is kept for a retry"),
        );
        return;
    }
    let cvs: Vec<Digest> = cvs.into_iter().flatten().collect();
    let ours = file_hash(f.offered.size, bs, &cvs);
    if ours != Some(hash) {
        let _ = std::fs::remove_file(f.rel.partial_under(&s.root));
        let _ = std::fs::remove_file(f.rel.journal_under(&s.root));
        s.fail(
            f.id,
            "the file's BLAKE3 does not match the sender's; nothing was kept".into(),
        );
        return;
    }
    // Durable before it takes the final name: a power loss never leaves a landed file
    // with blocks missing.
    let file = match open.file.sync_data().and_then(|()| open.file.try_clone()) {
        Ok(file) => file,
        Err(e) => {
            s.fail(f.id, format!("cannot finish the file: {e}"));
            return;
        }
    };
    let outcome = land(s, f, file, hash);
    if let Outcome::Stored { .. } = outcome {
        let _ = std::fs::remove_file(f.rel.journal_under(&s.root));
    }
    s.report(f.id, outcome);
}

/// Gives a complete partial file its mode and mtime and renames it into place: without
/// replacing anything unless the policy allows it.
fn land(s: &Session, f: &RecvFile, file: File, hash: Digest) -> Outcome {
    let part = f.rel.partial_under(&s.root);
    let target = f.rel.under(&s.root);
    let _ = file.set_permissions(std::fs::Permissions::from_mode(f.mode & 0o7777));
    if let Err(e) = file.set_modified(f.mtime()) {
        return failed(format!("cannot set the mtime: {e}"));
    }
    drop(file);
    let r = if f.replace {
        std::fs::rename(&part, &target)
    } else {
        rename_noreplace(&part, &target)
    };
    match r {
        Ok(()) => Outcome::Stored { hash },
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => failed(
            "a file appeared at the destination while this one arrived; it was left alone".into(),
        ),
        Err(e) => failed(format!("cannot move the file into place: {e}")),
    }
}

fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    let a = CString::new(from.as_os_str().as_bytes())?;
    let b = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths; renameat2 reads them and nothing else.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::ENOSYS) {
        // A file system without RENAME_NOREPLACE: check, then rename (a small race).
        if std::fs::symlink_metadata(to).is_ok() {
            return Err(std::io::ErrorKind::AlreadyExists.into());
        }
        return std::fs::rename(from, to);
    }
    Err(e)
}

fn mtime_of(e: &Entry) -> SystemTime {
    system_time(e.mtime_sec, e.mtime_nsec)
}

fn system_time(sec: i64, nsec: u32) -> SystemTime {
    if sec >= 0 {
        SystemTime::UNIX_EPOCH + Duration::new(sec as u64, nsec)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs())
            + Duration::from_nanos(u64::from(nsec))
    }
}

impl RecvFile {
    fn mtime(&self) -> SystemTime {
        system_time(self.offered.mtime_sec, self.offered.mtime_nsec)
    }
}
