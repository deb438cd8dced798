//! Byte sizes as people type them (`1G`, `512M`, `100MiB`, `1.5GB`) and as people read them.

use std::fmt;
use std::str::FromStr;

/// A number of bytes parsed from the command line.
///
/// Single-letter units and the `iB` forms are binary, as in iperf3 and dd: `K`, `KiB` = 1024,
/// `M`, `MiB` = 1024², `G`, `GiB` = 1024³, `T`, `TiB` = 1024⁴. The `B` forms are decimal:
/// `KB` = 1000, `MB` = 1000², `GB` = 1000³, `TB` = 1000⁴. Units are case-insensitive, a bare
/// number is bytes, and a fraction is allowed (`1.5G`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

/// Why a size did not parse; the message names the input and shows valid forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid size {input:?}: {reason}; write a number with an optional unit, e.g. 64M, 1G, 100MiB or 1.5GB"
)]
pub struct SizeError {
    input: String,
    reason: String,
}

const UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("b", 1),
    ("k", 1 << 10),
    ("kib", 1 << 10),
    ("m", 1 << 20),
    ("mib", 1 << 20),
    ("g", 1 << 30),
    ("gib", 1 << 30),
    ("t", 1 << 40),
    ("tib", 1 << 40),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
];

impl FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| SizeError {
            input: input.to_string(),
            reason,
        };
        let s = input.trim();
        if s.is_empty() {
            return Err(err("it is empty".into()));
        }
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: String = num.chars().filter(|&c| c != '_').collect();
        let unit = unit.trim();
        if num.is_empty() {
            return Err(err("it does not start with a number".into()));
        }
        let mult = UNITS
            .iter()
            .find(|(u, _)| u.eq_ignore_ascii_case(unit))
            .map(|&(_, m)| m)
            .ok_or_else(|| {
                err(format!(
                    "unknown unit {unit:?} (K, M, G, T and KiB.. are 1024-based; KB, MB, GB, TB are 1000-based)"
                ))
            })?;
        let bytes = if let Some((int, frac)) = num.split_once('.') {
            if frac.contains('.') {
                return Err(err("the number has more than one decimal point".into()));
            }
            // Exact integer arithmetic: `0.1G` must be 107374182, not a float rounding of it.
            let int: u128 = if int.is_empty() {
                0
            } else {
                int.parse()
                    .map_err(|_| err("the number is too large".into()))?
            };
            let digits = frac.len().min(18) as u32;
            let frac_val: u128 = if digits == 0 {
                0
            } else {
                frac[..digits as usize]
                    .parse()
                    .map_err(|_| err("the fraction is not a number".into()))?
            };
            let scale = 10u128.pow(digits);
            let whole = int
                .checked_mul(mult as u128)
                .ok_or_else(|| err("the number is too large".into()))?;
            whole + frac_val * mult as u128 / scale
        } else {
            let n: u128 = num
                .parse()
                .map_err(|_| err("the number is too large".into()))?;
            n.checked_mul(mult as u128)
                .ok_or_else(|| err("the number is too large".into()))?
        };
        u64::try_from(bytes)
            .map(ByteSize)
            .map_err(|_| err("it exceeds 2^64 bytes".into()))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&human_bytes(self.0))
    }
}

/// `1536` → `1.5 KiB`, `104857600` → `100.0 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", UNITS[i])
}

/// A rate in bits per second, network style: `2.35 Gbit/s`.
pub fn human_bits_per_sec(bytes_per_sec: f64) -> String {
    let bits = bytes_per_sec * 8.0;
    if bits >= 1e9 {
        format!("{:.2} Gbit/s", bits / 1e9)
    } else if bits >= 1e6 {
        format!("{:.1} Mbit/s", bits / 1e6)
    } else if bits >= 1e3 {
        format!("{:.1} kbit/s", bits / 1e3)
    } else {
        format!("{bits:.0} bit/s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> u64 {
        s.parse::<ByteSize>().unwrap().0
    }

    #[test]
    fn parses_binary_and_decimal_units() {
        assert_eq!(p("0"), 0);
        assert_eq!(p("4096"), 4096);
        assert_eq!(p("1G"), 1 << 30);
        assert_eq!(p("1g"), 1 << 30);
        assert_eq!(p("512M"), 512 << 20);
        assert_eq!(p("100MiB"), 100 << 20);
        assert_eq!(p("64k"), 64 << 10);
        assert_eq!(p("2T"), 2 << 40);
        assert_eq!(p("1GB"), 1_000_000_000);
        assert_eq!(p("10 MB"), 10_000_000);
        assert_eq!(p("1.5G"), 3 << 29);
        assert_eq!(p("0.1G"), 107_374_182);
        assert_eq!(p(".5K"), 512);
        assert_eq!(p("1_000_000"), 1_000_000);
        assert_eq!(p("7B"), 7);
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        for (bad, needle) in [
            ("", "empty"),
            ("G", "number"),
            ("12X", "unknown unit \"X\""),
            ("1.2.3M", "decimal point"),
            ("999999999999999999999999999999999999999999", "too large"),
            ("20000000T", "2^64"),
            ("-5M", "number"),
        ] {
            let e = bad.parse::<ByteSize>().unwrap_err().to_string();
            assert!(e.contains(needle), "{bad:?}: {e}");
            assert!(e.contains("e.g. 64M"), "{e}");
        }
    }

    #[test]
    fn prints_human_sizes_and_rates() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(100 << 20), "100.0 MiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
        assert_eq!(human_bits_per_sec(125_000_000.0), "1.00 Gbit/s");
        assert_eq!(human_bits_per_sec(1_250_000.0), "10.0 Mbit/s");
    }
}
