//! The hex examples of PROTOCOL.md, for the tests that decode them so that the document
//! cannot drift from the code (feature `protocol-doc`; meant for dev-dependencies).
//!
//! An example is a fenced block opened by a ```` ```hex ```` line whose first line reads
//! `example: NAME`, followed by hex digits; whitespace and `#` comments are ignored.
//!
//! ```
//! let doc = "```hex\nexample: ping\n20 00000010  # Ping, body 16\n```\n";
//! let examples = amst_core::protocol_doc::parse_examples(doc).unwrap();
//! assert_eq!(examples["ping"], [0x20, 0, 0, 0, 0x10]);
//! ```

use std::collections::BTreeMap;
use std::path::Path;

/// Every example in `doc`, by name. Fails, naming the line, on an unnamed block, odd or
/// non-hex digits, a name used twice, or a block left open.
pub fn parse_examples(doc: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut out = BTreeMap::new();
    let mut lines = doc.lines().enumerate();
    while let Some((start, line)) = lines.next() {
        if line.trim() != "```hex" {
            continue;
        }
        let at = format!("PROTOCOL.md line {}", start + 1);
        let mut name = None;
        let mut hex = String::new();
        let mut closed = false;
        for (_, l) in lines.by_ref() {
            if l.trim() == "```" {
                closed = true;
                break;
            }
            if let Some(n) = l.trim().strip_prefix("example: ") {
                name = Some(n.trim().to_string());
                continue;
            }
            let l = l.split('#').next().unwrap_or_default();
            hex.extend(l.chars().filter(|c| !c.is_whitespace()));
        }
        if !closed {
            return Err(format!("{at}: the hex block is never closed"));
        }
        let name = name.ok_or_else(|| format!("{at}: the hex block names no example"))?;
        let bytes = decode_hex(&hex).map_err(|e| format!("{at}: example {name}: {e}"))?;
        if out.insert(name.clone(), bytes).is_some() {
            return Err(format!("{at}: example {name} is named twice"));
        }
    }
    Ok(out)
}

/// Every example in the file at `path` (PROTOCOL.md) whose name starts with `prefix`.
pub fn read_examples(
    path: impl AsRef<Path>,
    prefix: &str,
) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let path = path.as_ref();
    let doc =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut all = parse_examples(&doc)?;
    all.retain(|name, _| name.starts_with(prefix));
    Ok(all)
}

/// `bytes` as lowercase hex, 16 bytes per line separated by spaces: the form in which
/// examples are written into PROTOCOL.md.
pub fn hex_lines(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|line| {
            line.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn decode_hex(hex: &str) -> Result<Vec<u8>, String> {
    if !hex.len().is_multiple_of(2) {
        return Err(format!("{} hex digits, an odd number", hex.len()));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            let pair = hex.get(i..i + 2).ok_or("a non-ASCII character")?;
            u8::from_str_radix(pair, 16).map_err(|_| format!("{pair:?} is not hex"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_named_and_comments_ignored() {
        let doc = "text\n```hex\nexample: a\n01 02 # two\n0304\n```\n```text\n00\n```\n";
        let ex = parse_examples(doc).unwrap();
        assert_eq!(ex.len(), 1);
        assert_eq!(ex["a"], [1, 2, 3, 4]);
        assert_eq!(hex_lines(&[0xab; 17]).lines().count(), 2);
    }

    #[test]
    fn a_malformed_block_is_an_error_naming_its_line() {
        for (doc, says) in [
            ("```hex\n01\n```\n", "names no example"),
            ("```hex\nexample: a\n012\n```\n", "odd"),
            ("```hex\nexample: a\nzz\n```\n", "not hex"),
            (
                "\n```hex\nexample: a\n01\n",
                "line 2: the hex block is never closed",
            ),
            (
                "```hex\nexample: a\n01\n```\n```hex\nexample: a\n02\n```\n",
                "named twice",
            ),
        ] {
            let e = parse_examples(doc).unwrap_err();
            assert!(e.contains(says), "{doc:?}: {e}");
        }
    }
}
