//! What one direction of the emulated link does to packets, and parsers for the
//! human-friendly spellings the CLI accepts (`200mbit`, `50ms`, `1%`).

use std::fmt;
use std::time::Duration;

/// One direction of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Packets sent by the left namespace to the right one.
    LeftToRight,
    /// Packets sent by the right namespace to the left one.
    RightToLeft,
}

impl Direction {
    /// Both directions, left-to-right first.
    pub const BOTH: [Direction; 2] = [Direction::LeftToRight, Direction::RightToLeft];

    pub(crate) fn index(self) -> usize {
        match self {
            Direction::LeftToRight => 0,
            Direction::RightToLeft => 1,
        }
    }
}

/// Gilbert-Elliott two-state burst loss. Evaluated once per packet, before the i.i.d. loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    /// Probability of moving from the good to the bad state, per packet.
    pub p_good_to_bad: f64,
    /// Probability of moving from the bad to the good state, per packet.
    pub p_bad_to_good: f64,
    /// Loss probability while in the good state.
    pub loss_in_good: f64,
    /// Loss probability while in the bad state.
    pub loss_in_bad: f64,
}

/// The droptail limit of the bottleneck queue: a packet that would exceed either bound is
/// dropped and counted in [`DirCounters::dropped_queue`](crate::DirCounters::dropped_queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimit {
    /// Most bytes waiting to be serialised (`None`: no byte bound).
    pub bytes: Option<u64>,
    /// Most packets waiting to be serialised (`None`: no packet bound).
    pub packets: Option<u32>,
}

impl QueueLimit {
    /// netem's default: 1000 packets.
    pub const DEFAULT: QueueLimit = QueueLimit {
        bytes: None,
        packets: Some(1000),
    };

    /// A limit in bytes only.
    pub fn bytes(bytes: u64) -> Self {
        QueueLimit {
            bytes: Some(bytes),
            packets: None,
        }
    }

    /// A limit in packets only.
    pub fn packets(packets: u32) -> Self {
        QueueLimit {
            bytes: None,
            packets: Some(packets),
        }
    }
}

impl Default for QueueLimit {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Everything one direction of the link does. `LinkParams::default()` is a transparent
/// link: unlimited rate, no delay, no loss, 1500-byte MTU.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkParams {
    /// Bottleneck rate in bit/s; each packet takes `8 * len / rate` to serialise. 0 = unlimited.
    pub rate_bps: u64,
    /// One-way propagation delay, added after serialisation.
    pub delay: Duration,
    /// Uniform jitter: each packet's delay is `delay ± jitter` (never below zero).
    pub jitter: Duration,
    /// Allow jitter to reorder packets. When false (the default) a packet never leaves
    /// before the one sent ahead of it, as on a real wire.
    pub reorder: bool,
    /// I.i.d. random loss probability in `[0, 1]`.
    pub loss: f64,
    /// Optional burst loss on top of `loss`.
    pub gilbert_elliott: Option<GilbertElliott>,
    /// Droptail limit of the serialisation queue.
    pub queue: QueueLimit,
    /// MTU of the sending TUN device, so the sender's kernel never emits a larger packet.
    pub mtu: u32,
}

impl Default for LinkParams {
    fn default() -> Self {
        LinkParams {
            rate_bps: 0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: false,
            loss: 0.0,
            gilbert_elliott: None,
            queue: QueueLimit::DEFAULT,
            mtu: 1500,
        }
    }
}

impl LinkParams {
    /// Checks ranges; called by every entry point that accepts parameters.
    pub fn validate(&self) -> Result<(), String> {
        let prob = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be a probability in [0, 1], got {v}"))
            }
        };
        prob("loss", self.loss)?;
        if let Some(ge) = &self.gilbert_elliott {
            prob("gilbert-elliott p", ge.p_good_to_bad)?;
            prob("gilbert-elliott r", ge.p_bad_to_good)?;
            prob("gilbert-elliott loss in good", ge.loss_in_good)?;
            prob("gilbert-elliott loss in bad", ge.loss_in_bad)?;
        }
        if !(68..=65535).contains(&self.mtu) {
            return Err(format!("mtu must be in 68..=65535, got {}", self.mtu));
        }
        if self.queue.packets == Some(0) || self.queue.bytes == Some(0) {
            return Err("a queue limit of 0 would drop everything".into());
        }
        Ok(())
    }

    /// Applies one `key=value` setting, as in the CLI's `--at 10s:rate=100mbit,delay=40ms`.
    /// Keys: `rate`, `delay`, `jitter`, `loss`, `queue` (bytes, `64kb`, or `100pkt`), `mtu`,
    /// `reorder` (`true`/`false`).
    pub fn apply_setting(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "rate" => self.rate_bps = parse_rate(value)?,
            "delay" => self.delay = parse_duration(value)?,
            "jitter" => self.jitter = parse_duration(value)?,
            "loss" => self.loss = parse_probability(value)?,
            "queue" => self.queue = parse_queue(value)?,
            "mtu" => self.mtu = value.parse().map_err(|e| format!("mtu {value:?}: {e}"))?,
            "reorder" => {
                self.reorder = value
                    .parse()
                    .map_err(|e| format!("reorder {value:?}: {e}"))?
            }
            _ => return Err(format!("unknown link setting {key:?}")),
        }
        self.validate()
    }
}

impl fmt::Display for LinkParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rate_bps == 0 {
            write!(f, "rate=unlimited")?;
        } else {
            write!(f, "rate={}mbit", self.rate_bps as f64 / 1e6)?;
        }
        write!(
            f,
            " delay={:?} jitter={:?} loss={}",
            self.delay, self.jitter, self.loss
        )?;
        if let Some(ge) = &self.gilbert_elliott {
            write!(f, " ge={ge:?}")?;
        }
        write!(f, " queue={:?} mtu={}", self.queue, self.mtu)
    }
}

fn split_number(s: &str) -> (&str, &str) {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    (&s[..end], s[end..].trim())
}

fn parse_f64(num: &str, whole: &str) -> Result<f64, String> {
    num.replace('_', "")
        .parse::<f64>()
        .map_err(|_| format!("{whole:?} does not start with a number"))
}

/// Parses a rate: `200mbit`, `1gbit`, `500kbit`, `100000` (bit/s), `12.5mbps` is *bytes*
/// per second as in tc (`bps` = bytes, `bit` = bits). `0` or `unlimited` means no limit.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    let (num, unit) = split_number(s);
    let v = parse_f64(num, s)?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "bit" | "b" => 1.0,
        "kbit" | "k" => 1e3,
        "mbit" | "m" => 1e6,
        "gbit" | "g" => 1e9,
        "bps" => 8.0,
        "kbps" => 8e3,
        "mbps" => 8e6,
        "gbps" => 8e9,
        other => {
            return Err(format!(
                "unknown rate unit {other:?} in {s:?} (try 200mbit)"
            ));
        }
    };
    Ok((v * mult).round() as u64)
}

/// Parses a duration: `50ms`, `1.5s`, `200us`, `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = split_number(s);
    let v = parse_f64(num, s)?;
    let secs = match unit.to_ascii_lowercase().as_str() {
        "s" | "sec" => v,
        "" if v == 0.0 => 0.0,
        "ms" => v / 1e3,
        "us" | "µs" => v / 1e6,
        "ns" => v / 1e9,
        "" => return Err(format!("duration {s:?} needs a unit (ms, s, us)")),
        other => return Err(format!("unknown duration unit {other:?} in {s:?}")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a probability: `1%`, `0.5%`, or a plain fraction `0.01`.
pub fn parse_probability(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let v = if let Some(p) = t.strip_suffix('%') {
        parse_f64(p.trim(), s)? / 100.0
    } else {
        parse_f64(t, s)?
    };
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("probability {s:?} is outside [0, 1]"))
    }
}

/// Parses a queue limit: `100pkt` (packets), `64kb`/`1mb`/`150000` (bytes).
pub fn parse_queue(s: &str) -> Result<QueueLimit, String> {
    let (num, unit) = split_number(s);
    let v = parse_f64(num, s)?;
    let unit = unit.to_ascii_lowercase();
    if matches!(unit.as_str(), "p" | "pkt" | "pkts" | "packets") {
        return Ok(QueueLimit::packets(v as u32));
    }
    let mult = match unit.as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "kib" => 1024.0,
        "mib" => 1048576.0,
        other => {
            return Err(format!(
                "unknown queue unit {other:?} in {s:?} (try 100pkt or 64kb)"
            ));
        }
    };
    Ok(QueueLimit::bytes((v * mult) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates() {
        assert_eq!(parse_rate("200mbit").unwrap(), 200_000_000);
        assert_eq!(parse_rate("1gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("1.5Mbit").unwrap(), 1_500_000);
        assert_eq!(parse_rate("10mbps").unwrap(), 80_000_000);
        assert_eq!(parse_rate("unlimited").unwrap(), 0);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10furlongs").is_err());
    }

    #[test]
    fn parses_durations_and_probabilities() {
        assert_eq!(parse_duration("50ms").unwrap(), Duration::from_millis(50));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("50").is_err());
        assert_eq!(parse_probability("1%").unwrap(), 0.01);
        assert_eq!(parse_probability("0.25").unwrap(), 0.25);
        assert!(parse_probability("150%").is_err());
    }

    #[test]
    fn parses_queues_and_settings() {
        assert_eq!(parse_queue("100pkt").unwrap(), QueueLimit::packets(100));
        assert_eq!(parse_queue("64kb").unwrap(), QueueLimit::bytes(64_000));
        let mut p = LinkParams::default();
        p.apply_setting("rate", "100mbit").unwrap();
        p.apply_setting("delay", "40ms").unwrap();
        assert_eq!(p.rate_bps, 100_000_000);
        assert_eq!(p.delay, Duration::from_millis(40));
        assert!(p.apply_setting("loss", "2").is_err());
        assert!(p.apply_setting("colour", "red").is_err());
        assert!(p.apply_setting("mtu", "20").is_err());
    }
}
