//! CRC32C (Castagnoli), the checksum on every data chunk, at more than the speed of the
//! `crc32` instruction.
//!
//! The `crc32c` crate drives the SSE 4.2 `crc32` instruction, which on some CPUs (AMD Zen 1:
//! one per 3 cycles) caps it near 5 GB/s at 2 GHz — a large share of a transport's CPU. On
//! x86_64 with PCLMULQDQ we instead fold the buffer with carry-less multiplies, as in Intel's
//! "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ Instruction" (Gopal et al.,
//! 2009): about 10 GB/s there, against 5.5 for the crate and 7.8 for the `crc-fast` crate.
//! Where the CPU has VPCLMULQDQ and AVX-512, the same folding runs four lanes per instruction
//! in 512-bit registers: on a Xeon with both (`cargo bench -p amst-core --bench crc`), 25, 35
//! and 45 GiB/s at 1, 64 and 256 KiB, against 14, 18 and 11 GiB/s for the 128-bit kernel and
//! 11-15 for the `crc32c` crate. Short inputs, tails and other architectures go to the
//! `crc32c` crate.
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
        __m128i, __m512i, _mm_clmulepi64_si128, _mm_crc32_u64, _mm_cvtsi32_si128,
        _mm_extract_epi64, _mm_loadu_si128, _mm_set_epi64x, _mm_xor_si128, _mm512_broadcast_i32x4,
        _mm512_clmulepi64_epi128, _mm512_loadu_si512, _mm512_setzero_si512, _mm512_storeu_si512,
        _mm512_ternarylogic_epi64, _mm512_zextsi128_si512,
    };
    use std::sync::OnceLock;

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

    pub(super) fn wide_available() -> bool {
        static WIDE: OnceLock<bool> = OnceLock::new();
        *WIDE.get_or_init(|| {
            available()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("vpclmulqdq")
        })
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
        if data.len() >= WIDE_MIN_LEN && wide_available() {
            // SAFETY: `wide_available` checked every feature `wide_kernel` enables.
            return unsafe { wide_kernel(crc, data) };
        }
        narrow_kernel(crc, data)
    }

    /// The 128-bit kernel, for CPUs without the wide one and for shorter inputs.
    #[target_feature(enable = "pclmulqdq,sse4.2")]
    pub(super) fn narrow_kernel(crc: u32, data: &[u8]) -> u32 {
        kernel::<LANES>(crc, data)
    }

    /// Below this the 128-bit kernel is as fast: the wide one's setup and its fold of sixteen
    /// lanes into one cost about a kilobyte of folding.
    pub(super) const WIDE_MIN_LEN: usize = 1024;
    /// 512-bit accumulators in the wide kernel, each four 128-bit lanes.
    const WIDE_REGS: usize = 4;
    const WIDE_LANES: usize = 4 * WIDE_REGS;

    /// The 128-bit kernel's folding with `WIDE_LANES` lanes, four to each instruction: each
    /// 128-bit lane of a 512-bit register folds by the same distance, so one broadcast
    /// constant serves all four.
    #[target_feature(enable = "pclmulqdq,sse4.2,avx512f,vpclmulqdq")]
    pub(super) fn wide_kernel(crc: u32, data: &[u8]) -> u32 {
        let block = 16 * WIDE_LANES;
        let mut blocks = data.chunks_exact(block);
        let Some(first) = blocks.next() else {
            return kernel::<LANES>(crc, data);
        };
        let load512 = |b: &[u8]| -> __m512i {
            assert!(b.len() >= 64);
            // SAFETY: `b` has at least 64 readable bytes, and `loadu` needs no alignment.
            unsafe { _mm512_loadu_si512(b.as_ptr().cast()) }
        };
        let mut x: [__m512i; WIDE_REGS] = std::array::from_fn(|i| load512(&first[64 * i..]));
        // The register enters the stream as if XORed into its first four bytes.
        x[0] = _mm512_ternarylogic_epi64(
            x[0],
            _mm512_zextsi128_si512(_mm_cvtsi32_si128(!crc as i32)),
            _mm512_setzero_si512(),
            0x96,
        );
        let (lo, hi) = FOLD[WIDE_LANES];
        let k = _mm512_broadcast_i32x4(_mm_set_epi64x(hi as i64, lo as i64));
        for block in &mut blocks {
            for (i, x) in x.iter_mut().enumerate() {
                // a ^ b ^ c in one instruction (truth table 0x96).
                *x = _mm512_ternarylogic_epi64(
                    _mm512_clmulepi64_epi128(*x, k, 0x00),
                    _mm512_clmulepi64_epi128(*x, k, 0x11),
                    load512(&block[64 * i..]),
                    0x96,
                );
            }
        }
        let mut lanes = [_mm_cvtsi32_si128(0); WIDE_LANES];
        for (i, x) in x.iter().enumerate() {
            // SAFETY: `lanes[4 * i..]` has room for 64 bytes, and `storeu` needs no alignment.
            unsafe { _mm512_storeu_si512(lanes[4 * i..].as_mut_ptr().cast(), *x) };
        }
        finish(&lanes, blocks.remainder())
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
        finish(&x, blocks.remainder())
    }

    /// Folds accumulators of consecutive 16-byte lanes into the last one, then the rest of the
    /// input into that, and reduces it to the CRC.
    #[inline]
    #[target_feature(enable = "pclmulqdq,sse4.2")]
    fn finish(x: &[__m128i], rest: &[u8]) -> u32 {
        let n = x.len();
        let mut acc = x[n - 1];
        for (i, &x) in x[..n - 1].iter().enumerate() {
            acc = _mm_xor_si128(acc, fold(x, FOLD[n - 1 - i]));
        }
        let mut tail = rest.chunks_exact(16);
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
            let ours = unsafe { x86::narrow_kernel(7, &data[..len]) };
            assert_eq!(ours, crc32c::crc32c_append(7, &data[..len]), "len {len}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn wide_kernel_runs_here_and_agrees() {
        if !x86::wide_available() {
            eprintln!("skipped: this CPU lacks avx512f or vpclmulqdq");
            return;
        }
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 13 + i / 509) as u8).collect();
        for len in [
            x86::WIDE_MIN_LEN,
            1025,
            1279,
            1280,
            4096 + 15,
            65_536,
            70_000,
        ] {
            // SAFETY: `wide_available` checked the features.
            let ours = unsafe { x86::wide_kernel(0xdead_beef, &data[..len]) };
            let want = crc32c::crc32c_append(0xdead_beef, &data[..len]);
            assert_eq!(ours, want, "len {len}");
        }
    }

    #[test]
    fn known_vector() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }
}
