//! PROTOCOL.md's hex examples of the file protocol (those named `file-…`) are decoded here
//! with `Message::decode`, their documented fields asserted and their re-encoding compared,
//! so the document cannot drift from the codec. The examples are read with
//! `amst_core::protocol_doc` (feature `protocol-doc`), as in the other crates.

use std::collections::BTreeMap;

use amst_files::protocol::*;
use bytes::Bytes;

/// The `file-` examples of PROTOCOL.md, by name.
fn examples() -> BTreeMap<String, Vec<u8>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md");
    amst_core::protocol_doc::read_examples(path, "file-").unwrap_or_else(|e| panic!("{e}"))
}

fn decode(name: &str) -> Message {
    let bytes = examples()
        .remove(name)
        .unwrap_or_else(|| panic!("PROTOCOL.md has no example {name}"));
    assert!(is_tree_message(&bytes), "{name}: not a tree message");
    let msg = Message::decode(Bytes::from(bytes.clone())).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        msg.encode().as_ref(),
        bytes.as_slice(),
        "{name}: re-encoding differs"
    );
    msg
}

/// The values the examples are built from (and asserted against).
const BLOCK_CV: Digest = [0xc5; 32];
const FILE_HASH: Digest = [0xf1; 32];
const VERIFIED_CV: Digest = [0xa0; 32];
const RECEIVER_HASH: Digest = [0xe7; 32];
const STORED_HASH: Digest = [0x5d; 32];

fn hello() -> Message {
    Message::Hello(Hello {
        version: TREE_PROTOCOL_VERSION,
        block_size: DEFAULT_BLOCK_SIZE,
        policy: ExistingPolicy::Skip,
        resume: true,
        entries: 3,
        bytes: 3 << 20,
    })
}

fn manifest() -> Message {
    Message::Manifest {
        entries: vec![
            Entry {
                path: b"d".to_vec(),
                kind: EntryKind::Dir,
                mode: 0o755,
                mtime_sec: 1_700_000_000,
                mtime_nsec: 0,
            },
            Entry {
                path: b"d/big".to_vec(),
                kind: EntryKind::File { size: 3 << 20 },
                mode: 0o644,
                mtime_sec: 1_700_000_000,
                mtime_nsec: 500_000_000,
            },
            Entry {
                path: b"d/ln".to_vec(),
                kind: EntryKind::Symlink {
                    target: b"big".to_vec(),
                },
                mode: 0o777,
                mtime_sec: 1_700_000_000,
                mtime_nsec: 0,
            },
        ],
        last: true,
    }
}

fn plan() -> Message {
    Message::Plan {
        items: vec![
            (1, Want::Send),
            (
                2,
                Want::Resume {
                    verified: vec![(0, VERIFIED_CV)],
                },
            ),
            (
                3,
                Want::Have {
                    hash: RECEIVER_HASH,
                },
            ),
            (
                4,
                Want::Refuse {
                    reason: "exists".into(),
                },
            ),
        ],
        last: true,
    }
}

fn data_small() -> Message {
    Message::Data(vec![
        Record::Whole {
            id: 5,
            hash: *blake3::hash(b"hello").as_bytes(),
            data: Bytes::from_static(b"hello"),
        },
        Record::Skip { id: 3 },
        Record::Fail {
            id: 6,
            reason: "gone".into(),
        },
        Record::Restart { id: 2 },
    ])
}

/// A one-block Data message, built as the sender builds it: header in place, then the bytes
/// read into it, then the chaining value sealed in.
fn data_block() -> Bytes {
    let mut b = block_message(1, 2, 4);
    b[BLOCK_HEADER_LEN..].copy_from_slice(b"tail");
    seal_block(&mut b, &BLOCK_CV);
    b.freeze()
}

fn file_end() -> Message {
    Message::Data(vec![Record::FileEnd {
        id: 1,
        hash: FILE_HASH,
        holes: vec![(1, 1)],
    }])
}

fn results() -> Message {
    Message::Results(vec![
        (0, Outcome::Stored { hash: [0; 32] }),
        (1, Outcome::Stored { hash: STORED_HASH }),
        (3, Outcome::Identical),
        (
            4,
            Outcome::Failed {
                reason: "exists".into(),
            },
        ),
    ])
}

fn finished() -> Message {
    Message::Finished(Finished {
        stored: 3,
        identical: 1,
        failed: 1,
        bytes_written: 1 << 20,
    })
}

fn abort() -> Message {
    Message::Abort("disk full".into())
}

#[test]
fn file_hello_decodes_to_the_documented_fields() {
    assert_eq!(decode("file-hello"), hello());
    let Message::Hello(h) = decode("file-hello") else {
        panic!("not a Hello")
    };
    assert_eq!(h.version, 1);
    assert_eq!(h.block_size, 1 << 20);
    assert_eq!(h.policy, ExistingPolicy::Skip);
    assert!(h.resume);
    assert_eq!((h.entries, h.bytes), (3, 3 << 20));
}

#[test]
fn file_manifest_decodes_to_the_documented_entries() {
    let m = decode("file-manifest");
    assert_eq!(m, manifest());
    let Message::Manifest { entries, last } = m else {
        panic!("not a Manifest")
    };
    assert!(last);
    let paths: Vec<&[u8]> = entries.iter().map(|e| e.path.as_slice()).collect();
    assert_eq!(paths, [&b"d"[..], b"d/big", b"d/ln"]);
    assert_eq!(entries[0].kind, EntryKind::Dir);
    assert_eq!(entries[1].kind, EntryKind::File { size: 3 << 20 });
    assert_eq!(
        (entries[1].mode, entries[1].mtime_nsec),
        (0o644, 500_000_000)
    );
    assert_eq!(
        entries[2].kind,
        EntryKind::Symlink {
            target: b"big".to_vec()
        }
    );
}

#[test]
fn file_plan_decodes_to_the_documented_wants() {
    assert_eq!(decode("file-plan"), plan());
}

#[test]
fn file_data_small_decodes_to_the_documented_records() {
    let m = decode("file-data-small");
    assert_eq!(m, data_small());
    let Message::Data(records) = m else {
        panic!("not Data")
    };
    let Record::Whole { hash, data, .. } = &records[0] else {
        panic!("the first record is not Whole")
    };
    assert_eq!(
        hash,
        blake3::hash(data).as_bytes(),
        "Whole carries BLAKE3 of its data"
    );
}

#[test]
fn file_data_block_is_what_block_message_builds() {
    let m = decode("file-data-block");
    assert_eq!(
        m,
        Message::Data(vec![Record::Block {
            id: 1,
            index: 2,
            cv: BLOCK_CV,
            data: Bytes::from_static(b"tail"),
        }])
    );
    let bytes = &examples()["file-data-block"];
    assert_eq!(bytes.as_slice(), data_block().as_ref());
    assert_eq!(bytes.len(), BLOCK_HEADER_LEN + 4);
}

#[test]
fn file_file_end_decodes_to_the_documented_record() {
    assert_eq!(decode("file-file-end"), file_end());
}

#[test]
fn file_end_is_one_byte() {
    assert_eq!(decode("file-end"), Message::End);
}

#[test]
fn file_results_decode_to_the_documented_outcomes() {
    assert_eq!(decode("file-results"), results());
}

#[test]
fn file_finished_decodes_to_the_documented_totals() {
    assert_eq!(decode("file-finished"), finished());
}

#[test]
fn file_abort_decodes_to_its_reason() {
    assert_eq!(decode("file-abort"), abort());
}

/// The error texts of the limits table are the decoder's, with the offending value as `N`.
#[test]
fn documented_decode_errors_are_the_decoders() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md"))
        .expect("PROTOCOL.md at the repository root");
    let with = |name: &str, at: usize, patch: &[u8]| {
        let mut b = examples()[name].clone();
        b[at..at + patch.len()].copy_from_slice(patch);
        b
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (with("file-hello", 3, &1000u32.to_be_bytes()), "1000"),
        (
            with("file-hello", 9, &(MAX_ENTRIES + 1).to_be_bytes()),
            "67108865",
        ),
        // Entry 0's path is 1 byte, so its mtime_nsec is at 6 + 2 + 1 + 4 + 8.
        (
            with("file-manifest", 21, &1_000_000_000u32.to_be_bytes()),
            "1000000000",
        ),
        (with("file-manifest", 25, &[9]), ""),
        (
            with("file-data-block", 50, &(MAX_BLOCK_SIZE + 1).to_be_bytes()),
            "16777217",
        ),
        (with("file-data-small", 5, &[7]), ""),
        (with("file-abort", 1, &4097u16.to_be_bytes()), "4097"),
        (with("file-plan", 2, &u32::MAX.to_be_bytes()), "4294967295"),
        (vec![0x60], ""),
        (vec![0x44, 0], ""),
        (Vec::new(), ""),
        (with("file-hello", 8, &[2]), ""),
        // Cut inside the third item's hash, which starts at byte 65.
        (examples()["file-plan"][..80].to_vec(), ""),
    ];
    for (bytes, value) in cases {
        let err = Message::decode(Bytes::from(bytes))
            .expect_err("a broken example")
            .to_string();
        let mut shown = err.replacen(value, "N", usize::from(!value.is_empty()));
        // A count's limit depends on the bytes left, so the table shows it as `M`.
        if shown.starts_with("Plan.items") {
            let (head, _) = shown.rsplit_once("limit of ").expect("a limit");
            shown = format!("{head}limit of M");
        }
        assert!(
            doc.contains(&shown),
            "PROTOCOL.md does not show {shown:?} ({err})"
        );
    }
}

#[test]
fn every_file_example_is_checked() {
    let names: Vec<String> = examples().into_keys().collect();
    let checked = [
        "file-abort",
        "file-data-block",
        "file-data-small",
        "file-end",
        "file-file-end",
        "file-finished",
        "file-hello",
        "file-manifest",
        "file-plan",
        "file-results",
    ];
    assert_eq!(names, checked, "a new example needs its assertions here");
}

/// Prints the examples as the codec encodes them (`cargo test -p amst-files --test
/// protocol_doc -- --ignored --nocapture`), to write them into PROTOCOL.md.
#[test]
#[ignore = "prints PROTOCOL.md's file-protocol examples"]
fn print_examples() {
    let messages = [
        ("file-hello", hello().encode()),
        ("file-manifest", manifest().encode()),
        ("file-plan", plan().encode()),
        ("file-data-small", data_small().encode()),
        ("file-data-block", data_block()),
        ("file-file-end", file_end().encode()),
        ("file-end", Message::End.encode()),
        ("file-results", results().encode()),
        ("file-finished", finished().encode()),
        ("file-abort", abort().encode()),
    ];
    for (name, bytes) in messages {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        println!("example: {name}\n{hex}\n");
    }
}
