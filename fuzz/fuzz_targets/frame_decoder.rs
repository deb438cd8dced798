//! The frame decoder on arbitrary bytes, fed in arbitrary splits: it may reject, never panic,
//! and whatever it accepts must re-encode to the bytes it came from.
#![no_main]

use amst_core::codec::{Decoder, Frame};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let decoder = Decoder::default();
    let mut buf = BytesMut::new();
    let step = (split as usize).max(1);
    let mut fed = 0;
    for piece in rest.chunks(step) {
        buf.extend_from_slice(piece);
        fed += piece.len();
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    // The buffer holds the last `before` bytes fed; the frame was their front.
                    let start = fed - before;
                    let used = before - buf.len();
                    // Ping padding is zeroes on encode, anything on decode: compare the rest.
                    if !matches!(frame, Frame::Ping(_)) {
                        assert_eq!(&frame.to_bytes()[..], &rest[start..start + used]);
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.decode_eof(&mut buf);
});
