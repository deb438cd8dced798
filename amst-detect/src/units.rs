//! Human formatting of RTTs and rates for decisions and logs.

use std::fmt;
use std::time::Duration;

/// Formats a duration in milliseconds with a precision that suits its size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ms(pub Duration);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_secs_f64() * 1e3;
        if ms < 1.0 {
            write!(f, "{ms:.3} ms")
        } else if ms < 100.0 {
            write!(f, "{ms:.1} ms")
        } else {
            write!(f, "{ms:.0} ms")
        }
    }
}

/// Formats a rate given in bytes per second as bits per second.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rate(pub u64);

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = self.0 as f64 * 8.0;
        if bits >= 1e9 {
            let g = bits / 1e9;
            if g.fract() == 0.0 {
                write!(f, "{g:.0} Gbit/s")
            } else {
                write!(f, "{g:.2} Gbit/s")
            }
        } else if bits >= 1e6 {
            write!(f, "{:.1} Mbit/s", bits / 1e6)
        } else {
            write!(f, "{:.1} kbit/s", bits / 1e3)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(Ms(Duration::from_micros(105)).to_string(), "0.105 ms");
        assert_eq!(Ms(Duration::from_micros(80_250)).to_string(), "80.2 ms");
        assert_eq!(Rate(125_000_000).to_string(), "1 Gbit/s");
        assert_eq!(Rate(25_000_000).to_string(), "200.0 Mbit/s");
        assert_eq!(Rate(1_250_000_000 + 12_500_000).to_string(), "10.10 Gbit/s");
    }
}
