//! Packet tables through `BPF_PROG_TEST_RUN`: input frame, expected verdict,
//! expected output frame, for the XDP and tc programs.
//!
//! The programs run inside a network namespace made for the test, with the
//! routes and (permanent) neighbours a node would have, so `bpf_fib_lookup`
//! answers as on a real node. Expected frames are produced by rewriting the
//! input with etherparse, which also computes every checksum: an
//! implementation independent of ours.
use std::net::Ipv4Addr;

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use aya::{
    programs::{SchedClassifier, Xdp},
    Ebpf,
};
use etherparse::{Ethernet2Header, Icmpv4Type, NetHeaders, PacketHeaders, TransportHeader};
use forwarder::{
    model::{Desired, Protocol},
    plan,
};
use forwarder_common::{program_names, Config, CtKey, Reason};
use integration_tests::{
    packet_rig::{
        self, backend, ct_key, frontend, icmp_error, src_port, tcp_flags_frame, tcp_frame,
        udp_frame, Rig, CALI_MAC, CLIENT, CLIENT_MAC, ETH0_MAC, HALF_OPEN_ENTRIES, LOCAL_POD, NODE,
        NODE2_MAC, NP_LOCAL_POLICY_EMPTY, NP_LOCAL_TCP, NP_LOCAL_UDP, NP_REMOTE_TCP, NP_REMOTE_UDP,
        POD_MAC, REMOTE_POD, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_TX,
    },
    skip_unless_netns_capable,
};

fn with_rig(f: impl FnOnce(&mut Rig) -> Result<()> + Send) -> Result<()> {
    packet_rig::with_rig("pk", f)
}

/// The frame as it should leave: new MACs, addresses and ports, TTL - 1,
/// every checksum recomputed by etherparse (a zero UDP checksum stays zero).
fn rewritten(
    frame: &[u8],
    macs: ([u8; 6], [u8; 6]),
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
) -> Result<Vec<u8>> {
    let h = PacketHeaders::from_ethernet_slice(frame).map_err(|e| anyhow!("{e}"))?;
    let Some(NetHeaders::Ipv4(mut ip, _)) = h.net else {
        bail!("not IPv4");
    };
    let payload = h.payload.slice();
    let mut out = Vec::new();
    Ethernet2Header {
        source: macs.0,
        destination: macs.1,
        ether_type: etherparse::EtherType::IPV4,
    }
    .write(&mut out)?;
    ip.source = src.0.octets();
    ip.destination = dst.0.octets();
    ip.time_to_live -= 1;
    ip.write(&mut out)?;
    match h.transport {
        Some(TransportHeader::Tcp(mut tcp)) => {
            tcp.source_port = src.1;
            tcp.destination_port = dst.1;
            tcp.checksum = tcp.calc_checksum_ipv4(&ip, payload)?;
            tcp.write(&mut out)?;
        }
        Some(TransportHeader::Udp(mut udp)) => {
            let had_checksum = udp.checksum != 0;
            udp.source_port = src.1;
            udp.destination_port = dst.1;
            udp.checksum = if had_checksum {
                udp.calc_checksum_ipv4(&ip, payload)?
            } else {
                0
            };
            udp.write(&mut out)?;
        }
        other => bail!("unexpected transport {other:?}"),
    }
    out.extend_from_slice(payload);
    Ok(out)
}

/// Checks every checksum of `frame` with etherparse.
fn assert_checksums_valid(frame: &[u8]) -> Result<()> {
    let h = PacketHeaders::from_ethernet_slice(frame).map_err(|e| anyhow!("{e}"))?;
    let Some(NetHeaders::Ipv4(ip, _)) = &h.net else {
        bail!("not IPv4");
    };
    ensure!(
        ip.header_checksum == ip.calc_header_checksum(),
        "bad IPv4 header checksum"
    );
    let payload = h.payload.slice();
    match &h.transport {
        Some(TransportHeader::Tcp(tcp)) => {
            ensure!(
                tcp.checksum == tcp.calc_checksum_ipv4(ip, payload)?,
                "bad TCP checksum"
            );
        }
        Some(TransportHeader::Udp(udp)) if udp.checksum != 0 => {
            ensure!(
                udp.checksum == udp.calc_checksum_ipv4(ip, payload)?,
                "bad UDP checksum"
            );
        }
        _ => {}
    }
    Ok(())
}

fn assert_frame(name: &str, got: &[u8], want: &[u8]) -> Result<()> {
    assert_checksums_valid(got).with_context(|| format!("{name}: output"))?;
    ensure!(
        got == want,
        "{name}: output frame differs\n got: {got:02x?}\nwant: {want:02x?}"
    );
    Ok(())
}

// ---- tables -------------------------------------------------------------

#[test]
fn remote_backend_flow_is_source_natted_and_sent_back_out_with_xdp_tx() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let client = (CLIENT, 40001);
        let front = (NODE, NP_REMOTE_TCP);
        let syn = tcp_frame(client, front, 64, true, &[]);
        let (verdict, out) = rig.xdp(rig.eth0, &syn)?;
        ensure!(verdict == XDP_TX, "SYN verdict {verdict}");
        let port = src_port(&out)?;
        ensure!(
            (61000..=65535).contains(&port),
            "source port {port} outside the SNAT range"
        );
        let want = rewritten(&syn, (ETH0_MAC, NODE2_MAC), (NODE, port), (REMOTE_POD, 80))?;
        assert_frame("SYN", &out, &want)?;
        ensure!(
            rig.has_flow(ct_key(client, front, 6)),
            "forward entry missing"
        );
        ensure!(
            rig.has_flow(ct_key((REMOTE_POD, 80), (NODE, port), 6)),
            "reply entry missing"
        );

        // Established: the same source port again.
        let ack = tcp_frame(
            client,
            front,
            64,
            false,
            b"GET /productpage HTTP/1.1\r\n\r\n",
        );
        let (verdict, out) = rig.xdp(rig.eth0, &ack)?;
        ensure!(verdict == XDP_TX, "ACK verdict {verdict}");
        let want = rewritten(&ack, (ETH0_MAC, NODE2_MAC), (NODE, port), (REMOTE_POD, 80))?;
        assert_frame("established", &out, &want)?;

        // The reply comes back to the node address and our port, and leaves
        // as if from the nodePort.
        let reply = tcp_frame(
            (REMOTE_POD, 80),
            (NODE, port),
            63,
            false,
            b"HTTP/1.1 200 OK\r\n\r\n",
        );
        let (verdict, out) = rig.xdp(rig.eth0, &reply)?;
        ensure!(verdict == XDP_TX, "reply verdict {verdict}");
        let want = rewritten(&reply, (ETH0_MAC, CLIENT_MAC), front, client)?;
        assert_frame("reply", &out, &want)?;
        ensure!(rig.count(Reason::XdpTx)? >= 3);
        Ok(())
    })
    .unwrap();
}

#[test]
fn local_backend_is_left_to_tc_which_delivers_into_the_pod_keeping_the_client_address() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let client = (CLIENT, 40002);
        let front = (NODE, NP_LOCAL_TCP);
        let syn = tcp_frame(client, front, 64, true, &[]);
        // XDP cannot transmit into a pod: it leaves the frame untouched,
        // noting the hand-over but counting no verdict (tc does).
        let before = rig.count(Reason::XdpToTc)?;
        let verdicts = rig.verdicts()?;
        let (verdict, out) = rig.xdp(rig.eth0, &syn)?;
        ensure!(verdict == XDP_PASS, "XDP verdict {verdict}");
        ensure!(out == syn, "XDP changed a frame it passed");
        ensure!(rig.count(Reason::XdpToTc)? == before + 1);
        ensure!(rig.verdicts()? == verdicts, "XDP counted a verdict");

        let peer = rig.count(Reason::TcRedirectPeer)?;
        let (verdict, out) = rig.tc(rig.eth0, &syn)?;
        ensure!(verdict == TC_ACT_REDIRECT, "tc verdict {verdict}");
        let want = rewritten(&syn, (CALI_MAC, POD_MAC), client, (LOCAL_POD, 80))?;
        assert_frame("to pod", &out, &want)?;
        ensure!(rig.count(Reason::TcRedirectPeer)? == peer + 1);
        ensure!(
            rig.verdicts()? == verdicts + 1,
            "the SYN counted {} verdicts over both hooks",
            rig.verdicts()? - verdicts
        );

        // The pod's reply, caught at tc ingress on its host-side veth.
        let reply = tcp_frame(
            (LOCAL_POD, 80),
            client,
            64,
            false,
            b"HTTP/1.1 200 OK\r\n\r\n",
        );
        let (verdict, out) = rig.tc(rig.cali, &reply)?;
        ensure!(verdict == TC_ACT_REDIRECT, "reply verdict {verdict}");
        let want = rewritten(&reply, (ETH0_MAC, CLIENT_MAC), front, client)?;
        assert_frame("reply", &out, &want)?;
        ensure!(rig.count(Reason::TcRedirect)? >= 1);
        Ok(())
    })
    .unwrap();
}

#[test]
fn udp_to_remote_and_local_backends_with_and_without_checksums() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let client = (CLIENT, 40003);
        let front = (NODE, NP_REMOTE_UDP);
        let query = udp_frame(client, front, 64, b"query");
        let (verdict, out) = rig.xdp(rig.eth0, &query)?;
        ensure!(verdict == XDP_TX, "UDP verdict {verdict}");
        let port = src_port(&out)?;
        let want = rewritten(
            &query,
            (ETH0_MAC, NODE2_MAC),
            (NODE, port),
            (REMOTE_POD, 53),
        )?;
        assert_frame("udp", &out, &want)?;

        // A zero UDP checksum means "none" and must stay zero.
        let mut no_sum = udp_frame((CLIENT, 40004), front, 64, b"query");
        no_sum[40] = 0;
        no_sum[41] = 0;
        let (verdict, out) = rig.xdp(rig.eth0, &no_sum)?;
        ensure!(verdict == XDP_TX, "UDP (no checksum) verdict {verdict}");
        let port = src_port(&out)?;
        ensure!(out[40..42] == [0, 0], "zero UDP checksum was changed");
        let want = rewritten(
            &no_sum,
            (ETH0_MAC, NODE2_MAC),
            (NODE, port),
            (REMOTE_POD, 53),
        )?;
        assert_frame("udp without checksum", &out, &want)?;

        // Local UDP backend through tc, both with and without a checksum.
        for (client, zero) in [((CLIENT, 40005), false), ((CLIENT, 40006), true)] {
            let mut q = udp_frame(client, (NODE, NP_LOCAL_UDP), 64, b"query");
            if zero {
                q[40] = 0;
                q[41] = 0;
            }
            let (verdict, out) = rig.tc(rig.eth0, &q)?;
            ensure!(verdict == TC_ACT_REDIRECT, "local UDP verdict {verdict}");
            let want = rewritten(&q, (CALI_MAC, POD_MAC), client, (LOCAL_POD, 53))?;
            assert_frame("local udp", &out, &want)?;
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn ipv4_options_are_kept_and_the_l4_header_found_after_them() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let client = (CLIENT, 40007);
        let front = (NODE, NP_REMOTE_TCP);
        let plain = tcp_frame(client, front, 64, true, &[]);
        // Rebuild with 8 bytes of options (NOPs and an end-of-list).
        let h = PacketHeaders::from_ethernet_slice(&plain).map_err(|e| anyhow!("{e}"))?;
        let Some(NetHeaders::Ipv4(mut ip, _)) = h.net else {
            bail!("not IPv4")
        };
        ip.options = [1u8, 1, 1, 1, 1, 1, 1, 0][..]
            .try_into()
            .map_err(|e| anyhow!("{e:?}"))?;
        let Some(TransportHeader::Tcp(mut tcp)) = h.transport else {
            bail!("not TCP")
        };
        ip.set_payload_len(tcp.header_len())?;
        tcp.checksum = tcp.calc_checksum_ipv4(&ip, &[])?;
        let mut frame = plain[..14].to_vec();
        ip.write(&mut frame)?;
        tcp.write(&mut frame)?;
        ensure!(frame[14] == 0x47, "ihl 7 expected");

        let (verdict, out) = rig.xdp(rig.eth0, &frame)?;
        ensure!(verdict == XDP_TX, "verdict {verdict}");
        let port = u16::from_be_bytes([out[14 + 28], out[14 + 29]]);
        let want = rewritten(
            &frame,
            (ETH0_MAC, NODE2_MAC),
            (NODE, port),
            (REMOTE_POD, 80),
        )?;
        assert_frame("options", &out, &want)?;
        Ok(())
    })
    .unwrap();
}

/// A SYN to the remote TCP frontend carrying IPv4 `options`, every checksum right.
fn syn_with_ip_options(client: (Ipv4Addr, u16), options: &[u8]) -> Result<Vec<u8>> {
    let plain = tcp_frame(client, (NODE, NP_REMOTE_TCP), 64, true, &[]);
    let h = PacketHeaders::from_ethernet_slice(&plain).map_err(|e| anyhow!("{e}"))?;
    let Some(NetHeaders::Ipv4(mut ip, _)) = h.net else {
        bail!("not IPv4")
    };
    ip.options = options.try_into().map_err(|e| anyhow!("{e:?}"))?;
    let Some(TransportHeader::Tcp(mut tcp)) = h.transport else {
        bail!("not TCP")
    };
    ip.set_payload_len(tcp.header_len())?;
    ip.header_checksum = ip.calc_header_checksum();
    tcp.checksum = tcp.calc_checksum_ipv4(&ip, &[])?;
    let mut frame = plain[..14].to_vec();
    ip.write(&mut frame)?;
    tcp.write(&mut frame)?;
    Ok(frame)
}

/// Found by tests/tests/fuzz.rs: options other than padding were forwarded,
/// malformed ones included, which the kernel drops (ip_options_compile) and
/// valid ones it acts on when it forwards.
#[test]
fn ipv4_options_other_than_padding_are_the_kernels() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let cases: [(&str, &[u8]); 3] = [
            ("option 4 of length 0 (malformed)", &[4, 0, 0, 0]),
            ("record route", &[7, 7, 4, 0, 0, 0, 0, 0]),
            ("router alert", &[148, 4, 0, 0]),
        ];
        for (i, (name, options)) in cases.iter().enumerate() {
            let frame = syn_with_ip_options((CLIENT, 40200 + i as u16), options)?;
            rig.passes_in_both_hooks(name, &frame, Reason::PassIpOptions)?;
        }
        ensure!(
            rig.count(Reason::CtCreated)? == 0,
            "a packet with options created a flow"
        );
        // Padding alone is still forwarded.
        let padded = syn_with_ip_options((CLIENT, 40210), &[1, 1, 1, 0])?;
        let (v, _) = rig.xdp(rig.eth0, &padded)?;
        ensure!(v == XDP_TX, "padding options: verdict {v}");
        Ok(())
    })
    .unwrap();
}

#[test]
fn packets_not_ours_pass_unchanged_with_their_reason_counted() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let client = (CLIENT, 40008);
        let mut arp = vec![0xffu8; 6];
        arp.extend_from_slice(&CLIENT_MAC);
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0u8; 28]);
        let mut icmp = tcp_frame(client, (NODE, NP_REMOTE_TCP), 64, true, &[]);
        icmp[14 + 9] = 1; // protocol ICMP, type 156 (checksums are irrelevant to a pass)
        let mut first_fragment = tcp_frame(client, (NODE, NP_REMOTE_TCP), 64, true, &[]);
        first_fragment[14 + 6] |= 0x20; // more fragments
        let mut later_fragment = tcp_frame(client, (NODE, NP_REMOTE_TCP), 64, true, &[]);
        later_fragment[14 + 7] = 0x10; // offset 16 * 8 bytes
        let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
            ("ARP", arp, Reason::PassNotIpv4),
            ("ICMP that is no error", icmp, Reason::PassIcmp),
            (
                "another port",
                tcp_frame(client, (NODE, 31999), 64, true, &[]),
                Reason::PassNoService,
            ),
            (
                "another address",
                tcp_frame(
                    client,
                    (Ipv4Addr::new(192, 0, 2, 5), NP_REMOTE_TCP),
                    64,
                    true,
                    &[],
                ),
                Reason::PassNoService,
            ),
            (
                "pod IP at a nodePort number",
                tcp_frame(client, (LOCAL_POD, NP_REMOTE_TCP), 64, true, &[]),
                Reason::PassNoService,
            ),
            (
                "UDP at a TCP nodePort",
                udp_frame(client, (NODE, NP_REMOTE_TCP), 64, b"x"),
                Reason::PassNoService,
            ),
            ("first fragment", first_fragment, Reason::PassFragment),
            ("later fragment", later_fragment, Reason::PassFragment),
            (
                "TTL 1",
                tcp_frame(client, (NODE, NP_REMOTE_TCP), 1, true, &[]),
                Reason::PassTtl,
            ),
        ];
        for (name, frame, reason) in cases {
            rig.passes_in_both_hooks(name, &frame, reason)?;
        }
        // Nothing above created a flow.
        ensure!(rig.count(Reason::CtCreated)? == 0);
        Ok(())
    })
    .unwrap();
}

#[test]
fn truncated_frames_at_every_length_pass_without_state() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let frames = [
            tcp_frame((CLIENT, 40009), (NODE, NP_REMOTE_TCP), 64, true, &[]),
            udp_frame((CLIENT, 40010), (NODE, NP_REMOTE_UDP), 64, &[]),
            tcp_frame((REMOTE_POD, 80), (NODE, 61000), 64, false, &[]),
        ];
        let before = rig.count(Reason::PassMalformed)?;
        let verdicts = rig.verdicts()?;
        // Only tc counts a frame XDP passes (tc sees it next).
        let mut tc_runs = 0;
        for frame in &frames {
            // The kernel refuses XDP test frames shorter than an Ethernet
            // header, and skb test frames whose IPv4 header is incomplete.
            for len in 14..frame.len() {
                let short = &frame[..len];
                let (v, out) = rig.xdp(rig.eth0, short)?;
                ensure!(
                    v == XDP_PASS && out == short,
                    "XDP, {len} bytes: verdict {v}"
                );
                if len >= 14 + 20 {
                    let (v, out) = rig
                        .tc(rig.eth0, short)
                        .with_context(|| format!("{len} bytes"))?;
                    ensure!(
                        v == TC_ACT_OK && out == short,
                        "tc, {len} bytes: verdict {v}"
                    );
                    tc_runs += 1;
                }
            }
        }
        // Every cut falls inside the IPv4 or L4 header: each tc run counts
        // one malformed packet, and nothing else counted a verdict.
        let malformed = rig.count(Reason::PassMalformed)? - before;
        ensure!(
            malformed == tc_runs,
            "{malformed} of {tc_runs} tc runs counted as malformed"
        );
        ensure!(rig.verdicts()? - verdicts == tc_runs);
        ensure!(
            rig.count(Reason::CtCreated)? == 0,
            "a truncated frame created a flow"
        );
        Ok(())
    })
    .unwrap();
}

#[test]
fn local_traffic_policy_without_local_backends_drops_and_counts() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let syn = tcp_frame(
            (CLIENT, 40011),
            (NODE, NP_LOCAL_POLICY_EMPTY),
            64,
            true,
            &[],
        );
        let (v, _) = rig.xdp(rig.eth0, &syn)?;
        ensure!(v == XDP_DROP, "XDP verdict {v}");
        let (v, _) = rig.tc(rig.eth0, &syn)?;
        ensure!(v == TC_ACT_SHOT, "tc verdict {v}");
        ensure!(rig.count(Reason::DropNoLocalBackend)? == 2);
        Ok(())
    })
    .unwrap();
}

#[test]
fn a_reply_for_an_unknown_flow_is_passed_untouched() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        // Backend traffic to a node port we never allocated: not ours.
        let stray = tcp_frame((REMOTE_POD, 80), (NODE, 61234), 64, false, b"x");
        let (v, out) = rig.xdp(rig.eth0, &stray)?;
        ensure!(v == XDP_PASS && out == stray, "verdict {v}");
        let pod_other = tcp_frame((LOCAL_POD, 80), (CLIENT, 50000), 64, false, b"x");
        let (v, out) = rig.tc(rig.cali, &pod_other)?;
        ensure!(
            v == TC_ACT_OK && out == pod_other,
            "pod traffic verdict {v}"
        );
        Ok(())
    })
    .unwrap();
}

#[test]
fn idle_and_closed_flows_expire_and_their_tuple_starts_a_new_flow() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let config = Config {
            udp_timeout_ns: 1_000_000_000,
            udp_replied_timeout_ns: 1_000_000_000,
            ..Config::default()
        };
        rig.maps.config.set(0, config, 0)?;

        // UDP idle past its timeout: the same tuple is a new flow.
        let q = udp_frame((CLIENT, 40020), (NODE, NP_REMOTE_UDP), 64, b"q");
        let created = rig.count(Reason::CtCreated)?;
        let (v, _) = rig.xdp(rig.eth0, &q)?;
        ensure!(v == XDP_TX);
        let (v, _) = rig.xdp(rig.eth0, &q)?;
        ensure!(v == XDP_TX);
        ensure!(
            rig.count(Reason::CtCreated)? == created + 1,
            "second packet is the same flow"
        );
        std::thread::sleep(std::time::Duration::from_millis(2_200));
        let recycled = rig.count(Reason::CtRecycled)?;
        let (v, _) = rig.xdp(rig.eth0, &q)?;
        ensure!(v == XDP_TX);
        ensure!(
            rig.count(Reason::CtRecycled)? == recycled + 1,
            "idle UDP flow not expired"
        );

        // TCP: after a FIN, a new SYN on the same tuple starts a new flow.
        let client = (CLIENT, 40021);
        let front = (NODE, NP_REMOTE_TCP);
        let syn = tcp_frame(client, front, 64, true, &[]);
        let (v, _) = rig.xdp(rig.eth0, &syn)?;
        ensure!(v == XDP_TX);
        let mut fin = tcp_frame(client, front, 64, false, &[]);
        fin[14 + 20 + 13] |= 0x01; // FIN (checksum is irrelevant to the verdict here)
        let (v, _) = rig.xdp(rig.eth0, &fin)?;
        ensure!(v == XDP_TX);
        let recycled = rig.count(Reason::CtRecycled)?;
        let (v, _) = rig.xdp(rig.eth0, &syn)?;
        ensure!(v == XDP_TX);
        ensure!(
            rig.count(Reason::CtRecycled)? == recycled + 1,
            "SYN after FIN did not start a new flow"
        );
        Ok(())
    })
    .unwrap();
}

// ---- flow states, devices, ICMP ----------------------------------------

fn entry_state(rig: &Rig, key: CtKey) -> Result<u8> {
    Ok(rig.entry(key).context("no entry")?.0.state)
}

#[test]
fn only_a_clients_syn_starts_a_flow_and_the_handshake_establishes_it() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let front = (NODE, NP_REMOTE_TCP);
        // Mid-stream packets of a flow we never saw (kube-proxy's, or none):
        // the kernel's, with no state created, in both hooks.
        for (i, flags) in [&["ack"][..], &["fin", "ack"], &["rst"], &["syn", "ack"]]
            .iter()
            .enumerate()
        {
            let client = (CLIENT, 40100 + i as u16);
            let frame = tcp_flags_frame(client, front, flags, b"x");
            rig.passes_in_both_hooks(&format!("{flags:?}"), &frame, Reason::PassNotSyn)?;
            ensure!(!rig.has_flow(ct_key(client, front, 6)), "{flags:?} tracked");
        }
        ensure!(rig.count(Reason::CtCreated)? == 0);

        // SYN -> SYN_SENT; the backend's SYN-ACK -> SYN_RECV; the client's
        // ACK -> ESTABLISHED (both entries share the state).
        let client = (CLIENT, 40110);
        let key = ct_key(client, front, 6);
        let (v, out) = rig.xdp(rig.eth0, &tcp_flags_frame(client, front, &["syn"], &[]))?;
        ensure!(v == XDP_TX);
        let port = src_port(&out)?;
        let reply_key = ct_key((REMOTE_POD, 80), (NODE, port), 6);
        ensure!(entry_state(rig, key)? == forwarder_common::CT_STATE_NEW);
        let synack = tcp_flags_frame((REMOTE_POD, 80), (NODE, port), &["syn", "ack"], &[]);
        let (v, _) = rig.xdp(rig.eth0, &synack)?;
        ensure!(v == XDP_TX, "SYN-ACK verdict {v}");
        ensure!(entry_state(rig, key)? == forwarder_common::CT_STATE_SYN_RECV);
        ensure!(entry_state(rig, reply_key)? == forwarder_common::CT_STATE_SYN_RECV);
        let (v, _) = rig.xdp(rig.eth0, &tcp_flags_frame(client, front, &["ack"], &[]))?;
        ensure!(v == XDP_TX);
        ensure!(entry_state(rig, key)? == forwarder_common::CT_STATE_ESTABLISHED);
        ensure!(entry_state(rig, reply_key)? == forwarder_common::CT_STATE_ESTABLISHED);
        Ok(())
    })
    .unwrap();
}

#[test]
fn a_syn_flood_recycles_half_open_flows_and_never_an_established_one() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let front = (NODE, NP_REMOTE_TCP);
        // An established flow, idle while the flood runs.
        let client = (CLIENT, 40200);
        let key = ct_key(client, front, 6);
        let (v, out) = rig.xdp(rig.eth0, &tcp_flags_frame(client, front, &["syn"], &[]))?;
        ensure!(v == XDP_TX);
        let port = src_port(&out)?;
        let reply_key = ct_key((REMOTE_POD, 80), (NODE, port), 6);
        ensure!(
            !rig.entry(key).context("no entry")?.1,
            "a SYN starts half-open"
        );
        let synack = tcp_flags_frame((REMOTE_POD, 80), (NODE, port), &["syn", "ack"], &[]);
        ensure!(rig.xdp(rig.eth0, &synack)?.0 == XDP_TX);
        ensure!(
            !rig.entry(key).context("no entry")?.1,
            "SYN_RECV is half-open"
        );
        ensure!(
            rig.xdp(rig.eth0, &tcp_flags_frame(client, front, &["ack"], &[]))?
                .0
                == XDP_TX
        );
        for k in [key, reply_key] {
            ensure!(
                rig.entry(k).context("flow lost")?.1,
                "the handshake's ACK did not move {k:?} to the established table"
            );
            ensure!(
                rig.maps.ct_half_open.get(&k, 0).is_err(),
                "{k:?} left behind"
            );
        }

        // Eight tables' worth of SYNs from new clients, each answered by the
        // backend as a real one would: each starts a flow (XDP_TX), none
        // completes.
        let inserted = rig.count(Reason::CtHalfOpenInserted)?;
        let deleted = rig.count(Reason::CtHalfOpenDeleted)?;
        let flood = 8 * HALF_OPEN_ENTRIES;
        for i in 0..flood {
            let forged = (CLIENT, 1024 + i as u16);
            let (v, out) = rig.xdp(rig.eth0, &tcp_flags_frame(forged, front, &["syn"], &[]))?;
            ensure!(v == XDP_TX, "flood SYN {i}: verdict {v}");
            let p = src_port(&out)?;
            let synack = tcp_flags_frame((REMOTE_POD, 80), (NODE, p), &["syn", "ack"], &[]);
            ensure!(rig.xdp(rig.eth0, &synack)?.0 == XDP_TX, "flood SYN-ACK {i}");
        }
        let live = rig.maps.ct_half_open.keys().count() as u64;
        ensure!(live <= HALF_OPEN_ENTRIES as u64, "{live} half-open entries");
        let added = rig.count(Reason::CtHalfOpenInserted)? - inserted;
        let removed = rig.count(Reason::CtHalfOpenDeleted)? - deleted;
        ensure!(added >= 2 * flood as u64, "{added} half-open entries added");
        // What was added and is neither there nor removed was evicted.
        ensure!(
            added - removed - live >= flood as u64,
            "only {} half-open entries evicted",
            added - removed - live
        );
        ensure!(rig.count(Reason::CtEstablishedDeleted)? == 0);

        // The idle flow is still there and still translated, both ways.
        ensure!(rig.entry(key).is_some_and(|(_, est)| est) && rig.entry(reply_key).is_some());
        let (v, out) = rig.xdp(rig.eth0, &tcp_frame(client, front, 64, false, b"after"))?;
        ensure!(v == XDP_TX, "the established flow's data: verdict {v}");
        ensure!(
            src_port(&out)? == port,
            "the established flow changed its port"
        );
        let reply = tcp_frame((REMOTE_POD, 80), (NODE, port), 64, false, b"reply");
        ensure!(rig.xdp(rig.eth0, &reply)?.0 == XDP_TX, "its reply");
        Ok(())
    })
    .unwrap();
}

#[test]
fn a_udp_flow_is_established_once_replied_and_still_active_two_seconds_on() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let front = (NODE, NP_REMOTE_UDP);
        let client = (CLIENT, 40300);
        let key = ct_key(client, front, 17);
        let (v, out) = rig.xdp(rig.eth0, &udp_frame(client, front, 64, b"q"))?;
        ensure!(v == XDP_TX);
        let port = src_port(&out)?;
        let reply = udp_frame((REMOTE_POD, 53), (NODE, port), 64, b"a");
        ensure!(rig.xdp(rig.eth0, &reply)?.0 == XDP_TX);
        ensure!(
            entry_state(rig, key)? == forwarder_common::CT_STATE_ESTABLISHED,
            "replied"
        );
        ensure!(
            !rig.entry(key).context("no entry")?.1,
            "established before it is a stream"
        );
        // nf_conntrack's stream: still talking more than 2 s after it began.
        std::thread::sleep(std::time::Duration::from_millis(2300));
        ensure!(rig.xdp(rig.eth0, &udp_frame(client, front, 64, b"q2"))?.0 == XDP_TX);
        let reply_key = ct_key((REMOTE_POD, 53), (NODE, port), 17);
        for k in [key, reply_key] {
            ensure!(
                rig.entry(k).context("flow lost")?.1,
                "{k:?} not established"
            );
        }
        ensure!(
            rig.xdp(rig.eth0, &reply)?.0 == XDP_TX,
            "a reply after the move"
        );
        Ok(())
    })
    .unwrap();
}

#[test]
fn packets_on_a_device_their_flow_does_not_use_are_not_translated() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        // A remote flow: its replies come in on eth0.
        let client = (CLIENT, 40120);
        let front = (NODE, NP_REMOTE_TCP);
        let port = rig.open_remote_flow(client)?;
        // A local pod forging the remote backend's reply to our port (sent
        // to its veth's MAC, as a pod's frames are).
        let mut forged = tcp_frame((REMOTE_POD, 80), (NODE, port), 64, false, b"inject");
        forged[0..6].copy_from_slice(&CALI_MAC);
        let before = rig.count(Reason::PassWrongDevice)?;
        let (v, out) = rig.tc(rig.cali, &forged)?;
        ensure!(
            v == TC_ACT_OK && out == forged,
            "forged reply from a pod: verdict {v}"
        );
        // A local pod forging the client's own packets.
        let mut forged_client = tcp_frame(client, front, 64, false, b"inject");
        forged_client[0..6].copy_from_slice(&CALI_MAC);
        let (v, out) = rig.tc(rig.cali, &forged_client)?;
        ensure!(
            v == TC_ACT_OK && out == forged_client,
            "forged client packet: verdict {v}"
        );

        // A local flow: its replies come in on cali1; the same reply sent
        // from outside (eth0) is somebody else's.
        let client = (CLIENT, 40121);
        let (v, _) = rig.tc(
            rig.eth0,
            &tcp_frame(client, (NODE, NP_LOCAL_TCP), 64, true, &[]),
        )?;
        ensure!(v == TC_ACT_REDIRECT);
        let reply = tcp_frame((LOCAL_POD, 80), client, 64, false, b"inject");
        let mut outside = reply.clone();
        outside[0..6].copy_from_slice(&ETH0_MAC);
        let (v, out) = rig.xdp(rig.eth0, &outside)?;
        ensure!(
            v == XDP_PASS && out == outside,
            "pod reply from outside (xdp): {v}"
        );
        let (v, out) = rig.tc(rig.eth0, &outside)?;
        ensure!(
            v == TC_ACT_OK && out == outside,
            "pod reply from outside (tc): {v}"
        );
        // Three verdicts: tc's on cali1 (twice) and on eth0; the XDP run
        // on eth0 leaves its frame's verdict to tc.
        ensure!(rig.count(Reason::PassWrongDevice)? == before + 3);
        // The real reply on the pod's device still works.
        let (v, _) = rig.tc(rig.cali, &reply)?;
        ensure!(v == TC_ACT_REDIRECT, "real reply verdict {v}");
        Ok(())
    })
    .unwrap();
}

#[test]
fn frames_the_kernel_would_refuse_are_passed_untracked() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let front = (NODE, NP_REMOTE_TCP);
        let good = tcp_frame((CLIENT, 40130), front, 64, true, &[]);
        let mut bad_ip_sum = good.clone();
        bad_ip_sum[14 + 10] ^= 0x55;
        let mut long_total = good.clone();
        long_total[14 + 3] = long_total[14 + 3].wrapping_add(4); // total length past the frame
        let mut doff_short = good.clone();
        doff_short[14 + 20 + 12] = 0x40; // data offset 4
        let mut doff_long = good.clone();
        doff_long[14 + 20 + 12] = 0xf0; // data offset 15, past the packet
        let syn_fin = tcp_flags_frame((CLIENT, 40131), front, &["syn", "fin"], &[]);
        let mut udp_long = udp_frame((CLIENT, 40132), (NODE, NP_REMOTE_UDP), 64, b"query");
        udp_long[14 + 20 + 5] += 8; // UDP length past the packet
        let martian = tcp_frame((Ipv4Addr::new(127, 0, 0, 1), 40133), front, 64, true, &[]);
        let zero_src = tcp_frame((Ipv4Addr::new(0, 0, 0, 0), 40134), front, 64, true, &[]);
        let multicast_src = tcp_frame((Ipv4Addr::new(224, 0, 0, 5), 40135), front, 64, true, &[]);
        let cases = [
            ("bad IPv4 header checksum", bad_ip_sum),
            ("total length past the frame", long_total),
            ("TCP data offset under 5", doff_short),
            ("TCP data offset past the packet", doff_long),
            ("SYN+FIN", syn_fin),
            ("UDP length past the packet", udp_long),
            ("loopback source", martian),
            ("zero source", zero_src),
            ("multicast source", multicast_src),
        ];
        for (name, frame) in &cases {
            rig.passes_in_both_hooks(name, frame, Reason::PassMalformed)?;
        }
        ensure!(
            rig.count(Reason::CtCreated)? == 0,
            "a refused frame created a flow"
        );
        Ok(())
    })
    .unwrap();
}

#[test]
fn frames_to_another_hosts_mac_or_to_broadcast_and_multicast_are_not_translated() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let front = (NODE, NP_REMOTE_TCP);
        let old = (CLIENT, 40180);
        rig.open_remote_flow(old)?;
        let created = rig.count(Reason::CtCreated)?;
        let other_host = [0x02, 0, 0, 0, 0, 0x99];
        let broadcast = [0xff; 6];
        let multicast = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01];
        for (i, (dmac, reason)) in [
            (other_host, Reason::PassOtherHost),
            (broadcast, Reason::PassNotUnicast),
            (multicast, Reason::PassNotUnicast),
        ]
        .into_iter()
        .enumerate()
        {
            // A new flow's SYN, and a packet of a flow we track.
            let client = (CLIENT, 40181 + i as u16);
            for (what, mut frame) in [
                ("SYN", tcp_frame(client, front, 64, true, &[])),
                ("established", tcp_frame(old, front, 64, false, b"data")),
            ] {
                frame[0..6].copy_from_slice(&dmac);
                rig.passes_in_both_hooks(&format!("{what} to {dmac:02x?}"), &frame, reason)?;
            }
            ensure!(
                !rig.has_flow(ct_key(client, front, 6)),
                "SYN to {dmac:02x?} tracked"
            );
        }
        ensure!(
            rig.count(Reason::CtCreated)? == created,
            "a frame to another MAC created a flow"
        );

        // A local pod's reply addressed to another MAC on its veth: passed.
        let client = (CLIENT, 40190);
        let (v, _) = rig.tc(
            rig.eth0,
            &tcp_frame(client, (NODE, NP_LOCAL_TCP), 64, true, &[]),
        )?;
        ensure!(v == TC_ACT_REDIRECT);
        let mut reply = tcp_frame((LOCAL_POD, 80), client, 64, false, b"data");
        reply[0..6].copy_from_slice(&other_host);
        let before = rig.count(Reason::PassOtherHost)?;
        let (v, out) = rig.tc(rig.cali, &reply)?;
        ensure!(
            v == TC_ACT_OK && out == reply,
            "reply to another MAC: verdict {v}"
        );
        ensure!(rig.count(Reason::PassOtherHost)? == before + 1);
        reply[0..6].copy_from_slice(&CALI_MAC);
        let (v, _) = rig.tc(rig.cali, &reply)?;
        ensure!(v == TC_ACT_REDIRECT, "the same reply to cali1's MAC: {v}");
        Ok(())
    })
    .unwrap();
}

/// Sends `frame` out of `ifname` as it is (an AF_PACKET socket).
fn send_raw(ifname: &str, frame: &[u8]) -> Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let ifindex = forwarder::netdev::ifindex(ifname)?;
    // SAFETY: a plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    ensure!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor that we now own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain C data, for which zeroes are valid.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_ifindex = i32::try_from(ifindex)?;
    to.sll_halen = 6;
    // SAFETY: `frame` and `to` are live for the call, their sizes as given.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    ensure!(
        sent == frame.len() as isize,
        "sending on {ifname}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Waits (up to 2 s) until `reason` counted `n` more than `before`.
fn wait_for_count(rig: &Rig, reason: Reason, before: u64, n: u64) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while rig.count(reason)? < before + n {
        ensure!(
            std::time::Instant::now() < deadline,
            "{} counted {} times, not {n}",
            reason.name(),
            rig.count(reason)? - before
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(())
}

/// A VLAN-tagged frame reaches tc ingress with its tag already moved out of
/// its bytes into the skb (skb_vlan_untag): it is its VLAN device's, which
/// the kernel delivers it to after tc, so tc must not translate it. Sent
/// for real through the veth: a test run cannot give an skb a VLAN tag.
#[test]
fn a_vlan_tagged_frame_is_left_to_its_vlan_device_in_both_hooks() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let tc: &mut SchedClassifier = rig
            .ebpf
            .program_mut(program_names::TC)
            .context("tc program")?
            .try_into()?;
        tc.attach("eth0", aya::programs::TcAttachType::Ingress)
            .context("attaching tc to eth0")?;
        let syn = tcp_frame((CLIENT, 40220), (NODE, NP_LOCAL_TCP), 64, true, &[]);
        let mut tagged = syn[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 100]);
        tagged.extend_from_slice(&syn[12..]);

        let created = rig.count(Reason::CtCreated)?;
        let not_ipv4 = rig.count(Reason::PassNotIpv4)?;
        send_raw("wire0", &tagged)?;
        // XDP sees the tag in the bytes and leaves the frame to tc, which
        // sees it in the skb and counts the packet's one verdict.
        wait_for_count(rig, Reason::PassNotIpv4, not_ipv4, 1)?;
        ensure!(
            rig.count(Reason::CtCreated)? == created,
            "the VLAN's frame was tracked"
        );
        // The same frame untagged is ours: tc takes it to the local pod.
        let redirected = rig.count(Reason::TcRedirectPeer)?;
        send_raw("wire0", &syn)?;
        wait_for_count(rig, Reason::TcRedirectPeer, redirected, 1)?;
        ensure!(rig.count(Reason::CtCreated)? == created + 1);
        Ok(())
    })
    .unwrap();
}

#[test]
fn draining_takes_no_new_flows_and_keeps_translating_existing_ones() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let front = (NODE, NP_REMOTE_TCP);
        let old = (CLIENT, 40140);
        let port = rig.open_remote_flow(old)?;
        let config = Config {
            flags: forwarder_common::CONFIG_F_DRAINING,
            ..Config::default()
        };
        rig.maps.config.set(0, config, 0)?;
        let syn = tcp_frame((CLIENT, 40141), front, 64, true, &[]);
        let (v, out) = rig.xdp(rig.eth0, &syn)?;
        ensure!(
            v == XDP_PASS && out == syn,
            "new flow while draining: verdict {v}"
        );
        ensure!(rig.count(Reason::PassDraining)? == 0, "XDP counted a pass");
        let (v, out) = rig.tc(rig.eth0, &syn)?;
        ensure!(
            v == TC_ACT_OK && out == syn,
            "new flow while draining (tc): verdict {v}"
        );
        ensure!(rig.count(Reason::PassDraining)? == 1);
        let data = tcp_frame(old, front, 64, false, b"more");
        let (v, out) = rig.xdp(rig.eth0, &data)?;
        ensure!(v == XDP_TX, "existing flow while draining: verdict {v}");
        let want = rewritten(&data, (ETH0_MAC, NODE2_MAC), (NODE, port), (REMOTE_POD, 80))?;
        assert_frame("existing flow while draining", &out, &want)
    })
    .unwrap();
}

/// A local pod under NetworkPolicy: a client's SYN (and UDP datagram) to it
/// goes to the kernel untouched in both hooks, nothing is tracked; a closed
/// flow whose tuple that SYN reuses is forgotten, so the kernel's new
/// connection is not translated from its second packet on.
#[test]
fn a_policed_backend_takes_no_new_flow_and_its_closed_flows_are_forgotten() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let front = (NODE, NP_LOCAL_TCP);
        let reused = (CLIENT, 40150);
        // A flow to the local pod, closed by the client's RST.
        let syn = tcp_frame(reused, front, 64, true, &[]);
        let (v, _) = rig.tc(rig.eth0, &syn)?;
        ensure!(
            v == TC_ACT_REDIRECT,
            "the flow before policing: verdict {v}"
        );
        let rst = tcp_flags_frame(reused, front, &["rst"], &[]);
        let (v, _) = rig.tc(rig.eth0, &rst)?;
        ensure!(v == TC_ACT_REDIRECT, "RST: verdict {v}");
        let reply_key = ct_key((LOCAL_POD, 80), reused, 6);
        ensure!(rig.has_flow(reply_key), "the closed flow's reply entry");

        // The pod comes under policy.
        let mut tcp = frontend(
            NP_LOCAL_TCP,
            Protocol::Tcp,
            vec![backend(LOCAL_POD, 80, true)],
        );
        let mut udp = frontend(
            NP_LOCAL_UDP,
            Protocol::Udp,
            vec![backend(LOCAL_POD, 53, true)],
        );
        tcp.1.backends[0].policed = true;
        udp.1.backends[0].policed = true;
        let mut desired = Desired::default();
        desired.frontends.extend([tcp, udp]);
        let ops = plan::plan(&desired, &rig.maps.snapshot()?)?;
        rig.maps.apply(&ops)?;

        let fresh = (CLIENT, 40151);
        let syn = tcp_frame(fresh, front, 64, true, &[]);
        rig.passes_in_both_hooks("SYN to a policed pod", &syn, Reason::PassPoliced)?;
        ensure!(
            !rig.has_flow(ct_key(fresh, front, 6)),
            "a policed SYN was tracked"
        );
        let dgram = udp_frame((CLIENT, 40152), (NODE, NP_LOCAL_UDP), 64, b"q");
        rig.passes_in_both_hooks("UDP to a policed pod", &dgram, Reason::PassPoliced)?;
        ensure!(
            !rig.has_flow(ct_key((CLIENT, 40152), (NODE, NP_LOCAL_UDP), 17)),
            "a policed datagram was tracked"
        );

        let again = tcp_frame(reused, front, 64, true, &[]);
        rig.passes_in_both_hooks("SYN on a closed flow's tuple", &again, Reason::PassPoliced)?;
        ensure!(
            !rig.has_flow(ct_key(reused, front, 6)) && !rig.has_flow(reply_key),
            "the closed flow's entries outlived a SYN that went to the kernel"
        );
        let ack = tcp_flags_frame(reused, front, &["ack"], &[]);
        rig.passes_in_both_hooks("the kernel's ACK on that tuple", &ack, Reason::PassNotSyn)?;
        Ok(())
    })
    .unwrap();
}

/// `quoted` (an IPv4 packet, possibly cut short) with new addresses and
/// ports, its IPv4 checksum recomputed and, where the quote holds it, the
/// TCP checksum of the whole original packet recomputed too.
fn requoted(
    quoted: &[u8],
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    whole: bool,
) -> Result<Vec<u8>> {
    let mut q = quoted.to_vec();
    q[12..16].copy_from_slice(&src.0.octets());
    q[16..20].copy_from_slice(&dst.0.octets());
    q[10..12].copy_from_slice(&[0, 0]);
    let c = forwarder_common::csum::checksum(&q[..20]);
    q[10..12].copy_from_slice(&c.to_ne_bytes());
    q[20..22].copy_from_slice(&src.1.to_be_bytes());
    q[22..24].copy_from_slice(&dst.1.to_be_bytes());
    if whole {
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&q)
            .map_err(|e| anyhow!("{e}"))?
            .to_header();
        let (mut tcp, payload) =
            etherparse::TcpHeader::from_slice(&q[20..]).map_err(|e| anyhow!("{e}"))?;
        tcp.checksum = tcp.calc_checksum_ipv4(&ip, payload)?;
        let mut out = q[..20].to_vec();
        tcp.write(&mut out)?;
        out.extend_from_slice(payload);
        q = out;
    }
    Ok(q)
}

#[test]
fn icmp_errors_about_a_flow_are_translated_both_ways() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let client = (CLIENT, 40150);
        let front = (NODE, NP_REMOTE_TCP);
        let syn = tcp_frame(client, front, 64, true, &[]);
        let (v, sent) = rig.xdp(rig.eth0, &syn)?;
        ensure!(v == XDP_TX);
        let port = src_port(&sent)?;
        let frag = Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        );
        // From the backend's side, about the packet we sent it: once with
        // the minimal quote, once with the whole packet (TCP checksum quoted).
        for whole in [false, true] {
            let quoted = if whole {
                &sent[14..]
            } else {
                &sent[14..14 + 28]
            };
            for reporter in [REMOTE_POD, Ipv4Addr::new(192, 0, 2, 2)] {
                let err = icmp_error(reporter, NODE, frag.clone(), quoted);
                let (v, out) = rig.xdp(rig.eth0, &err)?;
                ensure!(
                    v == XDP_TX,
                    "ICMP from {reporter} (whole {whole}): verdict {v}"
                );
                let inner = requoted(quoted, client, front, whole)?;
                // The backend itself takes the frontend's address; a router keeps its own.
                let outer_src = if reporter == REMOTE_POD {
                    NODE
                } else {
                    reporter
                };
                let mut want = icmp_error(outer_src, CLIENT, frag.clone(), &inner);
                want[0..6].copy_from_slice(&CLIENT_MAC);
                want[6..12].copy_from_slice(&ETH0_MAC);
                want[14 + 8] = 63;
                want[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
                let c = forwarder_common::csum::checksum(&want[14..34]);
                want[14 + 10..14 + 12].copy_from_slice(&c.to_ne_bytes());
                ensure!(
                    out == want,
                    "ICMP from {reporter} (whole {whole}):\n got: {out:02x?}\nwant: {want:02x?}"
                );
            }
        }
        // From the client's side, about a reply we sent it.
        let reply = tcp_frame((REMOTE_POD, 80), (NODE, port), 63, false, b"data");
        let (v, to_client) = rig.xdp(rig.eth0, &reply)?;
        ensure!(v == XDP_TX);
        let unreach =
            Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port);
        let err = icmp_error(CLIENT, NODE, unreach.clone(), &to_client[14..14 + 28]);
        let (v, out) = rig.xdp(rig.eth0, &err)?;
        ensure!(v == XDP_TX, "ICMP from the client: verdict {v}");
        let inner = requoted(
            &to_client[14..14 + 28],
            (REMOTE_POD, 80),
            (NODE, port),
            false,
        )?;
        let mut want = icmp_error(NODE, REMOTE_POD, unreach, &inner);
        want[0..6].copy_from_slice(&NODE2_MAC);
        want[6..12].copy_from_slice(&ETH0_MAC);
        want[14 + 8] = 63;
        want[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
        let c = forwarder_common::csum::checksum(&want[14..34]);
        want[14 + 10..14 + 12].copy_from_slice(&c.to_ne_bytes());
        ensure!(
            out == want,
            "ICMP from the client:\n got: {out:02x?}\nwant: {want:02x?}"
        );
        ensure!(rig.count(Reason::IcmpTranslated)? == 5);

        // ICMP about nothing of ours, and echo requests: the kernel's.
        let stray = tcp_frame((NODE, 61999), (REMOTE_POD, 80), 64, true, &[]);
        let err = icmp_error(REMOTE_POD, NODE, frag, &stray[14..14 + 28]);
        let (v, out) = rig.xdp(rig.eth0, &err)?;
        ensure!(v == XDP_PASS && out == err, "stray ICMP: verdict {v}");
        Ok(())
    })
    .unwrap();
}

#[test]
fn an_oversize_packet_of_a_flow_is_answered_with_fragmentation_needed() {
    skip_unless_netns_capable!();
    with_rig(|rig| {
        let client = (CLIENT, 40160);
        let front = (NODE, NP_REMOTE_TCP);
        rig.open_remote_flow(client)?;
        // A locked route MTU: bpf_fib_lookup honours a route's MTU only
        // then (or with ip_forward_use_pmtu); the kernel's forwarding
        // honours it either way (a limit stated in the README).
        integration_tests::netns::run_checked(std::process::Command::new("ip").args([
            "route",
            "replace",
            "10.244.2.0/24",
            "via",
            "192.0.2.2",
            "dev",
            "eth0",
            "mtu",
            "lock",
            "1400",
        ]))?;
        let big = tcp_frame(client, front, 64, false, &[0x5a; 1400]);
        let (v, out) = rig.xdp(rig.eth0, &big)?;
        ensure!(v == XDP_TX, "verdict {v}");
        ensure!(rig.count(Reason::XdpIcmpFragNeeded)? == 1);
        let h = PacketHeaders::from_ethernet_slice(&out).map_err(|e| anyhow!("{e}"))?;
        let Some(NetHeaders::Ipv4(ip, _)) = &h.net else {
            bail!("not IPv4")
        };
        ensure!(ip.source == NODE.octets() && ip.destination == CLIENT.octets());
        ensure!(
            ip.header_checksum == ip.calc_header_checksum(),
            "bad IPv4 checksum"
        );
        ensure!(out[0..6] == CLIENT_MAC && out[6..12] == ETH0_MAC, "MACs");
        let Some(TransportHeader::Icmpv4(icmp)) = &h.transport else {
            bail!("not ICMP")
        };
        ensure!(
            icmp.icmp_type
                == Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                        next_hop_mtu: 1400
                    }
                ),
            "ICMP type {:?}",
            icmp.icmp_type
        );
        let quote = h.payload.slice();
        ensure!(quote == &big[14..14 + 28], "quote differs");
        let want = etherparse::Icmpv4Header::with_checksum(icmp.icmp_type.clone(), quote);
        ensure!(icmp.checksum == want.checksum, "bad ICMP checksum");
        // A packet that fits still goes through.
        let small = tcp_frame(client, front, 64, false, &[0x5a; 1000]);
        let (v, _) = rig.xdp(rig.eth0, &small)?;
        ensure!(v == XDP_TX);
        Ok(())
    })
    .unwrap();
}

/// On a kernel without the nf_conntrack kfuncs the loader stubs their calls
/// out (`forwarder::kfuncs`): the programs must still verify and load.
#[test]
fn programs_load_with_the_conntrack_kfuncs_stubbed_out() {
    skip_unless_netns_capable!();
    let (object, resolved) = forwarder::kfuncs::resolve(forwarder::EBPF_OBJECT, |_| None).unwrap();
    assert!(resolved.values().all(|found| !found) && !resolved.is_empty());
    let mut ebpf = Ebpf::load(&object).expect("loading the stubbed object");
    let xdp: &mut Xdp = ebpf
        .program_mut(program_names::XDP)
        .unwrap()
        .try_into()
        .unwrap();
    xdp.load().expect("XDP verifies without the kfuncs");
    let tc: &mut SchedClassifier = ebpf
        .program_mut(program_names::TC)
        .unwrap()
        .try_into()
        .unwrap();
    tc.load().expect("tc verifies without the kfuncs");
}

/// A SYN of a connection nf_conntrack already tracks (kube-proxy's: a
/// retransmitted SYN of a handshake that began before the forwarder) is
/// left to the kernel, in both hooks.
#[test]
fn a_syn_the_kernel_already_tracks_stays_the_kernels() {
    skip_unless_netns_capable!();
    if std::process::Command::new("conntrack")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("skipped: the conntrack tool is not installed");
        return;
    }
    with_rig(|rig| {
        let client = (CLIENT, 40170);
        let front = (NODE, NP_REMOTE_TCP);
        integration_tests::netns::run_checked(std::process::Command::new("conntrack").args([
            "-I",
            "-p",
            "tcp",
            "--src",
            "192.0.2.100",
            "--dst",
            "192.0.2.1",
            "--sport",
            "40170",
            "--dport",
            "31380",
            "--state",
            "SYN_SENT",
            "--timeout",
            "120",
        ]))
        .context("adding a conntrack entry")?;
        let syn = tcp_frame(client, front, 64, true, &[]);
        rig.passes_in_both_hooks("a SYN the kernel tracks", &syn, Reason::PassKernelFlow)?;
        ensure!(
            !rig.has_flow(ct_key(client, front, 6)),
            "the kernel's SYN was tracked"
        );
        // Another client's SYN is ours.
        let (v, _) = rig.xdp(rig.eth0, &tcp_frame((CLIENT, 40171), front, 64, true, &[]))?;
        ensure!(v == XDP_TX, "a new connection: verdict {v}");
        Ok(())
    })
    .unwrap();
}
