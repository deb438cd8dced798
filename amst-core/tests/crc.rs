//! Our CRC32C against the `crc32c` crate, which the wire format was defined with: every
//! length through the kernel's thresholds, unaligned starts, and continued CRCs.

use proptest::prelude::*;

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

#[test]
fn known_vectors() {
    assert_eq!(amst_core::crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(amst_core::crc32c(b""), 0);
    assert_eq!(amst_core::crc32c(&[0; 32]), 0x8A91_36AA);
    assert_eq!(amst_core::crc32c(&[0xFF; 32]), 0x62A8_AB43);
    // Long enough for both kernels.
    let ascending: Vec<u8> = (0..=255u8).cycle().take(1 << 16).collect();
    assert_eq!(amst_core::crc32c(&ascending), crc32c::crc32c(&ascending));
}

#[test]
fn every_length_to_1024_and_around_the_thresholds() {
    let buf = data(70_000, 1);
    let lens = (0..=1024)
        .chain(4000..4400)
        .chain([8191, 8192, 8193, 65_536, 70_000]);
    for len in lens {
        for start in [0, 1, 7] {
            let d = &buf[start..start + len.min(buf.len() - start)];
            let want = crc32c::crc32c(d);
            assert_eq!(amst_core::crc32c(d), want, "len {} start {start}", d.len());
        }
    }
}

#[test]
fn all_zero_and_all_ones_registers() {
    // Inputs that drive the register through 0 and !0 inside the kernel.
    for len in [256, 300, 4096, 5000, 65_536] {
        for byte in [0u8, 0xFF] {
            let d = vec![byte; len];
            for crc in [0, 0xFFFF_FFFF, 0x1234_5678] {
                assert_eq!(
                    amst_core::crc32c_append(crc, &d),
                    crc32c::crc32c_append(crc, &d),
                    "len {len} byte {byte:#x} crc {crc:#x}"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn equals_crc32c_crate(len in 0usize..70_000, start in 0usize..64, seed: u64) {
        let buf = data(len + start, seed);
        let d = &buf[start..];
        prop_assert_eq!(amst_core::crc32c(d), crc32c::crc32c(d));
    }

    #[test]
    fn append_continues(len in 0usize..20_000, split in 0usize..20_000, crc: u32, seed: u64) {
        let buf = data(len, seed);
        let split = split.min(len);
        let whole = amst_core::crc32c_append(crc, &buf);
        prop_assert_eq!(whole, crc32c::crc32c_append(crc, &buf));
        let parts = amst_core::crc32c_append(amst_core::crc32c_append(crc, &buf[..split]), &buf[split..]);
        prop_assert_eq!(parts, whole);
    }
}
