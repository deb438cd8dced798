//! A QUIC stream's bytes put back in order here rather than in quinn.
//!
//! quinn keeps a stream's out-of-order data in at most 1,024 separate pieces and aborts the
//! connection past that ("too many gaps in stream buffer"), which a lossy path with a large
//! window reaches when a queue overflows. Read unordered, quinn hands over each piece as it
//! arrives and keeps none; the pieces wait here until the bytes before them come, bounded in
//! bytes (the peer's AMST credit keeps a sound peer far below) and in pieces.

use std::collections::BTreeMap;

use amst_core::ProtocolError;
use bytes::{Buf, Bytes, BytesMut};

/// Pieces one stream may hold ahead of a gap: a 15 MB window of 1,200-byte packets is about
/// 12,500.
pub(crate) const MAX_PIECES: usize = 1 << 16;

/// Bytes the control stream may hold behind a gap: its frames are acks, credit and pings.
pub(crate) const CONTROL_OUT_OF_ORDER: u64 = 16 << 20;

/// Bytes a data stream may hold behind a gap, for a receiver granting `window` of credit:
/// twice the most a sound peer can have sent past the gap.
pub(crate) fn data_out_of_order(window: u64) -> u64 {
    window.saturating_mul(2)
}

#[derive(Debug)]
pub(crate) struct StreamOrder {
    /// The offset of the first byte not yet handed on.
    next: u64,
    waiting: BTreeMap<u64, Bytes>,
    waiting_bytes: u64,
    max_bytes: u64,
}

impl StreamOrder {
    /// At most `max_bytes` wait behind a gap.
    pub(crate) fn new(max_bytes: u64) -> Self {
        StreamOrder {
            next: 0,
            waiting: BTreeMap::new(),
            waiting_bytes: 0,
            max_bytes,
        }
    }

    /// Takes the piece at `offset` and appends to `out` every byte now in order.
    pub(crate) fn insert(
        &mut self,
        offset: u64,
        bytes: Bytes,
        out: &mut BytesMut,
    ) -> Result<(), ProtocolError> {
        if offset > self.next {
            if self.waiting.len() >= MAX_PIECES {
                return Err(ProtocolError::OutOfOrderExcess {
                    what: "pieces",
                    limit: MAX_PIECES as u64,
                });
            }
            let len = bytes.len() as u64;
            if self.waiting_bytes + len > self.max_bytes {
                return Err(ProtocolError::OutOfOrderExcess {
                    what: "bytes",
                    limit: self.max_bytes,
                });
            }
            // quinn hands each byte over once; a longer piece at the same offset wins all
            // the same, so nothing is lost if it ever did not.
            let keep = match self.waiting.get(&offset) {
                Some(old) if old.len() >= bytes.len() => false,
                Some(old) => {
                    self.waiting_bytes -= old.len() as u64;
                    true
                }
                None => true,
            };
            if keep {
                self.waiting_bytes += len;
                self.waiting.insert(offset, bytes);
            }
            return Ok(());
        }
        self.append(offset, bytes, out);
        while let Some(entry) = self.waiting.first_entry() {
            if *entry.key() > self.next {
                break;
            }
            let (at, piece) = entry.remove_entry();
            self.waiting_bytes -= piece.len() as u64;
            self.append(at, piece, out);
        }
        Ok(())
    }

    /// Whether bytes wait behind a gap (at the end of a stream, a peer that left one).
    pub(crate) fn has_gap(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Appends the part of a piece at `at` (at most `next`) that is past `next`.
    fn append(&mut self, at: u64, mut piece: Bytes, out: &mut BytesMut) {
        let seen = (self.next - at).min(piece.len() as u64) as usize;
        piece.advance(seen);
        self.next += piece.len() as u64;
        out.extend_from_slice(&piece);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn feed(order: &mut StreamOrder, pieces: &[(u64, &[u8])]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for (at, b) in pieces {
            order
                .insert(*at, Bytes::copy_from_slice(b), &mut out)
                .unwrap();
        }
        out.to_vec()
    }

    #[test]
    fn pieces_wait_for_the_gap_before_them() {
        let mut o = StreamOrder::new(1 << 20);
        assert_eq!(feed(&mut o, &[(3, b"def"), (9, b"j")]), b"");
        assert!(o.has_gap());
        assert_eq!(feed(&mut o, &[(0, b"abc")]), b"abcdef");
        assert_eq!(feed(&mut o, &[(6, b"ghi")]), b"ghij");
        assert!(!o.has_gap());
        // Bytes handed on already are not handed on again.
        assert_eq!(feed(&mut o, &[(8, b"ijk")]), b"k");
    }

    #[test]
    fn a_peer_past_the_bounds_is_refused_with_the_limit() {
        let mut o = StreamOrder::new(4);
        let mut out = BytesMut::new();
        o.insert(10, Bytes::from_static(b"abc"), &mut out).unwrap();
        let err = o
            .insert(20, Bytes::from_static(b"de"), &mut out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("4 bytes"), "{err}");
        let mut o = StreamOrder::new(u64::MAX);
        for i in 0..MAX_PIECES as u64 {
            o.insert(2 * i + 1, Bytes::from_static(b"x"), &mut out)
                .unwrap();
        }
        let err = o
            .insert(u64::MAX / 2, Bytes::from_static(b"y"), &mut out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("65536 pieces"), "{err}");
    }

    proptest! {
        #[test]
        fn any_order_and_repeats_give_the_stream(
            cuts in proptest::collection::vec(1usize..50, 1..40),
            seed in any::<u64>(),
            repeats in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let data: Vec<u8> = (0..cuts.iter().sum::<usize>()).map(|i| (i * 7) as u8).collect();
            let mut pieces = Vec::new();
            let mut at = 0;
            for c in &cuts {
                pieces.push((at as u64, data[at..at + c].to_vec()));
                at += c;
            }
            for r in &repeats {
                let p = pieces[r.index(pieces.len())].clone();
                pieces.push(p);
            }
            // A deterministic shuffle from the seed.
            let mut s = seed | 1;
            for i in (1..pieces.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                pieces.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let mut o = StreamOrder::new(u64::MAX);
            let mut out = BytesMut::new();
            for (at, b) in pieces {
                o.insert(at, Bytes::from(b), &mut out).unwrap();
            }
            prop_assert_eq!(out.to_vec(), data);
            prop_assert!(!o.has_gap());
        }
    }
}
