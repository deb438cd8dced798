//! The segment format that every SEND and every ring slot carries, and the splitting of
//! messages into segments and back. Sans-IO: bytes in, bytes out.
//!
//! ```text
//! 0      1      2        4            8            16               24              32         40       44       48
//! | kind | flags| 0 (u16)| payload_len| msg_len    | recv_advertised | ring_advertised | acked    | crc32c | 0      | payload ...
//! ```
//!
//! All integers are big-endian. Every header carries the sender's cumulative credit
//! advertisements and its acknowledgement, so data flowing one way returns credit the other
//! way for free; a standalone control segment is needed only on an idle reverse path.

use amst_core::ProtocolError;
use amst_core::codec::FrameKind;
use bytes::{Bytes, BytesMut};

/// Bytes of header in front of every segment's payload.
pub const SEGMENT_HEADER_LEN: usize = 48;

/// What a segment carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SegmentKind {
    /// A piece of a message.
    Data = 1,
    /// Credit and acknowledgement only; no payload.
    Control = 2,
    /// The sender closes gracefully after everything it sent before.
    Close = 3,
}

/// The segment is the first of its message.
pub const FLAG_FIRST: u8 = 1;
/// The segment is the last of its message.
pub const FLAG_LAST: u8 = 2;

/// A decoded segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// What the segment carries.
    pub kind: SegmentKind,
    /// [`FLAG_FIRST`] and [`FLAG_LAST`].
    pub flags: u8,
    /// Bytes of payload after the header.
    pub payload_len: u32,
    /// Length of the whole message this segment belongs to.
    pub msg_len: u64,
    /// Cumulative receive work requests the sender has posted for us.
    pub recv_advertised: u64,
    /// Cumulative ring slots the sender has made available to us (initial size included).
    pub ring_advertised: u64,
    /// Messages the sender has received whole from us (a prefix).
    pub acked: u64,
    /// CRC32C of the payload.
    pub crc: u32,
}

fn malformed(field: &'static str, reason: String) -> ProtocolError {
    // The RDMA segment format has no frame kind of its own; Data is the closest.
    ProtocolError::Malformed {
        kind: FrameKind::Data,
        field,
        reason,
    }
}

impl SegmentHeader {
    /// Writes the header into the first [`SEGMENT_HEADER_LEN`] bytes of `dst`.
    pub fn encode(&self, dst: &mut [u8]) {
        let d = &mut dst[..SEGMENT_HEADER_LEN];
        d[0] = self.kind as u8;
        d[1] = self.flags;
        d[2..4].fill(0);
        d[4..8].copy_from_slice(&self.payload_len.to_be_bytes());
        d[8..16].copy_from_slice(&self.msg_len.to_be_bytes());
        d[16..24].copy_from_slice(&self.recv_advertised.to_be_bytes());
        d[24..32].copy_from_slice(&self.ring_advertised.to_be_bytes());
        d[32..40].copy_from_slice(&self.acked.to_be_bytes());
        d[40..44].copy_from_slice(&self.crc.to_be_bytes());
        d[44..48].fill(0);
    }

    /// Parses a header from a buffer of `available` valid bytes (the completion's byte
    /// length, or the slot size), checking that the payload fits.
    pub fn decode(src: &[u8]) -> Result<Self, ProtocolError> {
        if src.len() < SEGMENT_HEADER_LEN {
            return Err(ProtocolError::Truncated {
                kind: FrameKind::Data,
                needed: SEGMENT_HEADER_LEN,
                have: src.len(),
            });
        }
        let u32_at = |i: usize| u32::from_be_bytes(src[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_be_bytes(src[i..i + 8].try_into().expect("8 bytes"));
        let kind = match src[0] {
            1 => SegmentKind::Data,
            2 => SegmentKind::Control,
            3 => SegmentKind::Close,
            other => return Err(ProtocolError::UnknownFrameType(other)),
        };
        let flags = src[1];
        if flags & !(FLAG_FIRST | FLAG_LAST) != 0 {
            return Err(malformed("flags", format!("has unknown bits {flags:#04x}")));
        }
        let h = SegmentHeader {
            kind,
            flags,
            payload_len: u32_at(4),
            msg_len: u64_at(8),
            recv_advertised: u64_at(16),
            ring_advertised: u64_at(24),
            acked: u64_at(32),
            crc: u32_at(40),
        };
        let have = src.len() - SEGMENT_HEADER_LEN;
        if h.payload_len as usize > have {
            return Err(ProtocolError::Truncated {
                kind: FrameKind::Data,
                needed: SEGMENT_HEADER_LEN + h.payload_len as usize,
                have: src.len(),
            });
        }
        if kind != SegmentKind::Data && (h.payload_len != 0 || h.flags != 0) {
            return Err(malformed(
                "payload_len",
                format!(
                    "is {} on a {kind:?} segment, which carries none",
                    h.payload_len
                ),
            ));
        }
        Ok(h)
    }
}

/// Cuts messages into segments of at most `max_payload` bytes each.
#[derive(Debug)]
pub struct Segmenter {
    max_payload: usize,
    current: Option<(Bytes, usize)>,
}

/// One segment to put on the wire: the header fields that belong to the message, and the
/// payload (a slice of the message, no copy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutSegment {
    /// [`FLAG_FIRST`] / [`FLAG_LAST`].
    pub flags: u8,
    /// The whole message's length.
    pub msg_len: u64,
    /// This segment's bytes.
    pub payload: Bytes,
}

impl Segmenter {
    /// A segmenter for slots that hold `max_payload` bytes after the header.
    pub fn new(max_payload: usize) -> Self {
        assert!(max_payload > 0, "a segment must carry at least one byte");
        Segmenter {
            max_payload,
            current: None,
        }
    }

    /// True while a message is partly sent: the next segment continues it.
    pub fn in_progress(&self) -> bool {
        self.current.is_some()
    }

    /// Starts cutting `message`; only when the previous one is finished.
    pub fn start(&mut self, message: Bytes) {
        assert!(!self.in_progress(), "the previous message is not finished");
        self.current = Some((message, 0));
    }

    /// Length of the next segment's payload, if a message is in progress (so the caller can
    /// choose SEND or a ring write before taking it).
    pub fn peek_len(&self) -> Option<usize> {
        self.current
            .as_ref()
            .map(|(m, off)| (m.len() - off).min(self.max_payload))
    }

    /// The next segment of the message in progress.
    pub fn next_segment(&mut self) -> Option<OutSegment> {
        let (msg, off) = self.current.as_mut()?;
        let start = *off;
        let n = (msg.len() - start).min(self.max_payload);
        let mut flags = 0;
        if start == 0 {
            flags |= FLAG_FIRST;
        }
        *off += n;
        let msg_len = msg.len() as u64;
        let payload = msg.slice(start..start + n);
        if *off == msg.len() {
            flags |= FLAG_LAST;
            self.current = None;
        }
        Some(OutSegment {
            flags,
            msg_len,
            payload,
        })
    }
}

/// Rebuilds messages from segments that arrive in order (an RC queue pair keeps order).
#[derive(Debug)]
pub struct Assembler {
    max_message: u64,
    current: Option<(BytesMut, u64)>,
}

/// Memory reserved up front for a message; the rest grows as bytes arrive, so a peer cannot
/// make us allocate by announcing a large length.
const INITIAL_RESERVE: u64 = 1 << 20;

impl Assembler {
    /// An assembler that refuses messages longer than `max_message`.
    pub fn new(max_message: u64) -> Self {
        Assembler {
            max_message,
            current: None,
        }
    }

    /// Adds one data segment; returns the message it completes, if any.
    pub fn push(
        &mut self,
        header: &SegmentHeader,
        payload: &[u8],
    ) -> Result<Option<Bytes>, ProtocolError> {
        debug_assert_eq!(header.kind, SegmentKind::Data);
        if payload.len() != header.payload_len as usize {
            return Err(malformed(
                "payload_len",
                format!(
                    "says {} but {} bytes arrived",
                    header.payload_len,
                    payload.len()
                ),
            ));
        }
        let actual = amst_core::crc32c(payload);
        if actual != header.crc {
            let done = self.current.as_ref().map_or(0, |(b, _)| b.len() as u64);
            return Err(ProtocolError::ChunkCorrupt {
                msg_id: 0,
                msg_offset: done,
                expected: header.crc,
                actual,
            });
        }
        let first = header.flags & FLAG_FIRST != 0;
        match (&self.current, first) {
            (None, false) => {
                return Err(ProtocolError::Inconsistent(
                    "a continuation segment arrived with no message in progress".into(),
                ));
            }
            (Some(_), true) => {
                return Err(ProtocolError::Inconsistent(
                    "a new message started before the previous one ended".into(),
                ));
            }
            _ => {}
        }
        if first {
            if header.msg_len > self.max_message {
                return Err(ProtocolError::MessageTooLarge {
                    msg_id: 0,
                    len: header.msg_len,
                    limit: self.max_message,
                });
            }
            let reserve = header.msg_len.min(INITIAL_RESERVE) as usize;
            self.current = Some((BytesMut::with_capacity(reserve), header.msg_len));
        }
        let (buf, len) = self.current.as_mut().expect("set above");
        if header.msg_len != *len {
            return Err(ProtocolError::Inconsistent(format!(
                "segment says the message is {} bytes, its first segment said {len}",
                header.msg_len
            )));
        }
        if buf.len() as u64 + payload.len() as u64 > *len {
            return Err(ProtocolError::Inconsistent(format!(
                "segments overrun the announced message length of {len} bytes"
            )));
        }
        buf.extend_from_slice(payload);
        let last = header.flags & FLAG_LAST != 0;
        let complete = buf.len() as u64 == *len;
        if last != complete {
            return Err(ProtocolError::Inconsistent(format!(
                "LAST flag {last} but {} of {len} bytes received",
                buf.len()
            )));
        }
        if complete {
            let (buf, _) = self.current.take().expect("set above");
            return Ok(Some(buf.freeze()));
        }
        Ok(None)
    }

    /// True while a message is partly received.
    pub fn in_progress(&self) -> bool {
        self.current.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: SegmentKind, flags: u8, payload: &[u8], msg_len: u64) -> SegmentHeader {
        SegmentHeader {
            kind,
            flags,
            payload_len: payload.len() as u32,
            msg_len,
            recv_advertised: 7,
            ring_advertised: 9,
            acked: 3,
            crc: amst_core::crc32c(payload),
        }
    }

    #[test]
    fn header_round_trips_and_checks_lengths() {
        let h = header(SegmentKind::Data, FLAG_FIRST, b"abc", 10);
        let mut buf = vec![0u8; SEGMENT_HEADER_LEN + 3];
        h.encode(&mut buf);
        assert_eq!(SegmentHeader::decode(&buf).unwrap(), h);
        // One byte short of the announced payload.
        assert!(matches!(
            SegmentHeader::decode(&buf[..SEGMENT_HEADER_LEN + 2]),
            Err(ProtocolError::Truncated { .. })
        ));
        buf[0] = 9;
        assert_eq!(
            SegmentHeader::decode(&buf),
            Err(ProtocolError::UnknownFrameType(9))
        );
        buf[0] = 1;
        buf[1] = 0x80;
        assert!(matches!(
            SegmentHeader::decode(&buf),
            Err(ProtocolError::Malformed { field: "flags", .. })
        ));
    }

    #[test]
    fn control_segments_carry_no_payload() {
        let mut h = header(SegmentKind::Control, 0, b"", 0);
        let mut buf = vec![0u8; SEGMENT_HEADER_LEN + 4];
        h.encode(&mut buf);
        assert_eq!(SegmentHeader::decode(&buf).unwrap().acked, 3);
        h.payload_len = 4;
        h.encode(&mut buf);
        assert!(SegmentHeader::decode(&buf).is_err());
    }

    #[test]
    fn segmenter_and_assembler_round_trip_many_sizes() {
        for max_payload in [1usize, 7, 64] {
            let mut seg = Segmenter::new(max_payload);
            let mut asm = Assembler::new(1 << 20);
            for len in [0usize, 1, 6, 7, 8, 63, 64, 65, 200] {
                let msg: Bytes = (0..len).map(|i| (i * 31 + len) as u8).collect();
                seg.start(msg.clone());
                let mut out = None;
                let mut n = 0;
                while let Some(s) = seg.next_segment() {
                    n += 1;
                    assert!(s.payload.len() <= max_payload);
                    let h = header(SegmentKind::Data, s.flags, &s.payload, s.msg_len);
                    let got = asm.push(&h, &s.payload).unwrap();
                    assert!(out.is_none(), "a message completed before its last segment");
                    out = got;
                }
                assert_eq!(n, len.div_ceil(max_payload).max(1));
                assert_eq!(
                    out.as_deref(),
                    Some(&msg[..]),
                    "len {len} max {max_payload}"
                );
                assert!(!asm.in_progress());
            }
        }
    }

    #[test]
    fn assembler_rejects_corruption_and_inconsistency() {
        let mut asm = Assembler::new(100);
        let mut h = header(SegmentKind::Data, FLAG_FIRST, b"abcd", 8);
        h.crc ^= 1;
        assert!(matches!(
            asm.push(&h, b"abcd"),
            Err(ProtocolError::ChunkCorrupt { .. })
        ));

        let mut asm = Assembler::new(100);
        let h = header(SegmentKind::Data, 0, b"abcd", 8);
        assert!(matches!(
            asm.push(&h, b"abcd"),
            Err(ProtocolError::Inconsistent(_))
        ));

        let mut asm = Assembler::new(100);
        let h = header(SegmentKind::Data, FLAG_FIRST, b"abcd", 101);
        assert!(matches!(
            asm.push(&h, b"abcd"),
            Err(ProtocolError::MessageTooLarge { len: 101, .. })
        ));

        // LAST before the announced length is reached.
        let mut asm = Assembler::new(100);
        let h = header(SegmentKind::Data, FLAG_FIRST | FLAG_LAST, b"abcd", 8);
        assert!(asm.push(&h, b"abcd").is_err());

        // Overrun of the announced length.
        let mut asm = Assembler::new(100);
        let h = header(SegmentKind::Data, FLAG_FIRST, b"abcd", 6);
        asm.push(&h, b"abcd").unwrap();
        let h = header(SegmentKind::Data, FLAG_LAST, b"abcd", 6);
        assert!(asm.push(&h, b"abcd").is_err());
    }

    #[test]
    fn a_huge_announced_length_does_not_allocate_it() {
        let mut asm = Assembler::new(1 << 40);
        let h = header(SegmentKind::Data, FLAG_FIRST, b"x", 1 << 39);
        asm.push(&h, b"x").unwrap();
        let cap = asm.current.as_ref().unwrap().0.capacity() as u64;
        assert!(cap <= INITIAL_RESERVE, "reserved {cap} bytes");
    }
}
