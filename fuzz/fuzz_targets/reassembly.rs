//! The reassembler on arbitrary chunk sequences: protocol errors are fine, panics are not, and
//! it never holds more than the window plus the largest message it has seen.
#![no_main]

use amst_core::codec::DataChunk;
use amst_core::{Reassembler, ReassemblyConfig};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let config = ReassemblyConfig {
        window: 4096,
        max_message: 8192,
        max_ack_ranges: 16,
        max_pending_messages: 64,
    };
    let mut rx = Reassembler::new(config);
    let mut largest = 0u64;
    for rec in data.chunks(8) {
        if rec.len() < 8 {
            break;
        }
        let msg_id = u64::from(rec[0] % 16);
        let msg_len = u64::from(u16::from_le_bytes([rec[1], rec[2]]) % 8192);
        let msg_offset = u64::from(u16::from_le_bytes([rec[3], rec[4]])) % (msg_len + 1);
        let len = (u64::from(rec[5]) * 16).min(msg_len - msg_offset);
        let base = u64::from(rec[6]) * 64;
        let chunk = DataChunk::new(base + msg_offset, msg_id, msg_offset, msg_len, Bytes::from(vec![rec[7]; len as usize]));
        if rx.insert(chunk).is_err() {
            return;
        }
        largest = largest.max(msg_len);
        assert!(rx.buffered_bytes() <= config.window + 2 * largest);
        if rec[7] & 1 == 0 {
            let _ = rx.pop();
        }
        let ack = rx.ack();
        assert!(ack.ranges.len() <= config.max_ack_ranges);
    }
});
