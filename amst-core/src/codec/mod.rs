//! AMST's wire protocol as a sans-IO codec: frame types, a streaming decoder with limits,
//! and the PSK handshake. Nothing here touches a socket or a clock; [`driver`] runs the
//! handshake over any transport's [`FrameIo`](driver::FrameIo).

pub mod driver;
mod frame;
mod handshake;
mod wire;

pub use frame::*;
pub use handshake::{
    AwaitingProof, ClientHandshake, Established, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, Psk,
    ServerHandshake, negotiate_version, random_bytes,
};
pub use wire::{DATA_HEADER_LEN, Decoder, FRAME_HEADER_LEN, Limits, MAGIC};
