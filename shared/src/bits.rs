//! Bit-level writer and reader used by the snapshot codec.
//!
//! Bits are packed least-significant first: the first bit written is bit 0 of byte 0. A value of `n`
//! bits is written with its least-significant bit first. The reader never panics: running past the end
//! is [`BitError::Eof`].

/// Errors from [`BitReader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BitError {
    /// The buffer ended before the requested bits.
    #[error("bit stream ended early")]
    Eof,
}

/// Appends bit fields to a byte buffer.
#[derive(Debug, Default, Clone)]
pub struct BitWriter {
    /// Completed bytes.
    buf: Vec<u8>,
    /// Pending bits not yet flushed to `buf` (low `pending` bits are valid).
    acc: u64,
    /// Number of valid bits in `acc` (always < 32 between calls; flushed 32 bits at a time).
    pending: u32,
}

impl BitWriter {
    /// An empty writer.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty writer whose buffer can hold `bytes` without reallocating.
    #[must_use]
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            buf: Vec::with_capacity(bytes),
            acc: 0,
            pending: 0,
        }
    }

    /// Writes the low `n` bits of `value` (`n` ≤ 32).
    pub fn write(&mut self, value: u32, n: u32) {
        debug_assert!(n <= 32);
        if n == 0 {
            return;
        }
        let masked = u64::from(value) & ((1u64 << n) - 1);
        self.acc |= masked << self.pending;
        self.pending += n;
        if self.pending >= 32 {
            self.buf.extend_from_slice(&(self.acc as u32).to_le_bytes());
            self.acc >>= 32;
            self.pending -= 32;
        }
    }

    /// Writes one bit.
    pub fn write_bool(&mut self, b: bool) {
        self.write(u32::from(b), 1);
    }

    /// Writes a signed value in `n`-bit two's complement (`n` ≤ 32). The caller keeps it in range.
    pub fn write_signed(&mut self, value: i32, n: u32) {
        self.write(value as u32, n);
    }

    /// Appends all bits of another writer.
    pub fn append(&mut self, other: &BitWriter) {
        if self.pending == 0 {
            self.buf.extend_from_slice(&other.buf);
        } else {
            let mut words = other.buf.chunks_exact(4);
            for w in &mut words {
                if let &[a, b, c, d] = w {
                    self.write(u32::from_le_bytes([a, b, c, d]), 32);
                }
            }
            for &b in words.remainder() {
                self.write(u32::from(b), 8);
            }
        }
        if other.pending > 0 {
            self.write(other.acc as u32, other.pending);
        }
    }

    /// Number of bits written so far.
    #[must_use]
    pub fn bit_len(&self) -> usize {
        self.buf.len() * 8 + self.pending as usize
    }

    /// Bytes needed to hold what was written (rounded up).
    #[must_use]
    pub fn byte_len(&self) -> usize {
        self.bit_len().div_ceil(8)
    }

    /// Discards everything written.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.acc = 0;
        self.pending = 0;
    }

    /// Flushes the partial byte (zero-padded) and returns the bytes.
    #[must_use]
    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.byte_len());
        self.finish_into(&mut out);
        out
    }

    /// Appends the written bits, zero-padded to a whole byte, to `out`.
    pub fn finish_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.buf);
        let tail = self.acc.to_le_bytes();
        out.extend_from_slice(
            tail.get(..(self.pending as usize).div_ceil(8))
                .unwrap_or(&[]),
        );
    }
}

/// Reads bit fields written by [`BitWriter`].
#[derive(Debug, Clone)]
pub struct BitReader<'a> {
    /// The whole input.
    data: &'a [u8],
    /// Index of the next byte of `data` to load into `acc`.
    next_byte: usize,
    /// Loaded bits not yet consumed (low `avail` bits valid).
    acc: u64,
    /// Number of valid bits in `acc`.
    avail: u32,
}

impl<'a> BitReader<'a> {
    /// A reader over `data`.
    #[must_use]
    pub fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            next_byte: 0,
            acc: 0,
            avail: 0,
        }
    }

    /// Reads `n` bits (`n` ≤ 32) as an unsigned value.
    pub fn read(&mut self, n: u32) -> Result<u32, BitError> {
        debug_assert!(n <= 32);
        if n == 0 {
            return Ok(0);
        }
        while self.avail < n {
            let byte = *self.data.get(self.next_byte).ok_or(BitError::Eof)?;
            self.next_byte += 1;
            self.acc |= u64::from(byte) << self.avail;
            self.avail += 8;
        }
        let v = (self.acc & ((1u64 << n) - 1)) as u32;
        self.acc >>= n;
        self.avail -= n;
        Ok(v)
    }

    /// Reads one bit.
    pub fn read_bool(&mut self) -> Result<bool, BitError> {
        Ok(self.read(1)? == 1)
    }

    /// Reads an `n`-bit two's complement value (1 ≤ `n` ≤ 32).
    pub fn read_signed(&mut self, n: u32) -> Result<i32, BitError> {
        let raw = self.read(n)?;
        let shift = 32 - n;
        Ok(((raw << shift) as i32) >> shift)
    }

    /// Bits left to read (including zero padding of the last byte).
    #[must_use]
    pub fn remaining_bits(&self) -> usize {
        (self.data.len() - self.next_byte) * 8 + self.avail as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_mixed_widths() {
        let mut w = BitWriter::new();
        w.write(5, 3);
        w.write_bool(true);
        w.write(0xdead_beef, 32);
        w.write_signed(-3, 5);
        w.write_signed(-2048, 12);
        w.write(1, 1);
        let bytes = w.finish();
        let mut r = BitReader::new(&bytes);
        assert_eq!(r.read(3), Ok(5));
        assert_eq!(r.read_bool(), Ok(true));
        assert_eq!(r.read(32), Ok(0xdead_beef));
        assert_eq!(r.read_signed(5), Ok(-3));
        assert_eq!(r.read_signed(12), Ok(-2048));
        assert_eq!(r.read(1), Ok(1));
        assert!(r.read(8).is_err());
    }

    #[test]
    fn lsb_first_layout() {
        let mut w = BitWriter::new();
        w.write(1, 1);
        w.write(0b11, 2);
        assert_eq!(w.finish(), vec![0b0000_0111]);
    }

    #[test]
    fn append_matches_direct_writes() {
        let mut a = BitWriter::new();
        a.write(3, 2);
        let mut b = BitWriter::new();
        b.write(0x1ff, 9);
        b.write(1, 1);
        a.append(&b);
        let mut c = BitWriter::new();
        c.write(3, 2);
        c.write(0x1ff, 9);
        c.write(1, 1);
        assert_eq!(a.bit_len(), 12);
        assert_eq!(a.finish(), c.finish());
    }

    #[test]
    fn empty_reader_is_eof_not_panic() {
        let mut r = BitReader::new(&[]);
        assert_eq!(r.read(1), Err(BitError::Eof));
        assert_eq!(r.read(0), Ok(0));
    }
}
