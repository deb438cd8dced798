//! The file protocol end to end over amst-core's in-memory transport pair: what the binary
//! does over the network, minus the network, so the failure paths can be driven exactly.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use amst_cli::link::{Link, TransportLink};
use amst_cli::protocol::{FILE_PROTOCOL_VERSION, Header, Kind, Message, Receipt, Trailer, hex};
use amst_cli::source::Source;
use amst_cli::transfer::{ReceiveOptions, SendOptions, receive_session, send_transfer};
use amst_cli::{Failure, FailureKind};
use amst_core::{InMemoryTransport, Mode};
use bytes::Bytes;
use ring::digest;

fn pair() -> (Arc<dyn Link>, Arc<dyn Link>) {
    let (a, b) = InMemoryTransport::pair(64);
    (
        Arc::new(TransportLink::new(Arc::new(a), Mode::Datacenter)),
        Arc::new(TransportLink::new(Arc::new(b), Mode::Datacenter)),
    )
}

fn sha(data: &[u8]) -> [u8; 32] {
    digest::digest(&digest::SHA256, data)
        .as_ref()
        .try_into()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_arrives_whole_and_is_stored_under_a_safe_name() {
    let src_dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..3_000_017u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let path = src_dir.path().join("payload.bin");
    std::fs::write(&path, &data).unwrap();

    let (tx, rx) = pair();
    let opts = ReceiveOptions {
        output: Some(out.path().to_path_buf()),
    };
    let server = tokio::spawn(async move {
        let n = AtomicU64::new(0);
        let r = receive_session(&*rx, "test", &opts, &n).await;
        (r, n.load(Ordering::Relaxed))
    });
    let sent = AtomicU64::new(0);
    let open = Source::File(path).open().unwrap();
    let opts = SendOptions {
        piece: 64 << 10,
        ..SendOptions::default()
    };
    let outcome = send_transfer(&tx, "test", open, &opts, &sent)
        .await
        .unwrap();
    tx.close().await.unwrap();
    // The in-memory pair ends the peer's stream only when this end is dropped.
    drop(tx);
    let (report, received) = server.await.unwrap();

    assert_eq!(outcome.bytes, data.len() as u64);
    assert_eq!(outcome.sha256, sha(&data));
    assert_eq!(sent.load(Ordering::Relaxed), data.len() as u64);
    assert_eq!(received, data.len() as u64);
    assert!(outcome.receipt.ok);
    assert_eq!(outcome.receipt.sha256, hex(&sha(&data)));
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.transfers.len(), 1);
    let t = &report.transfers[0];
    assert!(t.result.is_ok());
    let stored = t.stored_as.clone().unwrap();
    assert_eq!(stored, out.path().join("payload.bin"));
    assert_eq!(std::fs::read(&stored).unwrap(), data);
    let names: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["payload.bin"], "no temporary files left behind");
}

/// A hand-written sender, to send what a correct one never would.
async fn raw_sender(
    link: &Arc<dyn Link>,
    header: Header,
    data: &[u8],
    trailer: Trailer,
) -> Receipt {
    link.send(Message::Header(header).encode()).await.unwrap();
    for c in data.chunks(1000) {
        link.send(Message::Data(Bytes::copy_from_slice(c)).encode())
            .await
            .unwrap();
    }
    link.send(Message::Trailer(trailer).encode()).await.unwrap();
    let msg = link.recv().await.unwrap().unwrap();
    let Message::Receipt(r) = Message::decode(msg).unwrap() else {
        panic!("expected a receipt")
    };
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checksum_mismatch_is_rejected_and_nothing_is_kept() {
    let out = tempfile::tempdir().unwrap();
    let (tx, rx) = pair();
    let opts = ReceiveOptions {
        output: Some(out.path().to_path_buf()),
    };
    let server = tokio::spawn(async move {
        let n = AtomicU64::new(0);
        receive_session(&*rx, "peer", &opts, &n).await
    });
    let data = vec![7u8; 5000];
    let mut wrong = sha(&data);
    wrong[0] ^= 1;
    let header = Header {
        version: FILE_PROTOCOL_VERSION,
        name: "../../escape.bin".into(),
        size: Some(5000),
        kind: Kind::File,
    };
    let r = raw_sender(
        &tx,
        header,
        &data,
        Trailer {
            bytes: 5000,
            sha256: wrong,
        },
    )
    .await;
    assert!(!r.ok);
    assert_eq!(r.error_kind.as_deref(), Some("integrity"));
    assert!(
        r.error.as_deref().unwrap().contains("checksum mismatch"),
        "{r:?}"
    );
    tx.close().await.unwrap();
    // The in-memory pair ends the peer's stream only when this end is dropped.
    drop(tx);
    let report = server.await.unwrap();
    assert_eq!(report.transfers.len(), 1);
    let f: &Failure = report.transfers[0].result.as_ref().unwrap_err();
    assert_eq!(f.kind, FailureKind::Integrity);
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "nothing kept"
    );
    assert!(!out.path().parent().unwrap().join("escape.bin").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_transfer_is_an_integrity_failure() {
    let (tx, rx) = pair();
    let server = tokio::spawn(async move {
        let n = AtomicU64::new(0);
        receive_session(&*rx, "peer", &ReceiveOptions { output: None }, &n).await
    });
    let data = vec![1u8; 3000];
    let header = Header {
        version: FILE_PROTOCOL_VERSION,
        name: "x".into(),
        size: Some(4000),
        kind: Kind::Generated,
    };
    let r = raw_sender(
        &tx,
        header,
        &data,
        Trailer {
            bytes: 3000,
            sha256: sha(&data),
        },
    )
    .await;
    assert!(!r.ok);
    assert!(
        r.error
            .unwrap()
            .contains("announced 4000 bytes but sent 3000")
    );
    tx.close().await.unwrap();
    // The in-memory pair ends the peer's stream only when this end is dropped.
    drop(tx);
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_fails_when_the_receiver_reports_another_checksum() {
    let (tx, rx) = pair();
    // A receiver that lies about what it got.
    let liar = tokio::spawn(async move {
        while let Some(m) = rx.recv().await.unwrap() {
            if let Message::Trailer(t) = Message::decode(m).unwrap() {
                let r = Receipt {
                    ok: true,
                    bytes: t.bytes,
                    sha256: hex(&[0u8; 32]),
                    stored_as: None,
                    error: None,
                    error_kind: None,
                };
                rx.send(Message::Receipt(r).encode()).await.unwrap();
            }
        }
    });
    let open = Source::Generated(100_000).open().unwrap();
    let n = AtomicU64::new(0);
    let e = send_transfer(&tx, "liar", open, &SendOptions::default(), &n)
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::Integrity);
    assert!(e.message.starts_with("checksum mismatch"), "{e}");
    tx.close().await.unwrap();
    // The in-memory pair ends the peer's stream only when this end is dropped.
    drop(tx);
    liar.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_rejection_stops_the_sender_with_the_receivers_reason() {
    let (tx, rx) = pair();
    let refuser = tokio::spawn(async move {
        let _header = rx.recv().await.unwrap().unwrap();
        let r = Receipt {
            ok: false,
            bytes: 0,
            sha256: String::new(),
            stored_as: None,
            error: Some("the receiver's disk is full: writing x failed".into()),
            error_kind: Some("disk".into()),
        };
        rx.send(Message::Receipt(r).encode()).await.unwrap();
        // Keep draining, as the real receiver does, until the sender goes away.
        while let Ok(Some(_)) = rx.recv().await {}
    });
    let open = Source::Generated(1 << 30).open().unwrap();
    let n = AtomicU64::new(0);
    let t0 = std::time::Instant::now();
    let e = send_transfer(&tx, "full", open, &SendOptions::default(), &n)
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::Disk, "{e}");
    assert!(e.message.contains("disk is full"), "{e}");
    assert!(
        n.load(Ordering::Relaxed) < 1 << 30,
        "the sender stopped before the end"
    );
    assert!(t0.elapsed() < std::time::Duration::from_secs(60));
    tx.close().await.unwrap();
    // The in-memory pair ends the peer's stream only when this end is dropped.
    drop(tx);
    refuser.await.unwrap();
}
