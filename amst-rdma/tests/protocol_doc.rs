//! PROTOCOL.md's hex examples of amst-rdma's wire (those named `rdma-…`): segments as they sit
//! in a receive buffer or ring slot, and the bootstrap's endpoint record. Each is decoded here,
//! its documented fields asserted and its re-encoding compared, so the document cannot drift
//! from `wire.rs` and `bootstrap.rs`. The examples are read with `amst_core::protocol_doc`
//! (feature `protocol-doc`), as in the other crates.

use std::collections::BTreeMap;

use amst_core::codec::{Credit, Decoder, Frame, Psk};
use amst_rdma::RdmaConfig;
use amst_rdma::bootstrap::{ENDPOINT_LEN, Endpoint};
use amst_rdma::wire::{SEGMENT_HEADER_LEN, SegmentHeader};
use bytes::BytesMut;

fn examples() -> BTreeMap<String, Vec<u8>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md");
    amst_core::protocol_doc::read_examples(path, "rdma-").unwrap_or_else(|e| panic!("{e}"))
}

/// The frame the stream example carries: amst-core's Credit, as on a TCP stream.
fn credit_frame() -> Vec<u8> {
    let mut b = BytesMut::new();
    Frame::Credit(Credit {
        limit: 256 << 10,
        max_msg_id: 256,
    })
    .encode(&mut b);
    b.to_vec()
}

/// The segment examples: header and payload.
fn segments() -> Vec<(&'static str, SegmentHeader, Vec<u8>)> {
    let header = |payload: &[u8], recv, ring| SegmentHeader {
        payload_len: payload.len() as u32,
        recv_advertised: recv,
        ring_advertised: ring,
    };
    let frame = credit_frame();
    vec![
        ("rdma-stream-segment", header(&frame, 256, 64), frame),
        ("rdma-credit-segment", header(b"", 320, 80), Vec::new()),
    ]
}

fn config() -> RdmaConfig {
    RdmaConfig::new(Psk::new(b"example key 0123456789").unwrap())
}

/// The endpoint example: a RoCE v2 queue pair at ::ffff:198.18.0.1 with the default sizes.
fn endpoint() -> Endpoint {
    let c = config();
    Endpoint {
        qpn: 0x11,
        psn: 0x12_3456,
        gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 1],
        lid: 0,
        mtu: 3,
        ring_addr: 0x7f00_0000_1000,
        ring_rkey: 0xdead_beef,
        ring_slots: c.ring_slots,
        slot_size: c.slot_size,
        recv_depth: c.recv_depth,
        recv_buf_size: c.recv_buf_size() as u32,
    }
}

fn encode_segment(h: &SegmentHeader, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; SEGMENT_HEADER_LEN + payload.len()];
    h.encode(&mut buf);
    buf[SEGMENT_HEADER_LEN..].copy_from_slice(payload);
    buf
}

#[test]
fn every_segment_example_decodes_to_its_documented_fields() {
    let docs = examples();
    for (name, want, payload) in segments() {
        let bytes = docs
            .get(name)
            .unwrap_or_else(|| panic!("PROTOCOL.md has no example {name}"));
        let got = SegmentHeader::decode(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, want, "{name}");
        assert_eq!(
            &bytes[SEGMENT_HEADER_LEN..],
            &payload[..],
            "{name}: the payload"
        );
        // The payload is a piece of amst-core's frame stream.
        let mut rest = BytesMut::from(&payload[..]);
        while !rest.is_empty() {
            Decoder::default()
                .decode(&mut rest)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .unwrap_or_else(|| panic!("{name}: a whole frame"));
        }
        assert_eq!(
            encode_segment(&want, &payload),
            *bytes,
            "{name}: re-encoding differs"
        );
    }
}

#[test]
fn the_endpoint_example_decodes_against_the_default_sizes() {
    let bytes = &examples()["rdma-endpoint"];
    let b: &[u8; ENDPOINT_LEN] = bytes[..]
        .try_into()
        .unwrap_or_else(|_| panic!("rdma-endpoint is {} bytes", bytes.len()));
    let got = Endpoint::decode(b, &config()).unwrap();
    assert_eq!(got, endpoint());
    assert_eq!(got.encode(), *b, "re-encoding differs");
    // A peer whose slots differ from ours is refused by name.
    let mut other = config();
    other.slot_size *= 2;
    let e = Endpoint::decode(b, &other).unwrap_err().to_string();
    assert!(e.contains("slot_size"), "{e}");
}

#[test]
fn every_rdma_example_is_checked() {
    let names: Vec<String> = examples().into_keys().collect();
    let mut checked: Vec<&str> = segments().iter().map(|(n, ..)| *n).collect();
    checked.push("rdma-endpoint");
    checked.sort();
    assert_eq!(names, checked, "a new example needs its assertions here");
}

/// Prints the examples as the code encodes them (`cargo test -p amst-rdma --test
/// protocol_doc -- --ignored --nocapture`), to write them into PROTOCOL.md.
#[test]
#[ignore = "prints PROTOCOL.md's RDMA examples"]
fn print_examples() {
    for (name, h, payload) in segments() {
        let hex = amst_core::protocol_doc::hex_lines(&encode_segment(&h, &payload));
        println!("{name}:\n{hex}");
    }
    let hex = amst_core::protocol_doc::hex_lines(&endpoint().encode());
    println!("rdma-endpoint:\n{hex}");
}
