//! Byte counts as users write them: `64M`, `256K`, `1G`.

/// Formats a byte count with the largest K/M/G suffix that divides it.
pub fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [(30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Parses a byte count with an optional K/M/G suffix.
pub fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'K' | b'k' => (&text[..text.len() - 1], 10),
        b'M' | b'm' => (&text[..text.len() - 1], 20),
        b'G' | b'g' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_trip_with_their_largest_suffix() {
        assert_eq!(format_size(64 << 20), "64M");
        assert_eq!(parse_size("64M"), Some(64 << 20));
    }

    #[test]
    fn a_size_that_is_no_multiple_stays_in_bytes() {
        assert_eq!(format_size(1000), "1000");
    }

    #[test]
    fn an_overflowing_size_is_refused() {
        assert_eq!(parse_size("99999999999G"), None);
    }
}
