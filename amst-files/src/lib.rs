//! The bulk-data job as a library: send directory trees over an AMST session, with many
//! small files pipelined, sparse files kept sparse, and transfers that resume after either
//! side is killed. BLAKE3 everywhere: each received file's hash is the one `b3sum` prints.
//!
//! - [`protocol`]: the messages, with explicit limits (sans-IO).
//! - [`path`]: which paths and link targets a receiver accepts (sans-IO).
//! - [`plan`]: what to send given what the receiver has (sans-IO).
//! - [`journal`]: the resume journal of verified blocks (sans-IO).
//! - [`hash`]: per-block BLAKE3 that combines into the whole file's hash.
//! - [`scan`], [`send`], [`receive`]: the drivers, over any [`Channel`] (an
//!   [`amst_hybrid::Amst`] session in practice).
//!
//! ```
//! use std::sync::Arc;
//! use amst_core::{Mode, codec::Psk};
//! use amst_files::{Channel, ReceiveOptions, SendOptions, Tree, receive_tree, send_tree};
//! use amst_hybrid::{Amst, AmstConfig, memory_network};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let src = tempfile::tempdir()?;
//! let out = tempfile::tempdir()?;
//! std::fs::create_dir(src.path().join("data"))?;
//! std::fs::write(src.path().join("data/a.txt"), b"hello")?;
//!
//! let config = AmstConfig::builder(Psk::new(b"correct horse battery")?)
//!     .auto_mode(false)
//!     .initial_mode(Mode::Datacenter)
//!     .build()?;
//! let (connector, acceptor) = memory_network(64);
//! let listener = Amst::listen_with(Arc::new(acceptor), config.clone())?;
//! let client: Arc<dyn Channel> = Arc::new(Amst::connect_with(Arc::new(connector), config).await?);
//! let server: Arc<dyn Channel> = Arc::new(listener.accept().await?);
//!
//! let tree = Tree::scan(&[src.path().join("data")])?;
//! let options = SendOptions::default();
//! let sending = send_tree(client, tree, &options, Default::default());
//! let receiving = async {
//!     let hello = server.recv().await?.expect("a hello");
//!     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
//!         receive_tree(server, hello, &ReceiveOptions::new(out.path()), Default::default()).await?,
//!     )
//! };
//! let (sent, received) = tokio::join!(sending, receiving);
//! assert_eq!(sent?.finished.stored, 2); // the directory and the file
//! assert_eq!(received?.finished.failed, 0);
//! assert_eq!(std::fs::read(out.path().join("data/a.txt"))?, b"hello");
//! # Ok(())
//! # }
//! ```

mod channel;
mod dirfd;
mod error;
pub mod hash;
pub mod journal;
mod landing;
pub mod path;
pub mod plan;
pub mod protocol;
pub mod receive;
pub mod scan;
pub mod send;

pub use channel::{BoxFuture, Channel, ChannelError};
pub use error::{Error, Result};
pub use protocol::{ExistingPolicy, Outcome, is_tree_message};
pub use receive::{ReceiveOptions, ReceiveProgress, ReceiveReport, receive_tree};
pub use scan::Tree;
pub use send::{SendOptions, SendProgress, SendReport, send_tree};
