//! Trees end to end over real Amst sessions on TCP loopback: content, modes, mtimes, links,
//! hostile manifests, sparse files, existing-file policies, resume after the sender is
//! killed mid-tree (including a file that changed in between), damaged blocks, and the
//! manifest window with the receiver's limit on files in flight.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use amst_core::{Mode, codec::Psk};
use amst_files::hash::block_cv;
use amst_files::protocol::{
    Entry, EntryKind, Hello, Message, Outcome, Record, TREE_PROTOCOL_VERSION,
};
use amst_files::{
    Channel, ExistingPolicy, ReceiveOptions, ReceiveProgress, ReceiveReport, SendOptions,
    SendProgress, SendReport, Tree, receive_tree, send_tree,
};
use amst_hybrid::{Amst, AmstConfig, AmstListener};
use bytes::Bytes;

fn config() -> AmstConfig {
    AmstConfig::builder(Psk::new(b"amst-files integration key").unwrap())
        .auto_mode(false)
        .initial_mode(Mode::Datacenter)
        .datacenter_streams(4)
        .min_streams(1)
        .build()
        .unwrap()
}

async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("the test finished within its time limit")
}

/// A receiver that serves sessions one after another into `out`.
struct Receiver {
    addr: std::net::SocketAddr,
    reports: tokio::sync::mpsc::UnboundedReceiver<amst_files::Result<ReceiveReport>>,
    progress: Arc<ReceiveProgress>,
    _listener: Arc<AmstListener>,
}

async fn receiver(out: &Path) -> Receiver {
    receiver_with(ReceiveOptions::new(out)).await
}

async fn receiver_with(opts: ReceiveOptions) -> Receiver {
    let listener = Arc::new(
        Amst::listen("127.0.0.1:0".parse().unwrap(), config())
            .await
            .unwrap(),
    );
    let addr = listener.local_addr().unwrap();
    let (tx, reports) = tokio::sync::mpsc::unbounded_channel();
    let progress = Arc::new(ReceiveProgress::default());
    let (l, p) = (listener.clone(), progress.clone());
    tokio::spawn(async move {
        while let Ok(session) = l.accept().await {
            let ch: Arc<dyn Channel> = Arc::new(session);
            let r = match ch.recv().await {
                Ok(Some(first)) => receive_tree(ch, first, &opts, p.clone()).await,
                _ => continue,
            };
            let _ = tx.send(r);
        }
    });
    Receiver {
        addr,
        reports,
        progress,
        _listener: listener,
    }
}

async fn send(addr: std::net::SocketAddr, paths: &[PathBuf], opts: SendOptions) -> SendReport {
    let ch: Arc<dyn Channel> = Arc::new(Amst::connect(addr, config()).await.unwrap());
    let tree = Tree::scan(paths).unwrap();
    send_tree(ch.clone(), tree, &opts, Default::default())
        .await
        .unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut x = u64::from(seed) * 0x9e37_79b9 + 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn b3(p: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(p).unwrap()).unwrap();
    h.finalize().to_hex().to_string()
}

fn set_mtime(p: &Path, secs: u64) {
    let f = std::fs::File::open(p).unwrap();
    f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_arrives_with_content_modes_mtimes_and_links() {
    within(120, async {
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let top = src.path().join("data");
        std::fs::create_dir_all(top.join("sub/deeper")).unwrap();
        let sizes = [
            0usize,
            1,
            4096,
            1 << 20,
            (1 << 20) + 1,
            3 * (1 << 20) + 12345,
        ];
        for (i, n) in sizes.iter().enumerate() {
            let p = top.join(format!("sub/f{i}.bin"));
            std::fs::write(&p, pattern(*n, i as u8)).unwrap();
            set_mtime(&p, 1_600_000_000 + i as u64);
        }
        std::fs::write(top.join("sub/deeper/x"), b"deep").unwrap();
        std::fs::set_permissions(
            top.join("sub/f2.bin"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::set_permissions(
            top.join("sub/f3.bin"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("sub/f1.bin", top.join("inside")).unwrap();
        std::os::unix::fs::symlink("../../etc/passwd", top.join("outside")).unwrap();
        set_mtime(&top.join("sub"), 1_500_000_000);

        let mut rx = receiver(out.path()).await;
        let r = send(rx.addr, std::slice::from_ref(&top), SendOptions::default()).await;
        let got = rx.reports.recv().await.unwrap().unwrap();
        assert_eq!(got.finished, r.finished);
        let failures: Vec<_> = r.failures().collect();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures[0].0, "data/outside");
        assert!(
            failures[0].1.contains("outside the output directory"),
            "{failures:?}"
        );
        let dst = out.path().join("data");
        for (i, n) in sizes.iter().enumerate() {
            let p = dst.join(format!("sub/f{i}.bin"));
            assert_eq!(std::fs::read(&p).unwrap(), pattern(*n, i as u8), "f{i}");
            assert_eq!(p.metadata().unwrap().mtime(), 1_600_000_000 + i as i64);
            let reported = r
                .entries
                .iter()
                .find(|e| e.path == format!("data/sub/f{i}.bin"))
                .unwrap();
            let Outcome::Stored { hash } = reported.outcome else {
                panic!("{reported:?}")
            };
            assert_eq!(
                amst_files::hash::hex(&hash),
                b3(&p),
                "the reported hash is b3sum's"
            );
        }
        assert_eq!(std::fs::read(dst.join("sub/deeper/x")).unwrap(), b"deep");
        let mode = |p: &str| dst.join(p).metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("sub/f2.bin"), 0o600);
        assert_eq!(mode("sub/f3.bin"), 0o755);
        assert_eq!(
            std::fs::read_link(dst.join("inside")).unwrap(),
            Path::new("sub/f1.bin")
        );
        assert!(std::fs::symlink_metadata(dst.join("outside")).is_err());
        assert_eq!(dst.join("sub").metadata().unwrap().mtime(), 1_500_000_000);
        let leftovers: Vec<_> = walk(out.path())
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(".amst-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // b3sum, when installed, agrees with the hash we report.
        if let Ok(o) = std::process::Command::new("b3sum")
            .arg(dst.join("sub/f5.bin"))
            .output()
        {
            let line = String::from_utf8_lossy(&o.stdout).to_string();
            assert!(line.starts_with(&b3(&dst.join("sub/f5.bin"))), "{line}");
        } else {
            eprintln!("b3sum is not installed; skipping the by-hand check");
        }

        // The same tree again: every file is identical, nothing is sent.
        let again = send(rx.addr, std::slice::from_ref(&top), SendOptions::default()).await;
        assert_eq!(again.data_bytes_sent, 0);
        assert_eq!(
            again.finished.identical,
            sizes.len() as u64 + 2,
            "files and the link"
        );

        // A file that differs: refused by default, replaced with --existing overwrite.
        std::fs::write(top.join("sub/f2.bin"), pattern(4096, 99)).unwrap();
        let skip = send(rx.addr, std::slice::from_ref(&top), SendOptions::default()).await;
        let f: Vec<_> = skip
            .failures()
            .map(|(p, why)| (p.to_string(), why.to_string()))
            .collect();
        assert!(
            f.iter().any(|(p, why)| p == "data/sub/f2.bin"
                && why.starts_with("not sent: a different file of the same size exists")),
            "{f:?}"
        );
        assert_eq!(
            std::fs::read(dst.join("sub/f2.bin")).unwrap(),
            pattern(4096, 2)
        );
        let opts = SendOptions {
            policy: ExistingPolicy::Overwrite,
            ..SendOptions::default()
        };
        let over = send(rx.addr, std::slice::from_ref(&top), opts).await;
        assert_eq!(over.data_bytes_sent, 4096);
        assert_eq!(
            std::fs::read(dst.join("sub/f2.bin")).unwrap(),
            pattern(4096, 99)
        );
        let refuse = SendOptions {
            policy: ExistingPolicy::Refuse,
            ..SendOptions::default()
        };
        let r = send(rx.addr, std::slice::from_ref(&top), refuse).await;
        assert!(
            r.failures()
                .any(|(p, why)| p == "data/sub/f0.bin" && why.contains("refuse"))
        );
    })
    .await;
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        out.push(e.path());
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

fn entry(path: &[u8], kind: EntryKind) -> Entry {
    Entry {
        path: path.to_vec(),
        kind,
        mode: 0o644,
        mtime_sec: 0,
        mtime_nsec: 0,
    }
}

/// A hostile sender, speaking the protocol by hand: nothing lands outside the output
/// directory, and each bad entry fails with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_manifests_write_nothing_outside_the_output() {
    within(60, async {
        let base = tempfile::tempdir().unwrap();
        let out = base.path().join("out");
        std::fs::create_dir(&out).unwrap();
        // Something already in the output that points outside: never followed.
        std::os::unix::fs::symlink(base.path(), out.join("escape")).unwrap();
        let mut rx = receiver(&out).await;
        let ch = Amst::connect(rx.addr, config()).await.unwrap();
        let file = |n| EntryKind::File { size: n };
        let link = |t: &[u8]| EntryKind::Symlink { target: t.to_vec() };
        let entries = vec![
            entry(b"../up", file(1)),
            entry(b"/abs", file(1)),
            entry(b"a\0b", file(1)),
            entry(b"ok", EntryKind::Dir),
            entry(b"ok/f", file(0)),
            entry(b"ok/f/g", file(0)),
            entry(b"ok/f", EntryKind::Dir),
            entry(b"ok/l", link(b"../../x")),
            entry(b"ok/abs", link(b"/etc/passwd")),
            entry(b"escape/x", file(0)),
            entry(b"escape", EntryKind::Dir),
            entry(b"x.amst-journal", file(0)),
        ];
        let n = entries.len() as u64;
        let hello = Hello {
            version: TREE_PROTOCOL_VERSION,
            block_size: 1 << 20,
            policy: ExistingPolicy::Overwrite,
            resume: true,
            entries: n,
            bytes: 3,
        };
        ch.send(Message::Hello(hello).encode()).await.unwrap();
        ch.send(
            Message::Manifest {
                entries,
                last: true,
            }
            .encode(),
        )
        .await
        .unwrap();
        ch.send(Message::End.encode()).await.unwrap();
        let mut outcomes = std::collections::BTreeMap::new();
        loop {
            match Message::decode(ch.recv().await.unwrap().unwrap()).unwrap() {
                Message::Plan { .. } => {}
                Message::Results(items) => outcomes.extend(items),
                Message::Finished(f) => {
                    assert_eq!(f.stored, 1, "only ok/ is created: {outcomes:?}");
                    ch.close().await.unwrap();
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        let reason = |id: u32| match &outcomes[&id] {
            Outcome::Failed { reason } => reason.clone(),
            o => panic!("entry {id}: {o:?}"),
        };
        assert!(reason(0).contains("'..'"));
        assert!(reason(1).contains("absolute"));
        assert!(reason(2).contains("NUL"));
        assert_eq!(outcomes[&3], Outcome::Stored { hash: [0; 32] });
        assert!(reason(5).contains("not a directory"), "{}", reason(5));
        assert!(reason(6).contains("twice"));
        assert!(reason(7).contains("outside"));
        assert!(reason(8).contains("outside"));
        assert!(reason(9).contains("not a directory"), "{}", reason(9));
        assert!(reason(10).contains("symbolic link"), "{}", reason(10));
        assert!(reason(11).contains("partial"));
        let report = rx.reports.recv().await.unwrap().unwrap();
        assert_eq!(
            report.finished.failed,
            n - 1,
            "all but ok/ (ok/f was never sent)"
        );
        let mut names: Vec<_> = walk(base.path())
            .into_iter()
            .map(|p| p.strip_prefix(base.path()).unwrap().to_path_buf())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                Path::new("out"),
                Path::new("out/escape"),
                Path::new("out/ok")
            ]
        );
    })
    .await;
}

/// A file of three blocks at `src/big`, a receiver into `out`, and one session spoken by
/// hand that sends block 0 as it is and block 1 as `damage` makes it (with the true chaining
/// value), then ends. Returns the file's bytes and why the receiver failed it.
async fn second_block_damaged(
    src: &Path,
    rx: &mut Receiver,
    damage: impl FnOnce(Vec<u8>) -> Vec<u8>,
) -> (Vec<u8>, String) {
    const BS: u32 = 1 << 20;
    let size = 2 * BS as usize + 4321;
    let data = pattern(size, 9);
    let path = src.join("big");
    std::fs::write(&path, &data).unwrap();
    let entry = amst_files::scan::entry_of(
        b"big".to_vec(),
        EntryKind::File { size: size as u64 },
        &std::fs::metadata(&path).unwrap(),
    );
    let ch = Amst::connect(rx.addr, config()).await.unwrap();
    let hello = Hello {
        version: TREE_PROTOCOL_VERSION,
        block_size: BS,
        policy: ExistingPolicy::Overwrite,
        resume: true,
        entries: 1,
        bytes: size as u64,
    };
    ch.send(Message::Hello(hello).encode()).await.unwrap();
    let manifest = Message::Manifest {
        entries: vec![entry],
        last: true,
    };
    ch.send(manifest.encode()).await.unwrap();
    let block = |i: usize| data[i * BS as usize..(i + 1) * BS as usize].to_vec();
    let cv = |i: usize| block_cv(&block(i), BS, i as u64);
    let records = vec![
        Record::Block {
            id: 0,
            index: 0,
            cv: cv(0),
            data: Bytes::from(block(0)),
        },
        Record::Block {
            id: 0,
            index: 1,
            cv: cv(1),
            data: Bytes::from(damage(block(1))),
        },
    ];
    ch.send(Message::Data(records).encode()).await.unwrap();
    ch.send(Message::End.encode()).await.unwrap();
    let mut reason = None;
    while let Ok(Some(m)) = ch.recv().await {
        match Message::decode(m).unwrap() {
            Message::Results(items) => {
                for (_, o) in items {
                    if let Outcome::Failed { reason: r } = o {
                        reason = Some(r);
                    }
                }
            }
            Message::Plan { .. } => {}
            Message::Finished(_) => break,
            other => panic!("{other:?}"),
        }
    }
    ch.close().await.unwrap();
    rx.reports.recv().await.unwrap().unwrap();
    (data, reason.expect("the file failed"))
}

/// Sends `src/big` again as `amst send` would, checks that it landed whole in `out`, and
/// returns the report.
async fn resend_lands_whole(rx: &mut Receiver, src: &Path, out: &Path, data: &[u8]) -> SendReport {
    let path = src.join("big");
    let r = send(rx.addr, std::slice::from_ref(&path), SendOptions::default()).await;
    rx.reports.recv().await.unwrap().unwrap();
    assert_eq!(
        r.failures().count(),
        0,
        "{:?}",
        r.failures().collect::<Vec<_>>()
    );
    assert!(std::fs::read(&path).unwrap() == data);
    assert!(
        std::fs::read(out.join("big")).unwrap() == data,
        "landed whole"
    );
    r
}

/// A block whose bytes do not match its chaining value (a sender bug, or memory corruption
/// past the CRC) fails its file. The receiver writes a block before its hash is known, so
/// the partial file is discarded with its journal, and nothing of it is trusted by the next
/// try, which sends the whole file again and lands it whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_that_fails_its_hash_discards_the_partial_and_the_retry_sends_all() {
    within(60, async {
        let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut rx = receiver(out.path()).await;
        let (data, reason) = second_block_damaged(src.path(), &mut rx, |mut b| {
            let middle = b.len() / 2;
            b[middle] ^= 1;
            b
        })
        .await;
        assert!(
            reason.contains("block 1 failed its BLAKE3 check"),
            "{reason}"
        );
        assert!(!out.path().join("big").exists(), "nothing landed");
        for name in [".big.amst-part", ".big.amst-journal"] {
            assert!(!out.path().join(name).exists(), "{name} was discarded");
        }
        let r = resend_lands_whole(&mut rx, src.path(), out.path(), &data).await;
        assert_eq!(
            r.blocks_resumed, 0,
            "nothing of the discarded partial is trusted"
        );
        assert_eq!(
            r.data_bytes_sent,
            data.len() as u64,
            "the whole file was sent again"
        );
    })
    .await;
}

/// A block refused before anything is written (here: shorter than its place in the file)
/// fails its file but keeps the partial file, and the blocks verified before it count for
/// the retry: they are made durable when the file fails, not only at the next sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_refused_unwritten_keeps_the_verified_blocks_for_the_retry() {
    within(60, async {
        let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut rx = receiver(out.path()).await;
        let (data, reason) = second_block_damaged(src.path(), &mut rx, |mut b| {
            b.truncate(1000);
            b
        })
        .await;
        assert!(reason.contains("block 1 has 1000 bytes"), "{reason}");
        assert!(
            out.path().join(".big.amst-journal").exists(),
            "the journal stays"
        );
        let r = resend_lands_whole(&mut rx, src.path(), out.path(), &data).await;
        assert_eq!(r.blocks_resumed, 1, "block 0 resumes");
        assert_eq!(
            r.data_bytes_sent,
            data.len() as u64 - (1 << 20),
            "all but block 0"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_directory_leaves_what_is_in_its_place_as_it_was() {
    within(60, async {
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        // The receiver already has a file where the tree has a directory, and a link (to a
        // directory outside the output) where it has another.
        let file_here = out.path().join("a");
        std::fs::write(&file_here, b"theirs").unwrap();
        std::fs::set_permissions(&file_here, std::fs::Permissions::from_mode(0o600)).unwrap();
        set_mtime(&file_here, 1_500_000_000);
        std::fs::set_permissions(elsewhere.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        set_mtime(elsewhere.path(), 1_500_000_000);
        std::os::unix::fs::symlink(elsewhere.path(), out.path().join("b")).unwrap();
        for d in ["a", "b", "c"] {
            let dir = src.path().join(d);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("f"), b"ours").unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
            set_mtime(&dir, 1_600_000_000);
        }
        let mut rx = receiver(out.path()).await;
        let paths: Vec<PathBuf> = ["a", "b", "c"].iter().map(|d| src.path().join(d)).collect();
        let r = send(rx.addr, &paths, SendOptions::default()).await;
        let _ = rx.reports.recv().await;
        let failed: Vec<_> = r.failures().map(|(p, _)| p.to_string()).collect();
        assert!(failed.contains(&"a".to_string()), "{failed:?}");
        assert!(failed.contains(&"b".to_string()), "{failed:?}");

        let m = std::fs::metadata(&file_here).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o600, "the file's mode is untouched");
        assert_eq!(m.mtime(), 1_500_000_000, "the file's mtime is untouched");
        assert_eq!(std::fs::read(&file_here).unwrap(), b"theirs");
        let m = std::fs::metadata(elsewhere.path()).unwrap();
        assert_eq!(
            m.mode() & 0o7777,
            0o700,
            "nothing is changed through the link"
        );
        assert_eq!(m.mtime(), 1_500_000_000);
        assert!(!elsewhere.path().join("f").exists());
        // The directory that could be made gets the sender's mode and mtime.
        let m = std::fs::metadata(out.path().join("c")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o777);
        assert_eq!(m.mtime(), 1_600_000_000);
        assert_eq!(std::fs::read(out.path().join("c/f")).unwrap(), b"ours");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparse_file_arrives_sparse() {
    within(240, async {
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let p = src.path().join("disk.img");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 30).unwrap();
        use std::os::unix::fs::FileExt;
        let data = pattern(16 << 20, 7);
        for i in 0..4u64 {
            f.write_all_at(&data, i * (256 << 20) + 4096).unwrap();
        }
        drop(f);
        if p.metadata().unwrap().blocks() * 512 > 200 << 20 {
            eprintln!("this file system does not make sparse files; skipping");
            return;
        }
        let mut rx = receiver(out.path()).await;
        let r = send(rx.addr, std::slice::from_ref(&p), SendOptions::default()).await;
        rx.reports.recv().await.unwrap().unwrap();
        assert_eq!(r.finished.stored, 1, "{:?}", r.entries);
        assert!(
            r.data_bytes_sent <= (64 << 20) + (8 << 20),
            "holes are not sent: {} bytes",
            r.data_bytes_sent
        );
        let got = out.path().join("disk.img");
        let m = got.metadata().unwrap();
        assert_eq!(m.len(), 1 << 30);
        assert!(
            m.blocks() * 512 < 100 << 20,
            "allocated {} bytes for 64 MiB of data",
            m.blocks() * 512
        );
        assert_eq!(b3(&got), b3(&p));
    })
    .await;
}

/// Kills the sender (its task and session) once half the tree has arrived, changes one
/// file, and sends again: only what is missing goes on the wire, the changed file is sent
/// whole, and every file's BLAKE3 matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_transfer_resumes_and_a_changed_file_is_sent_anew() {
    within(300, async {
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let top = src.path().join("tree");
        std::fs::create_dir(&top).unwrap();
        let sizes = [96usize << 20, 96 << 20, 48 << 20, 16 << 20];
        for (i, n) in sizes.iter().enumerate() {
            std::fs::write(top.join(format!("f{i}")), pattern(*n, i as u8)).unwrap();
        }
        for i in 0..200 {
            std::fs::write(top.join(format!("small{i:03}")), pattern(3000, i as u8)).unwrap();
        }
        let total: u64 = sizes.iter().map(|&n| n as u64).sum::<u64>() + 200 * 3000;
        let mut rx = receiver(out.path()).await;
        let ch: Arc<dyn Channel> = Arc::new(Amst::connect(rx.addr, config()).await.unwrap());
        let progress = Arc::new(SendProgress::default());
        let opts = SendOptions {
            readers: 2,
            ..SendOptions::default()
        };
        let tree = Tree::scan(std::slice::from_ref(&top)).unwrap();
        let (o, p) = (opts.clone(), progress.clone());
        let first = tokio::spawn(async move { send_tree(ch, tree, &o, p).await });
        while rx.progress.bytes.load(Ordering::Relaxed) < total / 2 {
            assert!(
                !first.is_finished(),
                "the first try ended before half the tree"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        first.abort();
        let _ = first.await;
        let broken = rx.reports.recv().await.unwrap();
        assert!(broken.is_err(), "the receiver saw the sender go");
        let partials = walk(out.path())
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".amst-journal"))
            .count();
        assert!(partials >= 1, "partial files with journals stay");

        // f3 changes at the sender (f3 may or may not have started; either way it is sent
        // whole); the rest resumes.
        std::fs::write(top.join("f3"), pattern(16 << 20, 200)).unwrap();
        let r = send(rx.addr, std::slice::from_ref(&top), opts).await;
        rx.reports.recv().await.unwrap().unwrap();
        assert_eq!(
            r.failures().count(),
            0,
            "{:?}",
            r.failures().collect::<Vec<_>>()
        );
        assert!(
            r.data_bytes_sent <= total * 55 / 100,
            "second try sent {} of {} bytes",
            r.data_bytes_sent,
            total
        );
        assert!(r.blocks_resumed > 0);
        for (i, n) in sizes.iter().enumerate() {
            let want = if i == 3 {
                pattern(*n, 200)
            } else {
                pattern(*n, i as u8)
            };
            let got = std::fs::read(out.path().join(format!("tree/f{i}"))).unwrap();
            assert!(got == want, "f{i} differs");
        }
        for i in 0..200 {
            assert_eq!(
                b3(&out.path().join(format!("tree/small{i:03}"))),
                b3(&top.join(format!("small{i:03}")))
            );
        }
        let leftovers = walk(out.path())
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(".amst-"))
            .count();
        assert_eq!(leftovers, 0);
    })
    .await;
}

/// A small file arrives whole in one record, and its session lets go of it (its partial
/// name) as soon as it has landed, not when the session ends: a second session sending the
/// same file while the first is still open finds it there and identical, without stopping
/// the first (which a held name would make it do, once the first had been quiet for a
/// second). Letting go early is also what keeps a receiver's memory from holding every file
/// of a large tree until the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_landed_small_file_is_let_go_while_its_session_goes_on() {
    within(60, async {
        let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let data = pattern(5000, 3);
        let path = src.path().join("a");
        std::fs::write(&path, &data).unwrap();
        // Sessions run side by side here, as under `amst serve`.
        let listener = Arc::new(
            Amst::listen("127.0.0.1:0".parse().unwrap(), config())
                .await
                .unwrap(),
        );
        let addr = listener.local_addr().unwrap();
        let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
        let (l, o) = (listener.clone(), out.path().to_path_buf());
        tokio::spawn(async move {
            while let Ok(session) = l.accept().await {
                let (tx, o) = (tx.clone(), o.clone());
                tokio::spawn(async move {
                    let ch: Arc<dyn Channel> = Arc::new(session);
                    if let Ok(Some(first)) = ch.recv().await {
                        let opts = ReceiveOptions::new(&o);
                        let _ = tx.send(receive_tree(ch, first, &opts, Default::default()).await);
                    }
                });
            }
        });

        // The first session: the file, whole, and then nothing until the others are done.
        let entry = amst_files::scan::entry_of(
            b"a".to_vec(),
            EntryKind::File { size: 5000 },
            &std::fs::metadata(&path).unwrap(),
        );
        let first = Amst::connect(addr, config()).await.unwrap();
        let hello = Hello {
            version: TREE_PROTOCOL_VERSION,
            block_size: 1 << 20,
            policy: ExistingPolicy::default(),
            resume: true,
            entries: 1,
            bytes: 5000,
        };
        first.send(Message::Hello(hello).encode()).await.unwrap();
        let manifest = Message::Manifest {
            entries: vec![entry],
            last: true,
        };
        first.send(manifest.encode()).await.unwrap();
        let record = Record::Whole {
            id: 0,
            hash: *blake3::hash(&data).as_bytes(),
            data: Bytes::from(data.clone()),
        };
        first
            .send(Message::Data(vec![record]).encode())
            .await
            .unwrap();
        loop {
            let m = first.recv().await.unwrap().expect("the receiver's results");
            if let Message::Results(items) = Message::decode(m).unwrap() {
                assert_eq!(
                    items,
                    vec![(
                        0,
                        Outcome::Stored {
                            hash: *blake3::hash(&data).as_bytes()
                        }
                    )]
                );
                break;
            }
        }
        // Quiet for longer than a session may be before another takes over what it holds.
        tokio::time::sleep(Duration::from_millis(1500)).await;

        let second = send(addr, std::slice::from_ref(&path), SendOptions::default()).await;
        assert_eq!(second.finished.identical, 1, "{:?}", second.entries);
        assert_eq!(second.data_bytes_sent, 0);
        reports.recv().await.unwrap().unwrap();

        first.send(Message::End.encode()).await.unwrap();
        while let Ok(Some(m)) = first.recv().await {
            if let Message::Finished(_) = Message::decode(m).unwrap() {
                break;
            }
        }
        first.close().await.unwrap();
        let r = reports
            .recv()
            .await
            .unwrap()
            .expect("the first session was not stopped");
        assert_eq!(r.finished.stored, 1);
        assert!(std::fs::read(out.path().join("a")).unwrap() == data);
    })
    .await;
}

/// The sender announces at most `manifest_window` entries ahead of the receiver's results,
/// so the receiver never holds more files than that in flight; the tree still arrives
/// whole, with small files (whose part-filled batches must go out while the manifest
/// waits), files of several blocks, an empty file and a link, and a second send finds it
/// all identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windowed_manifest_bounds_the_files_in_flight_and_the_tree_arrives() {
    within(60, async {
        let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let top = src.path().join("w");
        for d in 0..6 {
            let dir = top.join(format!("d{d}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..50u8 {
                std::fs::write(dir.join(format!("f{f}")), pattern(100 + usize::from(f), f))
                    .unwrap();
            }
        }
        std::fs::write(top.join("big1"), pattern(200_000, 1)).unwrap();
        std::fs::write(top.join("d3/big2"), pattern(150_000, 2)).unwrap();
        std::fs::write(top.join("empty"), b"").unwrap();
        std::os::unix::fs::symlink("d0/f1", top.join("link")).unwrap();
        let mut rx = receiver(out.path()).await;
        let opts = SendOptions {
            manifest_window: 16,
            block_size: 64 << 10,
            ..SendOptions::default()
        };
        let first = send(rx.addr, std::slice::from_ref(&top), opts.clone()).await;
        let received = rx.reports.recv().await.unwrap().unwrap();
        assert_eq!(first.failures().count(), 0, "{:?}", first.entries);
        assert_eq!(received.finished.failed, 0);
        assert_eq!(first.finished.stored, 1 + 6 + 300 + 2 + 1 + 1);
        let peak = rx.progress.files_in_flight_peak.load(Ordering::Relaxed);
        assert!(
            (1..=16).contains(&peak),
            "{peak} files in flight at the receiver at once"
        );
        for p in walk(&top) {
            let rel = p.strip_prefix(src.path()).unwrap();
            let got = out.path().join(rel);
            if p.is_file() && !p.is_symlink() {
                assert!(
                    std::fs::read(&got).unwrap() == std::fs::read(&p).unwrap(),
                    "{rel:?}"
                );
            }
        }
        assert_eq!(
            std::fs::read_link(out.path().join("w/link")).unwrap(),
            Path::new("d0/f1")
        );

        let again = send(rx.addr, std::slice::from_ref(&top), opts).await;
        rx.reports.recv().await.unwrap().unwrap();
        assert_eq!(
            again.finished.identical,
            // The files and the link; directories count as stored.
            300 + 2 + 1 + 1,
            "{:?}",
            again.finished
        );
        assert_eq!(again.data_bytes_sent, 0);
    })
    .await;
}

/// A sender that announces more files than the receiver keeps in flight (one that ignores
/// the manifest window) is stopped with an error that names the limit, and both ends say
/// so; nothing of the refused batch is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_past_the_receivers_files_in_flight_is_stopped_with_the_limit() {
    within(60, async {
        let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut paths = Vec::new();
        for i in 0..10u8 {
            let p = src.path().join(format!("f{i}"));
            std::fs::write(&p, [i]).unwrap();
            paths.push(p);
        }
        let opts = ReceiveOptions {
            max_files_in_flight: 4,
            ..ReceiveOptions::new(out.path())
        };
        let mut rx = receiver_with(opts).await;
        let ch: Arc<dyn Channel> = Arc::new(Amst::connect(rx.addr, config()).await.unwrap());
        let tree = Tree::scan(&paths).unwrap();
        let sent = send_tree(
            ch,
            tree,
            &SendOptions {
                manifest_window: 100,
                ..SendOptions::default()
            },
            Default::default(),
        )
        .await;
        let received = rx.reports.recv().await.unwrap();
        let why = match received {
            Err(amst_files::Error::Protocol(why)) => why,
            other => panic!("{other:?}"),
        };
        assert!(why.contains("limit of 4 files"), "{why}");
        match sent {
            Err(amst_files::Error::Aborted(reason)) => assert_eq!(reason, why),
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);

        // Within the limit, the same files arrive.
        let r = send(
            rx.addr,
            &paths,
            SendOptions {
                manifest_window: 4,
                ..SendOptions::default()
            },
        )
        .await;
        rx.reports.recv().await.unwrap().unwrap();
        assert_eq!(r.finished.stored, 10, "{:?}", r.entries);
    })
    .await;
}
