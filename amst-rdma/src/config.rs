//! Settings of the RDMA transport.

use std::time::Duration;

use amst_core::codec::{DATA_HEADER_LEN, Psk};
use amst_core::{Error, MemoryBudget, Result};

use crate::wire::SEGMENT_HEADER_LEN;

/// How to pick the RDMA device, port and GID.
#[derive(Clone, Debug)]
pub struct RdmaConfig {
    /// The pre-shared key that authenticates the TCP bootstrap.
    pub psk: Psk,
    /// Device name (`rxe0`, `mlx5_0`), or `None` for the first device with an active port.
    pub device: Option<String>,
    /// The device port, 1-based.
    pub port: u8,
    /// The GID index, or `None` to choose: a RoCE v2 GID holding an IPv4-mapped address
    /// first, then any RoCE v2 GID, then index 0 (InfiniBand).
    pub gid_index: Option<u32>,
    /// Receives kept posted; each holds one small segment.
    pub recv_depth: u32,
    /// Largest payload sent with SEND into a posted receive; larger segments go by RDMA WRITE
    /// with immediate into the peer's ring.
    pub small_max: u32,
    /// Slots in the receive ring.
    pub ring_slots: u32,
    /// Bytes per ring slot, header included.
    pub slot_size: u32,
    /// Bytes of queued, unacknowledged messages before `send` waits: the memory bound.
    pub send_window: u64,
    /// Bytes the peer may send beyond what the application has taken (the credit window),
    /// at most: the window is also at most this session's share of `memory_budget`.
    pub receive_window: u64,
    /// The byte budget every received byte is held against (the registered receive memory
    /// included), shared with every other session given the same budget:
    /// [`MemoryBudget::process`] unless set.
    pub memory_budget: MemoryBudget,
    /// With data outstanding, the peer is pinged after a third of this much silence, and the
    /// session fails after all of it.
    pub idle_timeout: Duration,
    /// Largest message accepted.
    pub max_message: u64,
    /// Limit for the bootstrap connection and handshake.
    pub handshake_timeout: Duration,
    /// The RC ack timeout exponent (4.096 µs × 2^n) and retry count: together they bound how
    /// long a dead peer takes to surface as a retry-exceeded error.
    pub ack_timeout: u8,
    /// See [`ack_timeout`](Self::ack_timeout). At most 6: Soft-RoCE (rxe) treats 7 as
    /// "retry forever", which would turn a dead peer into a hang.
    pub retry_count: u8,
}

impl RdmaConfig {
    /// Defaults sized for a datacenter link: 256 KiB slots × 64 (16 MiB ring), 256 receives.
    pub fn new(psk: Psk) -> Self {
        RdmaConfig {
            psk,
            device: None,
            port: 1,
            gid_index: None,
            recv_depth: 256,
            small_max: 4096 - SEGMENT_HEADER_LEN as u32,
            ring_slots: 64,
            slot_size: 256 * 1024,
            send_window: 64 << 20,
            receive_window: 64 << 20,
            memory_budget: MemoryBudget::process(),
            idle_timeout: Duration::from_secs(30),
            max_message: 1 << 30,
            handshake_timeout: Duration::from_secs(10),
            // 4.096 µs × 2^17 ≈ 0.54 s per try, so about 3.8 s over 7 tries before a dead
            // peer is an error. 14 (67 ms) made starved but alive peers look dead: under
            // qemu TCG a guest can stall for half a second, and rxe counted hundreds of
            // spurious retransmissions and once gave up (retry exceeded) mid-transfer.
            ack_timeout: 17,
            retry_count: 6,
        }
    }

    /// Checks that the values fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: String| Err(Error::Config { field, reason });
        if self.port == 0 {
            return bad("port", "is 0; RDMA ports count from 1".into());
        }
        if self.recv_depth < 4 {
            return bad(
                "recv_depth",
                format!("is {}; use at least 4", self.recv_depth),
            );
        }
        if self.ring_slots < 2 {
            return bad(
                "ring_slots",
                format!("is {}; use at least 2", self.ring_slots),
            );
        }
        if (self.slot_size as usize) <= SEGMENT_HEADER_LEN + self.small_max as usize {
            return bad(
                "slot_size",
                format!(
                    "is {}; it must exceed small_max ({}) plus the {SEGMENT_HEADER_LEN}-byte header",
                    self.slot_size, self.small_max
                ),
            );
        }
        if self.small_max == 0 {
            return bad("small_max", "is 0".into());
        }
        if self.receive_window == 0 {
            return bad("receive_window", "is 0".into());
        }
        if self.idle_timeout.is_zero() {
            return bad("idle_timeout", "is 0".into());
        }
        if self.ack_timeout > 31 {
            return bad(
                "ack_timeout",
                format!("is {}; at most 31", self.ack_timeout),
            );
        }
        if self.retry_count > 6 {
            return bad(
                "retry_count",
                format!(
                    "is {}; at most 6 (7 means retry forever on rxe)",
                    self.retry_count
                ),
            );
        }
        Ok(())
    }

    /// Bytes of each receive buffer.
    pub fn recv_buf_size(&self) -> usize {
        SEGMENT_HEADER_LEN + self.small_max as usize
    }

    /// Payload bytes per ring slot.
    pub fn slot_payload(&self) -> usize {
        self.slot_size as usize - SEGMENT_HEADER_LEN
    }

    /// The largest Data chunk payload: a chunk with its frame header fills one ring slot.
    pub fn chunk_payload(&self) -> usize {
        self.slot_payload().saturating_sub(DATA_HEADER_LEN).max(1)
    }

    /// Bytes of registered receive memory (receive buffers and ring) a session pins.
    pub fn pinned_receive_bytes(&self) -> u64 {
        self.recv_depth as u64 * self.recv_buf_size() as u64
            + self.ring_slots as u64 * self.slot_size as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_name_their_field() {
        let c = RdmaConfig::new(Psk::new(b"0123456789abcdef").unwrap());
        c.validate().unwrap();
        let mut bad = c.clone();
        bad.slot_size = 1024;
        match bad.validate() {
            Err(Error::Config { field, .. }) => assert_eq!(field, "slot_size"),
            other => panic!("{other:?}"),
        }
        let mut bad = c.clone();
        bad.retry_count = 7;
        assert!(matches!(
            bad.validate(),
            Err(Error::Config {
                field: "retry_count",
                ..
            })
        ));
        let mut bad = c;
        bad.port = 0;
        assert!(matches!(
            bad.validate(),
            Err(Error::Config { field: "port", .. })
        ));
    }
}
