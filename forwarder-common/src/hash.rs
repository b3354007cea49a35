//! Flow hashing for backend choice: cheap, verifier-friendly, well mixed.

/// A 32-bit hash of a flow's addresses, ports and protocol.
#[inline(always)]
pub const fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h: u32 = 0x9e37_79b9 ^ proto as u32;
    h = mix(h ^ saddr);
    h = mix(h ^ daddr);
    h = mix(h ^ ((sport as u32) << 16 | dport as u32));
    h
}

/// The murmur3 finaliser step after a multiply-rotate (good avalanche).
#[inline(always)]
const fn mix(mut h: u32) -> u32 {
    h = h.wrapping_mul(0xcc9e_2d51);
    h = h.rotate_left(15);
    h = h.wrapping_mul(0x1b87_3593);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ports_spread_evenly_over_backends() {
        let backends = 4u32;
        let mut hits = [0u32; 4];
        for port in 30_000u16..34_000 {
            let h = flow_hash(0x6400_000a, 0x0100_000a, port.to_be(), 31380u16.to_be(), 6);
            hits[(h % backends) as usize] += 1;
        }
        for h in hits {
            assert!((800..1200).contains(&h), "uneven spread: {hits:?}");
        }
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = flow_hash(1, 2, 3, 4, 6);
        assert_ne!(base, flow_hash(5, 2, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 5, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 5, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 5, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 4, 17));
    }
}
