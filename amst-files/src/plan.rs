//! What to send, decided without IO: the receiver's want for each file given what it has
//! ([`receiver_want`]), the sender's answer to an existing copy ([`answer_have`]), and which
//! blocks go on the wire given the file's data extents and the blocks already verified
//! ([`BlockPlan`]).

use std::collections::HashSet;

use crate::hash::block_count;
use crate::journal::{Identity, Journal};
use crate::protocol::{Digest, ExistingPolicy, Want};

/// What the receiver finds where a file is to land.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtTarget {
    /// Nothing.
    Missing,
    /// A regular file of `size` bytes; `hash` is its BLAKE3 when it was worth computing
    /// (see [`wants_existing_hash`]).
    File {
        /// Its size.
        size: u64,
        /// Its BLAKE3, if computed.
        hash: Option<Digest>,
    },
    /// A directory, link or special file.
    Other,
}

/// Whether the receiver should hash an existing file of `existing` bytes before deciding:
/// only when it might be identical and the policy could skip it.
pub fn wants_existing_hash(policy: ExistingPolicy, existing: u64, size: u64) -> bool {
    policy != ExistingPolicy::Refuse && existing == size
}

/// The receiver's want for one file. `journal` is the partial copy's journal, if one exists.
pub fn receiver_want(
    policy: ExistingPolicy,
    resume: bool,
    offered: &Identity,
    at_target: AtTarget,
    journal: Option<&Journal>,
) -> Want {
    match at_target {
        AtTarget::Other => {
            return Want::Refuse {
                reason: "something other than a regular file is in the way; not replacing it"
                    .into(),
            };
        }
        AtTarget::File { .. } if policy == ExistingPolicy::Refuse => {
            return Want::Refuse {
                reason: "the file exists (policy refuse)".into(),
            };
        }
        AtTarget::File {
            hash: Some(hash), ..
        } => return Want::Have { hash },
        AtTarget::File { size, hash: None } if policy == ExistingPolicy::Skip => {
            return Want::Refuse {
                reason: format!(
                    "a different file of {size} bytes exists (policy skip; --existing overwrite \
                     replaces it)"
                ),
            };
        }
        AtTarget::File { .. } | AtTarget::Missing => {}
    }
    match journal {
        Some(j) if resume && j.identity == *offered && !j.verified.is_empty() => Want::Resume {
            verified: j.verified.clone(),
        },
        _ => Want::Send,
    }
}

/// The sender's answer to a receiver that has a file of the same size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HaveAnswer {
    /// Identical: nothing to send.
    Skip,
    /// Different, and the policy allows replacing it: send everything.
    Send,
    /// Different, and the policy keeps it: say so.
    Refuse(String),
}

/// Answers [`Want::Have`].
pub fn answer_have(policy: ExistingPolicy, ours: &Digest, theirs: &Digest) -> HaveAnswer {
    if ours == theirs {
        HaveAnswer::Skip
    } else if policy == ExistingPolicy::Overwrite {
        HaveAnswer::Send
    } else {
        HaveAnswer::Refuse(format!(
            "a different file of the same size exists (policy {}; --existing overwrite replaces \
             it)",
            policy.as_str()
        ))
    }
}

/// Which blocks of a multi-block file go on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockPlan {
    /// Blocks to read and send.
    pub send: Vec<u64>,
    /// Blocks that are holes, in runs of (first, count): nothing is sent for them.
    pub holes: Vec<(u64, u64)>,
    /// Blocks the receiver already holds, verified.
    pub resumed: Vec<u64>,
}

impl BlockPlan {
    /// Plans a file of `size` bytes whose data lies in `extents` ((offset, length) pairs from
    /// SEEK_DATA/SEEK_HOLE, in order), when the receiver holds `verified` blocks already.
    pub fn new(
        size: u64,
        block_size: u32,
        extents: &[(u64, u64)],
        verified: &HashSet<u64>,
    ) -> Self {
        let b = u64::from(block_size);
        let n = block_count(size, block_size);
        let mut has_data = vec![false; n as usize];
        for &(off, len) in extents {
            if len == 0 || off >= size {
                continue;
            }
            let end = (off + len).min(size);
            for i in off / b..end.div_ceil(b) {
                has_data[i as usize] = true;
            }
        }
        let mut plan = BlockPlan {
            send: Vec::new(),
            holes: Vec::new(),
            resumed: Vec::new(),
        };
        for i in 0..n {
            if verified.contains(&i) {
                plan.resumed.push(i);
            } else if has_data[i as usize] {
                plan.send.push(i);
            } else {
                match plan.holes.last_mut() {
                    Some((first, count)) if *first + *count == i => *count += 1,
                    _ => plan.holes.push((i, 1)),
                }
            }
        }
        plan
    }

    /// Bytes that will go on the wire.
    pub fn wire_bytes(&self, size: u64, block_size: u32) -> u64 {
        self.send
            .iter()
            .map(|&i| u64::from(crate::hash::block_len(size, block_size, i)))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: Identity = Identity {
        block_size: 1 << 20,
        size: 5 << 20,
        mtime_sec: 10,
        mtime_nsec: 0,
    };

    fn journal(identity: Identity) -> Journal {
        Journal {
            identity,
            verified: vec![(1, [1; 32])],
            valid_len: 0,
        }
    }

    #[test]
    fn the_receiver_resumes_only_the_same_file() {
        let j = journal(ID);
        assert!(matches!(
            receiver_want(ExistingPolicy::Skip, true, &ID, AtTarget::Missing, Some(&j)),
            Want::Resume { .. }
        ));
        assert_eq!(
            receiver_want(
                ExistingPolicy::Skip,
                false,
                &ID,
                AtTarget::Missing,
                Some(&j)
            ),
            Want::Send
        );
        let changed = Identity {
            mtime_sec: 11,
            ..ID
        };
        assert_eq!(
            receiver_want(
                ExistingPolicy::Skip,
                true,
                &changed,
                AtTarget::Missing,
                Some(&j)
            ),
            Want::Send,
            "a file changed since the first try is sent anew"
        );
    }

    #[test]
    fn existing_files_follow_the_policy() {
        use ExistingPolicy::*;
        let same = AtTarget::File {
            size: 5,
            hash: Some([3; 32]),
        };
        let other = AtTarget::File {
            size: 6,
            hash: None,
        };
        assert_eq!(
            receiver_want(Skip, true, &ID, same, None),
            Want::Have { hash: [3; 32] }
        );
        assert!(matches!(
            receiver_want(Skip, true, &ID, other, None),
            Want::Refuse { .. }
        ));
        assert_eq!(receiver_want(Overwrite, true, &ID, other, None), Want::Send);
        assert!(matches!(
            receiver_want(Refuse, true, &ID, same, None),
            Want::Refuse { .. }
        ));
        assert!(matches!(
            receiver_want(Overwrite, true, &ID, AtTarget::Other, None),
            Want::Refuse { .. }
        ));
        assert!(wants_existing_hash(Skip, 5, 5));
        assert!(!wants_existing_hash(Refuse, 5, 5));
        assert!(!wants_existing_hash(Overwrite, 4, 5));
        assert_eq!(answer_have(Skip, &[1; 32], &[1; 32]), HaveAnswer::Skip);
        assert!(matches!(
            answer_have(Skip, &[1; 32], &[2; 32]),
            HaveAnswer::Refuse(_)
        ));
        assert_eq!(answer_have(Overwrite, &[1; 32], &[2; 32]), HaveAnswer::Send);
    }

    #[test]
    fn holes_and_verified_blocks_are_not_sent() {
        let mib = 1u64 << 20;
        let verified: HashSet<u64> = [0].into();
        let p = BlockPlan::new(
            10 * mib + 5,
            1 << 20,
            &[(0, 2 * mib), (6 * mib + 1, 10)],
            &verified,
        );
        assert_eq!(p.resumed, vec![0]);
        assert_eq!(p.send, vec![1, 6]);
        assert_eq!(p.holes, vec![(2, 4), (7, 4)]);
        assert_eq!(p.wire_bytes(10 * mib + 5, 1 << 20), 2 * mib);
    }

    proptest! {
        #[test]
        fn every_block_is_planned_exactly_once(
            size in 1u64..(40 << 16),
            extents in prop::collection::vec((0u64..(40 << 16), 0u64..(8 << 16)), 0..6),
            verified in prop::collection::hash_set(0u64..40, 0..10),
        ) {
            let bs = 1 << 16;
            let mut ext = extents.clone();
            ext.sort();
            let p = BlockPlan::new(size, bs, &ext, &verified);
            let n = block_count(size, bs);
            let mut all: Vec<u64> = p.send.iter().chain(&p.resumed).copied().collect();
            for &(f, c) in &p.holes { all.extend(f..f + c); }
            all.sort();
            prop_assert_eq!(all, (0..n).collect::<Vec<_>>());
        }
    }
}
