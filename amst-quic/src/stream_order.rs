//! A QUIC stream's bytes put back in order here rather than in quinn.
//!
//! quinn keeps a stream's out-of-order data in at most 1,024 separate pieces and aborts the
//! connection past that ("too many gaps in stream buffer"), which a lossy path with a large
//! window reaches when a queue overflows. Read unordered, quinn hands over each piece as it
//! arrives and keeps none; the pieces wait here until the bytes before them come, bounded in
//! bytes (the peer's AMST credit keeps a sound peer far below) and in pieces.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use amst_core::ProtocolError;
use bytes::{Buf, Bytes, BytesMut};

/// Pieces a connection's streams may hold ahead of gaps, together: a 15 MB window of
/// 1,200-byte packets is about 12,500.
pub(crate) const MAX_PIECES: u64 = 1 << 16;

/// Bytes the control stream may hold behind a gap: its frames are acks, credit and pings.
pub(crate) const CONTROL_OUT_OF_ORDER: u64 = 16 << 20;

/// Bytes a connection's data streams may hold behind gaps, together, for a receiver granting
/// `window` of credit: twice the most a sound peer can have sent past them. (Read unordered,
/// quinn's own flow control no longer bounds this: it counts what we read as consumed.)
pub(crate) fn data_out_of_order(window: u64) -> u64 {
    window.saturating_mul(2)
}

/// What the streams of one connection hold behind gaps, counted together, and the bounds.
#[derive(Clone, Debug)]
pub(crate) struct Waiting {
    counts: Arc<Counts>,
    max_bytes: u64,
}

#[derive(Debug, Default)]
struct Counts {
    bytes: AtomicU64,
    pieces: AtomicU64,
}

impl Waiting {
    /// Bounds shared by every stream given a clone.
    pub(crate) fn new(max_bytes: u64) -> Self {
        Waiting {
            counts: Arc::default(),
            max_bytes,
        }
    }

    fn hold(&self, bytes: u64) -> Result<(), ProtocolError> {
        let c = &self.counts;
        if c.pieces.fetch_add(1, Ordering::Relaxed) >= MAX_PIECES {
            c.pieces.fetch_sub(1, Ordering::Relaxed);
            return Err(ProtocolError::OutOfOrderExcess {
                what: "pieces",
                limit: MAX_PIECES,
            });
        }
        if c.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes > self.max_bytes {
            self.release(1, bytes);
            return Err(ProtocolError::OutOfOrderExcess {
                what: "bytes",
                limit: self.max_bytes,
            });
        }
        Ok(())
    }

    fn release(&self, pieces: u64, bytes: u64) {
        self.counts.pieces.fetch_sub(pieces, Ordering::Relaxed);
        self.counts.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub(crate) struct StreamOrder {
    /// The offset of the first byte not yet handed on.
    next: u64,
    waiting: BTreeMap<u64, Bytes>,
    waiting_bytes: u64,
    shared: Waiting,
}

impl StreamOrder {
    /// A stream whose pieces count against `shared`.
    pub(crate) fn new(shared: Waiting) -> Self {
        StreamOrder {
            next: 0,
            waiting: BTreeMap::new(),
            waiting_bytes: 0,
            shared,
        }
    }

    /// Takes the piece at `offset` and appends to `out` every byte now in order.
    pub(crate) fn insert(
        &mut self,
        offset: u64,
        bytes: Bytes,
        out: &mut impl InOrder,
    ) -> Result<(), ProtocolError> {
        if offset > self.next {
            // quinn hands each byte over once; a longer piece at the same offset wins all
            // the same, so nothing is lost if it ever did not.
            if let Some(old) = self.waiting.get(&offset)
                && old.len() >= bytes.len()
            {
                return Ok(());
            }
            let len = bytes.len() as u64;
            self.shared.hold(len)?;
            if let Some(old) = self.waiting.insert(offset, bytes) {
                self.shared.release(1, old.len() as u64);
                self.waiting_bytes -= old.len() as u64;
            }
            self.waiting_bytes += len;
            return Ok(());
        }
        self.append(offset, bytes, out);
        while let Some(entry) = self.waiting.first_entry() {
            if *entry.key() > self.next {
                break;
            }
            let (at, piece) = entry.remove_entry();
            self.waiting_bytes -= piece.len() as u64;
            self.shared.release(1, piece.len() as u64);
            self.append(at, piece, out);
        }
        Ok(())
    }

    /// Whether bytes wait behind a gap (at the end of a stream, a peer that left one).
    pub(crate) fn has_gap(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Appends the part of a piece at `at` (at most `next`) that is past `next`.
    fn append(&mut self, at: u64, mut piece: Bytes, out: &mut impl InOrder) {
        let seen = (self.next - at).min(piece.len() as u64) as usize;
        piece.advance(seen);
        self.next += piece.len() as u64;
        out.append(&piece);
    }
}

/// Where a stream's bytes go once they are in order.
pub(crate) trait InOrder {
    fn append(&mut self, bytes: &[u8]);
}

impl InOrder for BytesMut {
    fn append(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl Drop for StreamOrder {
    fn drop(&mut self) {
        self.shared
            .release(self.waiting.len() as u64, self.waiting_bytes);
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
        let mut o = StreamOrder::new(Waiting::new(1 << 20));
        assert_eq!(feed(&mut o, &[(3, b"def"), (9, b"j")]), b"");
        assert!(o.has_gap());
        assert_eq!(feed(&mut o, &[(0, b"abc")]), b"abcdef");
        assert_eq!(feed(&mut o, &[(6, b"ghi")]), b"ghij");
        assert!(!o.has_gap());
        // Bytes handed on already are not handed on again.
        assert_eq!(feed(&mut o, &[(8, b"ijk")]), b"k");
    }

    #[test]
    fn a_peer_past_the_bounds_is_refused_with_the_limit_across_its_streams() {
        let shared = Waiting::new(4);
        let mut a = StreamOrder::new(shared.clone());
        let mut b = StreamOrder::new(shared.clone());
        let mut out = BytesMut::new();
        a.insert(10, Bytes::from_static(b"abc"), &mut out).unwrap();
        let err = b
            .insert(20, Bytes::from_static(b"de"), &mut out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("4 bytes"), "{err}");
        // What a stream lets go of, in order or when it ends, counts no more.
        a.insert(0, Bytes::from_static(&[0; 10]), &mut out).unwrap();
        b.insert(20, Bytes::from_static(b"de"), &mut out).unwrap();
        drop(b);
        assert_eq!(shared.counts.bytes.load(Ordering::Relaxed), 0);
        assert_eq!(shared.counts.pieces.load(Ordering::Relaxed), 0);

        let shared = Waiting::new(u64::MAX);
        let (mut a, mut b) = (StreamOrder::new(shared.clone()), StreamOrder::new(shared));
        for i in 0..MAX_PIECES {
            let o = if i % 2 == 0 { &mut a } else { &mut b };
            o.insert(2 * i + 1, Bytes::from_static(b"x"), &mut out)
                .unwrap();
        }
        let err = a
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
            let mut o = StreamOrder::new(Waiting::new(u64::MAX));
            let mut out = BytesMut::new();
            for (at, b) in pieces {
                o.insert(at, Bytes::from(b), &mut out).unwrap();
            }
            prop_assert_eq!(out.to_vec(), data);
            prop_assert!(!o.has_gap());
        }
    }
}
