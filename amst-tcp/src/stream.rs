//! The two tasks of every stream.
//!
//! The writer pulls the next chunks from the shared send buffer whenever its socket has room
//! (`TCP_NOTSENT_LOWAT` keeps that room small), so a fast stream takes more chunks than a slow
//! one: work stealing, not round-robin. Headers and payloads go out in one vectored write, the
//! payload never copied. The reader decodes frames in place and hands data chunks to the
//! reassembler. A large chunk of a larger message is read straight into its message's buffer
//! once its header has come (`Session::place`): the kernel's copy is the only one, and the CRC
//! is checked while the bytes are still in cache. Other chunks are split off large read slabs
//! without a copy.
//!
//! Memory: each reader's slab is charged to the session's memory budget. A message that
//! arrives whole in one chunk would keep the slab it was read into alive as long as the
//! application holds it; one that would pin a slab more than twice its size is copied out,
//! and one that is kept pays for the rest of its slab, so that what a peer makes us pin is
//! always counted.

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use amst_core::codec::{DATA_HEADER_LEN, DataChunk, Decoder, Frame};
use amst_core::session::{MAX_BATCH, Transmit};
use amst_core::{Charge, PathId, charged};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tracing::{debug, trace};

use crate::conn::{ReadSide, WriteSide};

use crate::session::{Fatal, Shared, lock};
use crate::stats::StreamCtl;

/// Read buffer for control traffic and small frames.
const SMALL_READ: usize = 64 << 10;
/// Bytes a session's readers take per read, all streams together: about what the L2 caches
/// of two cores hold, so that the CRC check and the copy into the message find the data the
/// kernel just wrote still cached. One stream reads up to [`MAX_READ_FRAMES`] frames at a
/// time (fewer, larger reads: fewer wake-ups); many streams read one frame each.
const READ_BUDGET: usize = 4 << 20;
/// Frames (of the last size seen) per read, at most.
const MAX_READ_FRAMES: usize = 4;
/// Chunks at least this large (of larger messages) are read straight into their message:
/// for smaller ones, the lock and the extra read for the next header cost more than the copy.
const MIN_IN_PLACE: usize = 64 << 10;

/// Runs a stream's writer until the stream ends; reports the end to the session.
pub(crate) async fn writer(
    shared: Arc<Shared>,
    path: PathId,
    ctl: Arc<StreamCtl>,
    mut stream: WriteSide,
) {
    let result = write_loop(&shared, path, &ctl, &mut stream).await;
    match result {
        Ok(()) => {
            // Stopped on purpose: the reader ends the stream when the peer's FIN arrives.
            trace!(path, "writer finished");
        }
        Err(e) => {
            let quiet = {
                let p = lock(&shared.proto);
                p.is_closing() || p.is_peer_closed() || p.is_closed()
            };
            if quiet {
                // The session is closing and we half-closed: the reader ends the stream.
                return;
            }
            debug!(path, error = %e, "stream write failed");
            shared.stream_ended(path, ctl.stopping(), &format!("write failed: {e}"));
        }
    }
}

async fn write_loop(
    shared: &Shared,
    path: PathId,
    ctl: &StreamCtl,
    stream: &mut WriteSide,
) -> io::Result<()> {
    let mut control = BytesMut::with_capacity(4096);
    let mut batch: Vec<DataChunk> = Vec::with_capacity(MAX_BATCH);
    let mut headers: Vec<[u8; DATA_HEADER_LEN]> = Vec::with_capacity(MAX_BATCH);
    loop {
        control.clear();
        batch.clear();
        let more = {
            // Registered before asking, so a chunk queued meanwhile is not missed; dropped
            // before writing, so a busy writer is never the one woken for more work.
            let woken = shared.tx_wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let stream_woken = ctl.wake.notified();
            tokio::pin!(stream_woken);
            stream_woken.as_mut().enable();
            match take(shared, path, &mut control, &mut batch) {
                (Transmit::Finish, _) => {
                    // The parting Close (or this stream's own), after whole frames only;
                    // then half-close.
                    write_all(stream, &control, &[], &[]).await?;
                    stream.shutdown_write().await;
                    return Ok(());
                }
                (Transmit::Idle, _) => {
                    tokio::select! {
                        _ = &mut woken => {}
                        _ = &mut stream_woken => {}
                    }
                    continue;
                }
                (Transmit::Send, more) => more,
            }
        };
        if more {
            // Someone else can take the rest while we write: the writer idle the shortest
            // time, so a light load stays on a few warm streams instead of cycling through
            // all of them.
            shared.tx_wake.notify_last();
        }
        headers.clear();
        headers.extend(batch.iter().map(DataChunk::encode_header));
        write_all(stream, &control, &headers, &batch).await?;
        let bytes: u64 = batch.iter().map(|c| c.payload.len() as u64).sum();
        if !batch.is_empty() {
            ctl.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
            ctl.chunks_sent
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            shared.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

/// Asks the protocol what this stream writes next: control frames and up to one chunk's
/// worth of data (several chunks when they are small), recorded as sent on `path`; and
/// whether more is left for another writer.
fn take(
    shared: &Shared,
    path: PathId,
    control: &mut BytesMut,
    batch: &mut Vec<DataChunk>,
) -> (Transmit, bool) {
    // The session's in-flight cap (one flow toward others): while it is shut, only control
    // frames go out; the gate's driver wakes the writers when the kernels have drained.
    let max = if shared.gate.open() {
        shared.chunk_size.load(Ordering::Relaxed)
    } else {
        0
    };
    let now = Instant::now();
    let (t, more, queued) = {
        let mut p = lock(&shared.proto);
        let t = p.poll_transmit(path, now, max, control, batch);
        let sb = p.send_buffer();
        (t, sb.has_sendable(), sb.queued_bytes())
    };
    shared
        .gate
        .spend(batch.iter().map(|c| c.payload.len() as u64).sum());
    // Unsealed: the CRC is computed here, after the lock is released, so writers checksum
    // in parallel and never hold each other up.
    for c in batch.iter_mut() {
        c.seal();
    }
    // A blocked sender is woken once the queue has drained to half (or is empty), not per
    // chunk: one wakeup then refills many chunks' worth.
    if !batch.is_empty() && (queued == 0 || queued <= shared.config.send_queue / 2) {
        shared.space.notify_waiters();
    }
    (t, more && t == Transmit::Send)
}

/// Writes control bytes, then each header followed by its payload, with as few syscalls as
/// the socket allows.
async fn write_all(
    stream: &mut WriteSide,
    control: &[u8],
    headers: &[[u8; DATA_HEADER_LEN]],
    chunks: &[DataChunk],
) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(1 + 2 * chunks.len());
    if !control.is_empty() {
        slices.push(IoSlice::new(control));
    }
    for (h, c) in headers.iter().zip(chunks) {
        slices.push(IoSlice::new(h));
        if !c.payload.is_empty() {
            slices.push(IoSlice::new(&c.payload));
        }
    }
    stream.write_all_vectored(&mut slices).await
}

/// How a reader ended.
enum ReadEnd {
    /// The peer half-closed; graceful if the stream was being removed or the session closed.
    Eof,
    /// The session failed; already reported.
    Fatal,
}

/// Runs a stream's reader until the stream ends; reports the end to the session.
pub(crate) async fn reader(
    shared: Arc<Shared>,
    path: PathId,
    ctl: Arc<StreamCtl>,
    mut stream: ReadSide,
    leftover: BytesMut,
) {
    match read_loop(&shared, path, &ctl, &mut stream, leftover).await {
        Ok(ReadEnd::Eof) => {
            let graceful = lock(&shared.proto).path_stopping(path);
            shared.stream_ended(path, graceful, "peer closed the stream");
        }
        Ok(ReadEnd::Fatal) => shared.stream_ended(path, true, "session failed"),
        Err(e) => shared.stream_ended(path, false, &format!("read failed: {e}")),
    }
}

async fn read_loop(
    shared: &Arc<Shared>,
    path: PathId,
    ctl: &StreamCtl,
    stream: &mut ReadSide,
    mut buf: BytesMut,
) -> io::Result<ReadEnd> {
    let decoder = Decoder::new(shared.limits);
    // The size of the last data frame: a fresh buffer of that size takes the next frame
    // whole, so large chunks are never copied after the kernel's copy.
    let mut hint = SMALL_READ;
    let mut read_frames = 1;
    let mut frames: Vec<Frame> = Vec::new();
    let budget = &shared.config.memory_budget;
    let mut slab_len = buf.capacity();
    let mut _slab_charge: Charge = budget.charge(slab_len as u64);
    // The last data chunk was read in place.
    let mut placing = false;
    loop {
        // Decode what we have; stop at the first incomplete frame, or at a bad one.
        let bad = loop {
            match decoder.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        for f in frames.iter_mut() {
            if let Frame::Data(chunk) = f {
                unpin_from_slab(shared, chunk, slab_len);
            }
        }
        // The frames before a bad one are sound: what they complete stays readable, as it
        // would had the bad frame come in the next read.
        if !frames.is_empty() && !handle_frames(shared, path, ctl, &mut frames) {
            return drain(stream, buf).await;
        }
        if let Some(e) = bad {
            shared.fail(Fatal::Protocol(e));
            return drain(stream, buf).await;
        }
        if shared.failed.load(Ordering::Relaxed) {
            return drain(stream, buf).await;
        }
        match read_in_place(shared, &decoder, ctl, stream, &mut buf).await? {
            InPlace::Read => {
                placing = true;
                continue;
            }
            InPlace::Failed => return drain(stream, buf).await,
            InPlace::No => placing = false,
            InPlace::NotYet => {}
        }
        if placing && buf.len() < DATA_HEADER_LEN {
            // After a chunk read in place, read only the next frame's header: if it starts
            // another large chunk, its payload goes straight to its message too.
            if buf.capacity() < DATA_HEADER_LEN {
                if !buf.try_reclaim(SMALL_READ - buf.len()) {
                    let mut fresh = BytesMut::with_capacity(SMALL_READ);
                    fresh.extend_from_slice(&buf);
                    buf = fresh;
                }
                slab_len = buf.capacity();
                _slab_charge = budget.charge(slab_len as u64);
            }
            let rest_of_header = DATA_HEADER_LEN - buf.len();
            if stream.read_some(&mut buf, rest_of_header).await? == 0 {
                return end_of_stream(&buf);
            }
            continue;
        }
        // Make room: exactly the rest of a known frame, or a fresh buffer for the next.
        let known = decoder.frame_len(&buf);
        let want = match known {
            Ok(Some(n)) => n,
            Ok(None) => hint,
            Err(e) => {
                shared.fail(Fatal::Protocol(e));
                return drain(stream, buf).await;
            }
        };
        if want > SMALL_READ {
            hint = want;
        }
        if buf.capacity() < want {
            // A slab that several frames are read into and split off without a copy. The same
            // slab again once every frame split off it is gone (copied into multi-chunk
            // messages): its pages are mapped and warm, where a fresh one page-faults under
            // the kernel's copy. A partial frame at its end moves to its start.
            let streams = shared.stream_count().max(1);
            read_frames = (READ_BUDGET / hint.saturating_mul(streams)).clamp(1, MAX_READ_FRAMES);
            // Two reads' worth: one being reassembled while the next comes in.
            let mut slab = want.max(hint.saturating_mul(read_frames * 2));
            if budget.held().saturating_add(slab as u64) > budget.limit() {
                // The budget is spent (many sessions, or a full window): one frame at a time.
                read_frames = 1;
                slab = want;
            }
            if !buf.try_reclaim(slab.saturating_sub(buf.len())) {
                let mut fresh = BytesMut::with_capacity(slab);
                fresh.extend_from_slice(&buf);
                buf = fresh;
            }
            // The old slab, if still alive, is paid for by the chunks that pin it.
            slab_len = buf.capacity();
            _slab_charge = budget.charge(slab_len as u64);
        }
        // To the end of the frame in progress and read_frames - 1 more of the last size seen:
        // with frames of one size, reads and so slabs end on frame boundaries, and no partial
        // frame is copied when a slab is reused or replaced. (Up to the end of one frame only
        // cost a single stream a fifth of its goodput in wake-ups.)
        let room = match known {
            Ok(Some(n)) => n.saturating_sub(buf.len()) + hint * (read_frames - 1),
            _ => hint * read_frames,
        };
        if stream.read_some(&mut buf, room.max(1)).await? == 0 {
            return end_of_stream(&buf);
        }
    }
}

/// The stream's end, read with `pending` bytes not yet decoded.
fn end_of_stream(pending: &[u8]) -> io::Result<ReadEnd> {
    if pending.is_empty() {
        return Ok(ReadEnd::Eof);
    }
    Err(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!(
            "stream ended inside a frame ({} bytes pending)",
            pending.len()
        ),
    ))
}

/// What [`read_in_place`] did.
enum InPlace {
    /// A chunk was read into its message.
    Read,
    /// The frame at the front is not one to read in place.
    No,
    /// Not enough of the frame has arrived to tell.
    NotYet,
    /// The session failed.
    Failed,
}

/// If `buf` starts with the header of a large chunk of a larger message, reads the chunk's
/// payload straight into the message (`Session::place`) instead of into `buf`: one copy
/// fewer per byte, the kernel's. The CRC is checked as soon as the payload is in, while it
/// is still in cache.
async fn read_in_place(
    shared: &Arc<Shared>,
    decoder: &Decoder,
    ctl: &StreamCtl,
    stream: &mut ReadSide,
    buf: &mut BytesMut,
) -> io::Result<InPlace> {
    let header = match decoder.data_header(buf) {
        Ok(Some(h)) => h,
        // A bad header fails the session when the frame is decoded.
        Ok(None) | Err(_) if buf.len() < DATA_HEADER_LEN => return Ok(InPlace::NotYet),
        Ok(None) | Err(_) => return Ok(InPlace::No),
    };
    if (header.chunk_len as usize) < MIN_IN_PLACE {
        return Ok(InPlace::No);
    }
    let mut placement = match shared.update(|p| p.place(&header)) {
        Ok(Some(placement)) => placement,
        Ok(None) => return Ok(InPlace::No),
        Err(_) => return Ok(InPlace::Failed),
    };
    // What came with the header; the whole frame is not here, or it would have been decoded.
    buf.advance(DATA_HEADER_LEN);
    placement.put_slice(&buf.split());
    while placement.has_remaining_mut() {
        let want = placement.remaining_mut();
        if stream.read_some(&mut placement, want).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "stream ended inside a frame ({} of {} payload bytes read)",
                    header.chunk_len as usize - want,
                    header.chunk_len
                ),
            ));
        }
    }
    let placed = match placement.verify() {
        Ok(placed) => placed,
        Err(e) => {
            shared.fail(Fatal::Protocol(e));
            return Ok(InPlace::Failed);
        }
    };
    count_received(shared, ctl, header.chunk_len as u64, 1);
    if shared.update(|p| p.on_placed(placed, Instant::now()).is_ok()) {
        Ok(InPlace::Read)
    } else {
        Ok(InPlace::Failed)
    }
}

/// A chunk that is a whole message is kept as a slice of the read slab, so it keeps the whole
/// slab alive until the application drops it. A small one is copied out instead (a copy of
/// a small message is cheap; pinning an 8 MiB slab for it is not); a large one keeps the
/// slab and is charged for the part of the slab it does not use, so a slab's bytes are
/// always counted while they are pinned.
fn unpin_from_slab(shared: &Shared, chunk: &mut DataChunk, slab_len: usize) {
    let len = chunk.payload.len();
    let whole = chunk.msg_offset == 0 && len as u64 == chunk.msg_len;
    if !whole || len == 0 {
        // Parts of larger messages are copied into the message's buffer and let go at once.
        return;
    }
    if len.saturating_mul(2) < slab_len {
        chunk.payload = Bytes::copy_from_slice(&chunk.payload);
    } else {
        let rest = slab_len.saturating_sub(len) as u64;
        let surcharge = shared.config.memory_budget.charge(rest);
        chunk.payload = charged(std::mem::take(&mut chunk.payload), surcharge);
    }
}

/// After the session failed: reads and drops whatever still comes until the peer closes (or
/// the session's linger ends and aborts us), so that our socket is never closed with unread
/// bytes, which would reset the connection and could destroy our Close before the peer
/// reads it.
async fn drain(stream: &mut ReadSide, mut buf: BytesMut) -> io::Result<ReadEnd> {
    loop {
        buf.clear();
        buf.reserve(SMALL_READ);
        if stream.read_some(&mut buf, SMALL_READ).await? == 0 {
            return Ok(ReadEnd::Fatal);
        }
    }
}

/// Applies decoded frames; returns false if the session failed.
fn handle_frames(
    shared: &Arc<Shared>,
    path: PathId,
    ctl: &StreamCtl,
    frames: &mut Vec<Frame>,
) -> bool {
    let mut data_bytes = 0u64;
    let mut data_chunks = 0u64;
    for f in frames.iter() {
        if let Frame::Data(c) = f {
            data_bytes += c.payload.len() as u64;
            data_chunks += 1;
        }
    }
    count_received(shared, ctl, data_bytes, data_chunks);
    let now = Instant::now();
    // All of a read's frames under one lock.
    let ok = shared.update(|p| {
        frames
            .drain(..)
            .try_for_each(|f| p.on_frame(path, f, now))
            .is_ok()
    });
    frames.clear();
    ok
}

/// Counts data received, before the session sees it: once it has, the application may read
/// the last message and the metrics before this task runs again.
fn count_received(shared: &Shared, ctl: &StreamCtl, bytes: u64, chunks: u64) {
    if chunks > 0 {
        ctl.bytes_received.fetch_add(bytes, Ordering::Relaxed);
        ctl.chunks_received.fetch_add(chunks, Ordering::Relaxed);
        shared.bytes_received.fetch_add(bytes, Ordering::Relaxed);
    }
}
