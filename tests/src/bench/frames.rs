//! Frames the benchmark sends, built with etherparse (which computes every
//! checksum).

use std::net::Ipv4Addr;

use anyhow::{anyhow, Result};
use etherparse::PacketBuilder;

pub type Mac = [u8; 6];

/// A UDP frame with `payload_len` zero bytes of payload and a zero UDP
/// checksum (valid for IPv4: "no checksum"), so that a generator may change
/// the source port without updating any checksum.
pub fn udp(
    macs: (Mac, Mac),
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload_len: usize,
) -> Result<Vec<u8>> {
    let b = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .udp(src.1, dst.1);
    let payload = vec![0u8; payload_len];
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, &payload)
        .map_err(|e| anyhow!("building a UDP frame: {e}"))?;
    // Bytes 40..42 are the UDP checksum (14 Ethernet + 20 IPv4 + 6).
    out[40] = 0;
    out[41] = 0;
    Ok(out)
}

/// A TCP frame: SYN, or an ACK carrying `payload_len` bytes.
pub fn tcp(
    macs: (Mac, Mac),
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    syn: bool,
    payload_len: usize,
) -> Result<Vec<u8>> {
    let b = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(2000) };
    let payload = vec![0u8; payload_len];
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, &payload)
        .map_err(|e| anyhow!("building a TCP frame: {e}"))?;
    Ok(out)
}

/// An ARP request (not IP: the program's cheapest path).
pub fn arp(src_mac: Mac, src: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f.resize(60, 0);
    f
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<Mac> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    if parts.len() != 6 {
        return Err(anyhow!("not a MAC address: {s:?}"));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| anyhow!("not a MAC address: {s:?}"))?;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_frame_has_zero_checksum_and_right_size() {
        let f = udp(
            ([2, 0, 0, 0, 0, 0x64], [2, 0, 0, 0, 0, 1]),
            (Ipv4Addr::new(192, 0, 2, 100), 1000),
            (Ipv4Addr::new(192, 0, 2, 1), 30001),
            18,
        )
        .unwrap();
        assert_eq!(f.len(), 60);
        assert_eq!(&f[40..42], &[0, 0]);
        assert_eq!(&f[36..38], &30001u16.to_be_bytes());
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("02:00:00:00:0a:ff").unwrap(),
            [2, 0, 0, 0, 10, 255]
        );
        assert!(parse_mac("02:00").is_err());
        assert!(parse_mac("zz:00:00:00:00:00").is_err());
    }
}
