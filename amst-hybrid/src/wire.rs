//! The hybrid frames that ride inside transport messages, as a sans-IO codec.
//!
//! When both transport peers advertise `capabilities::HYBRID`, every transport message starts
//! with one kind byte. Integers are big-endian.
//!
//! ```text
//! 0x01 Data       seq:u64 payload..         an application message; a large payload is
//!                                           sent with `Transport::send_parts`, not copied
//! 0x10 Open       "AMHY" vmin:u16 vmax:u16  first message of a new hybrid session
//! 0x11 OpenAck    version:u16 session:[16]
//! 0x12 Attach     session:[16] gen:u64 index:u8 count:u8 mode:u8
//! 0x13 AttachAck  gen:u64
//! 0x14 Retire                               "I send nothing more on this transport"
//! 0x15 Bye        messages:u64              "I sent exactly this many messages; goodbye"
//! 0x16 Reject     reason:utf8..
//! 0x17 ModeRequest mode:u8                  server asks the client to switch
//! ```
//!
//! Sequence numbers are explicit on every message because in hybrid mode two transports
//! carry one sequence, and after a switch the new transport resends what the old one may
//! still deliver.

use amst_core::Mode;
use amst_core::codec::SessionId;
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{Error, Result};

/// The oldest hybrid protocol version this build speaks.
pub const HYBRID_VERSION_MIN: u16 = 1;
/// The newest hybrid protocol version this build speaks.
pub const HYBRID_VERSION_MAX: u16 = 1;

/// Messages up to this size are copied behind their header; larger ones go with
/// `Transport::send_parts`, header and payload in one transport message, the payload
/// untouched.
pub const INLINE_MAX: usize = 16 << 10;

/// Bytes a Data frame adds before the payload: transports must allow messages this much
/// larger than the hybrid limit.
pub const DATA_HEADER_LEN: usize = 9;

/// Opens every Open frame, so that a server can tell a hybrid client from a plain one whose
/// transport does not report capabilities.
pub const OPEN_MAGIC: [u8; 4] = *b"AMHY";

/// Longest Reject reason sent.
pub const MAX_REASON: usize = 1024;

const DATA: u8 = 0x01;
const OPEN: u8 = 0x10;
const OPEN_ACK: u8 = 0x11;
const ATTACH: u8 = 0x12;
const ATTACH_ACK: u8 = 0x13;
const RETIRE: u8 = 0x14;
const BYE: u8 = 0x15;
const REJECT: u8 = 0x16;
const MODE_REQUEST: u8 = 0x17;

/// One hybrid frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HybridFrame {
    /// An application message with its hybrid sequence number.
    Data {
        /// Hybrid sequence number, counting from 0 per direction.
        seq: u64,
        /// The message.
        payload: Bytes,
    },
    /// Opens a hybrid session on the first transport.
    Open {
        /// Oldest hybrid version the client speaks.
        version_min: u16,
        /// Newest hybrid version the client speaks.
        version_max: u16,
    },
    /// Accepts an Open.
    OpenAck {
        /// The version both will speak.
        version: u16,
        /// The hybrid session's id, used to attach later transports.
        session_id: SessionId,
    },
    /// Attaches this transport to a session as lane `index` of `count` in generation `gen`.
    Attach {
        /// The hybrid session.
        session_id: SessionId,
        /// The route generation this transport belongs to; only ever increases.
        generation: u64,
        /// This lane's index in the route (0: low-latency or only, 1: bulk).
        index: u8,
        /// How many lanes the route has (1 or 2).
        count: u8,
        /// The mode the route serves.
        mode: Mode,
    },
    /// The server installed generation `gen`.
    AttachAck {
        /// The generation.
        generation: u64,
    },
    /// The sender puts nothing more on this transport.
    Retire,
    /// The sender is done: it sent exactly `messages` messages.
    Bye {
        /// Total messages sent in the session.
        messages: u64,
    },
    /// A refusal with a human reason.
    Reject {
        /// Why.
        reason: String,
    },
    /// The server asks the client to switch to `mode`.
    ModeRequest {
        /// The requested mode.
        mode: Mode,
    },
}

fn mode_byte(mode: Mode) -> u8 {
    match mode {
        Mode::Datacenter => 0,
        Mode::Internet => 1,
        Mode::Hybrid => 2,
    }
}

fn mode_from(b: u8) -> Result<Mode> {
    Ok(match b {
        0 => Mode::Datacenter,
        1 => Mode::Internet,
        2 => Mode::Hybrid,
        other => return Err(Error::protocol(format!("unknown mode byte {other}"))),
    })
}

impl HybridFrame {
    /// The frame as one transport message. Data frames copy their payload: use
    /// [`encode_data`] for application messages.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(64);
        match self {
            HybridFrame::Data { seq, payload } => {
                b.reserve(9 + payload.len());
                b.put_u8(DATA);
                b.put_u64(*seq);
                b.put_slice(payload);
            }
            HybridFrame::Open {
                version_min,
                version_max,
            } => {
                b.put_u8(OPEN);
                b.put_slice(&OPEN_MAGIC);
                b.put_u16(*version_min);
                b.put_u16(*version_max);
            }
            HybridFrame::OpenAck {
                version,
                session_id,
            } => {
                b.put_u8(OPEN_ACK);
                b.put_u16(*version);
                b.put_slice(session_id);
            }
            HybridFrame::Attach {
                session_id,
                generation,
                index,
                count,
                mode,
            } => {
                b.put_u8(ATTACH);
                b.put_slice(session_id);
                b.put_u64(*generation);
                b.put_u8(*index);
                b.put_u8(*count);
                b.put_u8(mode_byte(*mode));
            }
            HybridFrame::AttachAck { generation } => {
                b.put_u8(ATTACH_ACK);
                b.put_u64(*generation);
            }
            HybridFrame::Retire => b.put_u8(RETIRE),
            HybridFrame::Bye { messages } => {
                b.put_u8(BYE);
                b.put_u64(*messages);
            }
            HybridFrame::Reject { reason } => {
                let mut cut = reason.len().min(MAX_REASON);
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                b.put_u8(REJECT);
                b.put_slice(&reason.as_bytes()[..cut]);
            }
            HybridFrame::ModeRequest { mode } => {
                b.put_u8(MODE_REQUEST);
                b.put_u8(mode_byte(*mode));
            }
        }
        b.freeze()
    }

    /// Parses one transport message. A Data payload is a zero-copy slice of `msg`.
    pub fn decode(mut msg: Bytes) -> Result<HybridFrame> {
        fn need(msg: &Bytes, n: usize, what: &str) -> Result<()> {
            if msg.len() < n {
                Err(Error::protocol(format!(
                    "truncated {what} frame: needed {n} bytes, have {}",
                    msg.len()
                )))
            } else {
                Ok(())
            }
        }
        fn exact(msg: &Bytes, n: usize, what: &str) -> Result<()> {
            if msg.len() != n {
                Err(Error::protocol(format!(
                    "{what} frame has {} body bytes, expected {n}",
                    msg.len()
                )))
            } else {
                Ok(())
            }
        }
        need(&msg, 1, "hybrid")?;
        let kind = msg.get_u8();
        Ok(match kind {
            DATA => {
                need(&msg, 8, "Data")?;
                let seq = msg.get_u64();
                HybridFrame::Data { seq, payload: msg }
            }
            OPEN => {
                exact(&msg, 8, "Open")?;
                if msg[..4] != OPEN_MAGIC {
                    return Err(Error::protocol("Open frame without the hybrid magic"));
                }
                msg.advance(4);
                HybridFrame::Open {
                    version_min: msg.get_u16(),
                    version_max: msg.get_u16(),
                }
            }
            OPEN_ACK => {
                exact(&msg, 18, "OpenAck")?;
                let version = msg.get_u16();
                let mut session_id = [0u8; 16];
                msg.copy_to_slice(&mut session_id);
                HybridFrame::OpenAck {
                    version,
                    session_id,
                }
            }
            ATTACH => {
                exact(&msg, 16 + 8 + 3, "Attach")?;
                let mut session_id = [0u8; 16];
                msg.copy_to_slice(&mut session_id);
                let generation = msg.get_u64();
                let index = msg.get_u8();
                let count = msg.get_u8();
                let mode = mode_from(msg.get_u8())?;
                if count == 0 || count > 2 || index >= count {
                    return Err(Error::protocol(format!(
                        "Attach lane index {index} of {count}: a route has 1 or 2 lanes"
                    )));
                }
                HybridFrame::Attach {
                    session_id,
                    generation,
                    index,
                    count,
                    mode,
                }
            }
            ATTACH_ACK => {
                exact(&msg, 8, "AttachAck")?;
                HybridFrame::AttachAck {
                    generation: msg.get_u64(),
                }
            }
            RETIRE => {
                exact(&msg, 0, "Retire")?;
                HybridFrame::Retire
            }
            BYE => {
                exact(&msg, 8, "Bye")?;
                HybridFrame::Bye {
                    messages: msg.get_u64(),
                }
            }
            REJECT => {
                if msg.len() > MAX_REASON {
                    return Err(Error::protocol(format!(
                        "Reject reason of {} bytes exceeds {MAX_REASON}",
                        msg.len()
                    )));
                }
                HybridFrame::Reject {
                    reason: String::from_utf8_lossy(&msg).into_owned(),
                }
            }
            MODE_REQUEST => {
                exact(&msg, 1, "ModeRequest")?;
                HybridFrame::ModeRequest {
                    mode: mode_from(msg.get_u8())?,
                }
            }
            other => {
                return Err(Error::protocol(format!(
                    "unknown hybrid frame kind {other:#04x}"
                )));
            }
        })
    }
}

/// The transport message that carries message `seq`: the header with the payload copied
/// behind it for small messages, or the header and the payload untouched, to go together
/// with `Transport::send_parts`, for large ones.
pub fn encode_data(seq: u64, payload: &Bytes) -> (Bytes, Option<Bytes>) {
    if payload.len() <= INLINE_MAX {
        let mut b = BytesMut::with_capacity(DATA_HEADER_LEN + payload.len());
        b.put_u8(DATA);
        b.put_u64(seq);
        b.put_slice(payload);
        (b.freeze(), None)
    } else {
        let mut b = BytesMut::with_capacity(DATA_HEADER_LEN);
        b.put_u8(DATA);
        b.put_u64(seq);
        (b.freeze(), Some(payload.clone()))
    }
}

/// The version both ranges contain, or a clear error naming both ranges.
pub fn negotiate(ours: (u16, u16), theirs: (u16, u16)) -> Result<u16> {
    let high = ours.1.min(theirs.1);
    let low = ours.0.max(theirs.0);
    if theirs.0 <= theirs.1 && low <= high {
        Ok(high)
    } else {
        Err(Error::VersionMismatch {
            ours_min: ours.0,
            ours_max: ours.1,
            theirs_min: theirs.0,
            theirs_max: theirs.1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_roundtrips() {
        let frames = [
            HybridFrame::Data {
                seq: 7,
                payload: Bytes::from_static(b"hi"),
            },
            HybridFrame::Open {
                version_min: 1,
                version_max: 3,
            },
            HybridFrame::OpenAck {
                version: 1,
                session_id: [5; 16],
            },
            HybridFrame::Attach {
                session_id: [1; 16],
                generation: 42,
                index: 1,
                count: 2,
                mode: Mode::Hybrid,
            },
            HybridFrame::AttachAck { generation: 42 },
            HybridFrame::Retire,
            HybridFrame::Bye { messages: 10_000 },
            HybridFrame::Reject {
                reason: "unknown session".into(),
            },
            HybridFrame::ModeRequest {
                mode: Mode::Internet,
            },
        ];
        for f in frames {
            assert_eq!(HybridFrame::decode(f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn large_messages_are_not_copied() {
        let big = Bytes::from(vec![3u8; INLINE_MAX + 1]);
        let (head, body) = encode_data(5, &big);
        assert_eq!(head.len(), DATA_HEADER_LEN);
        let body = body.unwrap();
        assert_eq!(
            body.as_ptr(),
            big.as_ptr(),
            "the payload must be the same buffer"
        );
        // What the peer receives: header and payload as one message, one Data frame.
        let mut joined = head.to_vec();
        joined.extend_from_slice(&body);
        assert_eq!(
            HybridFrame::decode(joined.into()).unwrap(),
            HybridFrame::Data {
                seq: 5,
                payload: big
            }
        );
        let (one, none) = encode_data(6, &Bytes::from_static(b"small"));
        assert!(none.is_none());
        assert_eq!(
            HybridFrame::decode(one).unwrap(),
            HybridFrame::Data {
                seq: 6,
                payload: Bytes::from_static(b"small")
            }
        );
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        for (bytes, needle) in [
            (&b""[..], "truncated hybrid"),
            (&[0x99][..], "unknown hybrid frame kind 0x99"),
            (&[DATA, 0, 0][..], "truncated Data"),
            (&[OPEN, 0, 1][..], "Open frame has 2 body bytes"),
            (
                &[OPEN, b'X', b'M', b'H', b'Y', 0, 1, 0, 1][..],
                "without the hybrid magic",
            ),
            (&[MODE_REQUEST, 9][..], "unknown mode byte 9"),
        ] {
            let err = HybridFrame::decode(Bytes::copy_from_slice(bytes))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err} lacks {needle}");
        }
        let mut attach = HybridFrame::Attach {
            session_id: [0; 16],
            generation: 1,
            index: 0,
            count: 1,
            mode: Mode::Datacenter,
        }
        .encode()
        .to_vec();
        attach[26] = 3; // count
        attach[25] = 3; // index
        let err = HybridFrame::decode(attach.into()).unwrap_err().to_string();
        assert!(err.contains("1 or 2 lanes"), "{err}");
    }

    #[test]
    fn negotiation_picks_the_highest_common_and_names_both_ranges() {
        assert_eq!(negotiate((1, 3), (2, 5)).unwrap(), 3);
        assert_eq!(negotiate((1, 1), (1, 1)).unwrap(), 1);
        let err = negotiate((1, 1), (7, 9)).unwrap_err().to_string();
        assert!(err.contains("1..=1") && err.contains("7..=9"), "{err}");
        assert!(negotiate((1, 1), (2, 1)).is_err());
    }
}
