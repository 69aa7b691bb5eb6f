//! LEB128 variable-length integers, the length and offset encoding of every
//! codec record. Reading is bounds-checked and refuses encodings longer than
//! ten bytes or overflowing 64 bits.

/// A varint that could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VarintError {
    /// The input ended inside a varint.
    #[error("the data ends inside a variable-length integer")]
    Truncated,
    /// More than 64 bits.
    #[error("a variable-length integer does not fit in 64 bits")]
    Overflow,
}

/// Appends `value` as LEB128.
#[inline]
pub fn write(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(low_byte(value) | 0x80);
        value >>= 7;
    }
    out.push(low_byte(value));
}

/// Reads a LEB128 value at `*position`, advancing it.
#[inline]
pub fn read(input: &[u8], position: &mut usize) -> Result<u64, VarintError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *input.get(*position).ok_or(VarintError::Truncated)?;
        *position += 1;
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            return Err(VarintError::Overflow);
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(VarintError::Overflow)
}

/// Maps a signed value to an unsigned one with small magnitudes staying small.
#[inline]
pub fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)).cast_unsigned()
}

/// Inverse of [`zigzag`].
#[inline]
pub fn unzigzag(value: u64) -> i64 {
    (value >> 1).cast_signed() ^ -(value & 1).cast_signed()
}

/// The difference `to - from` of two page numbers, wrapping, as a signed
/// step (small when the pages are near each other), zigzag-encoded.
#[inline]
pub fn zigzag_step(from: u64, to: u64) -> u64 {
    zigzag(to.wrapping_sub(from).cast_signed())
}

/// The page number `step` (as [`zigzag_step`] made it) away from `from`.
#[inline]
pub fn apply_step(from: u64, step: u64) -> u64 {
    from.wrapping_add(unzigzag(step).cast_unsigned())
}

/// The low 8 bits of `value`.
#[inline]
fn low_byte(value: u64) -> u8 {
    value.to_le_bytes()[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(value: u64) -> u64 {
        let mut out = Vec::new();
        write(&mut out, value);
        let mut position = 0;
        let read_back = read(&out, &mut position).expect("valid varint");
        assert_eq!(position, out.len());
        read_back
    }

    #[test]
    fn extremes_round_trip() {
        assert_eq!(round_trip(0), 0);
        assert_eq!(round_trip(127), 127);
        assert_eq!(round_trip(128), 128);
        assert_eq!(round_trip(u64::MAX), u64::MAX);
    }

    #[test]
    fn truncated_input_is_an_error() {
        let mut position = 0;
        assert_eq!(
            read(&[0x80, 0x80], &mut position),
            Err(VarintError::Truncated)
        );
    }

    #[test]
    fn eleven_byte_encoding_is_an_error() {
        let mut position = 0;
        assert_eq!(read(&[0xff; 11], &mut position), Err(VarintError::Overflow));
    }

    #[test]
    fn tenth_byte_above_one_overflows() {
        let mut bytes = vec![0xff; 9];
        bytes.push(0x02);
        let mut position = 0;
        assert_eq!(read(&bytes, &mut position), Err(VarintError::Overflow));
    }

    #[test]
    fn zigzag_keeps_small_magnitudes_small() {
        assert_eq!(zigzag(0), 0);
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
        assert_eq!(unzigzag(zigzag(i64::MIN)), i64::MIN);
        assert_eq!(unzigzag(zigzag(i64::MAX)), i64::MAX);
    }
}
