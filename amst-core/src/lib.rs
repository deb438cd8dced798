//! The foundation every AMST crate builds on: the [`Transport`] trait, [`Mode`], metrics and
//! errors, the wire protocol as a sans-IO [`codec`], and the two halves of reliable delivery,
//! [`SendBuffer`] and [`Reassembler`], and the per-connection [`session`] protocol built
//! on them as a sans-IO state machine.
//!
//! Nothing here does IO or reads a clock; time is always an argument.
//!
//! ```
//! use amst_core::{Reassembler, ReassemblyConfig, SendBuffer};
//! use bytes::Bytes;
//!
//! let mut tx = SendBuffer::new(1 << 20);
//! let mut rx = Reassembler::new(ReassemblyConfig::default());
//! tx.on_credit(rx.credit());
//! tx.push(Bytes::from_static(b"hello, world"))?;
//! while let Some(out) = tx.next_chunk(5) {
//!     rx.insert(out.chunk)?;
//! }
//! assert_eq!(rx.pop().as_deref(), Some(&b"hello, world"[..]));
//! tx.on_ack(&rx.ack())?;
//! assert!(tx.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod assembly;
mod budget;
pub mod clock;
pub mod codec;
mod crc;
mod error;
#[cfg(feature = "in-memory")]
mod in_memory;
mod metrics;
mod mode;
mod progress;
#[cfg(feature = "protocol-doc")]
pub mod protocol_doc;
mod ranges;
mod reassembly;
mod recycle;
mod send_buffer;
pub mod session;
mod transport;
pub mod util;

pub use budget::{
    BudgetMember, Charge, DEFAULT_MEMORY_BUDGET, DIRECT_MAPPING_THRESHOLD, MemoryBudget, charged,
    limit_allocator_retention,
};
pub use crc::{crc32c, crc32c_append};
pub use error::{Error, ProtocolError, Result};
#[cfg(feature = "in-memory")]
pub use in_memory::InMemoryTransport;
pub use metrics::TransportMetrics;
pub use mode::{Congestion, Mode, TransportKind};
pub use progress::{AckCounter, AckWatch, Beyond};
pub use ranges::RangeSet;
pub use reassembly::{
    Inserted, MIN_WINDOW, OVERDRAFT_GRACE, Placed, Placement, Reassembler, ReassemblyConfig,
};
pub use send_buffer::{AckOutcome, Outgoing, PathId, SendBuffer};
pub use transport::{BoxFuture, PathSample, Transport};
