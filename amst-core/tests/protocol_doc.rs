//! PROTOCOL.md's hex examples of amst-core frames and of the handshake are decoded here and
//! their documented fields asserted, so the document cannot drift from the codec. The
//! handshake's MACs are recomputed from the documented key and nonces. The examples are
//! read with `amst_core::protocol_doc` (feature `protocol-doc`), as in the other crates.

use amst_core::codec::*;
use bytes::BytesMut;

/// The examples of PROTOCOL.md, by name.
fn examples() -> std::collections::BTreeMap<String, Vec<u8>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md");
    amst_core::protocol_doc::read_examples(path, "").unwrap_or_else(|e| panic!("{e}"))
}

fn decode_one(name: &str, bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let frame = Decoder::default()
        .decode(&mut buf)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .unwrap_or_else(|| panic!("{name}: incomplete"));
    assert!(buf.is_empty(), "{name}: {} bytes left over", buf.len());
    assert_eq!(
        frame.to_bytes().as_ref(),
        bytes,
        "{name}: re-encoding differs"
    );
    frame
}

fn example(name: &str) -> Vec<u8> {
    examples()
        .remove(name)
        .unwrap_or_else(|| panic!("PROTOCOL.md has no example {name}"))
}

/// The handshake of PROTOCOL.md: key, nonces and session id.
const PSK: &[u8] = b"example key 0123456789";
const CLIENT_NONCE: Nonce = [0x11; 32];
const SERVER_NONCE: Nonce = [0x22; 32];
const SESSION: SessionId = [0x5e; 16];

#[test]
fn the_handshake_examples_decode_and_their_macs_verify() {
    let psk = Psk::new(PSK).unwrap();
    let Frame::Hello(hello) = decode_one("hello", &example("hello")) else {
        panic!("hello is not a Hello")
    };
    assert_eq!(
        hello,
        Hello {
            version_min: 1,
            version_max: 1,
            session_id: [0; 16],
            stream_index: 0,
            stream_count: 8,
            capabilities: capabilities::HYBRID,
            nonce: CLIENT_NONCE,
        }
    );
    let Frame::HelloAck(ack) = decode_one("hello-ack", &example("hello-ack")) else {
        panic!("hello-ack is not a HelloAck")
    };
    assert_eq!(ack.version, 1);
    assert_eq!((ack.version_min, ack.version_max), (1, 1));
    assert_eq!(ack.session_id, SESSION);
    assert_eq!(ack.capabilities, capabilities::HYBRID);
    assert_eq!(ack.nonce, SERVER_NONCE);
    let Frame::Auth(proof) = decode_one("auth", &example("auth")) else {
        panic!("auth is not an Auth")
    };

    // The documented MACs are what the state machines compute from the documented inputs.
    let (client, sent) = ClientHandshake::new(
        psk.clone(),
        CLIENT_NONCE,
        [0; 16],
        0,
        8,
        capabilities::HYBRID,
    );
    assert_eq!(sent, hello);
    let (our_ack, awaiting) = ServerHandshake::new(psk.clone(), SERVER_NONCE, capabilities::HYBRID)
        .on_hello(&hello, SESSION)
        .unwrap();
    assert_eq!(our_ack, ack, "the documented HelloAck MAC");
    let (our_proof, est) = client.on_hello_ack(&ack).unwrap();
    assert_eq!(our_proof, proof, "the documented Auth MAC");
    assert_eq!(awaiting.on_auth(&proof).unwrap(), est);

    // And the MAC inputs are exactly as documented: HMAC-SHA256(psk, label || transcript).
    let transcript = [
        &CLIENT_NONCE[..],
        &SERVER_NONCE,
        &SESSION,
        &1u16.to_be_bytes(),
        // the client's offered range, then the server's
        &1u16.to_be_bytes(),
        &1u16.to_be_bytes(),
        &1u16.to_be_bytes(),
        &1u16.to_be_bytes(),
        &0u16.to_be_bytes(),
        &8u16.to_be_bytes(),
        &capabilities::HYBRID.to_be_bytes(),
        &capabilities::HYBRID.to_be_bytes(),
    ]
    .concat();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, PSK);
    let tag = |label: &[u8]| {
        ring::hmac::sign(&key, &[label, &transcript].concat())
            .as_ref()
            .to_vec()
    };
    assert_eq!(tag(b"amst/3 server proof"), ack.mac);
    assert_eq!(tag(b"amst/3 client proof"), proof.mac);
}

#[test]
fn the_data_and_control_examples_decode_to_their_documented_fields() {
    let Frame::Data(d) = decode_one("data", &example("data")) else {
        panic!("data is not Data")
    };
    assert_eq!(
        (d.session_offset, d.msg_id, d.msg_offset, d.msg_len),
        (4096, 3, 1024, 2048)
    );
    assert_eq!(&d.payload[..], b"hello");
    assert_eq!(d.crc, amst_core::crc32c(b"hello"));
    assert_eq!(d.crc, 0x9a71_bb4c);

    assert_eq!(
        decode_one("ack", &example("ack")),
        Frame::Ack(AckFrame {
            messages: 2,
            cumulative: 1000,
            ranges: vec![ByteRange {
                start: 2000,
                end: 3000
            }],
        })
    );
    assert_eq!(
        decode_one("credit", &example("credit")),
        Frame::Credit(Credit {
            limit: 64 << 20,
            max_msg_id: 4096,
        })
    );
    assert_eq!(
        decode_one("ping", &example("ping")),
        Frame::Ping(Ping {
            id: 7,
            timestamp_ns: 1_000_000,
            padding: 4,
        })
    );
    assert_eq!(
        decode_one("pong", &example("pong")),
        Frame::Pong(Pong {
            id: 7,
            timestamp_ns: 1_000_000,
        })
    );
    assert_eq!(
        decode_one("close", &example("close")),
        Frame::Close(Close::new(CloseCode::Normal, "done"))
    );
}

#[test]
fn every_core_example_is_checked() {
    let names: Vec<String> = examples()
        .into_keys()
        .filter(|n| {
            !["hybrid-", "file-", "rdma-"]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .collect();
    let checked = [
        "ack",
        "auth",
        "close",
        "credit",
        "data",
        "hello",
        "hello-ack",
        "ping",
        "pong",
    ];
    assert_eq!(names, checked, "a new example needs its assertions here");
}

/// Prints the examples as the codec encodes them (`cargo test -p amst-core --test
/// protocol_doc -- --ignored --nocapture`), to write them into PROTOCOL.md.
#[test]
#[ignore = "prints PROTOCOL.md's examples"]
fn print_examples() {
    let psk = Psk::new(PSK).unwrap();
    let (client, hello) = ClientHandshake::new(
        psk.clone(),
        CLIENT_NONCE,
        [0; 16],
        0,
        8,
        capabilities::HYBRID,
    );
    let (ack, _) = ServerHandshake::new(psk, SERVER_NONCE, capabilities::HYBRID)
        .on_hello(&hello, SESSION)
        .unwrap();
    let (proof, _) = client.on_hello_ack(&ack).unwrap();
    let frames = [
        ("hello", Frame::Hello(hello)),
        ("hello-ack", Frame::HelloAck(ack)),
        ("auth", Frame::Auth(proof)),
        (
            "data",
            Frame::Data(DataChunk::new(
                4096,
                3,
                1024,
                2048,
                bytes::Bytes::from_static(b"hello"),
            )),
        ),
        (
            "ack",
            Frame::Ack(AckFrame {
                messages: 2,
                cumulative: 1000,
                ranges: vec![ByteRange {
                    start: 2000,
                    end: 3000,
                }],
            }),
        ),
        (
            "credit",
            Frame::Credit(Credit {
                limit: 64 << 20,
                max_msg_id: 4096,
            }),
        ),
        (
            "ping",
            Frame::Ping(Ping {
                id: 7,
                timestamp_ns: 1_000_000,
                padding: 4,
            }),
        ),
        (
            "pong",
            Frame::Pong(Pong {
                id: 7,
                timestamp_ns: 1_000_000,
            }),
        ),
        ("close", Frame::Close(Close::new(CloseCode::Normal, "done"))),
    ];
    for (name, f) in frames {
        let hex = amst_core::protocol_doc::hex_lines(&f.to_bytes());
        println!("{name}:\n{hex}");
    }
}
