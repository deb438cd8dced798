//! CRC32C throughput, ours against the `crc32c` crate, at chunk sizes transports use.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

fn crc(c: &mut Criterion) {
    let buf: Vec<u8> = (0..(256usize << 10) + 1)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let mut group = c.benchmark_group("crc32c");
    for size in [1usize << 10, 64 << 10, 256 << 10] {
        // Off by one byte, as a payload after a header usually is.
        let data = &buf[1..1 + size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("amst_core", size), data, |b, d| {
            b.iter(|| amst_core::crc32c(black_box(d)))
        });
        group.bench_with_input(BenchmarkId::new("crc32c_crate", size), data, |b, d| {
            b.iter(|| crc32c::crc32c(black_box(d)))
        });
    }
    group.finish();
}

criterion_group!(benches, crc);
criterion_main!(benches);
