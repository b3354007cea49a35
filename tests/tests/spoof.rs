//! Anti-spoofing, live: forged replies get into nobody's flow.
//!
//! An external client holds two UDP flows through node1's nodePorts: one to
//! a remote pod (source-NATed to node1's address and a port of ours) and one
//! to a local pod. Forgers then send, with raw sockets:
//!
//! - (a) from another pod on node1: a datagram claiming to be the remote
//!   backend, to node1's address and the flow's source-NAT port;
//! - (b) from that pod: a datagram claiming to be the local backend, to the
//!   client's address and port;
//! - (c) from outside (the client's namespace, an Ethernet frame to node1's
//!   eth0): the same reply "from the local pod".
//!
//! With the forwarder (kube-proxy's rules installed too, as on a node) none
//! of them is translated: each is counted once as `pass_wrong_device`,
//! nothing is forwarded by the datapath meanwhile, and the client receives
//! nothing from the Service's address. What the kernel then does with the
//! untouched packet is the node's routing: with strict reverse-path
//! filtering (Calico's setting on workload devices) it drops all three, and
//! the client receives nothing at all; with it off (this testbed's default)
//! it delivers (a) to node1's own stack (no socket there) and routes (b) and
//! (c) on as they are, from the pod's own address, which a client's socket
//! connected to the Service does not accept.
//!
//! With kube-proxy's rules alone the claim is narrower, and the test says
//! so: nf_conntrack matches a reply by its addresses, not by the device it
//! came in on, so without reverse-path filtering (a) is de-NATed and reaches
//! the client *as a reply from the Service*. (b) and (c) are routed on
//! untouched, as with the forwarder (kube-proxy masquerades nodePort flows
//! to local pods too, so a reply to the client's own address is no reply of
//! a tracked flow). Strict reverse-path filtering drops all three.
use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use etherparse::PacketBuilder;
use forwarder_common::{Reason, CT_F_REPLY, IPPROTO_UDP};
use integration_tests::{
    daemon::Daemon,
    kube_proxy::{install, restore_input, Backend, Cidr, KpConfig, KpEndpoint, KpPort, KpService},
    netns, skip_unless_netns_capable,
    topology::{Cluster, ClusterOptions, Pod, PodNet, CLIENT_IP, NODE_IPS, UDP_PORT},
};

const LOCAL_NODE_PORT: u16 = 31353;
const REMOTE_NODE_PORT: u16 = 31354;
/// The client's source ports for its flow to the remote and the local pod.
const REMOTE_FLOW_PORT: u16 = 40500;
const LOCAL_FLOW_PORT: u16 = 40501;
const SPOOF: &[u8] = b"spoofed";

fn check(result: Result<()>) {
    if let Err(e) = result {
        panic!("{e:?}");
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    /// The forwarder on node1, next to kube-proxy's rules.
    Forwarder,
    /// kube-proxy's rules alone.
    KubeProxyAlone,
}

struct Testbed {
    cluster: Cluster,
    /// The local backend, the forging pod (both on node1), the remote backend.
    local: Pod,
    forger: Pod,
    remote: Pod,
}

fn testbed() -> Result<Testbed> {
    let cluster = Cluster::build(ClusterOptions {
        pod_net: PodNet::RoutedVeth,
        wire_napi: true,
        pods_per_node: 2,
        ..ClusterOptions::default()
    })?;
    let on1 = cluster.pods_on("node1");
    let (local, forger) = (on1[0].clone(), on1[1].clone());
    let remote = cluster.pod_on("node2")?.clone();
    // Two Services, one backend each: the flows' backends are known. The
    // forger is a backend too (of a third): a compromised pod of some
    // Service, whose device carries the forwarder's tc program.
    cluster.write_service_with_node_ports("local", &[&local], 31380, LOCAL_NODE_PORT)?;
    cluster.write_service_with_node_ports("remote", &[&remote], 31381, REMOTE_NODE_PORT)?;
    cluster.write_service_with_node_ports("forger", &[&forger], 31382, 31355)?;
    Ok(Testbed {
        cluster,
        local,
        forger,
        remote,
    })
}

fn install_kube_proxy(t: &Testbed) -> Result<()> {
    let service = |name: &str, ip: [u8; 4], node_port: u16, pod: &Pod| {
        KpService::new("default", name, Ipv4Addr::from(ip))
            .port(KpPort::udp("dns", UDP_PORT).with_node_port(node_port))
            .endpoint(
                KpEndpoint::new(pod.ip)
                    .udp("dns", UDP_PORT)
                    .on_node(&pod.node)
                    .conditions(true, true, false),
            )
    };
    let config = KpConfig::new(
        &t.cluster.node(1).name,
        Some("10.244.0.0/16".parse::<Cidr>()?),
    );
    let rules = restore_input(
        &config,
        &[
            service("local", [10, 96, 0, 10], LOCAL_NODE_PORT, &t.local),
            service("remote", [10, 96, 0, 11], REMOTE_NODE_PORT, &t.remote),
        ],
    );
    install(t.cluster.node_ns(1), &rules, Backend::Legacy).context("installing kube-proxy's rules")
}

/// The client's flow: a socket bound to `port`, not connected (it shows
/// every datagram sent to it), that asked `node_port` once and got its reply.
fn open_flow(t: &Testbed, port: u16, node_port: u16) -> Result<UdpSocket> {
    let service = SocketAddrV4::new(NODE_IPS[0], node_port);
    let sock = netns::run_in(t.cluster.client_ns(), || {
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).context("binding the client's socket")
    })?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    for _ in 0..5 {
        sock.send_to(b"query", service)?;
        let mut buf = [0u8; 512];
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            ensure!(
                from == std::net::SocketAddr::V4(service),
                "the reply to {service} came from {from}: {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
            return Ok(sock);
        }
    }
    bail!("no reply from {service} to the client's port {port}")
}

/// Everything that arrives at the client's socket within a second.
fn received(sock: &UdpSocket) -> Vec<(std::net::SocketAddr, Vec<u8>)> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            out.push((from, buf[..n].to_vec()));
        }
    }
    out
}

/// The source port node1 put on the client's flow to the remote pod.
fn snat_port(t: &Testbed, daemon: Option<&Daemon>) -> Result<u16> {
    match daemon {
        Some(d) => {
            let maps = d.maps()?;
            let client = u32::from_ne_bytes(CLIENT_IP.octets());
            // A UDP flow starts half-open and moves once it is a stream.
            for item in maps.conntrack.iter().chain(maps.ct_half_open.iter()) {
                let (k, e) = item?;
                if k.proto == IPPROTO_UDP
                    && k.saddr_be == client
                    && u16::from_be(k.sport_be) == REMOTE_FLOW_PORT
                    && e.flags & CT_F_REPLY == 0
                {
                    return Ok(u16::from_be(e.new_sport_be));
                }
            }
            bail!("no conntrack entry for the client's remote flow")
        }
        None => {
            // The reply tuple's destination port: the second `dport=`.
            let out = netns::exec_in(
                t.cluster.node_ns(1),
                &[
                    "conntrack",
                    "-L",
                    "-p",
                    "udp",
                    "--orig-src",
                    "192.0.2.100",
                    "--orig-port-src",
                    &REMOTE_FLOW_PORT.to_string(),
                ],
            )?;
            out.split_whitespace()
                .filter_map(|w| w.strip_prefix("dport="))
                .nth(1)
                .and_then(|p| p.parse().ok())
                .with_context(|| format!("no reply port in nf_conntrack's entry: {out:?}"))
        }
    }
}

/// An IPv4/UDP datagram from `src` to `dst` carrying [`SPOOF`].
fn datagram(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let b =
        PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64).udp(src.port(), dst.port());
    let mut out = Vec::with_capacity(b.size(SPOOF.len()));
    b.write(&mut out, SPOOF).expect("writing to a Vec");
    out
}

fn last_os_error(what: &str) -> anyhow::Error {
    anyhow::Error::new(std::io::Error::last_os_error()).context(what.to_string())
}

/// Sends `packet` (an IPv4 packet with any source) from inside `ns` through
/// a raw socket, routed as the namespace routes its destination.
fn send_raw_ip(ns: &str, packet: Vec<u8>, dst: Ipv4Addr) -> Result<()> {
    netns::run_in(ns, move || {
        // SAFETY: plain socket(2); the descriptor is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(last_os_error("raw socket"));
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: the buffer and address outlive the call, with their sizes.
        let sent = unsafe {
            libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        let result = if sent < 0 {
            Err(last_os_error("sending the forged datagram"))
        } else {
            Ok(())
        };
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(fd) };
        result
    })
}

fn mac_of(ns: &str, iface: &str) -> Result<[u8; 6]> {
    let out = netns::ip_in(ns, &["-o", "link", "show", iface])?;
    let text = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .with_context(|| format!("no MAC for {iface}: {out}"))?;
    let mut mac = [0u8; 6];
    for (i, part) in text.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

/// Sends `packet` (IPv4) in an Ethernet frame to node1's eth0, from the
/// client's eth0 (an AF_PACKET socket: the client's own routing would keep a
/// packet to its own address).
fn send_frame_to_node1(t: &Testbed, packet: Vec<u8>) -> Result<()> {
    let client_mac = mac_of(t.cluster.client_ns(), "eth0")?;
    let node_mac = mac_of(t.cluster.node_ns(1), "eth0")?;
    let mut frame = Vec::with_capacity(14 + packet.len());
    frame.extend_from_slice(&node_mac);
    frame.extend_from_slice(&client_mac);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&packet);
    netns::run_in(t.cluster.client_ns(), move || {
        let proto = (libc::ETH_P_IP as u16).to_be();
        // SAFETY: plain socket(2); the descriptor is closed below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if fd < 0 {
            return Err(last_os_error("packet socket"));
        }
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        // SAFETY: zero is a valid sockaddr_ll; the fields are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&node_mac);
        // SAFETY: the buffer and address outlive the call, with their sizes.
        let sent = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        let result = if sent < 0 || ifindex == 0 {
            Err(last_os_error("sending the forged frame"))
        } else {
            Ok(())
        };
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(fd) };
        result
    })
}

/// Strict reverse-path filtering on node1, or none.
fn set_rp_filter(t: &Testbed, strict: bool) -> Result<()> {
    let value = if strict { "1" } else { "0" };
    netns::sysctl_in(t.cluster.node_ns(1), "ipv4.conf.all.rp_filter", value)
}

fn reason_count(daemon: &Daemon, reason: Reason) -> Result<u64> {
    Ok(daemon.maps()?.reason_totals()?[reason.name()])
}

fn forwarded(daemon: &Daemon) -> Result<u64> {
    let totals = daemon.maps()?.reason_totals()?;
    Ok([
        Reason::XdpTx,
        Reason::XdpRedirect,
        Reason::TcRedirect,
        Reason::TcRedirectPeer,
        Reason::TcRedirectNeigh,
    ]
    .iter()
    .map(|r| totals[r.name()])
    .sum())
}

/// One forgery against one flow: what the client received, and (with the
/// forwarder) that it was counted once as `pass_wrong_device` and nothing
/// was forwarded meanwhile.
fn forge(
    what: &str,
    daemon: Option<&Daemon>,
    victim: &UdpSocket,
    send: impl FnOnce() -> Result<()>,
) -> Result<Vec<(std::net::SocketAddr, Vec<u8>)>> {
    let before = match daemon {
        Some(d) => Some((reason_count(d, Reason::PassWrongDevice)?, forwarded(d)?)),
        None => None,
    };
    send().with_context(|| format!("{what}: sending"))?;
    let got: Vec<_> = received(victim)
        .into_iter()
        .filter(|(_, payload)| payload == SPOOF)
        .collect();
    if let (Some(d), Some((wrong, fwd))) = (daemon, before) {
        let wrong_now = reason_count(d, Reason::PassWrongDevice)?;
        ensure!(
            wrong_now == wrong + 1,
            "{what}: pass_wrong_device moved by {} (expected 1)",
            wrong_now - wrong
        );
        ensure!(
            forwarded(d)? == fwd,
            "{what}: a forged packet was forwarded"
        );
    }
    eprintln!("{what}: the client received {got:?}");
    Ok(got)
}

fn run(variant: Variant, strict_rp_filter: bool) -> Result<()> {
    let t = testbed()?;
    install_kube_proxy(&t)?;
    set_rp_filter(&t, strict_rp_filter)?;
    let daemon = match variant {
        Variant::Forwarder => {
            let options = t.cluster.daemon_options(1);
            Some(t.cluster.start_forwarder(1, &options)?)
        }
        Variant::KubeProxyAlone => None,
    };
    let remote_flow = open_flow(&t, REMOTE_FLOW_PORT, REMOTE_NODE_PORT)?;
    let local_flow = open_flow(&t, LOCAL_FLOW_PORT, LOCAL_NODE_PORT)?;
    let port = snat_port(&t, daemon.as_ref())?;
    let remote_backend = SocketAddrV4::new(t.remote.ip, UDP_PORT);
    let local_backend = SocketAddrV4::new(t.local.ip, UDP_PORT);
    let client_local = SocketAddrV4::new(CLIENT_IP, LOCAL_FLOW_PORT);
    let service_local = std::net::SocketAddr::from((NODE_IPS[0], LOCAL_NODE_PORT));
    let service_remote = std::net::SocketAddr::from((NODE_IPS[0], REMOTE_NODE_PORT));
    let pod_local = std::net::SocketAddr::V4(local_backend);

    let a = forge(
        "(a) a pod forges the remote backend's reply to our port",
        daemon.as_ref(),
        &remote_flow,
        || {
            let dst = SocketAddrV4::new(NODE_IPS[0], port);
            send_raw_ip(&t.forger.ns, datagram(remote_backend, dst), *dst.ip())
        },
    )?;
    let b = forge(
        "(b) a pod forges the other local pod's reply",
        daemon.as_ref(),
        &local_flow,
        || {
            send_raw_ip(
                &t.forger.ns,
                datagram(local_backend, client_local),
                CLIENT_IP,
            )
        },
    )?;
    let c = forge(
        "(c) a local pod's reply forged from outside",
        daemon.as_ref(),
        &local_flow,
        || send_frame_to_node1(&t, datagram(local_backend, client_local)),
    )?;

    let from = |got: &[(std::net::SocketAddr, Vec<u8>)], addr| got.iter().any(|(f, _)| *f == addr);
    match (variant, strict_rp_filter) {
        (_, true) => {
            for (case, got) in [("a", &a), ("b", &b), ("c", &c)] {
                ensure!(got.is_empty(), "({case}) reached the client: {got:?}");
            }
        }
        (Variant::Forwarder, false) => {
            ensure!(a.is_empty(), "(a) reached the client: {a:?}");
            // Untouched, the kernel routes them on as they are: from the
            // pod's own address, never from the Service's.
            for (case, got) in [("b", &b), ("c", &c)] {
                ensure!(
                    !from(got, service_local),
                    "({case}) reached the client as the Service's reply: {got:?}"
                );
                ensure!(
                    !got.is_empty() && got.iter().all(|(f, _)| *f == pod_local),
                    "({case}) {got:?}"
                );
            }
        }
        (Variant::KubeProxyAlone, false) => {
            // nf_conntrack matches replies by address, whatever the device:
            // (a) is de-NATed and reaches the client as the Service's reply.
            ensure!(
                a.len() == 1 && from(&a, service_remote),
                "(a) under kube-proxy alone: {a:?}"
            );
            // kube-proxy masquerades nodePort flows to local pods too, so a
            // reply to the client's own address matches no entry: routed on
            // untouched, as with the forwarder.
            for (case, got) in [("b", &b), ("c", &c)] {
                ensure!(
                    !got.is_empty() && got.iter().all(|(f, _)| *f == pod_local),
                    "({case}) under kube-proxy alone: {got:?}"
                );
            }
        }
    }
    // The flows still work.
    for (sock, node_port) in [
        (&remote_flow, REMOTE_NODE_PORT),
        (&local_flow, LOCAL_NODE_PORT),
    ] {
        let service = SocketAddrV4::new(NODE_IPS[0], node_port);
        sock.send_to(b"query", service)?;
        let mut buf = [0u8; 512];
        let (_, replier) = sock
            .recv_from(&mut buf)
            .with_context(|| format!("the flow to {service} after the forgeries"))?;
        ensure!(replier == std::net::SocketAddr::V4(service), "{replier}");
    }
    drop(daemon);
    thread::sleep(Duration::from_millis(100));
    Ok(())
}

fn kube_proxy_available() -> bool {
    if let Some(reason) = Backend::Legacy.missing() {
        println!("skipped: {reason}");
        return false;
    }
    true
}

#[test]
fn forged_replies_are_not_translated_without_reverse_path_filtering() {
    skip_unless_netns_capable!();
    if kube_proxy_available() {
        check(run(Variant::Forwarder, false));
    }
}

#[test]
fn forged_replies_are_not_translated_with_strict_reverse_path_filtering() {
    skip_unless_netns_capable!();
    if kube_proxy_available() {
        check(run(Variant::Forwarder, true));
    }
}

#[test]
fn kube_proxy_alone_delivers_forged_replies_without_reverse_path_filtering() {
    skip_unless_netns_capable!();
    if kube_proxy_available() {
        check(run(Variant::KubeProxyAlone, false));
    }
}

#[test]
fn kube_proxy_alone_drops_forged_replies_with_strict_reverse_path_filtering() {
    skip_unless_netns_capable!();
    if kube_proxy_available() {
        check(run(Variant::KubeProxyAlone, true));
    }
}
