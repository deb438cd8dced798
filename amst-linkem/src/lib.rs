//! amst-linkem: a user-space WAN link emulator for machines without `sch_netem`.
//!
//! It creates two network namespaces, *left* and *right*, each holding only `lo` and a TUN
//! device with an address in 198.18.0.0/15, and forwards IP packets between the two TUN
//! devices with a configurable rate, delay, jitter, loss and droptail queue per direction.
//! Kernel TCP (BBR, CUBIC) and QUIC then see real queues and real losses.
//!
//! ```no_run
//! use std::time::Duration;
//! use amst_linkem::{LinkEm, check_privileges};
//!
//! # fn main() -> std::io::Result<()> {
//! if let Err(why) = check_privileges() {
//!     eprintln!("skipping: {why}");
//!     return Ok(());
//! }
//! let link = LinkEm::builder()
//!     .rate_bps(200_000_000)
//!     .delay(Duration::from_millis(25)) // one way: 50 ms round trip
//!     .loss(0.01)
//!     .queue_bytes(1_000_000)
//!     .start()?;
//! // Sockets live in the namespace they were made in, whichever thread uses them.
//! let server = link.right().tcp_listener("198.18.0.2:5000")?;
//! let client = link.left().spawn(|| std::net::TcpStream::connect("198.18.0.2:5000"));
//! let (_conn, _) = server.accept()?;
//! let _client = client.join().unwrap()?;
//! link.update(|p| p.delay = Duration::from_millis(5))?; // change under traffic
//! let iperf = link.left().command("iperf3").args(["-s", "-1"]).spawn()?;
//! println!("{:?}", link.counters());
//! # drop(iperf);
//! # Ok(())
//! # }
//! ```

mod forward;
mod link;
mod model;
mod namespace;
mod params;
mod sys;

pub use forward::DirCounters;
pub use link::{Counters, LinkEm, LinkEmBuilder, Schedule};
pub use namespace::Namespace;
pub use params::{
    Direction, GilbertElliott, LinkParams, QueueLimit, parse_duration, parse_probability,
    parse_queue, parse_rate,
};
pub use sys::{check_privileges, cleanup_stale};
