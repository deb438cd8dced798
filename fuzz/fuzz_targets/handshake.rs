//! The server side of the handshake fed arbitrary frames: it may refuse, never panic, and
//! never accepts a proof that was not made with the key.
#![no_main]

use amst_core::codec::{Decoder, Frame, Psk, ServerHandshake};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let psk = Psk::new(b"fuzzing key, never guessed").expect("valid key");
    let decoder = Decoder::default();
    let mut buf = BytesMut::from(data);
    let Ok(Some(Frame::Hello(hello))) = decoder.decode(&mut buf) else {
        return;
    };
    let server = ServerHandshake::new(psk, [3; 32], 0);
    let Ok((_ack, awaiting)) = server.on_hello(&hello, [1; 16]) else {
        return;
    };
    if let Ok(Some(Frame::Auth(proof))) = decoder.decode(&mut buf) {
        assert!(awaiting.on_auth(&proof).is_err(), "a forged proof was accepted");
    }
});
