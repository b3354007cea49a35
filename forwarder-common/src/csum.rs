//! Incremental Internet checksum updates (RFC 1624, eqn. 3).
//!
//! Values are taken exactly as they sit in the packet (read with native
//! endianness from the wire bytes): one's-complement sums do not care about
//! byte order as long as every term is read the same way.

/// Folds a 32-bit one's-complement accumulator to 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// `check` after a 32-bit field covered by it changes from `old` to `new`.
#[inline(always)]
pub const fn replace_u32(check: u16, old: u32, new: u32) -> u16 {
    let sum = (!check as u32) + (!old & 0xffff) + (!old >> 16) + (new & 0xffff) + (new >> 16);
    !fold(sum)
}

/// `check` after a 16-bit field covered by it changes from `old` to `new`.
#[inline(always)]
pub const fn replace_u16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32) + (new as u32);
    !fold(sum)
}

/// The full checksum of `data` (as for an IPv4 header with its checksum
/// field zeroed), in the same memory order as the functions above.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_ne_bytes([c[0], c[1]]) as u32;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum += u16::from_ne_bytes([*last, 0]) as u32;
    }
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(src: [u8; 4], dst: [u8; 4], ttl: u8) -> [u8; 20] {
        let mut h = [
            0x45, 0, 0, 60, 0x12, 0x34, 0x40, 0, ttl, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        h
    }

    #[test]
    fn full_checksum_of_a_valid_header_verifies_to_zero() {
        let h = header([10, 0, 0, 100], [10, 0, 0, 1], 64);
        assert_eq!(checksum(&h), 0);
    }

    #[test]
    fn matches_the_textbook_example() {
        // The worked example of the IPv4 header checksum (result 0xb861).
        let h: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h).to_ne_bytes(), [0xb8, 0x61]);
    }

    #[test]
    fn incremental_address_and_ttl_updates_match_a_full_recompute() {
        let cases = [
            (
                [10, 0, 0, 100],
                [10, 0, 0, 1],
                [10, 0, 0, 100],
                [10, 244, 2, 10],
                64,
                63,
            ),
            (
                [1, 2, 3, 4],
                [255, 255, 255, 255],
                [0, 0, 0, 0],
                [9, 9, 9, 9],
                2,
                1,
            ),
            (
                [192, 168, 0, 1],
                [0, 0, 0, 0],
                [255, 255, 0, 0],
                [0, 0, 255, 255],
                255,
                254,
            ),
        ];
        for (src, dst, new_src, new_dst, ttl, new_ttl) in cases {
            let h = header(src, dst, ttl);
            let mut c = u16::from_ne_bytes([h[10], h[11]]);
            c = replace_u32(c, u32::from_ne_bytes(src), u32::from_ne_bytes(new_src));
            c = replace_u32(c, u32::from_ne_bytes(dst), u32::from_ne_bytes(new_dst));
            c = replace_u16(
                c,
                u16::from_ne_bytes([ttl, 6]),
                u16::from_ne_bytes([new_ttl, 6]),
            );
            let expected = header(new_src, new_dst, new_ttl);
            assert_eq!(
                c.to_ne_bytes(),
                [expected[10], expected[11]],
                "{src:?}->{new_src:?}"
            );
        }
    }

    #[test]
    fn replacing_a_value_with_itself_keeps_the_checksum() {
        for check in [0x0000u16, 0x1234, 0xfffe, 0xffff] {
            let out = replace_u32(check, 0xdead_beef, 0xdead_beef);
            // 0x0000 and 0xffff are the same value in one's complement.
            assert!(
                out == check || (out ^ check) == 0xffff,
                "{check:#x} -> {out:#x}"
            );
        }
    }
}
