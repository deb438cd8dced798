//! CRC32C (Castagnoli), the checksum on every data chunk, at more than the speed of the
//! `crc32` instruction.
//!
//! The `crc32c` crate drives the SSE 4.2 `crc32` instruction, which on some CPUs (AMD Zen 1:
//! one per 3 cycles) caps it near 5 GB/s at 2 GHz — a large share of a transport's CPU. On
//! x86_64 with PCLMULQDQ we instead fold the buffer with carry-less multiplies, as in Intel's
//! "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ Instruction" (Gopal et al.,
//! 2009): about 10 GB/s there, against 5.5 for the crate and 7.8 for the `crc-fast` crate.
//! Short inputs, tails and other architectures go to the `crc32c` crate.
//!
//! Running the `crc32` instruction over a second region inside the folding loop ("fusion")
//! was measured and lost on Zen 1: even 8 bytes of it per 128 folded slowed the loop by 15%,
//! so the two evidently compete for a unit there.
//!
//! Polynomials are in the reflected (LSB-first) form CRC32C uses: a 32-bit value holds the
//! coefficient of x^d in bit 31 - d, a 64-bit one in bit 63 - d.

/// The Castagnoli polynomial, reflected, without its x^32 term.
const POLY: u32 = 0x82F6_3B78;

/// Computes the CRC32C of `data`; equal to `crc32c::crc32c(data)`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

/// Continues `crc` (a finished CRC32C of some prefix) over `data`; equal to
/// `crc32c::crc32c_append(crc, data)`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if data.len() >= x86::MIN_LEN && x86::available() {
        // SAFETY: `available` checked that the CPU has the features the kernel enables.
        return unsafe { x86::crc32c_append(crc, data) };
    }
    crc32c::crc32c_append(crc, data)
}

/// `a * x` mod P.
const fn mul_x(a: u32) -> u32 {
    if a & 1 != 0 { (a >> 1) ^ POLY } else { a >> 1 }
}

/// `a * b` mod P.
const fn mul_mod(a: u32, b: u32) -> u32 {
    let (mut a, mut r, mut d) = (a, 0, 0);
    while d < 32 {
        if b & (1 << (31 - d)) != 0 {
            r ^= a;
        }
        a = mul_x(a);
        d += 1;
    }
    r
}

/// `x^n` mod P.
const fn x_pow(mut n: u64) -> u32 {
    let (mut result, mut base) = (1 << 31, 1 << 30);
    while n > 0 {
        if n & 1 != 0 {
            result = mul_mod(result, base);
        }
        base = mul_mod(base, base);
        n >>= 1;
    }
    result
}

/// `x^n mod P` in the 64-bit reflected frame, where a carry-less multiply uses it.
const fn k64(n: u64) -> u64 {
    (x_pow(n) as u64) << 32
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m128i, _mm_clmulepi64_si128, _mm_crc32_u64, _mm_cvtsi32_si128, _mm_extract_epi64,
        _mm_loadu_si128, _mm_set_epi64x, _mm_xor_si128,
    };

    use super::k64;

    /// Below this the `crc32c` crate is as fast: the kernel's setup and final reduction cost
    /// about as much as the folding saves.
    pub(super) const MIN_LEN: usize = 256;
    /// Parallel 128-bit accumulators (see `kernel`).
    const LANES: usize = 8;

    /// Constants that move a 128-bit accumulator `m` blocks of 16 bytes forward:
    /// the high-degree half is multiplied by x^(128m+63), the low-degree half by x^(128m-1)
    /// (each one less than the shift, because a reflected carry-less product comes out
    /// multiplied by x).
    const FOLD: [(u64, u64); 17] = {
        let mut t = [(0, 0); 17];
        let mut m = 1;
        while m < t.len() {
            t[m] = (k64(128 * m as u64 + 63), k64(128 * m as u64 - 1));
            m += 1;
        }
        t
    };

    pub(super) fn available() -> bool {
        // std caches CPUID, so this is two loads and tests.
        is_x86_feature_detected!("pclmulqdq") && is_x86_feature_detected!("sse4.2")
    }

    #[inline(always)]
    fn load(b: &[u8]) -> __m128i {
        assert!(b.len() >= 16);
        // SAFETY: `b` has at least 16 readable bytes, and `loadu` needs no alignment.
        unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
    }

    #[inline]
    #[target_feature(enable = "pclmulqdq")]
    fn fold(acc: __m128i, k: (u64, u64)) -> __m128i {
        let k = _mm_set_epi64x(k.1 as i64, k.0 as i64);
        _mm_xor_si128(
            _mm_clmulepi64_si128(acc, k, 0x00),
            _mm_clmulepi64_si128(acc, k, 0x11),
        )
    }

    /// The raw CRC register (no inversion) of the 16 bytes in `acc`, starting from 0.
    #[inline]
    #[target_feature(enable = "sse4.2")]
    fn reduce(acc: __m128i) -> u32 {
        let r = _mm_crc32_u64(0, _mm_extract_epi64(acc, 0) as u64);
        _mm_crc32_u64(r, _mm_extract_epi64(acc, 1) as u64) as u32
    }

    /// CRC32C of `data` (at least `MIN_LEN` bytes) continuing `crc`.
    #[target_feature(enable = "pclmulqdq,sse4.2")]
    pub(super) fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
        kernel::<LANES>(crc, data)
    }

    /// `L` accumulators: 2 already cover the multiply's latency on Zen 1; more hide it on
    /// CPUs with a longer one, and past 8 they no longer fit in the 16 registers.
    #[inline]
    #[target_feature(enable = "pclmulqdq,sse4.2")]
    fn kernel<const L: usize>(crc: u32, data: &[u8]) -> u32 {
        let block = 16 * L;
        debug_assert!(data.len() >= block);
        let mut blocks = data.chunks_exact(block);
        let Some(first) = blocks.next() else {
            return crc32c::crc32c_append(crc, data);
        };
        let mut x = [_mm_cvtsi32_si128(0); L];
        for (i, x) in x.iter_mut().enumerate() {
            *x = load(&first[16 * i..]);
        }
        // The register enters the stream as if XORed into its first four bytes.
        x[0] = _mm_xor_si128(x[0], _mm_cvtsi32_si128(!crc as i32));
        for block in &mut blocks {
            for (i, x) in x.iter_mut().enumerate() {
                *x = _mm_xor_si128(fold(*x, FOLD[L]), load(&block[16 * i..]));
            }
        }
        let mut acc = x[L - 1];
        for (i, &x) in x[..L - 1].iter().enumerate() {
            acc = _mm_xor_si128(acc, fold(x, FOLD[L - 1 - i]));
        }
        let mut tail = blocks.remainder().chunks_exact(16);
        for c in &mut tail {
            acc = _mm_xor_si128(fold(acc, FOLD[1]), load(c));
        }
        crc32c::crc32c_append(!reduce(acc), tail.remainder())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x_pow_matches_repeated_multiplication() {
        let mut v = 1 << 31;
        for n in 0..3000 {
            assert_eq!(x_pow(n), v, "x^{n}");
            v = mul_x(v);
        }
    }

    #[test]
    fn mul_mod_is_multiplication() {
        for (i, j) in [(0, 0), (1, 31), (32, 33), (100, 2000), (12345, 678)] {
            assert_eq!(mul_mod(x_pow(i), x_pow(j)), x_pow(i + j));
        }
    }

    #[test]
    fn fold_constants_are_the_powers_of_x() {
        let brute = |n: u64| (0..n).fold(1u32 << 31, |v, _| mul_x(v));
        for m in 1..=16u64 {
            assert_eq!(
                k64(128 * m + 63),
                u64::from(brute(128 * m + 63)) << 32,
                "m {m}"
            );
            assert_eq!(
                k64(128 * m - 1),
                u64::from(brute(128 * m - 1)) << 32,
                "m {m}"
            );
        }
    }

    /// The integration tests go through the dispatch; this one makes sure the kernel itself
    /// ran, rather than the fallback twice.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn kernel_runs_here_and_agrees() {
        if !x86::available() {
            eprintln!("skipped: this CPU lacks pclmulqdq or sse4.2");
            return;
        }
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for len in [x86::MIN_LEN, 300, 4097, 5000] {
            // SAFETY: `available` checked the features.
            let ours = unsafe { x86::crc32c_append(7, &data[..len]) };
            assert_eq!(ours, crc32c::crc32c_append(7, &data[..len]), "len {len}");
        }
    }

    #[test]
    fn known_vector() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }
}
