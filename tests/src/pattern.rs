//! Seeded pseudo-random byte streams for bulk transfers that are checked
//! byte for byte: the sender generates the stream from a seed, the receiver
//! generates the same stream and compares, with no copy of the data kept.
//!
//! Byte `i` of the stream of `seed` depends only on `(seed, i)` (a SplitMix64
//! output per 8-byte word), so any chunking gives the same bytes.

/// A position in the stream of one seed.
#[derive(Clone, Debug)]
pub struct Pattern {
    seed: u64,
    pos: u64,
}

/// Where a received stream first differed from the expected one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Offset of the first differing byte from the start of the stream.
    pub offset: u64,
    pub expected: u8,
    pub got: u8,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "byte {} is {:#04x}, expected {:#04x}",
            self.offset, self.got, self.expected
        )
    }
}

fn word(seed: u64, index: u64) -> u64 {
    // SplitMix64 of the index-th state.
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern { seed, pos: 0 }
    }

    /// Bytes produced or checked so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Fills `buf` with the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() {
            let pos = self.pos + i as u64;
            let bytes = word(self.seed, pos / 8).to_le_bytes();
            let start = (pos % 8) as usize;
            let n = (8 - start).min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&bytes[start..start + n]);
            i += n;
        }
        self.pos += buf.len() as u64;
    }

    /// Checks that `buf` is the next `buf.len()` bytes of the stream (and
    /// moves past them).
    pub fn check(&mut self, buf: &[u8]) -> Result<(), Mismatch> {
        let mut expected = [0u8; 4096];
        for chunk in buf.chunks(expected.len()) {
            let want = &mut expected[..chunk.len()];
            let base = self.pos;
            self.fill(want);
            if want != chunk {
                let i = want
                    .iter()
                    .zip(chunk)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(Mismatch {
                    offset: base + i as u64,
                    expected: want[i],
                    got: chunk[i],
                });
            }
        }
        Ok(())
    }

    /// The first `len` bytes of the stream of `seed`.
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        Pattern::new(seed).fill(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_change_the_stream() {
        let whole = Pattern::bytes(7, 1000);
        let mut p = Pattern::new(7);
        let mut pieces = Vec::new();
        for n in [1, 3, 8, 13, 0, 500, 475] {
            let mut b = vec![0u8; n];
            p.fill(&mut b);
            pieces.extend(b);
        }
        assert_eq!(pieces, whole);
        assert_eq!(p.position(), 1000);
    }

    #[test]
    fn seeds_differ_and_check_finds_the_first_difference() {
        assert_ne!(Pattern::bytes(1, 64), Pattern::bytes(2, 64));
        let mut data = Pattern::bytes(3, 10_000);
        assert_eq!(Pattern::new(3).check(&data), Ok(()));
        data[5001] ^= 0x40;
        let m = Pattern::new(3).check(&data).unwrap_err();
        assert_eq!(m.offset, 5001);
        assert_eq!(m.got, m.expected ^ 0x40);
        // Checked in two parts: offsets stay absolute.
        let mut p = Pattern::new(3);
        assert_eq!(p.check(&data[..5000]), Ok(()));
        assert_eq!(p.check(&data[5000..]).unwrap_err().offset, 5001);
    }
}
