//! PROTOCOL.md's hex examples of amst-hybrid's frames (the ones named `hybrid-*`) are
//! decoded here and their documented fields asserted, so the document cannot drift from the
//! codec.

use std::collections::BTreeMap;

use amst_core::Mode;
use amst_hybrid::wire::HybridFrame;
use bytes::Bytes;

fn examples() -> BTreeMap<String, Vec<u8>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md");
    amst_core::protocol_doc::read_examples(path, "hybrid-").unwrap_or_else(|e| panic!("{e}"))
}

/// The hybrid examples and what each must decode to.
fn expected() -> Vec<(&'static str, HybridFrame)> {
    vec![
        (
            "hybrid-data",
            HybridFrame::Data {
                seq: 5,
                payload: Bytes::from_static(b"hi"),
            },
        ),
        (
            "hybrid-open",
            HybridFrame::Open {
                version_min: 1,
                version_max: 1,
            },
        ),
        (
            "hybrid-open-ack",
            HybridFrame::OpenAck {
                version: 1,
                session_id: [0xab; 16],
            },
        ),
        (
            "hybrid-attach",
            HybridFrame::Attach {
                session_id: [0xab; 16],
                generation: 2,
                index: 1,
                count: 2,
                mode: Mode::Hybrid,
            },
        ),
        (
            "hybrid-attach-ack",
            HybridFrame::AttachAck { generation: 2 },
        ),
        ("hybrid-retire", HybridFrame::Retire),
        ("hybrid-bye", HybridFrame::Bye { messages: 10 }),
        (
            "hybrid-reject",
            HybridFrame::Reject {
                reason: "no".into(),
            },
        ),
        (
            "hybrid-mode-request",
            HybridFrame::ModeRequest {
                mode: Mode::Internet,
            },
        ),
    ]
}

#[test]
fn every_hybrid_example_decodes_to_its_documented_fields() {
    let docs = examples();
    let expected = expected();
    let names: Vec<&str> = docs.keys().map(String::as_str).collect();
    let mut want: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
    want.sort();
    assert_eq!(
        names, want,
        "PROTOCOL.md's hybrid examples and this test's list"
    );
    for (name, frame) in expected {
        let bytes = &docs[name];
        let decoded = HybridFrame::decode(Bytes::copy_from_slice(bytes))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(decoded, frame, "{name}");
        assert_eq!(
            frame.encode().as_ref(),
            &bytes[..],
            "{name}: re-encoding differs"
        );
    }
}

/// Prints the examples as the codec encodes them (`cargo test -p amst-hybrid --test
/// protocol_doc -- --ignored --nocapture`), to write them into PROTOCOL.md.
#[test]
#[ignore = "prints PROTOCOL.md's examples"]
fn print_examples() {
    for (name, f) in expected() {
        let hex = amst_core::protocol_doc::hex_lines(&f.encode());
        println!("{name}:\n{hex}");
    }
}
