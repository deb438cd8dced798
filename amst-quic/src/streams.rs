//! The tasks that do a session's IO: the control writer, one writer per sending lane, a
//! reader per stream the peer opens (and the control stream), the datagram reader, the
//! session's timer and the connection monitor. Each asks the session what to write
//! (`poll_transmit`) or hands it what was read (`on_frame`); none holds protocol state.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use amst_core::PathId;
use amst_core::codec::{DataChunk, DataHeader, Decoder, Frame, Pong};
use amst_core::session::{Fatal, MAX_BATCH, Transmit};
use amst_core::util::lock;
use bytes::{Bytes, BytesMut};
use quinn::SendStream;

use crate::config::StreamMapping;
use crate::session::{
    CONTROL_PATH, DATAGRAM_PATH, FrameReader, Read, ReadFail, Shared, connection_error,
};

/// Frames a reader hands the session under one lock, at most.
const READ_BATCH: usize = 64;
/// The timer looks at the session's deadlines at least this often.
const TIMER_RECHECK: Duration = Duration::from_millis(100);

/// Starts every task of a session.
pub(crate) fn start(shared: &Arc<Shared>, control_rx: FrameReader, lanes: usize) {
    shared.spawn_task(control_writer(shared.clone()));
    for lane in 1..=lanes as PathId {
        shared.spawn_task(lane_writer(shared.clone(), lane));
    }
    shared.spawn_task(read_stream(shared.clone(), CONTROL_PATH, control_rx));
    shared.spawn_task(accept_streams(shared.clone()));
    shared.spawn_task(datagrams(shared.clone()));
    shared.spawn_task(timer(shared.clone()));
    // Not a session task: it must see the end of the connection even after a teardown.
    tokio::spawn(monitor(shared.clone()));
}

/// What one `poll_transmit` of `path` produced: control bytes and sealed chunks.
fn take(
    shared: &Shared,
    path: PathId,
    max_bytes: usize,
    control: &mut BytesMut,
    chunks: &mut Vec<DataChunk>,
) -> Transmit {
    control.clear();
    chunks.clear();
    let (t, more) = {
        let mut p = lock(&shared.proto);
        let t = p.poll_transmit(path, Instant::now(), max_bytes, control, chunks);
        (t, p.send_buffer().has_sendable())
    };
    // Unsealed under the lock: the CRC is computed here, so lanes checksum in parallel.
    for c in chunks.iter_mut() {
        c.seal();
    }
    if more && t == Transmit::Send && max_bytes > 0 {
        // Another lane can take the rest while this one writes.
        shared.tx_wake.notify_one();
    }
    t
}

/// Writes control bytes on the control stream (every writer's control frames go there, so
/// that acks and credit never queue behind bulk data).
async fn write_control(shared: &Shared, control: &[u8]) -> bool {
    if control.is_empty() {
        return true;
    }
    let r = shared.control_tx.lock().await.write_all(control).await;
    match r {
        Ok(()) => true,
        Err(e) => {
            write_failed(shared, e);
            false
        }
    }
}

fn write_failed(shared: &Shared, e: quinn::WriteError) {
    match e {
        // The monitor records why the connection ended.
        quinn::WriteError::ConnectionLost(_) => {}
        other => shared.fail(Fatal::Protocol(amst_core::ProtocolError::Inconsistent(
            format!("the peer stopped a QUIC stream we write: {other}"),
        ))),
    }
}

/// Writes the session's control frames on the control stream whenever it has some.
async fn control_writer(shared: Arc<Shared>) {
    let mut control = BytesMut::with_capacity(4096);
    let mut chunks = Vec::new();
    loop {
        let woken = shared.control_wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        match take(&shared, CONTROL_PATH, 0, &mut control, &mut chunks) {
            // The parting Close goes as QUIC's CONNECTION_CLOSE (see `Shared::on_failed`).
            Transmit::Finish => return,
            Transmit::Idle => woken.await,
            Transmit::Send => {
                if !write_control(&shared, &control).await {
                    return;
                }
            }
        }
    }
}

/// One sending lane: takes chunks from the session and writes them, as Data frames, on its
/// own unidirectional stream (or, mapping per message, on a fresh stream per message).
async fn lane_writer(shared: Arc<Shared>, lane: PathId) {
    let per_message = matches!(shared.config.mapping, StreamMapping::PerMessage { .. });
    let max_chunk = shared.config.max_chunk as usize;
    let mut control = BytesMut::with_capacity(4096);
    let mut chunks: Vec<DataChunk> = Vec::with_capacity(MAX_BATCH);
    let mut parts: Vec<Bytes> = Vec::with_capacity(2 * MAX_BATCH);
    let mut stream: Option<SendStream> = None;
    loop {
        let woken = shared.tx_wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        match take(&shared, lane, max_chunk, &mut control, &mut chunks) {
            Transmit::Finish => break,
            Transmit::Idle => {
                woken.await;
                continue;
            }
            Transmit::Send => {}
        }
        if !write_control(&shared, &control).await {
            break;
        }
        // Consecutive chunks up to a message's end make one write; with a stream per
        // message, the stream then ends.
        let mut rest = &chunks[..];
        while !rest.is_empty() {
            let end = if per_message {
                rest.iter()
                    .position(|c| c.msg_offset + c.payload.len() as u64 == c.msg_len)
                    .map_or(rest.len(), |i| i + 1)
            } else {
                rest.len()
            };
            let (now, later) = rest.split_at(end);
            rest = later;
            let s = match &mut stream {
                Some(s) => s,
                None => match shared.conn.open_uni().await {
                    Ok(s) => {
                        shared.active_streams.fetch_add(1, Ordering::Relaxed);
                        stream.insert(s)
                    }
                    // The monitor records why the connection ended.
                    Err(_) => return lane_ended(&shared, lane, false),
                },
            };
            parts.clear();
            let mut payload = 0u64;
            for c in now {
                parts.push(Bytes::copy_from_slice(&c.encode_header()));
                parts.push(c.payload.clone());
                payload += c.payload.len() as u64;
            }
            if let Err(e) = s.write_all_chunks(&mut parts).await {
                write_failed(&shared, e);
                return lane_ended(&shared, lane, true);
            }
            shared.bytes_sent.fetch_add(payload, Ordering::Relaxed);
            let ends_message = now
                .last()
                .is_some_and(|c| c.msg_offset + c.payload.len() as u64 == c.msg_len);
            if per_message && ends_message {
                let _ = s.finish();
                stream = None;
                shared.active_streams.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
    lane_ended(&shared, lane, stream.is_some());
}

/// A lane stopped writing; its chunks not yet acknowledged go out on the other lanes (or,
/// if the connection is ending, nowhere: the session is over).
fn lane_ended(shared: &Shared, lane: PathId, had_stream: bool) {
    if had_stream {
        shared.active_streams.fetch_sub(1, Ordering::Relaxed);
    }
    let graceful = shared.is_ended();
    shared.update(|p| p.path_ended(lane, graceful));
}

/// Accepts the peer's data streams and reads each on its own task.
async fn accept_streams(shared: Arc<Shared>) {
    while let Ok(stream) = shared.conn.accept_uni().await {
        let path = shared.next_incoming.fetch_add(1, Ordering::Relaxed);
        let reader = FrameReader::new(stream, shared.limits, shared.waiting.clone());
        shared.spawn_task(read_stream(shared.clone(), path, reader));
    }
}

/// Hands every frame read from one stream to the session.
async fn read_stream(shared: Arc<Shared>, path: PathId, mut reader: FrameReader) {
    let data = path != CONTROL_PATH;
    if data {
        shared.active_streams.fetch_add(1, Ordering::Relaxed);
    }
    let mut frames = Vec::with_capacity(READ_BATCH);
    // A session that has failed places nothing; the frame is then read as usual, and the
    // session refuses it.
    let mut place = |h: &DataHeader| {
        data.then(|| shared.update(|p| p.place(h)).ok().flatten())
            .flatten()
    };
    loop {
        frames.clear();
        match reader.next_batch(&mut frames, READ_BATCH, &mut place).await {
            Ok(Read::Frames) => {}
            Ok(Read::Placed(placed)) => {
                // Counted before the session sees it, as frames are below.
                let len = placed.header().chunk_len as u64;
                shared.bytes_received.fetch_add(len, Ordering::Relaxed);
                if shared.update(|p| p.on_placed(placed, Instant::now()).is_err()) {
                    break;
                }
                continue;
            }
            // The stream ended; a data stream ends with its message (per-message mapping)
            // or with the connection.
            Ok(Read::End) => break,
            Err(ReadFail::Protocol(p)) => {
                shared.fail(Fatal::Protocol(p));
                break;
            }
            // The connection is ending; the monitor records why.
            Err(ReadFail::Stream(_)) => break,
        }
        let bytes: u64 = frames
            .iter()
            .map(|f| match f {
                Frame::Data(c) => c.payload.len() as u64,
                _ => 0,
            })
            .sum();
        // Counted before the session sees them: once it has, the application may read the
        // last message and the metrics before this task runs again.
        shared.bytes_received.fetch_add(bytes, Ordering::Relaxed);
        let now = Instant::now();
        let ok = shared.update(|p| {
            frames
                .drain(..)
                .try_for_each(|f| p.on_frame(path, f, now))
                .is_ok()
        });
        if !ok {
            break;
        }
    }
    if data {
        shared.active_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Answers Ping datagrams with Pong datagrams (an echo, so that a probe's RTT is not
/// measured behind stream data) and hands Pongs to the session, which reports them.
async fn datagrams(shared: Arc<Shared>) {
    let decoder = Decoder::new(shared.limits);
    while let Ok(d) = shared.conn.read_datagram().await {
        let mut b = BytesMut::from(&d[..]);
        match decoder.decode(&mut b) {
            Ok(Some(Frame::Ping(p))) => {
                let pong = Frame::Pong(Pong {
                    id: p.id,
                    timestamp_ns: p.timestamp_ns,
                });
                // A probe tolerates a lost Pong; never block the reader on it.
                let _ = shared.conn.send_datagram(pong.to_bytes());
            }
            Ok(Some(pong @ Frame::Pong(_))) => {
                let now = Instant::now();
                let _ = shared.update(|p| p.on_frame(DATAGRAM_PATH, pong, now));
            }
            // Datagrams are only for probes; anything else is ignored, not fatal.
            other => tracing::debug!(?other, "ignoring an unexpected datagram"),
        }
    }
}

/// Runs the session's timer: the delayed ack, the stall backstop, idle pings and timeout.
/// Deadlines that move earlier (the delayed ack) wake it; the ones that appear with data
/// sent (idle, stall) are seen at the next recheck.
async fn timer(shared: Arc<Shared>) {
    loop {
        let moved = shared.timer.notified();
        tokio::pin!(moved);
        moved.as_mut().enable();
        let deadline = {
            let mut p = lock(&shared.proto);
            // A long path lengthens the stall backstop.
            p.set_srtt(Some(shared.conn.rtt()));
            p.poll_timeout()
        };
        let recheck = tokio::time::Instant::now() + TIMER_RECHECK;
        let wake = deadline.map_or(recheck, |d| recheck.min(d.into()));
        tokio::select! {
            _ = &mut moved => {}
            _ = tokio::time::sleep_until(wake) => {
                let requeued = shared.update(|p| p.on_timeout(Instant::now()));
                if requeued > 0 {
                    tracing::info!(requeued, "QUIC chunks unacknowledged past the stall backstop; sending them again");
                }
            }
        }
    }
}

/// Records why the connection ended.
async fn monitor(shared: Arc<Shared>) {
    let e = shared.conn.closed().await;
    tracing::debug!(error = %connection_error(&e), "QUIC connection ended");
    shared.connection_ended(&e);
}
