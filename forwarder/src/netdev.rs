//! What the daemon needs to know about the node's network devices: indexes,
//! IPv4 addresses, whether a device is a veth or a bridge, and which device
//! the main routing table uses to reach an address.
use std::{fs, io, net::Ipv4Addr, path::Path};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetdevError {
    #[error("interface {0} does not exist")]
    UnknownInterface(String),
    #[error("reading {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("reading the MAC address of {name}: {source}")]
    Mac { name: String, source: io::Error },
    #[error("listing interface addresses: {0}")]
    Addresses(#[source] nix::Error),
}

/// ifindex of `name`.
pub fn ifindex(name: &str) -> Result<u32, NetdevError> {
    nix::net::if_::if_nametoindex(name).map_err(|_| NetdevError::UnknownInterface(name.to_string()))
}

/// Name of the device with `ifindex`, if it exists.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The hardware address of `name`; all zeros for a device that is not
/// Ethernet-like (an L3 tunnel, loopback), which is what the kernel
/// compares a frame's destination with too. Asked of the kernel
/// (SIOCGIFHWADDR) in the caller's network namespace.
pub fn mac(name: &str) -> Result<[u8; 6], NetdevError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let failed = |source| NetdevError::Mac {
        name: name.to_string(),
        source,
    };
    // SAFETY: ifreq is plain C data, for which all-zero bytes are valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(NetdevError::UnknownInterface(name.to_string()));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: a plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(failed(io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor that we now own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCGIFHWADDR reads the NUL-terminated name from `req` and
    // writes a sockaddr into it; `req` is a live ifreq. (The request's type
    // is the C library's: unsigned long on glibc, int on musl.)
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR as _, &mut req) } < 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::ENODEV) {
            NetdevError::UnknownInterface(name.to_string())
        } else {
            failed(e)
        });
    }
    // SAFETY: after SIOCGIFHWADDR the union holds the hardware address.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    if hw.sa_family == libc::ARPHRD_ETHER {
        for (dst, src) in mac.iter_mut().zip(hw.sa_data) {
            *dst = src as u8;
        }
    }
    Ok(mac)
}

/// IPv4 addresses of `name`, in the order the kernel lists them (primary first).
pub fn ipv4_addresses(name: &str) -> Result<Vec<Ipv4Addr>, NetdevError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(NetdevError::Addresses)?;
    Ok(addrs
        .filter(|a| a.interface_name == name)
        .filter_map(|a| {
            a.address
                .and_then(|s| s.as_sockaddr_in().map(|sin| sin.ip()))
        })
        .collect())
}

/// The kernel driver behind a device, from sysfs (`veth`, `bridge`, NIC drivers).
pub fn kind(name: &str) -> DeviceKind {
    let base = Path::new("/sys/class/net").join(name);
    if base.join("bridge").exists() {
        return DeviceKind::Bridge;
    }
    // veth has no bus device; its driver is reported through ethtool only,
    // but sysfs exposes the peer's ifindex as `iflink` != `ifindex`.
    let read = |f: &str| {
        fs::read_to_string(base.join(f))
            .ok()
            .map(|s| s.trim().to_string())
    };
    let uevent = read("uevent").unwrap_or_default();
    if uevent.lines().any(|l| l == "DEVTYPE=bridge") {
        return DeviceKind::Bridge;
    }
    if base.join("device").exists() {
        return DeviceKind::Physical;
    }
    if is_veth(name) {
        return DeviceKind::Veth;
    }
    DeviceKind::Other
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Veth,
    Bridge,
    Physical,
    Other,
}

/// Asks the driver's name through the ethtool ioctl (`ETHTOOL_GDRVINFO`).
fn is_veth(name: &str) -> bool {
    driver_name(name).is_some_and(|d| d == "veth")
}

pub fn driver_name(name: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IF_NAMESIZE],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    if name.len() >= libc::IF_NAMESIZE {
        return None;
    }
    // SAFETY: plain-old-data structs; zero is a valid value for each field.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq {
        name: [0; libc::IF_NAMESIZE],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: a datagram socket for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: req points at a valid ifreq whose data points at a valid ethtool_drvinfo.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) };
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let end = info
        .driver
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Ports (enslaved devices) of a bridge.
pub fn bridge_ports(bridge: &str) -> Vec<String> {
    let dir = Path::new("/sys/class/net").join(bridge).join("brif");
    let mut ports: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    ports.sort();
    ports
}

/// One IPv4 route of the main table, as /proc/net/route lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub iface: String,
    pub dest: Ipv4Addr,
    pub prefix_len: u8,
    pub metric: u32,
}

/// The main routing table (what CNIs use for pod routes).
pub fn routes() -> Result<Vec<Route>, NetdevError> {
    let path = "/proc/net/route";
    let text = fs::read_to_string(path).map_err(|source| NetdevError::Read {
        path: path.into(),
        source,
    })?;
    Ok(parse_proc_net_route(&text))
}

/// Parses /proc/net/route: the kernel prints each `__be32` as a native u32 in
/// hex, so on little-endian machines the wire bytes are its LE bytes.
pub fn parse_proc_net_route(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let dest = u32::from_str_radix(f[1], 16).ok()?;
            let metric = f[6].parse().ok()?;
            let mask = u32::from_str_radix(f[7], 16).ok()?;
            Some(Route {
                iface: f[0].to_string(),
                dest: Ipv4Addr::from(dest.to_le_bytes()),
                prefix_len: mask.count_ones() as u8,
                metric,
            })
        })
        .collect()
}

/// The device of the longest-prefix (then lowest-metric) route to `addr`.
pub fn route_device(routes: &[Route], addr: Ipv4Addr) -> Option<&str> {
    routes
        .iter()
        .filter(|r| {
            let mask = if r.prefix_len == 0 {
                0
            } else {
                u32::MAX << (32 - r.prefix_len as u32)
            };
            u32::from(addr) & mask == u32::from(r.dest) & mask
        })
        .max_by(|a, b| {
            a.prefix_len
                .cmp(&b.prefix_len)
                .then(b.metric.cmp(&a.metric))
        })
        .map(|r| r.iface.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_no_ethernet_address_and_missing_devices_fail() {
        assert_eq!(mac("lo").unwrap(), [0; 6]);
        assert!(matches!(
            mac("no-such-dev0"),
            Err(NetdevError::UnknownInterface(_))
        ));
    }

    const SAMPLE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t0002F40A\t020200C0\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0
cali1\t0A01F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0
cni0\t0001F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
";

    #[test]
    fn parses_proc_net_route() {
        let r = parse_proc_net_route(SAMPLE);
        assert_eq!(r.len(), 5);
        assert_eq!(r[1].dest, Ipv4Addr::new(192, 0, 2, 0));
        assert_eq!(r[1].prefix_len, 24);
        assert_eq!(r[3].dest, Ipv4Addr::new(10, 244, 1, 10));
        assert_eq!(r[3].prefix_len, 32);
        assert_eq!(r[0].prefix_len, 0);
    }

    #[test]
    fn longest_prefix_wins() {
        let r = parse_proc_net_route(SAMPLE);
        assert_eq!(
            route_device(&r, Ipv4Addr::new(10, 244, 1, 10)),
            Some("cali1")
        );
        assert_eq!(
            route_device(&r, Ipv4Addr::new(10, 244, 1, 11)),
            Some("cni0")
        );
        assert_eq!(route_device(&r, Ipv4Addr::new(10, 244, 2, 7)), Some("eth0"));
        assert_eq!(route_device(&r, Ipv4Addr::new(8, 8, 8, 8)), Some("eth0"));
        assert_eq!(
            route_device(&parse_proc_net_route(""), Ipv4Addr::LOCALHOST),
            None
        );
    }

    #[test]
    fn loopback_is_not_a_veth_or_bridge() {
        assert_ne!(kind("lo"), DeviceKind::Veth);
        assert_ne!(kind("lo"), DeviceKind::Bridge);
        assert!(ifindex("lo").is_ok());
        assert!(matches!(
            ifindex("no-such-if0"),
            Err(NetdevError::UnknownInterface(_))
        ));
    }
}

/// An IPv4 prefix, as `--nodeport-addresses` takes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let mask = if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix_len as u32)
        };
        u32::from(a) & mask == u32::from(self.addr) & mask
    }
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (expected e.g. 192.0.2.0/24)"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 address (only IPv4 is supported)"))?;
        let prefix_len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("{len:?} is not a prefix length 0-32"))?;
        Ok(Ipv4Cidr { addr, prefix_len })
    }
}

#[cfg(test)]
mod cidr_tests {
    use super::*;

    #[test]
    fn parses_and_matches() {
        let c: Ipv4Cidr = "192.0.2.0/24".parse().unwrap();
        assert!(c.contains(Ipv4Addr::new(192, 0, 2, 77)));
        assert!(!c.contains(Ipv4Addr::new(192, 0, 3, 1)));
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
        assert!("192.0.2.0".parse::<Ipv4Cidr>().is_err());
        assert!("192.0.2.0/33".parse::<Ipv4Cidr>().is_err());
        assert!("fd00::/8".parse::<Ipv4Cidr>().is_err());
    }
}
