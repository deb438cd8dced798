//! The resume journal of one partial file, as bytes: a header naming the sender's file as it
//! was (size, mtime, block size), then one record per block that arrived, was verified
//! against its BLAKE3 chaining value and was written.
//!
//! Records are appended after the block's `pwrite`, so a journal never names a block that
//! was not written. Each record carries its own check bytes: a torn record at the end (the
//! process was killed mid-append) is dropped, and anything after it ignored. A journal whose
//! header does not match the file the sender offers now is discarded with the partial file,
//! and the file is sent anew rather than spliced.

use crate::protocol::Digest;

const MAGIC: &[u8; 8] = b"AMSTJNL1";
/// Length of the header.
pub const HEADER_LEN: usize = 8 + 4 + 8 + 8 + 4 + 8;
/// Length of one record.
pub const RECORD_LEN: usize = 8 + 32 + 8;

/// Which version of the sender's file the partial copy belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Block size of the transfer.
    pub block_size: u32,
    /// The file's size.
    pub size: u64,
    /// Its mtime, seconds.
    pub mtime_sec: i64,
    /// Its mtime, nanoseconds.
    pub mtime_nsec: u32,
}

/// A parsed journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Journal {
    /// The file the blocks belong to.
    pub identity: Identity,
    /// Verified blocks and their chaining values, in the order they landed, no repeats.
    pub verified: Vec<(u64, Digest)>,
    /// Bytes of the journal that parsed; anything after is a torn tail to cut off.
    pub valid_len: usize,
}

fn check(bytes: &[u8]) -> [u8; 8] {
    let mut out = [0; 8];
    out.copy_from_slice(&blake3::hash(bytes).as_bytes()[..8]);
    out
}

/// The header bytes for `id`.
pub fn header(id: &Identity) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&id.block_size.to_be_bytes());
    h[12..20].copy_from_slice(&id.size.to_be_bytes());
    h[20..28].copy_from_slice(&id.mtime_sec.to_be_bytes());
    h[28..32].copy_from_slice(&id.mtime_nsec.to_be_bytes());
    let c = check(&h[..32]);
    h[32..].copy_from_slice(&c);
    h
}

/// One record's bytes.
pub fn record(index: u64, cv: &Digest) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[..8].copy_from_slice(&index.to_be_bytes());
    r[8..40].copy_from_slice(cv);
    let c = check(&r[..40]);
    r[40..].copy_from_slice(&c);
    r
}

/// Parses a journal; `None` when the header is missing or damaged. Records for blocks past
/// the end of the file are dropped with everything after them.
pub fn parse(bytes: &[u8]) -> Option<Journal> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC || check(&bytes[..32]) != bytes[32..40] {
        return None;
    }
    let u32_at = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_be_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let identity = Identity {
        block_size: u32_at(8),
        size: u64_at(12),
        mtime_sec: u64_at(20) as i64,
        mtime_nsec: u32_at(28),
    };
    if identity.block_size == 0 {
        return None;
    }
    let blocks = identity.size.div_ceil(u64::from(identity.block_size));
    let mut seen = std::collections::HashSet::new();
    let mut verified = Vec::new();
    let mut at = HEADER_LEN;
    while let Some(r) = bytes.get(at..at + RECORD_LEN) {
        if check(&r[..40]) != r[40..] {
            break;
        }
        let index = u64::from_be_bytes(r[..8].try_into().expect("8 bytes"));
        if index >= blocks {
            break;
        }
        if seen.insert(index) {
            verified.push((index, r[8..40].try_into().expect("32 bytes")));
        }
        at += RECORD_LEN;
    }
    Some(Journal {
        identity,
        verified,
        valid_len: at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: Identity = Identity {
        block_size: 1 << 20,
        size: 10 << 20,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 5,
    };

    #[test]
    fn a_journal_roundtrips_and_a_torn_tail_is_cut() {
        let mut j = header(&ID).to_vec();
        j.extend_from_slice(&record(3, &[1; 32]));
        j.extend_from_slice(&record(0, &[2; 32]));
        j.extend_from_slice(&record(3, &[1; 32]));
        let whole = j.len();
        j.extend_from_slice(&record(4, &[3; 32])[..20]);
        let p = parse(&j).unwrap();
        assert_eq!(p.identity, ID);
        assert_eq!(p.verified, vec![(3, [1; 32]), (0, [2; 32])]);
        assert_eq!(p.valid_len, whole);
    }

    #[test]
    fn damage_is_never_believed() {
        assert!(parse(b"short").is_none());
        let mut h = header(&ID).to_vec();
        h[13] ^= 1;
        assert!(
            parse(&h).is_none(),
            "a changed size must not pass the check"
        );
        let mut j = header(&ID).to_vec();
        let mut r = record(1, &[7; 32]);
        r[9] ^= 0x80;
        j.extend_from_slice(&r);
        j.extend_from_slice(&record(2, &[8; 32]));
        assert!(parse(&j).unwrap().verified.is_empty());
        let mut j = header(&ID).to_vec();
        j.extend_from_slice(&record(10, &[7; 32]));
        assert!(
            parse(&j).unwrap().verified.is_empty(),
            "block 10 of 10 is past the end"
        );
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(tail in prop::collection::vec(any::<u8>(), 0..300)) {
            let mut j = header(&ID).to_vec();
            j.extend_from_slice(&tail);
            let p = parse(&j).unwrap();
            prop_assert!(p.valid_len <= j.len());
            let _ = parse(&tail);
        }
    }
}
