//! The codec: every frame survives a roundtrip in any split, and every kind of bad input is
//! rejected with its own error before anything is allocated for it.

use amst_core::ProtocolError;
use amst_core::codec::*;
use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<u16>(),
            any::<u64>(),
            any::<[u8; 32]>()
        )
            .prop_map(|(a, b, s, i, c, caps, n)| Frame::Hello(Hello {
                version_min: a,
                version_max: b,
                session_id: s,
                stream_index: i,
                stream_count: c,
                capabilities: caps,
                nonce: n,
            })),
        (
            any::<(u16, u16, u16)>(),
            any::<[u8; 16]>(),
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>()
        )
            .prop_map(|((v, lo, hi), s, caps, n, m)| Frame::HelloAck(HelloAck {
                version: v,
                version_min: lo,
                version_max: hi,
                session_id: s,
                capabilities: caps,
                nonce: n,
                mac: m,
            })),
        any::<[u8; 32]>().prop_map(|mac| Frame::Auth(AuthProof { mac })),
        (
            0u64..1 << 40,
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..3000),
            0u64..5000
        )
            .prop_map(|(base, id, payload, extra)| {
                let len = payload.len() as u64;
                let msg_offset = extra.min(1 << 20);
                Frame::Data(DataChunk::new(
                    base + msg_offset,
                    id as u64,
                    msg_offset,
                    msg_offset + len + extra,
                    Bytes::from(payload),
                ))
            }),
        (
            any::<u32>(),
            0u64..1 << 40,
            proptest::collection::vec((1u64..1000, 1u64..1000), 0..20)
        )
            .prop_map(|(messages, cumulative, gaps)| {
                let mut at = cumulative;
                let ranges = gaps
                    .into_iter()
                    .map(|(gap, len)| {
                        let start = at + gap;
                        at = start + len;
                        ByteRange { start, end: at }
                    })
                    .collect();
                Frame::Ack(AckFrame {
                    messages: messages as u64,
                    cumulative,
                    ranges,
                })
            }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(limit, max_msg_id)| Frame::Credit(Credit { limit, max_msg_id })),
        (any::<u64>(), any::<u64>(), 0u32..2000).prop_map(|(id, timestamp_ns, padding)| {
            Frame::Ping(Ping {
                id,
                timestamp_ns,
                padding,
            })
        }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(id, timestamp_ns)| Frame::Pong(Pong { id, timestamp_ns })),
        (any::<u16>(), ".{0,40}")
            .prop_map(|(code, reason)| Frame::Close(Close::new(CloseCode::from_u16(code), reason))),
    ]
}

proptest! {
    #[test]
    fn frames_roundtrip_whatever_the_read_boundaries(
        frames in proptest::collection::vec(arb_frame(), 1..8),
        cuts in proptest::collection::vec(1usize..600, 1..40),
    ) {
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        let wire = wire.freeze();
        let decoder = Decoder::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut pos = 0;
        let mut cuts = cuts.into_iter().cycle();
        while pos < wire.len() {
            let n = cuts.next().unwrap().min(wire.len() - pos);
            buf.extend_from_slice(&wire[pos..pos + n]);
            pos += n;
            while let Some(f) = decoder.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        prop_assert_eq!(decoder.decode_eof(&mut buf).unwrap(), None);
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let decoder = Decoder::default();
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decoder.decode(&mut buf) {}
        let _ = decoder.decode_eof(&mut buf);
    }
}

fn hello_bytes() -> BytesMut {
    let mut b = BytesMut::new();
    Frame::Hello(Hello {
        version_min: 1,
        version_max: 1,
        session_id: [0; 16],
        stream_index: 0,
        stream_count: 1,
        capabilities: 0,
        nonce: [7; 32],
    })
    .encode(&mut b);
    b
}

#[test]
fn bad_magic_is_its_own_error() {
    let mut b = hello_bytes();
    b[5] = b'X';
    let err = Decoder::default().decode(&mut b).unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::BadMagic {
                expected: MAGIC,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("magic"));
}

#[test]
fn oversized_frame_is_rejected_from_its_header_alone() {
    // Only the 5-byte header: a 3 GiB announcement must fail now, not wait for the body.
    let mut b = BytesMut::new();
    b.put_u8(FrameKind::Data as u8);
    b.put_u32(3 << 30);
    let err = Decoder::default().decode(&mut b).unwrap_err();
    match err {
        ProtocolError::FrameTooLarge {
            kind: FrameKind::Data,
            len,
            limit,
        } => {
            assert_eq!(len, 3 << 30);
            assert!(limit < 8 << 20);
        }
        other => panic!("expected FrameTooLarge, got {other}"),
    }
    assert!(
        b.capacity() < 1 << 20,
        "the decoder must not reserve for the announced body"
    );
}

#[test]
fn fixed_size_frames_with_the_wrong_length_are_rejected() {
    let mut b = BytesMut::new();
    b.put_u8(FrameKind::Credit as u8);
    b.put_u32(64);
    b.put_bytes(0, 64);
    assert!(matches!(
        Decoder::default().decode(&mut b),
        Err(ProtocolError::FrameTooLarge {
            kind: FrameKind::Credit,
            ..
        })
    ));
    let mut b = BytesMut::new();
    b.put_u8(FrameKind::Credit as u8);
    b.put_u32(3);
    b.put_bytes(0, 3);
    assert!(matches!(
        Decoder::default().decode(&mut b),
        Err(ProtocolError::Truncated {
            kind: FrameKind::Credit,
            ..
        })
    ));
}

#[test]
fn truncated_frame_at_eof_is_reported_with_sizes() {
    let mut b = hello_bytes();
    b.truncate(20);
    let decoder = Decoder::default();
    assert_eq!(
        decoder.decode(&mut b).unwrap(),
        None,
        "mid-stream it just waits"
    );
    match decoder.decode_eof(&mut b).unwrap_err() {
        ProtocolError::Truncated {
            kind: FrameKind::Hello,
            needed,
            have,
        } => {
            assert_eq!(have, 20);
            assert!(needed > have);
        }
        other => panic!("expected Truncated, got {other}"),
    }
}

#[test]
fn bad_crc_names_the_chunk() {
    let chunk = DataChunk::new(100, 3, 100, 1000, Bytes::from_static(b"some payload"));
    let mut b = BytesMut::new();
    Frame::Data(chunk).encode(&mut b);
    let last = b.len() - 1;
    b[last] ^= 0x40;
    match Decoder::default().decode(&mut b).unwrap_err() {
        ProtocolError::ChunkCorrupt {
            msg_id: 3,
            msg_offset: 100,
            expected,
            actual,
        } => assert_ne!(expected, actual),
        other => panic!("expected ChunkCorrupt, got {other}"),
    }
}

#[test]
fn unknown_frame_type_is_rejected() {
    let mut b = BytesMut::from(&[0xEEu8, 0, 0, 0, 0][..]);
    assert_eq!(
        Decoder::default().decode(&mut b),
        Err(ProtocolError::UnknownFrameType(0xEE))
    );
}

#[test]
fn data_fields_are_checked_against_limits_and_each_other() {
    let limits = Limits {
        max_message: 1000,
        ..Limits::default()
    };
    let decoder = Decoder::new(limits);
    let too_big = DataChunk::new(0, 1, 0, 5000, Bytes::from_static(b"abc"));
    let mut b = Frame::Data(too_big).to_bytes().into();
    assert!(matches!(
        decoder.decode(&mut b),
        Err(ProtocolError::MessageTooLarge {
            msg_id: 1,
            len: 5000,
            limit: 1000
        })
    ));

    let past_end = DataChunk::new(10, 1, 10, 12, Bytes::from_static(b"abc"));
    let mut b = Frame::Data(past_end).to_bytes().into();
    assert!(matches!(
        decoder.decode(&mut b),
        Err(ProtocolError::Malformed {
            field: "msg_offset",
            ..
        })
    ));

    // chunk_len disagrees with the frame length.
    let ok = DataChunk::new(0, 1, 0, 3, Bytes::from_static(b"abc"));
    let mut b: BytesMut = Frame::Data(ok).to_bytes().into();
    b[5 + 32 + 3] = 9;
    assert!(matches!(
        decoder.decode(&mut b),
        Err(ProtocolError::Malformed {
            field: "chunk_len",
            ..
        })
    ));
}

#[test]
fn ack_ranges_must_be_ordered_and_within_limits() {
    let bad = AckFrame {
        messages: 0,
        cumulative: 100,
        ranges: vec![
            ByteRange {
                start: 300,
                end: 400,
            },
            ByteRange {
                start: 200,
                end: 250,
            },
        ],
    };
    let mut b = Frame::Ack(bad).to_bytes().into();
    assert!(matches!(
        Decoder::default().decode(&mut b),
        Err(ProtocolError::Malformed {
            field: "ranges",
            ..
        })
    ));
    let many = AckFrame {
        messages: 0,
        cumulative: 0,
        ranges: (0..10)
            .map(|i| ByteRange {
                start: 10 * i + 1,
                end: 10 * i + 5,
            })
            .collect(),
    };
    let limits = Limits {
        max_ack_ranges: 4,
        ..Limits::default()
    };
    let mut b = Frame::Ack(many).to_bytes().into();
    assert!(matches!(
        Decoder::new(limits).decode(&mut b),
        Err(ProtocolError::FrameTooLarge {
            kind: FrameKind::Ack,
            ..
        })
    ));
}

#[test]
fn close_reasons_are_cut_to_fit_and_must_be_utf8() {
    let long = Close::new(CloseCode::Aborted, "é".repeat(2000));
    assert!(long.reason.len() <= Close::MAX_REASON);
    let mut b: BytesMut = Frame::Close(long.clone()).to_bytes().into();
    assert_eq!(
        Decoder::default().decode(&mut b).unwrap(),
        Some(Frame::Close(long))
    );

    let mut b: BytesMut = Frame::Close(Close::new(CloseCode::Normal, "ok"))
        .to_bytes()
        .into();
    let n = b.len();
    b[n - 1] = 0xFF;
    assert!(matches!(
        Decoder::default().decode(&mut b),
        Err(ProtocolError::Malformed {
            field: "reason",
            ..
        })
    ));
}

fn psk(k: &[u8]) -> Psk {
    Psk::new(k).unwrap()
}

#[test]
fn handshake_authenticates_both_sides() {
    let (client, hello) = ClientHandshake::new(
        psk(b"correct horse"),
        [1; 32],
        [0; 16],
        0,
        4,
        capabilities::TLS | capabilities::QUIC,
    );
    let server = ServerHandshake::new(psk(b"correct horse"), [2; 32], capabilities::QUIC);
    let (ack, awaiting) = server.on_hello(&hello, [9; 16]).unwrap();
    let (proof, client_side) = client.on_hello_ack(&ack).unwrap();
    let server_side = awaiting.on_auth(&proof).unwrap();
    assert_eq!(client_side, server_side);
    assert_eq!(server_side.session_id, [9; 16]);
    assert_eq!(server_side.capabilities, capabilities::QUIC);
    assert_eq!(server_side.stream_count, 4);
}

#[test]
fn wrong_key_fails_on_both_sides() {
    // The server has the wrong key: the client refuses the server's proof.
    let (client, hello) = ClientHandshake::new(psk(b"client key"), [1; 32], [0; 16], 0, 1, 0);
    let server = ServerHandshake::new(psk(b"server key"), [2; 32], 0);
    let (ack, _) = server.on_hello(&hello, [3; 16]).unwrap();
    assert_eq!(
        client.on_hello_ack(&ack).unwrap_err(),
        ProtocolError::AuthFailed
    );

    // The client has the wrong key but lies about having verified: the server refuses it.
    let (_, hello) = ClientHandshake::new(psk(b"client key"), [1; 32], [0; 16], 0, 1, 0);
    let server = ServerHandshake::new(psk(b"server key"), [2; 32], 0);
    let (_, awaiting) = server.on_hello(&hello, [3; 16]).unwrap();
    assert_eq!(
        awaiting.on_auth(&AuthProof { mac: [0; 32] }).unwrap_err(),
        ProtocolError::AuthFailed
    );
}

#[test]
fn a_proof_for_one_session_does_not_open_another() {
    let key = b"shared secret!";
    let (client, hello) = ClientHandshake::new(psk(key), [1; 32], [0; 16], 0, 1, 0);
    let (ack, _) = ServerHandshake::new(psk(key), [2; 32], 0)
        .on_hello(&hello, [5; 16])
        .unwrap();
    let (proof, _) = client.on_hello_ack(&ack).unwrap();
    // Replay the proof against a handshake that put the stream in another session.
    let (_, awaiting) = ServerHandshake::new(psk(key), [2; 32], 0)
        .on_hello(&hello, [6; 16])
        .unwrap();
    assert_eq!(
        awaiting.on_auth(&proof).unwrap_err(),
        ProtocolError::AuthFailed
    );
}

#[test]
fn versions_negotiate_to_the_highest_common_and_reject_disjoint_ranges() {
    assert_eq!(negotiate_version((1, 3), (2, 5)).unwrap(), 3);
    assert_eq!(negotiate_version((1, 1), (1, 1)).unwrap(), 1);
    let err = negotiate_version((1, 1), (2, 4)).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::VersionMismatch {
            ours_min: 1,
            ours_max: 1,
            theirs_min: 2,
            theirs_max: 4
        }
    );
    assert!(err.to_string().contains("1..=1") && err.to_string().contains("2..=4"));

    let (_, hello) =
        ClientHandshake::with_versions(psk(b"k1234567"), [1; 32], [0; 16], 0, 1, 0, (7, 9));
    let server = ServerHandshake::new(psk(b"k1234567"), [2; 32], 0);
    assert!(matches!(
        server.on_hello(&hello, [1; 16]),
        Err(ProtocolError::VersionMismatch { .. })
    ));
}

#[test]
fn short_keys_and_bad_stream_indices_are_refused() {
    let err = Psk::new(b"short").unwrap_err().to_string();
    assert!(err.contains("psk") && err.contains("at least 8"), "{err}");
    let (_, hello) = ClientHandshake::new(psk(b"k1234567"), [1; 32], [0; 16], 4, 4, 0);
    let server = ServerHandshake::new(psk(b"k1234567"), [2; 32], 0);
    assert!(matches!(
        server.on_hello(&hello, [1; 16]),
        Err(ProtocolError::Malformed {
            field: "stream_index",
            ..
        })
    ));
}

#[test]
fn a_version_range_narrowed_in_transit_fails_authentication() {
    let key = b"downgrade tests";
    let server = || ServerHandshake::with_versions(psk(key), [2; 32], 0, (1, 3));
    let client = || ClientHandshake::with_versions(psk(key), [1; 32], [0; 16], 0, 1, 0, (1, 3));

    // A man in the middle lowers the client's newest version to force version 1: the
    // server, seeing 1..=1, agrees on 1, and the client refuses the server's proof.
    let (hs, mut hello) = client();
    hello.version_max = 1;
    let (ack, _) = server().on_hello(&hello, [4; 16]).unwrap();
    assert_eq!(ack.version, 1);
    let err = hs.on_hello_ack(&ack).unwrap_err();
    assert_eq!(err, ProtocolError::AuthFailed);
    let msg = err.to_string();
    assert!(
        msg.contains("altered in transit") && msg.contains("downgrade"),
        "the error should say the handshake may have been tampered with: {msg}"
    );

    // The range itself is covered, not only the version chosen: narrowing the client's
    // oldest version leaves the choice at 3 and still fails.
    let (hs, mut hello) = client();
    hello.version_min = 2;
    let (ack, _) = server().on_hello(&hello, [4; 16]).unwrap();
    assert_eq!(ack.version, 3);
    assert_eq!(
        hs.on_hello_ack(&ack).unwrap_err(),
        ProtocolError::AuthFailed
    );

    // Narrowing the server's advertised range in the HelloAck fails the same way.
    let (hs, hello) = client();
    let (mut ack, _) = server().on_hello(&hello, [4; 16]).unwrap();
    ack.version_min = 3;
    assert_eq!(
        hs.on_hello_ack(&ack).unwrap_err(),
        ProtocolError::AuthFailed
    );

    // And the server refuses a client proof made over another range than it saw: the
    // honest exchange's proof does not open a session whose Hello was narrowed.
    let (hs, hello) = client();
    let (ack, _) = server().on_hello(&hello, [4; 16]).unwrap();
    let (proof, _) = hs.on_hello_ack(&ack).unwrap();
    let mut narrowed = hello.clone();
    narrowed.version_min = 2;
    let (_, awaiting) = server().on_hello(&narrowed, [4; 16]).unwrap();
    assert_eq!(
        awaiting.on_auth(&proof).unwrap_err(),
        ProtocolError::AuthFailed
    );

    // Untampered, both sides agree on the highest common version.
    let (hs, hello) = client();
    let (ack, awaiting) = server().on_hello(&hello, [4; 16]).unwrap();
    let (proof, est) = hs.on_hello_ack(&ack).unwrap();
    assert_eq!(est.version, 3);
    assert_eq!(awaiting.on_auth(&proof).unwrap(), est);
}
