//! The segment every SEND and every ring slot carries, and the frame stream the segments
//! carry. Sans-IO: bytes in, bytes out.
//!
//! The session protocol is amst-core's (`amst_core::session`): its frames (Data chunks with
//! their CRC32C, Ack, Credit, Ping, Pong, Close) form one ordered byte stream per direction,
//! exactly as on a TCP stream. An RC queue pair delivers segments reliably and in order, so
//! the stream is cut into segments anywhere, frame boundaries or not: [`Outbox`] cuts it,
//! [`Inbox`] joins it and decodes frames. The segment header itself carries only what is
//! RDMA's own: the receive and ring-slot credit of the queue pair (see [`crate::credit`]).
//!
//! ```text
//! 0      1      4            8                 16                24
//! | kind | 0    | payload_len| recv_advertised | ring_advertised | payload ...
//! ```
//!
//! All integers are big-endian.

use amst_core::codec::{DATA_HEADER_LEN, DataChunk, Decoder, Frame, FrameKind, Limits};
use amst_core::{Charge, MemoryBudget, ProtocolError, charged};
use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;

/// Bytes of header in front of every segment's payload.
pub const SEGMENT_HEADER_LEN: usize = 24;

/// The only segment kind: a piece of the peer's frame stream (possibly empty: credit only).
pub const KIND_STREAM: u8 = 1;

/// A decoded segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Bytes of the frame stream after the header (0: a credit update only).
    pub payload_len: u32,
    /// Cumulative receive work requests the sender has posted for us.
    pub recv_advertised: u64,
    /// Cumulative ring slots the sender has made available to us (initial size included).
    pub ring_advertised: u64,
}

impl SegmentHeader {
    /// Writes the header into the first [`SEGMENT_HEADER_LEN`] bytes of `dst`.
    pub fn encode(&self, dst: &mut [u8]) {
        let d = &mut dst[..SEGMENT_HEADER_LEN];
        d[0] = KIND_STREAM;
        d[1..4].fill(0);
        d[4..8].copy_from_slice(&self.payload_len.to_be_bytes());
        d[8..16].copy_from_slice(&self.recv_advertised.to_be_bytes());
        d[16..24].copy_from_slice(&self.ring_advertised.to_be_bytes());
    }

    /// Parses a header from the valid bytes of a receive buffer or ring slot, checking that
    /// the payload fits in them.
    pub fn decode(src: &[u8]) -> Result<Self, ProtocolError> {
        if src.len() < SEGMENT_HEADER_LEN {
            return Err(ProtocolError::Truncated {
                kind: FrameKind::Data,
                needed: SEGMENT_HEADER_LEN,
                have: src.len(),
            });
        }
        if src[0] != KIND_STREAM {
            return Err(ProtocolError::UnknownFrameType(src[0]));
        }
        let u64_at = |i: usize| u64::from_be_bytes(src[i..i + 8].try_into().expect("8 bytes"));
        let h = SegmentHeader {
            payload_len: u32::from_be_bytes(src[4..8].try_into().expect("4 bytes")),
            recv_advertised: u64_at(8),
            ring_advertised: u64_at(16),
        };
        if h.payload_len as usize > src.len() - SEGMENT_HEADER_LEN {
            return Err(ProtocolError::Truncated {
                kind: FrameKind::Data,
                needed: SEGMENT_HEADER_LEN + h.payload_len as usize,
                have: src.len(),
            });
        }
        Ok(h)
    }
}

/// The frame stream waiting to be cut into segments: control bytes and Data frames (header
/// and payload, not copied) in order.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Pieces, each marked whether it belongs to a Data frame.
    pieces: VecDeque<(Bytes, bool)>,
    len: usize,
}

impl Outbox {
    /// Appends encoded control frames.
    pub fn push_control(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.len += bytes.len();
            self.pieces.push_back((bytes, false));
        }
    }

    /// Appends a sealed Data chunk as a frame.
    pub fn push_chunk(&mut self, chunk: &DataChunk) {
        let header = Bytes::copy_from_slice(&chunk.encode_header());
        self.len += DATA_HEADER_LEN + chunk.payload.len();
        self.pieces.push_back((header, true));
        if !chunk.payload.is_empty() {
            self.pieces.push_back((chunk.payload.clone(), true));
        }
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes before the first Data frame: what may go out when only control credit is left.
    pub fn control_prefix(&self) -> usize {
        self.pieces
            .iter()
            .take_while(|(_, data)| !data)
            .map(|(b, _)| b.len())
            .sum()
    }

    /// Moves up to `dst.len()` bytes from the front into `dst`; returns how many.
    pub fn take_into(&mut self, dst: &mut [u8]) -> usize {
        let mut n = 0;
        while n < dst.len() {
            let Some((front, _)) = self.pieces.front_mut() else {
                break;
            };
            let k = front.len().min(dst.len() - n);
            dst[n..n + k].copy_from_slice(&front[..k]);
            front.advance(k);
            n += k;
            if front.is_empty() {
                self.pieces.pop_front();
            }
        }
        self.len -= n;
        n
    }
}

/// Rebuilds the peer's frame stream from segment payloads and decodes it. The bytes are
/// copied out of the registered buffer or slot at once (so it goes back to the peer), into a
/// slab charged to the memory budget; Data payloads are split off the slab without another
/// copy.
#[derive(Debug)]
pub struct Inbox {
    decoder: Decoder,
    buf: BytesMut,
    slab_min: usize,
    slab_len: usize,
    budget: MemoryBudget,
    _slab_charge: Charge,
}

impl Inbox {
    /// An inbox whose slabs hold at least `slab_min` bytes, charged to `budget`.
    pub fn new(limits: Limits, slab_min: usize, budget: MemoryBudget) -> Self {
        Inbox {
            decoder: Decoder::new(limits),
            buf: BytesMut::new(),
            slab_min,
            slab_len: 0,
            _slab_charge: budget.empty_charge(),
            budget,
        }
    }

    /// Bytes of a frame begun and not yet complete.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Appends one segment's payload and decodes every whole frame into `frames`.
    pub fn push(&mut self, bytes: &[u8], frames: &mut Vec<Frame>) -> Result<(), ProtocolError> {
        if self.buf.capacity() - self.buf.len() < bytes.len() {
            // A frame that is known to be large gets a slab of its size: it is never copied
            // again. The old slab, if still alive, is paid for by the chunks that pin it.
            let known = self.decoder.frame_len(&self.buf)?.unwrap_or(0);
            let want = self.slab_min.max(known).max(self.buf.len() + bytes.len());
            if !self.buf.try_reclaim(want.saturating_sub(self.buf.len())) {
                let mut fresh = BytesMut::with_capacity(want);
                fresh.extend_from_slice(&self.buf);
                self.buf = fresh;
            }
            self.slab_len = self.buf.capacity();
            self._slab_charge = self.budget.charge(self.slab_len as u64);
        }
        self.buf.extend_from_slice(bytes);
        while let Some(mut f) = self.decoder.decode(&mut self.buf)? {
            if let Frame::Data(chunk) = &mut f {
                self.unpin(chunk);
            }
            frames.push(f);
        }
        Ok(())
    }

    /// A chunk that is a whole message keeps its slab alive as long as the application holds
    /// it: a small one is copied out instead, a large one pays for the rest of the slab, so
    /// that what the peer makes us pin is always counted (as amst-tcp's readers do).
    fn unpin(&self, chunk: &mut DataChunk) {
        let len = chunk.payload.len();
        if chunk.msg_offset != 0 || len as u64 != chunk.msg_len || len == 0 {
            return;
        }
        if len.saturating_mul(2) < self.slab_len {
            chunk.payload = Bytes::copy_from_slice(&chunk.payload);
        } else {
            let rest = self.slab_len.saturating_sub(len) as u64;
            let surcharge = self.budget.charge(rest);
            chunk.payload = charged(std::mem::take(&mut chunk.payload), surcharge);
        }
    }
}

#[cfg(test)]
mod tests {
    use amst_core::codec::{Ping, Pong};

    use super::*;

    #[test]
    fn header_round_trips_and_checks_lengths() {
        let h = SegmentHeader {
            payload_len: 3,
            recv_advertised: 300,
            ring_advertised: 70,
        };
        let mut buf = vec![0u8; SEGMENT_HEADER_LEN + 3];
        h.encode(&mut buf);
        assert_eq!(SegmentHeader::decode(&buf).unwrap(), h);
        assert!(matches!(
            SegmentHeader::decode(&buf[..SEGMENT_HEADER_LEN + 2]),
            Err(ProtocolError::Truncated { .. })
        ));
        assert!(matches!(
            SegmentHeader::decode(&buf[..10]),
            Err(ProtocolError::Truncated { .. })
        ));
        buf[0] = 9;
        assert!(matches!(
            SegmentHeader::decode(&buf),
            Err(ProtocolError::UnknownFrameType(9))
        ));
    }

    fn chunk(id: u64, len: usize) -> DataChunk {
        let payload: Vec<u8> = (0..len).map(|i| (i as u8) ^ (id as u8)).collect();
        DataChunk::new(0, id, 0, len as u64, Bytes::from(payload))
    }

    /// Frames cut into segments of every size from 1 byte up come out whole and equal, and
    /// the control prefix ends where the first Data frame begins.
    #[test]
    fn a_frame_stream_survives_any_segmentation() {
        for seg in [1usize, 7, 60, 100, 4096, 1 << 20] {
            let mut out = Outbox::default();
            let mut control = BytesMut::new();
            Frame::Ping(Ping {
                id: 5,
                timestamp_ns: 9,
                padding: 0,
            })
            .encode(&mut control);
            let control_len = control.len();
            out.push_control(control.freeze());
            let chunks = [chunk(0, 0), chunk(1, 3000), chunk(2, 70_000)];
            for c in &chunks {
                out.push_chunk(c);
            }
            let mut control = BytesMut::new();
            Frame::Pong(Pong {
                id: 5,
                timestamp_ns: 9,
            })
            .encode(&mut control);
            out.push_control(control.freeze());
            assert_eq!(out.control_prefix(), control_len);

            let budget = MemoryBudget::new(64 << 20);
            let mut inbox = Inbox::new(Limits::default(), 8192, budget.clone());
            let mut frames = Vec::new();
            let mut buf = vec![0u8; seg];
            while !out.is_empty() {
                let n = out.take_into(&mut buf);
                inbox.push(&buf[..n], &mut frames).unwrap();
            }
            assert_eq!(inbox.pending(), 0);
            assert_eq!(frames.len(), 5, "segments of {seg}");
            assert!(matches!(frames[0], Frame::Ping(Ping { id: 5, .. })));
            for (f, c) in frames[1..4].iter().zip(&chunks) {
                match f {
                    Frame::Data(d) => assert_eq!(d, c, "segments of {seg}"),
                    other => panic!("{other:?}"),
                }
            }
            assert!(matches!(frames[4], Frame::Pong(Pong { id: 5, .. })));
            assert!(budget.held() > 0, "the slab is charged");
            drop((frames, inbox));
            assert_eq!(budget.held(), 0, "every charge is given back");
        }
    }

    #[test]
    fn a_corrupt_chunk_is_refused() {
        let mut out = Outbox::default();
        let mut c = chunk(0, 100);
        c.crc ^= 1;
        out.push_chunk(&c);
        let mut buf = vec![0u8; out.len()];
        out.take_into(&mut buf);
        let mut inbox = Inbox::new(Limits::default(), 4096, MemoryBudget::new(1 << 20));
        assert!(matches!(
            inbox.push(&buf, &mut Vec::new()),
            Err(ProtocolError::ChunkCorrupt { .. })
        ));
    }
}
