//! Sizes in bytes as people write them, for `gale echo`'s BYTES flags and the byte-sized keys
//! of `gale serve`'s configuration: a whole number of bytes (`65536`), or one with a unit —
//! `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024), `KB`, `MB`, `GB`, `TB` (powers of 1000) or `B`,
//! in any case, with or without a space (`64KiB`, `16 MiB`, `1GB`). A bare `k`, `m` or `g` is
//! refused: whether it means 1000 or 1024 is exactly what a reader cannot tell.

use std::fmt;

use serde::Deserializer;
use serde::de::{self, Visitor};

/// The units a size may carry, with their value in bytes.
const UNITS: [(&str, u64); 9] = [
    ("b", 1),
    ("kb", 1000),
    ("mb", 1000 * 1000),
    ("gb", 1000 * 1000 * 1000),
    ("tb", 1000 * 1000 * 1000 * 1000),
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
];

/// What a size should look like, for error messages.
const EXPECTED: &str = "expected a whole number of bytes";
const HINT: &str = "(a number, or one with a unit: B, KB, MB, GB, KiB, MiB, GiB)";

/// Parse a size in bytes: `65536`, `64KiB`, `16 MiB`, `1GB`. The error is one line in words.
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let bad = || format!("{EXPECTED}, got {text:?} {HINT}");
    let trimmed = text.trim();
    let digits_end = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(bad());
    }
    let unit = unit.trim_start().to_ascii_lowercase();
    let scale = if unit.is_empty() {
        1
    } else {
        UNITS.iter().find(|(name, _)| *name == unit).map(|&(_, scale)| scale).ok_or_else(bad)?
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("{text:?} is more bytes than this machine can count"))
}

/// `#[serde(deserialize_with = "units::bytes")]`: a size in bytes from a TOML integer or a
/// string with a unit.
pub fn bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
    deserializer.deserialize_any(BytesVisitor)
}

struct BytesVisitor;

impl Visitor<'_> for BytesVisitor {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Read as "expected {this}" in the error messages.
        f.write_str("a whole number of bytes")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<usize, E> {
        usize::try_from(v).map_err(|_| E::custom(format!("{v} is more bytes than this machine can count")))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<usize, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(format!("{EXPECTED}, got {v}"))),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
        parse_bytes(v).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_numbers_are_bytes() {
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes(" 125 "), Ok(125));
        assert_eq!(parse_bytes("125B"), Ok(125));
    }

    #[test]
    fn binary_units_are_powers_of_1024() {
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes("16MiB"), Ok(16 << 20));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("16 MiB"), Ok(16 << 20));
        assert_eq!(parse_bytes("64kib"), Ok(64 << 10));
        assert_eq!(parse_bytes("2TiB"), Ok(2 << 40));
    }

    #[test]
    fn decimal_units_are_powers_of_1000() {
        assert_eq!(parse_bytes("64KB"), Ok(64_000));
        assert_eq!(parse_bytes("64kB"), Ok(64_000));
        assert_eq!(parse_bytes("16MB"), Ok(16_000_000));
        assert_eq!(parse_bytes("1GB"), Ok(1_000_000_000));
    }

    #[test]
    fn ambiguous_or_malformed_sizes_are_refused_in_words() {
        for bad in ["64k", "16M", "1G", "", "KiB", "1.5MiB", "-1", "64 KiB extra", "sixty", "1e6"] {
            let e = parse_bytes(bad).unwrap_err();
            assert!(e.starts_with(&format!("expected a whole number of bytes, got {bad:?}")), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn sizes_too_large_are_refused() {
        let e = parse_bytes("99999999999999999999").unwrap_err();
        assert!(e.contains("more bytes than"), "{e}");
        let e = parse_bytes("20000000TiB").unwrap_err();
        assert!(e.contains("more bytes than"), "{e}");
    }
}
