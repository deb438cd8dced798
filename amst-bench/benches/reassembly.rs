//! amst-core's `Reassembler`: chunks in, whole messages out. The codec, on_ack and ArcSwap
//! benches live in their crates' own `benches/`; reassembly had none.
//!
//! Chunks are built (CRC included) outside the timed part, so this measures only what the
//! receiver does per chunk: range bookkeeping, the copy into the message buffer, pop and ack.

use amst_core::codec::DataChunk;
use amst_core::{Reassembler, ReassemblyConfig};
use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

/// `count` messages of `msg` bytes cut into `chunk`-byte chunks, in send order.
fn chunks(count: u64, msg: u64, chunk: u64) -> Vec<DataChunk> {
    let payload = Bytes::from((0..chunk).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    let mut out = Vec::new();
    for id in 0..count {
        let mut off = 0;
        while off < msg {
            let n = chunk.min(msg - off);
            out.push(DataChunk::new(
                id * msg + off,
                id,
                off,
                msg,
                payload.slice(..n as usize),
            ));
            off += n;
        }
    }
    out
}

/// Deals chunks round-robin onto `lanes` lanes and replays the lanes one after the other: the
/// worst in-window reordering that striping over that many streams can produce.
fn striped(mut v: Vec<DataChunk>, lanes: usize) -> Vec<DataChunk> {
    let mut dealt: Vec<Vec<DataChunk>> = (0..lanes).map(|_| Vec::new()).collect();
    for (i, c) in v.drain(..).enumerate() {
        dealt[i % lanes].push(c);
    }
    dealt.into_iter().flatten().collect()
}

fn run(chunks: Vec<DataChunk>) -> u64 {
    let mut r = Reassembler::new(ReassemblyConfig::default());
    let mut popped = 0u64;
    for c in chunks {
        r.insert(c).expect("valid chunk");
        while let Some(m) = r.pop() {
            popped += m.len() as u64;
        }
    }
    black_box(r.ack());
    popped
}

fn reassembly(c: &mut Criterion) {
    let mut g = c.benchmark_group("reassembly");
    let cases = [
        (
            "4MiB_msgs_256KiB_chunks_in_order",
            chunks(4, 4 << 20, 256 << 10),
        ),
        (
            "4MiB_msgs_256KiB_chunks_striped_8",
            striped(chunks(4, 4 << 20, 256 << 10), 8),
        ),
        ("1KiB_msgs_single_chunk", chunks(4096, 1 << 10, 1 << 10)),
    ];
    for (name, input) in cases {
        let bytes: u64 = input.iter().map(|c| c.payload.len() as u64).sum();
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(name, |b| {
            b.iter_batched(
                || input.clone(),
                |v| assert_eq!(run(v), bytes),
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, reassembly);
criterion_main!(benches);
