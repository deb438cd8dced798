//! Encode and decode of a 256 KiB data chunk, CRC32C included: the per-chunk cost every
//! transport pays.

use amst_core::codec::{DataChunk, Decoder, Frame};
use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const CHUNK: usize = 256 << 10;

fn codec(c: &mut Criterion) {
    let payload = Bytes::from(
        (0..CHUNK)
            .map(|i| (i * 31 % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let mut group = c.benchmark_group("codec_256KiB");
    group.throughput(Throughput::Bytes(CHUNK as u64));

    group.bench_function("encode_header_with_crc", |b| {
        b.iter(|| {
            let chunk = DataChunk::new(0, 0, 0, CHUNK as u64, black_box(payload.clone()));
            black_box(chunk.encode_header())
        })
    });

    let encoded = Frame::Data(DataChunk::new(0, 0, 0, CHUNK as u64, payload.clone())).to_bytes();
    let decoder = Decoder::default();
    group.bench_function("decode_with_crc_check", |b| {
        b.iter_batched(
            || BytesMut::from(&encoded[..]),
            |mut buf| black_box(decoder.decode(&mut buf).expect("valid frame")),
            BatchSize::LargeInput,
        )
    });

    let mut buf = BytesMut::with_capacity(encoded.len());
    group.bench_function("encode_contiguous_with_copy", |b| {
        b.iter(|| {
            buf.clear();
            Frame::Data(DataChunk::new(0, 0, 0, CHUNK as u64, payload.clone())).encode(&mut buf);
            black_box(buf.len())
        })
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
