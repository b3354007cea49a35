//! A SYN flood from forged sources, for the hostile-traffic tests: TCP SYNs
//! from random addresses (and ports) of a given /N to one address and port,
//! written straight to a device through an AF_PACKET socket, as fast as it
//! takes them.
//!
//! ```text
//! synflood --iface eth0 --dst-mac 02:..:01 --dst 192.0.2.1:31380 \
//!          --count 200000 [--sources 100.64.0.0/10] [--seed 1]
//! ```
//!
//! Prints one line: `sent <frames> in <ms> ms (<frames per second>/s)`.
use std::{
    ffi::CString,
    net::{Ipv4Addr, SocketAddrV4},
    time::Instant,
};

use anyhow::{anyhow, bail, Context, Result};
use integration_tests::bench::frames::{self, Mac};

struct Args {
    iface: String,
    dst_mac: Mac,
    dst: SocketAddrV4,
    count: u64,
    sources: (Ipv4Addr, u8),
    seed: u64,
}

fn parse_args() -> Result<Args> {
    let mut iface = None;
    let mut dst_mac = None;
    let mut dst = None;
    let mut count = None;
    let mut sources = (Ipv4Addr::new(100, 64, 0, 0), 10);
    let mut seed = 1;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--iface" => iface = Some(value()?),
            "--dst-mac" => dst_mac = Some(frames::parse_mac(&value()?)?),
            "--dst" => dst = Some(value()?.parse().context("--dst")?),
            "--count" => count = Some(value()?.parse().context("--count")?),
            "--seed" => seed = value()?.parse().context("--seed")?,
            "--sources" => {
                let v = value()?;
                let (net, len) = v.split_once('/').context("--sources: a.b.c.d/len")?;
                let len: u8 = len.parse().context("--sources prefix length")?;
                if !(1..=32).contains(&len) {
                    bail!("--sources prefix length must be 1..=32");
                }
                sources = (net.parse().context("--sources address")?, len);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(Args {
        iface: iface.context("--iface is required")?,
        dst_mac: dst_mac.context("--dst-mac is required")?,
        dst: dst.context("--dst is required")?,
        count: count.context("--count is required")?,
        sources,
        seed,
    })
}

/// xorshift64*: cheap, and the same flood for the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn read_mac(iface: &str) -> Result<Mac> {
    let path = format!("/sys/class/net/{iface}/address");
    frames::parse_mac(&std::fs::read_to_string(&path).with_context(|| path.clone())?)
}

/// Frames per `sendmmsg` call.
const BATCH: usize = 64;

fn main() -> Result<()> {
    let args = parse_args()?;
    let src_mac = read_mac(&args.iface)?;
    let name = CString::new(args.iface.clone())?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no device {}", args.iface);
    }
    let proto_be = (libc::ETH_P_IP as u16).to_be();
    // SAFETY: plain socket(2) arguments.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto_be as i32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("AF_PACKET socket (needs root)");
    }
    // SAFETY: a zeroed sockaddr_ll is valid; the fields set below are its own.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto_be;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&args.dst_mac);
    // SAFETY: `sll` outlives the call and its size is passed along.
    let bound = unsafe {
        libc::bind(
            fd,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if bound != 0 {
        return Err(std::io::Error::last_os_error()).context("binding to the device");
    }
    // Skip the device's qdisc: it only adds queueing in front of the veth.
    let one: libc::c_int = 1;
    // SAFETY: an int option, its size passed along.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };

    let mut rng = Rng(args.seed.max(1));
    let host_bits = 32 - u32::from(args.sources.1);
    let net = u32::from(args.sources.0) & !((1u64 << host_bits) as u32).wrapping_sub(1);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
    while sent < args.count {
        batch.clear();
        let n = (args.count - sent).min(BATCH as u64);
        for _ in 0..n {
            let r = rng.next();
            let host = if host_bits == 0 {
                0
            } else {
                (r as u32) & (((1u64 << host_bits) - 1) as u32)
            };
            let src = Ipv4Addr::from(net | host);
            let sport = 1024 + ((r >> 32) as u16 % 64_000);
            batch.push(frames::tcp(
                (src_mac, args.dst_mac),
                (src, sport),
                (*args.dst.ip(), args.dst.port()),
                true,
                0,
            )?);
        }
        let mut iovs: Vec<libc::iovec> = batch
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        // SAFETY: zeroed mmsghdrs are valid; each points at one iovec of
        // `iovs`, which (with the frames) outlives the call.
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = iov as *mut libc::iovec;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let mut done = 0;
        while done < msgs.len() {
            // SAFETY: `msgs[done..]` are valid headers (see above).
            let r = unsafe {
                libc::sendmmsg(fd, msgs[done..].as_mut_ptr(), (msgs.len() - done) as u32, 0)
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    // The device is busy: try again.
                    Some(libc::ENOBUFS) | Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                    _ => return Err(e).context("sendmmsg"),
                }
            }
            done += r as usize;
        }
        sent += n;
    }
    let elapsed = started.elapsed();
    // SAFETY: our own descriptor, closed once.
    unsafe { libc::close(fd) };
    let ms = elapsed.as_millis().max(1);
    println!(
        "sent {sent} in {ms} ms ({:.0}/s)",
        sent as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    Ok(())
}
