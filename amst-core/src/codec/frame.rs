//! The frames of AMST's wire protocol, as plain values.

use std::fmt;

use crate::ProtocolError;
use bytes::Bytes;

/// A session's 128-bit random identifier. All zeroes in a Hello asks for a new session.
pub type SessionId = [u8; 16];
/// A handshake nonce.
pub type Nonce = [u8; 32];
/// An HMAC-SHA256 tag.
pub type Mac = [u8; 32];

/// Capability bits carried in Hello and HelloAck; the session uses their intersection.
pub mod capabilities {
    /// Streams are wrapped in TLS after the handshake.
    pub const TLS: u64 = 1 << 0;
    /// The peer can also run the QUIC transport.
    pub const QUIC: u64 = 1 << 1;
    /// The peer can also run the RDMA transport.
    pub const RDMA: u64 = 1 << 2;
    /// The peer runs the hybrid manager's message numbering on top of this transport.
    pub const HYBRID: u64 = 1 << 3;
    /// Bits 32 and up belong to the transport that sent the Hello (amst-quic uses bit 32
    /// for a Hello sent as 0-RTT early data); bits below 32 mean the same on every transport.
    pub const TRANSPORT_SPECIFIC: u64 = !0 << 32;
}

/// The first frame on every connection, from the connecting side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The oldest protocol version the sender speaks.
    pub version_min: u16,
    /// The newest protocol version the sender speaks.
    pub version_max: u16,
    /// The session to join, or all zeroes for a new one.
    pub session_id: SessionId,
    /// This connection's index within the session.
    pub stream_index: u16,
    /// How many connections the sender intends to open.
    pub stream_count: u16,
    /// Capability bits, see [`capabilities`].
    pub capabilities: u64,
    /// The client's fresh random nonce.
    pub nonce: Nonce,
}

/// The server's answer: the chosen version, the session and its proof of the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloAck {
    /// The version both sides will speak.
    pub version: u16,
    /// The oldest protocol version the server accepts. Both MACs cover both sides' ranges, so
    /// a man in the middle cannot narrow either range to force an older version.
    pub version_min: u16,
    /// The newest protocol version the server accepts.
    pub version_max: u16,
    /// The session this connection belongs to.
    pub session_id: SessionId,
    /// The server's capability bits.
    pub capabilities: u64,
    /// The server's fresh random nonce.
    pub nonce: Nonce,
    /// HMAC proving the server holds the key, over both nonces and the session parameters.
    pub mac: Mac,
}

/// The client's proof of the key; the server accepts no data before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthProof {
    /// HMAC over both nonces and the session parameters, with the client's label.
    pub mac: Mac,
}

/// A piece of one message, placed in the session's byte sequence.
///
/// Messages are laid end to end in one byte sequence per session; `session_offset` is where
/// this chunk starts in it. Acks and credit speak in those offsets.
#[derive(Clone, PartialEq, Eq)]
pub struct DataChunk {
    /// Offset of the first payload byte in the session byte sequence.
    pub session_offset: u64,
    /// The message this chunk belongs to; ids count up from 0 in send order.
    pub msg_id: u64,
    /// Offset of the first payload byte within the message.
    pub msg_offset: u64,
    /// Total length of the message.
    pub msg_len: u64,
    /// CRC32C of `payload`.
    pub crc: u32,
    /// The bytes.
    pub payload: Bytes,
}

impl DataChunk {
    /// A chunk with its CRC32C computed over `payload`.
    pub fn new(
        session_offset: u64,
        msg_id: u64,
        msg_offset: u64,
        msg_len: u64,
        payload: Bytes,
    ) -> Self {
        let crc = crate::crc32c(&payload);
        DataChunk {
            session_offset,
            msg_id,
            msg_offset,
            msg_len,
            crc,
            payload,
        }
    }

    /// Computes the CRC32C of the payload into `crc` (for chunks taken with
    /// [`SendBuffer::next_chunk_unsealed`](crate::SendBuffer::next_chunk_unsealed)).
    pub fn seal(&mut self) {
        self.crc = crate::crc32c(&self.payload);
    }

    /// The end of this chunk in the session byte sequence.
    pub fn session_end(&self) -> u64 {
        self.session_offset + self.payload.len() as u64
    }

    /// Whether the payload still matches the CRC.
    pub fn crc_ok(&self) -> bool {
        crate::crc32c(&self.payload) == self.crc
    }
}

/// A Data frame's fields without its payload: what a reader knows once the header has
/// arrived, enough to place the payload in its message before it is read
/// ([`Decoder::data_header`](super::Decoder::data_header)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHeader {
    /// Offset of the first payload byte in the session byte sequence.
    pub session_offset: u64,
    /// The message this chunk belongs to.
    pub msg_id: u64,
    /// Offset of the first payload byte within the message.
    pub msg_offset: u64,
    /// Total length of the message.
    pub msg_len: u64,
    /// Payload bytes that follow the header.
    pub chunk_len: u32,
    /// CRC32C of the payload.
    pub crc: u32,
}

impl DataHeader {
    /// The end of the chunk in the session byte sequence.
    pub fn session_end(&self) -> u64 {
        self.session_offset + self.chunk_len as u64
    }

    /// The error for a payload whose CRC32C came out as `actual`.
    pub fn corrupt(&self, actual: u32) -> ProtocolError {
        ProtocolError::ChunkCorrupt {
            msg_id: self.msg_id,
            msg_offset: self.msg_offset,
            expected: self.crc,
            actual,
        }
    }
}

impl DataChunk {
    /// The chunk's fields without its payload.
    pub fn header(&self) -> DataHeader {
        DataHeader {
            session_offset: self.session_offset,
            msg_id: self.msg_id,
            msg_offset: self.msg_offset,
            msg_len: self.msg_len,
            chunk_len: self.payload.len() as u32,
            crc: self.crc,
        }
    }
}

impl fmt::Debug for DataChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataChunk")
            .field("session_offset", &self.session_offset)
            .field("msg_id", &self.msg_id)
            .field("msg_offset", &self.msg_offset)
            .field("msg_len", &self.msg_len)
            .field("crc", &format_args!("{:#010x}", self.crc))
            .field("len", &self.payload.len())
            .finish()
    }
}

/// A half-open range `[start, end)` of the session byte sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// Cumulative plus selective acknowledgement of session bytes, and of whole messages.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AckFrame {
    /// The first `messages` messages have arrived whole.
    pub messages: u64,
    /// Every byte below this offset has been received.
    pub cumulative: u64,
    /// Ranges above `cumulative` also received, ascending and disjoint.
    pub ranges: Vec<ByteRange>,
}

/// The receiver lets the sender send session bytes below `limit`, of messages whose ids are
/// below `max_msg_id`. Both are absolute and never decrease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credit {
    /// Absolute session offset.
    pub limit: u64,
    /// Absolute message id.
    pub max_msg_id: u64,
}

/// An RTT probe; `padding` bytes (discarded) make a probe train measure bandwidth too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ping {
    /// Echoed in the Pong.
    pub id: u64,
    /// Sender's timestamp in nanoseconds on its own clock; echoed unchanged.
    pub timestamp_ns: u64,
    /// Bytes of zero padding after the fields.
    pub padding: u32,
}

/// The answer to a [`Ping`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pong {
    /// The Ping's id.
    pub id: u64,
    /// The Ping's timestamp, unchanged.
    pub timestamp_ns: u64,
}

/// Why a session or stream is being closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseCode {
    /// Everything was delivered; goodbye.
    Normal,
    /// The peer failed authentication.
    AuthFailed,
    /// The peer broke the protocol.
    ProtocolError,
    /// A limit was hit (sessions, streams, message size).
    LimitExceeded,
    /// A chunk failed its CRC.
    Corrupt,
    /// The application aborted (for example, the receiver's disk is full).
    Aborted,
    /// Only this stream closes; the session goes on.
    StreamClosed,
    /// A code this version does not know.
    Other(u16),
}

impl CloseCode {
    /// The code on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            CloseCode::Normal => 0,
            CloseCode::AuthFailed => 1,
            CloseCode::ProtocolError => 2,
            CloseCode::LimitExceeded => 3,
            CloseCode::Corrupt => 4,
            CloseCode::Aborted => 5,
            CloseCode::StreamClosed => 6,
            CloseCode::Other(c) => c,
        }
    }

    /// The code from the wire.
    pub fn from_u16(code: u16) -> Self {
        match code {
            0 => CloseCode::Normal,
            1 => CloseCode::AuthFailed,
            2 => CloseCode::ProtocolError,
            3 => CloseCode::LimitExceeded,
            4 => CloseCode::Corrupt,
            5 => CloseCode::Aborted,
            6 => CloseCode::StreamClosed,
            c => CloseCode::Other(c),
        }
    }
}

/// Closes a stream or the whole session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Close {
    /// Why.
    pub code: CloseCode,
    /// A human explanation, UTF-8.
    pub reason: String,
}

impl Close {
    /// Longest reason sent; longer ones are cut at a character boundary.
    pub const MAX_REASON: usize = 1024;

    /// A Close whose reason fits the default limit.
    pub fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        let mut reason = reason.into();
        if reason.len() > Self::MAX_REASON {
            let mut cut = Self::MAX_REASON;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        Close { code, reason }
    }
}

/// Every frame of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloAck`].
    HelloAck(HelloAck),
    /// See [`AuthProof`].
    Auth(AuthProof),
    /// See [`DataChunk`].
    Data(DataChunk),
    /// See [`AckFrame`].
    Ack(AckFrame),
    /// See [`Credit`].
    Credit(Credit),
    /// See [`Ping`].
    Ping(Ping),
    /// See [`Pong`].
    Pong(Pong),
    /// See [`Close`].
    Close(Close),
}

impl Frame {
    /// This frame's kind.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello(_) => FrameKind::Hello,
            Frame::HelloAck(_) => FrameKind::HelloAck,
            Frame::Auth(_) => FrameKind::Auth,
            Frame::Data(_) => FrameKind::Data,
            Frame::Ack(_) => FrameKind::Ack,
            Frame::Credit(_) => FrameKind::Credit,
            Frame::Ping(_) => FrameKind::Ping,
            Frame::Pong(_) => FrameKind::Pong,
            Frame::Close(_) => FrameKind::Close,
        }
    }
}

/// The type byte of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// 0x01
    Hello = 0x01,
    /// 0x02
    HelloAck = 0x02,
    /// 0x03
    Auth = 0x03,
    /// 0x10
    Data = 0x10,
    /// 0x11
    Ack = 0x11,
    /// 0x12
    Credit = 0x12,
    /// 0x20
    Ping = 0x20,
    /// 0x21
    Pong = 0x21,
    /// 0x30
    Close = 0x30,
}

impl FrameKind {
    /// The kind for a type byte, if this version defines it.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => FrameKind::Hello,
            0x02 => FrameKind::HelloAck,
            0x03 => FrameKind::Auth,
            0x10 => FrameKind::Data,
            0x11 => FrameKind::Ack,
            0x12 => FrameKind::Credit,
            0x20 => FrameKind::Ping,
            0x21 => FrameKind::Pong,
            0x30 => FrameKind::Close,
            _ => return None,
        })
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
