//! On a host without RDMA (this CI host: no rdma-core, no device), every constructor says
//! so with `Unavailable`, naming the reason, so amst-hybrid can fall back to TCP.

use amst_core::codec::Psk;
use amst_core::{Error, TransportKind};
use amst_rdma::{RdmaConfig, RdmaListener, RdmaTransport, devices};

fn host_has_rdma_device() -> bool {
    std::fs::read_dir("/sys/class/infiniband")
        .map(|d| d.count() > 0)
        .unwrap_or(false)
}

fn assert_unavailable(e: Error) {
    match e {
        Error::Unavailable {
            transport: TransportKind::Rdma,
            reason,
        } => {
            eprintln!("unavailable: {reason}");
            assert!(
                reason.starts_with("no RDMA device"),
                "the reason should say there is no device: {reason}"
            )
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn construction_without_a_device_is_unavailable() {
    let config = RdmaConfig::new(Psk::new(b"0123456789abcdef").unwrap());
    if host_has_rdma_device() && cfg!(feature = "rdma") {
        // In the Soft-RoCE VMs: the same calls must find the device instead.
        let names = devices().expect("a device is present");
        assert!(!names.is_empty());
        return;
    }
    assert_unavailable(devices().unwrap_err());
    assert_unavailable(
        RdmaListener::bind("127.0.0.1:0".parse().unwrap(), config.clone())
            .await
            .unwrap_err(),
    );
    // No listener is needed: the device check comes before any connection attempt.
    assert_unavailable(
        RdmaTransport::connect("127.0.0.1:9".parse().unwrap(), config)
            .await
            .unwrap_err(),
    );
}

#[tokio::test]
async fn a_named_device_that_does_not_exist_is_unavailable() {
    if !cfg!(feature = "rdma") || !host_has_rdma_device() {
        eprintln!("skip: needs the rdma feature and an RDMA device (run by `cargo xtask rdma-vm`)");
        return;
    }
    let mut config = RdmaConfig::new(Psk::new(b"0123456789abcdef").unwrap());
    config.device = Some("no-such-device0".into());
    let l = RdmaListener::bind("127.0.0.1:0".parse().unwrap(), config.clone())
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let server = tokio::spawn(async move { l.accept().await.map(|_| ()) });
    match RdmaTransport::connect(addr, config).await {
        Err(Error::Unavailable { reason, .. }) => {
            assert!(reason.contains("no-such-device0"), "{reason}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    server.abort();
}
