//! The file protocol that `amst send` and `amst serve` speak on top of AMST messages.
//!
//! AMST already delivers messages whole, once and in order; this layer only says what the
//! messages mean. A transfer is:
//!
//! ```text
//! sender                                          receiver
//!   Header {name, size?, kind}             ->
//!   Data (bytes) ... Data (bytes)           ->     hash + write as they arrive
//!   Trailer {bytes, sha256}                 ->     compare
//!                                          <-      Receipt {ok, bytes, sha256, error?}
//! ```
//!
//! The receiver may send its Receipt early, with `ok: false`, when it cannot go on (a full
//! disk); the sender then stops. The sender sends `Abort {reason}` instead of a Trailer when it
//! cannot go on (a read error). The first byte of every message is its type. Header and Receipt carry small
//! JSON objects, capped at [`MAX_CONTROL_LEN`], so a peer cannot make us parse or allocate
//! without bound; Data is raw bytes after the type byte.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// The version of this file protocol, sent in every Header.
pub const FILE_PROTOCOL_VERSION: u16 = 1;

/// Longest Header, Receipt or Abort accepted.
pub const MAX_CONTROL_LEN: usize = 64 * 1024;

const TAG_HEADER: u8 = 1;
const TAG_DATA: u8 = 2;
const TAG_TRAILER: u8 = 3;
const TAG_RECEIPT: u8 = 4;
const TAG_ABORT: u8 = 5;

/// What a transfer carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A file; the receiver stores it unless it runs with `--discard`.
    File,
    /// Generated test data (`amst send --size`); the receiver verifies and discards it.
    Generated,
}

/// Announces a transfer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// [`FILE_PROTOCOL_VERSION`] of the sender.
    pub version: u16,
    /// The file name as the sender knows it; the receiver sanitises it.
    pub name: String,
    /// The size, when known in advance (not for a pipe). Used for progress only: the
    /// receiver never allocates by it.
    pub size: Option<u64>,
    /// File or generated data.
    pub kind: Kind,
}

/// Ends a transfer with what the receiver must have seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    /// Data bytes sent.
    pub bytes: u64,
    /// SHA-256 of those bytes.
    pub sha256: [u8; 32],
}

/// The receiver's verdict on a transfer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The bytes arrived intact and (for a file) are stored.
    pub ok: bool,
    /// Data bytes received.
    pub bytes: u64,
    /// SHA-256 of the bytes received, lower-case hex.
    pub sha256: String,
    /// Where the file was stored, relative to the receiver's output directory.
    pub stored_as: Option<String>,
    /// Why `ok` is false.
    pub error: Option<String>,
    /// What kind of failure (`disk`, `integrity`, `network`, ...) when `ok` is false, so that
    /// the sender exits with the same code as the receiver would.
    pub error_kind: Option<String>,
}

/// One message of the file protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Announces a transfer.
    Header(Header),
    /// A piece of the data.
    Data(Bytes),
    /// Ends a transfer.
    Trailer(Trailer),
    /// The receiver's verdict.
    Receipt(Receipt),
    /// Gives up on the transfer, with a reason for the other side's user.
    Abort(String),
}

/// A message that does not belong to this protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// An empty message.
    #[error("empty message")]
    Empty,
    /// A type byte this version does not define.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// A control message above [`MAX_CONTROL_LEN`].
    #[error("control message of {0} bytes exceeds the limit of {MAX_CONTROL_LEN}")]
    TooLarge(usize),
    /// A body that does not parse.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

impl Message {
    /// The message as it goes on the wire.
    pub fn encode(&self) -> Bytes {
        match self {
            Message::Header(h) => json(TAG_HEADER, h),
            Message::Receipt(r) => json(TAG_RECEIPT, r),
            Message::Data(d) => {
                let mut b = BytesMut::with_capacity(1 + d.len());
                b.put_u8(TAG_DATA);
                b.put_slice(d);
                b.freeze()
            }
            Message::Trailer(t) => {
                let mut b = BytesMut::with_capacity(1 + 8 + 32);
                b.put_u8(TAG_TRAILER);
                b.put_u64(t.bytes);
                b.put_slice(&t.sha256);
                b.freeze()
            }
            Message::Abort(reason) => {
                let mut r = reason.as_str();
                if r.len() > MAX_CONTROL_LEN - 1 {
                    let mut cut = MAX_CONTROL_LEN - 1;
                    while !r.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    r = &r[..cut];
                }
                let mut b = BytesMut::with_capacity(1 + r.len());
                b.put_u8(TAG_ABORT);
                b.put_slice(r.as_bytes());
                b.freeze()
            }
        }
    }

    /// Parses a message; Data keeps a zero-copy slice of `msg`.
    pub fn decode(msg: Bytes) -> Result<Message, DecodeError> {
        let Some(&tag) = msg.first() else {
            return Err(DecodeError::Empty);
        };
        if tag != TAG_DATA && msg.len() > MAX_CONTROL_LEN {
            return Err(DecodeError::TooLarge(msg.len()));
        }
        let body = &msg[1..];
        match tag {
            TAG_DATA => Ok(Message::Data(msg.slice(1..))),
            TAG_HEADER => serde_json::from_slice(body)
                .map(Message::Header)
                .map_err(|e| malformed("header", e)),
            TAG_RECEIPT => serde_json::from_slice(body)
                .map(Message::Receipt)
                .map_err(|e| malformed("receipt", e)),
            TAG_TRAILER => {
                if body.len() != 40 {
                    return Err(malformed(
                        "trailer",
                        format!("{} bytes, expected 40", body.len()),
                    ));
                }
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&body[..8]);
                let mut sha256 = [0u8; 32];
                sha256.copy_from_slice(&body[8..]);
                Ok(Message::Trailer(Trailer {
                    bytes: u64::from_be_bytes(bytes),
                    sha256,
                }))
            }
            TAG_ABORT => Ok(Message::Abort(String::from_utf8_lossy(body).into_owned())),
            other => Err(DecodeError::UnknownType(other)),
        }
    }
}

/// A Data message built in place: a buffer with the type byte already written, so that a
/// file can be read straight into it with no copy afterwards.
pub fn data_buffer(capacity: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(1 + capacity);
    b.put_u8(TAG_DATA);
    b
}

fn json<T: Serialize>(tag: u8, value: &T) -> Bytes {
    let mut out = vec![tag];
    serde_json::to_writer(&mut out, value).expect("plain structs always serialise");
    Bytes::from(out)
}

fn malformed(what: &'static str, reason: impl ToString) -> DecodeError {
    DecodeError::Malformed {
        what,
        reason: reason.to_string(),
    }
}

/// Lower-case hex of a digest (amst-core's, re-exported for the report and the tests).
pub use amst_core::util::hex;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_roundtrips() {
        let msgs = [
            Message::Header(Header {
                version: FILE_PROTOCOL_VERSION,
                name: "a b/ü.bin".into(),
                size: Some(12),
                kind: Kind::File,
            }),
            Message::Header(Header {
                version: 1,
                name: "stdin".into(),
                size: None,
                kind: Kind::Generated,
            }),
            Message::Data(Bytes::from_static(b"\x01\x02payload")),
            Message::Data(Bytes::new()),
            Message::Trailer(Trailer {
                bytes: u64::MAX - 3,
                sha256: [7; 32],
            }),
            Message::Receipt(Receipt {
                ok: false,
                bytes: 5,
                sha256: hex(&[0xab; 32]),
                stored_as: None,
                error: Some("disk full".into()),
                error_kind: Some("disk".into()),
            }),
            Message::Abort("the receiver's disk is full".into()),
        ];
        for m in msgs {
            assert_eq!(Message::decode(m.encode()).unwrap(), m);
        }
        let mut b = data_buffer(3);
        b.extend_from_slice(b"xyz");
        assert_eq!(
            Message::decode(b.freeze()).unwrap(),
            Message::Data(Bytes::from_static(b"xyz"))
        );
    }

    #[test]
    fn rejects_bad_input_without_panicking() {
        assert_eq!(Message::decode(Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(
            Message::decode(Bytes::from_static(&[9, 1, 2])),
            Err(DecodeError::UnknownType(9))
        );
        assert!(matches!(
            Message::decode(Bytes::from_static(&[TAG_TRAILER, 1, 2])),
            Err(DecodeError::Malformed {
                what: "trailer",
                ..
            })
        ));
        assert!(matches!(
            Message::decode(Bytes::from_static(b"\x01{\"name\":")),
            Err(DecodeError::Malformed { what: "header", .. })
        ));
        let mut big = vec![TAG_HEADER];
        big.resize(MAX_CONTROL_LEN + 1, b' ');
        assert_eq!(
            Message::decode(Bytes::from(big)),
            Err(DecodeError::TooLarge(MAX_CONTROL_LEN + 1))
        );
        assert_eq!(hex(&[0, 0xff, 0x10]), "00ff10");
    }
}
