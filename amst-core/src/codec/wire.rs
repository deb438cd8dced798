//! Byte layout: encoding and a streaming decoder that checks every length against its limit
//! before it allocates or waits for the body.
//!
//! Every frame is `type: u8, body_len: u32 (big-endian), body`. Integers are big-endian.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::frame::*;
use crate::ProtocolError;

/// `"AMST"`, first field of Hello and HelloAck.
pub const MAGIC: u32 = 0x414d_5354;
/// Bytes before every frame body: the type and the body length.
pub const FRAME_HEADER_LEN: usize = 5;
/// Bytes of a Data frame before its payload: the frame header plus the chunk fields.
pub const DATA_HEADER_LEN: usize = FRAME_HEADER_LEN + DATA_FIELDS_LEN;

const DATA_FIELDS_LEN: usize = 8 * 4 + 4 + 4;
const HELLO_LEN: usize = 4 + 2 + 2 + 16 + 2 + 2 + 8 + 32;
const HELLO_ACK_LEN: usize = 4 + 2 + 2 + 2 + 16 + 8 + 32 + 32;
const AUTH_LEN: usize = 32;
const CREDIT_LEN: usize = 16;
const PING_FIELDS_LEN: usize = 16;
const PONG_LEN: usize = 16;
const ACK_FIELDS_LEN: usize = 8 + 8 + 2;
const ACK_RANGE_LEN: usize = 16;
const CLOSE_FIELDS_LEN: usize = 2 + 2;

/// Upper bounds on everything a peer can make us buffer. A frame over a limit is rejected
/// from its header, before any allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest chunk payload accepted.
    pub max_chunk: u32,
    /// Largest message accepted (default 1 GiB).
    pub max_message: u64,
    /// Most SACK ranges in one Ack.
    pub max_ack_ranges: u16,
    /// Longest Close reason in bytes.
    pub max_close_reason: u16,
    /// Most padding in one Ping.
    pub max_ping_padding: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_chunk: 4 << 20,
            max_message: 1 << 30,
            max_ack_ranges: 256,
            max_close_reason: Close::MAX_REASON as u16,
            max_ping_padding: 64 << 10,
        }
    }
}

impl Limits {
    /// The largest body a frame of `kind` may announce.
    pub fn max_body(&self, kind: FrameKind) -> usize {
        match kind {
            FrameKind::Hello => HELLO_LEN,
            FrameKind::HelloAck => HELLO_ACK_LEN,
            FrameKind::Auth => AUTH_LEN,
            FrameKind::Data => DATA_FIELDS_LEN + self.max_chunk as usize,
            FrameKind::Ack => ACK_FIELDS_LEN + ACK_RANGE_LEN * self.max_ack_ranges as usize,
            FrameKind::Credit => CREDIT_LEN,
            FrameKind::Ping => PING_FIELDS_LEN + self.max_ping_padding as usize,
            FrameKind::Pong => PONG_LEN,
            FrameKind::Close => CLOSE_FIELDS_LEN + self.max_close_reason as usize,
        }
    }

    fn min_body(kind: FrameKind) -> usize {
        match kind {
            FrameKind::Data => DATA_FIELDS_LEN,
            FrameKind::Ack => ACK_FIELDS_LEN,
            FrameKind::Ping => PING_FIELDS_LEN,
            FrameKind::Close => CLOSE_FIELDS_LEN,
            fixed => Limits::default().max_body(fixed),
        }
    }
}

impl Frame {
    /// Appends the whole frame, payload included, to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            Frame::Data(chunk) => {
                dst.reserve(DATA_HEADER_LEN + chunk.payload.len());
                dst.put_slice(&chunk.encode_header());
                dst.put_slice(&chunk.payload);
            }
            other => {
                let body_len = other.body_len();
                dst.reserve(FRAME_HEADER_LEN + body_len);
                dst.put_u8(other.kind() as u8);
                dst.put_u32(body_len as u32);
                other.encode_body(dst);
            }
        }
    }

    /// The frame as one contiguous buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::new();
        self.encode(&mut buf);
        buf.freeze()
    }

    fn body_len(&self) -> usize {
        match self {
            Frame::Hello(_) => HELLO_LEN,
            Frame::HelloAck(_) => HELLO_ACK_LEN,
            Frame::Auth(_) => AUTH_LEN,
            Frame::Data(c) => DATA_FIELDS_LEN + c.payload.len(),
            Frame::Ack(a) => ACK_FIELDS_LEN + ACK_RANGE_LEN * a.ranges.len(),
            Frame::Credit(_) => CREDIT_LEN,
            Frame::Ping(p) => PING_FIELDS_LEN + p.padding as usize,
            Frame::Pong(_) => PONG_LEN,
            Frame::Close(c) => CLOSE_FIELDS_LEN + c.reason.len(),
        }
    }

    fn encode_body(&self, dst: &mut BytesMut) {
        match self {
            Frame::Hello(h) => {
                dst.put_u32(MAGIC);
                dst.put_u16(h.version_min);
                dst.put_u16(h.version_max);
                dst.put_slice(&h.session_id);
                dst.put_u16(h.stream_index);
                dst.put_u16(h.stream_count);
                dst.put_u64(h.capabilities);
                dst.put_slice(&h.nonce);
            }
            Frame::HelloAck(h) => {
                dst.put_u32(MAGIC);
                dst.put_u16(h.version);
                dst.put_u16(h.version_min);
                dst.put_u16(h.version_max);
                dst.put_slice(&h.session_id);
                dst.put_u64(h.capabilities);
                dst.put_slice(&h.nonce);
                dst.put_slice(&h.mac);
            }
            Frame::Auth(a) => dst.put_slice(&a.mac),
            Frame::Data(_) => unreachable!("data frames are encoded by encode()"),
            Frame::Ack(a) => {
                dst.put_u64(a.messages);
                dst.put_u64(a.cumulative);
                dst.put_u16(a.ranges.len() as u16);
                for r in &a.ranges {
                    dst.put_u64(r.start);
                    dst.put_u64(r.end);
                }
            }
            Frame::Credit(c) => {
                dst.put_u64(c.limit);
                dst.put_u64(c.max_msg_id);
            }
            Frame::Ping(p) => {
                dst.put_u64(p.id);
                dst.put_u64(p.timestamp_ns);
                dst.put_bytes(0, p.padding as usize);
            }
            Frame::Pong(p) => {
                dst.put_u64(p.id);
                dst.put_u64(p.timestamp_ns);
            }
            Frame::Close(c) => {
                dst.put_u16(c.code.to_u16());
                dst.put_u16(c.reason.len() as u16);
                dst.put_slice(c.reason.as_bytes());
            }
        }
    }
}

impl DataChunk {
    /// The frame header and chunk fields, to be written before the payload with a vectored
    /// write, so that the payload is never copied.
    pub fn encode_header(&self) -> [u8; DATA_HEADER_LEN] {
        let mut out = [0u8; DATA_HEADER_LEN];
        let mut b = &mut out[..];
        b.put_u8(FrameKind::Data as u8);
        b.put_u32((DATA_FIELDS_LEN + self.payload.len()) as u32);
        b.put_u64(self.session_offset);
        b.put_u64(self.msg_id);
        b.put_u64(self.msg_offset);
        b.put_u64(self.msg_len);
        b.put_u32(self.payload.len() as u32);
        b.put_u32(self.crc);
        out
    }
}

/// A streaming frame decoder: feed it whatever bytes arrived, take out whole frames.
#[derive(Clone, Copy, Debug, Default)]
pub struct Decoder {
    limits: Limits,
}

impl Decoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Decoder { limits }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Takes one whole frame off the front of `src`, or returns `Ok(None)` when more bytes
    /// are needed. The header is validated as soon as it is complete, so an oversized frame
    /// fails before its body is awaited. A Data payload is split off `src` without copying.
    pub fn decode(&self, src: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        let Some((kind, body_len)) = self.header(src)? else {
            return Ok(None);
        };
        if src.len() < FRAME_HEADER_LEN + body_len {
            return Ok(None);
        }
        src.advance(FRAME_HEADER_LEN);
        let body = src.split_to(body_len).freeze();
        self.decode_body(kind, body).map(Some)
    }

    /// Like [`decode`](Self::decode), for when the input has ended: leftover bytes that do
    /// not make a whole frame are a [`ProtocolError::Truncated`].
    pub fn decode_eof(&self, src: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        if let Some(frame) = self.decode(src)? {
            return Ok(Some(frame));
        }
        if src.is_empty() {
            return Ok(None);
        }
        let kind = FrameKind::from_u8(src[0]).ok_or(ProtocolError::UnknownFrameType(src[0]))?;
        let needed = match self.header(src)? {
            Some((_, body_len)) => FRAME_HEADER_LEN + body_len,
            None => FRAME_HEADER_LEN,
        };
        Err(ProtocolError::Truncated {
            kind,
            needed,
            have: src.len(),
        })
    }

    /// How many bytes the frame at the front of `src` needs in all, once its header is
    /// complete and valid; lets a reader reserve exactly once for a large chunk.
    pub fn frame_len(&self, src: &[u8]) -> Result<Option<usize>, ProtocolError> {
        Ok(self.header(src)?.map(|(_, body)| FRAME_HEADER_LEN + body))
    }

    /// The header of the Data frame at the front of `src`, validated as [`decode`](Self::decode)
    /// would, once its fields have arrived and before its payload has: a reader can then read
    /// the payload straight to where it belongs. `Ok(None)` if the frame is not Data or its
    /// header is incomplete.
    pub fn data_header(&self, src: &[u8]) -> Result<Option<DataHeader>, ProtocolError> {
        match self.header(src)? {
            Some((FrameKind::Data, body_len)) if src.len() >= DATA_HEADER_LEN => self
                .data_fields(
                    &src[FRAME_HEADER_LEN..DATA_HEADER_LEN],
                    body_len - DATA_FIELDS_LEN,
                )
                .map(Some),
            _ => Ok(None),
        }
    }

    /// Parses and checks a Data frame's fields; `payload_len` is what the frame's length
    /// leaves for the payload.
    fn data_fields(&self, mut f: &[u8], payload_len: usize) -> Result<DataHeader, ProtocolError> {
        let malformed = |field: &'static str, reason: String| ProtocolError::Malformed {
            kind: FrameKind::Data,
            field,
            reason,
        };
        let h = DataHeader {
            session_offset: f.get_u64(),
            msg_id: f.get_u64(),
            msg_offset: f.get_u64(),
            msg_len: f.get_u64(),
            chunk_len: f.get_u32(),
            crc: f.get_u32(),
        };
        if h.chunk_len as usize != payload_len {
            return Err(malformed(
                "chunk_len",
                format!(
                    "is {} but the frame carries {payload_len} payload bytes",
                    h.chunk_len
                ),
            ));
        }
        if h.msg_len > self.limits.max_message {
            return Err(ProtocolError::MessageTooLarge {
                msg_id: h.msg_id,
                len: h.msg_len,
                limit: self.limits.max_message,
            });
        }
        if h.msg_offset
            .checked_add(h.chunk_len as u64)
            .is_none_or(|end| end > h.msg_len)
        {
            return Err(malformed(
                "msg_offset",
                format!(
                    "{} + chunk_len {} runs past msg_len {}",
                    h.msg_offset, h.chunk_len, h.msg_len
                ),
            ));
        }
        if h.chunk_len == 0 && h.msg_len != 0 {
            return Err(malformed("chunk_len", "is 0 in a non-empty message".into()));
        }
        if h.session_offset.checked_add(h.msg_len).is_none() || h.session_offset < h.msg_offset {
            return Err(malformed(
                "session_offset",
                format!(
                    "{} is inconsistent with msg_offset {} and msg_len {}",
                    h.session_offset, h.msg_offset, h.msg_len
                ),
            ));
        }
        Ok(h)
    }

    fn header(&self, src: &[u8]) -> Result<Option<(FrameKind, usize)>, ProtocolError> {
        let Some(&type_byte) = src.first() else {
            return Ok(None);
        };
        let kind =
            FrameKind::from_u8(type_byte).ok_or(ProtocolError::UnknownFrameType(type_byte))?;
        if src.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let body_len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]) as usize;
        let limit = self.limits.max_body(kind);
        if body_len > limit {
            return Err(ProtocolError::FrameTooLarge {
                kind,
                len: body_len as u64,
                limit: limit as u64,
            });
        }
        let min = Limits::min_body(kind);
        if body_len < min {
            return Err(ProtocolError::Truncated {
                kind,
                needed: min,
                have: body_len,
            });
        }
        Ok(Some((kind, body_len)))
    }

    fn decode_body(&self, kind: FrameKind, mut b: Bytes) -> Result<Frame, ProtocolError> {
        let malformed = |field: &'static str, reason: String| ProtocolError::Malformed {
            kind,
            field,
            reason,
        };
        Ok(match kind {
            FrameKind::Hello => {
                check_magic(b.get_u32())?;
                Frame::Hello(Hello {
                    version_min: b.get_u16(),
                    version_max: b.get_u16(),
                    session_id: take(&mut b),
                    stream_index: b.get_u16(),
                    stream_count: b.get_u16(),
                    capabilities: b.get_u64(),
                    nonce: take(&mut b),
                })
            }
            FrameKind::HelloAck => {
                check_magic(b.get_u32())?;
                Frame::HelloAck(HelloAck {
                    version: b.get_u16(),
                    version_min: b.get_u16(),
                    version_max: b.get_u16(),
                    session_id: take(&mut b),
                    capabilities: b.get_u64(),
                    nonce: take(&mut b),
                    mac: take(&mut b),
                })
            }
            FrameKind::Auth => Frame::Auth(AuthProof { mac: take(&mut b) }),
            FrameKind::Data => {
                let payload_len = b.len() - DATA_FIELDS_LEN;
                let h = self.data_fields(&b[..DATA_FIELDS_LEN], payload_len)?;
                b.advance(DATA_FIELDS_LEN);
                let actual = crate::crc32c(&b);
                if actual != h.crc {
                    return Err(h.corrupt(actual));
                }
                Frame::Data(DataChunk {
                    session_offset: h.session_offset,
                    msg_id: h.msg_id,
                    msg_offset: h.msg_offset,
                    msg_len: h.msg_len,
                    crc: h.crc,
                    payload: b,
                })
            }
            FrameKind::Ack => {
                let messages = b.get_u64();
                let cumulative = b.get_u64();
                let count = b.get_u16();
                if count > self.limits.max_ack_ranges {
                    return Err(malformed(
                        "range_count",
                        format!(
                            "is {count}, over the limit of {}",
                            self.limits.max_ack_ranges
                        ),
                    ));
                }
                if b.len() != count as usize * ACK_RANGE_LEN {
                    return Err(malformed(
                        "range_count",
                        format!(
                            "is {count} but the frame carries {} bytes of ranges",
                            b.len()
                        ),
                    ));
                }
                let mut ranges = Vec::with_capacity(count as usize);
                let mut floor = cumulative;
                for _ in 0..count {
                    let r = ByteRange {
                        start: b.get_u64(),
                        end: b.get_u64(),
                    };
                    if r.start <= floor || r.end <= r.start {
                        return Err(malformed(
                            "ranges",
                            format!(
                                "range {}..{} is empty, unordered or overlaps what precedes it",
                                r.start, r.end
                            ),
                        ));
                    }
                    floor = r.end;
                    ranges.push(r);
                }
                Frame::Ack(AckFrame {
                    messages,
                    cumulative,
                    ranges,
                })
            }
            FrameKind::Credit => Frame::Credit(Credit {
                limit: b.get_u64(),
                max_msg_id: b.get_u64(),
            }),
            FrameKind::Ping => Frame::Ping(Ping {
                id: b.get_u64(),
                timestamp_ns: b.get_u64(),
                padding: b.remaining() as u32,
            }),
            FrameKind::Pong => Frame::Pong(Pong {
                id: b.get_u64(),
                timestamp_ns: b.get_u64(),
            }),
            FrameKind::Close => {
                let code = CloseCode::from_u16(b.get_u16());
                let len = b.get_u16() as usize;
                if len != b.len() {
                    return Err(malformed(
                        "reason_len",
                        format!("is {len} but the frame carries {} bytes", b.len()),
                    ));
                }
                let reason = String::from_utf8(b.to_vec())
                    .map_err(|_| malformed("reason", "is not UTF-8".into()))?;
                Frame::Close(Close { code, reason })
            }
        })
    }
}

fn check_magic(found: u32) -> Result<(), ProtocolError> {
    if found == MAGIC {
        Ok(())
    } else {
        Err(ProtocolError::BadMagic {
            found,
            expected: MAGIC,
        })
    }
}

fn take<const N: usize>(b: &mut Bytes) -> [u8; N] {
    let mut out = [0u8; N];
    b.copy_to_slice(&mut out);
    out
}
