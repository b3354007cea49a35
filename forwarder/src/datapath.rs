//! Loading the eBPF object, pinning its maps, attaching XDP and tc, and
//! keeping the interface table in step with the node's devices.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData, MapType},
    programs::{
        links::{FdLink, Link as _, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use forwarder_common::{
    map_names, program_names, AffinityKey, AffinityValue, Backend, BackendKey, Config, Counters,
    CtEntry, CtKey, DaemonStatus, Frontend, FrontendKey, IfaceInfo, MemberKey, Reason,
    ServiceLabel, CONFIG_F_DRAINING, CT_F_REPLY, CT_F_SNAT, CT_STATE_CLOSED, CT_STATE_FIN,
    GENERATION_GLOBAL, IFACE_F_EXTERNAL, IFACE_F_TC_NETLINK, IFACE_F_TC_ONLY, IFACE_F_VETH_PEER,
    IFACE_F_XDP_GENERIC, IFACE_F_XDP_TX, IPPROTO_TCP, IPPROTO_UDP,
};
use log::{info, warn};

use crate::{
    maps::{pin_path, Maps},
    model::{Desired, FrontendAddr, Protocol},
    netdev::{self, DeviceKind},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeArg {
    /// Native (driver) mode, then generic, then tc only where the device refuses XDP.
    Auto,
    Native,
    Generic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpTxArg {
    /// On, except for native XDP on a veth (it drops XDP frames unless its
    /// peer has NAPI, which we cannot see from here).
    Auto,
    On,
    Off,
}

/// How tc programs are attached (`--tc-attach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttachArg {
    /// tcx where the kernel has it (6.6 and later), else netlink.
    Auto,
    /// bpf links through tcx, pinned (Linux 6.6 or later).
    Tcx,
    /// A filter on a clsact qdisc through netlink (any kernel).
    Netlink,
}

/// How a device got its tc program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcWay {
    /// A tcx bpf link, pinned under the pin dir's `links/`.
    Tcx,
    /// A direct-action cls_bpf filter at [`NETLINK_TC_PRIORITY`] and
    /// [`NETLINK_TC_HANDLE`] on the clsact qdisc's ingress: it outlives the
    /// daemon without a pin, and a new daemon replaces its program in place.
    Netlink,
}

/// Where our netlink tc filter sits on every device: fixed, so a restarted
/// daemon (or `forwarder uninstall`) finds it without any saved state. A
/// lower number runs first; 1 is left to whatever claims "first" (Cilium).
pub const NETLINK_TC_PRIORITY: u16 = 21;
pub const NETLINK_TC_HANDLE: u32 = 0xf0d;

impl TcWay {
    pub const fn name(self) -> &'static str {
        match self {
            TcWay::Tcx => "tcx",
            TcWay::Netlink => "netlink",
        }
    }

    pub const fn from_flags(flags: u32) -> Self {
        if flags & IFACE_F_TC_NETLINK != 0 {
            TcWay::Netlink
        } else {
            TcWay::Tcx
        }
    }

    const fn flags(self) -> u32 {
        match self {
            TcWay::Tcx => 0,
            TcWay::Netlink => IFACE_F_TC_NETLINK,
        }
    }

    /// The way `arg` asks for on a kernel of version `kernel`.
    pub fn choose(arg: TcAttachArg, kernel: KernelVersion) -> Result<Self> {
        let has_tcx = kernel >= KernelVersion::new(6, 6, 0);
        match arg {
            TcAttachArg::Auto if has_tcx => Ok(TcWay::Tcx),
            TcAttachArg::Auto | TcAttachArg::Netlink => Ok(TcWay::Netlink),
            TcAttachArg::Tcx if has_tcx => Ok(TcWay::Tcx),
            TcAttachArg::Tcx => bail!(
                "--tc-attach tcx needs Linux 6.6 or later (this is {kernel}); use --tc-attach auto or netlink"
            ),
        }
    }
}

pub struct Options {
    pub ifaces: Vec<String>,
    pub xdp_mode: XdpModeArg,
    pub tc_attach: TcAttachArg,
    pub xdp_tx: XdpTxArg,
    pub pin_dir: PathBuf,
    pub config: Config,
    pub conntrack_entries: u32,
    /// The service maps' sizes.
    pub limits: crate::plan::Limits,
    pub conntrack_half_open_entries: u32,
    /// Patched into the programs' read-only data (`--datapath-generation`).
    pub generation: u32,
}

/// How an external interface is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    Native,
    Generic,
    /// The device refused XDP: tc ingress does everything.
    TcOnly,
}

impl Attached {
    pub const fn name(self) -> &'static str {
        match self {
            Attached::Native => "native",
            Attached::Generic => "generic",
            Attached::TcOnly => "tc-only",
        }
    }

    pub const fn from_flags(flags: u32) -> Self {
        if flags & IFACE_F_TC_ONLY != 0 {
            Attached::TcOnly
        } else if flags & IFACE_F_XDP_GENERIC != 0 {
            Attached::Generic
        } else {
            Attached::Native
        }
    }
}

/// A program attachment held through a pinned bpf link: it stays attached
/// when the daemon exits, and a new daemon adopts it.
struct PinnedAttachment {
    /// Keeps our handle; the pin keeps the link itself alive.
    _link: FdLink,
    pin: PathBuf,
}

/// A device's tc program, either way.
enum TcAttachment {
    Tcx(PinnedAttachment),
    /// Nothing to hold: the filter lives on the device (see [`TcWay::Netlink`]).
    Netlink,
}

struct External {
    name: String,
    ifindex: u32,
    mode: Attached,
    _xdp: Option<PinnedAttachment>,
    _tc: TcAttachment,
}

/// What happens to the datapath when the daemon stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExit {
    /// Leave programs attached and maps pinned: forwarding goes on, and the
    /// next daemon adopts them (rolling updates, crashes).
    KeepForwarding,
    /// Drain (see [`drain`]), then detach everything and remove the pins:
    /// traffic goes back to kube-proxy.
    Cleanup { drain_timeout: Duration },
}

pub struct Datapath {
    ebpf: Ebpf,
    pub maps: Maps,
    pin_dir: PathBuf,
    external: Vec<External>,
    /// Pod-facing devices with our tc program, by ifindex.
    pod_devices: BTreeMap<u32, (String, TcAttachment)>,
    /// How tc programs are attached on this kernel.
    tc_way: TcWay,
    /// The previous daemon's status, if we adopted a running datapath.
    pub adopted: Option<DaemonStatus>,
    pub object_hash: u64,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// The service maps' sizes as loaded (pinned maps keep theirs).
    limits: crate::plan::Limits,
    /// Entries `purge_stale_flows` removed, per table (half-open,
    /// established): the sweeper's eviction inference subtracts them.
    purged: std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>,
    /// Made at load, handed to the daemon's sweep thread.
    sweeper: Option<Sweeper>,
}

// nix's constant has the C library's f_type width (i64 on glibc, u64 on musl).
use nix::sys::statfs::BPF_FS_MAGIC;

/// Makes sure `pin_dir` lives on a bpffs, mounting one if needed.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let mut existing = pin_dir;
    while !existing.exists() {
        existing = existing
            .parent()
            .ok_or_else(|| anyhow!("{} has no existing parent", pin_dir.display()))?;
    }
    let on_bpffs =
        |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC);
    if !on_bpffs(existing) {
        let sys_bpf = Path::new("/sys/fs/bpf");
        let target = if pin_dir.starts_with(sys_bpf) {
            sys_bpf.to_path_buf()
        } else {
            pin_dir
                .parent()
                .ok_or_else(|| anyhow!("--pin-dir {} has no parent", pin_dir.display()))?
                .to_path_buf()
        };
        fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
        if !on_bpffs(&target) {
            nix::mount::mount(
                Some("bpf"),
                &target,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .with_context(|| {
                format!(
                    "bpffs is not mounted and mounting it on {} failed",
                    target.display()
                )
            })?;
            info!("mounted bpffs on {}", target.display());
        }
    }
    fs::create_dir_all(links_dir(pin_dir))
        .with_context(|| format!("creating pin dir {}", pin_dir.display()))
}

pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

fn link_pin(pin_dir: &Path, kind: &str, ifname: &str) -> PathBuf {
    links_dir(pin_dir).join(format!("{kind}-{ifname}"))
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The effective capabilities we lack, by name (from /proc/self/status).
pub fn missing_capabilities(status: &str) -> Vec<&'static str> {
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    missing
}

/// Fails with one clear line when the process cannot load or attach programs.
pub fn check_privileges() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let missing = missing_capabilities(&status);
    if !missing.is_empty() {
        bail!(
            "insufficient privileges: run as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (missing {})",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Fails with one clear line on a kernel without what the programs need.
pub fn check_kernel() -> Result<()> {
    if let Ok(version) = KernelVersion::current() {
        check_kernel_version(version)?;
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!("this kernel has no BTF (/sys/kernel/btf/vmlinux is missing): forwarder needs a kernel built with CONFIG_DEBUG_INFO_BTF, 5.11 or newer");
    }
    Ok(())
}

/// The oldest kernel with every helper the programs call; what an older
/// one lacks, named.
fn check_kernel_version(version: KernelVersion) -> Result<()> {
    let missing = [
        ((5, 9), "XDP bpf links"),
        ((5, 10), "bpf_redirect_peer and bpf_redirect_neigh"),
        ((5, 11), "bpf_ktime_get_coarse_ns"),
    ]
    .into_iter()
    .filter(|((major, minor), _)| version < KernelVersion::new(*major, *minor, 0))
    .map(|(_, what)| what)
    .collect::<Vec<_>>();
    if !missing.is_empty() {
        bail!(
            "Linux {version} lacks {}: forwarder needs Linux 5.11 or later",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Turns the kernel's answer to a load into one line an operator can act on.
fn explain_load_error(e: aya::EbpfError) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("Operation not permitted") || text.contains("EPERM") {
        anyhow!("loading the eBPF programs was refused (needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN): {e}")
    } else {
        anyhow!(e).context("loading the eBPF programs")
    }
}

/// The MAC frames addressed to this node carry when they come in on `name`:
/// its own, or for a port of bridge `master_ifindex` the bridge's (the
/// bridge hands those up as the host's).
fn host_mac(name: &str, master_ifindex: u32) -> [u8; 6] {
    let device = if master_ifindex != 0 {
        netdev::ifname(master_ifindex).unwrap_or_else(|| name.to_string())
    } else {
        name.to_string()
    };
    netdev::mac(&device).unwrap_or_else(|e| {
        warn!("{device}: no MAC address ({e}): XDP passes its frames to the kernel");
        [0; 6]
    })
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// (type, key size, value size) each pinned map must have to be reused.
fn expected_layout(name: &str) -> Option<(MapType, u32, u32)> {
    use std::mem::size_of;
    let u32s = size_of::<u32>() as u32;
    Some(match name {
        map_names::FRONTENDS => (
            MapType::Hash,
            size_of::<FrontendKey>() as u32,
            size_of::<Frontend>() as u32,
        ),
        map_names::BACKENDS => (
            MapType::Hash,
            size_of::<BackendKey>() as u32,
            size_of::<Backend>() as u32,
        ),
        map_names::CONNTRACK | map_names::CT_HALF_OPEN => (
            MapType::LruHash,
            size_of::<CtKey>() as u32,
            size_of::<CtEntry>() as u32,
        ),
        map_names::IFACES => (MapType::Hash, u32s, size_of::<IfaceInfo>() as u32),
        map_names::CONFIG => (MapType::Array, u32s, size_of::<Config>() as u32),
        map_names::SERVICE_STATS => (MapType::PerCpuArray, u32s, size_of::<Counters>() as u32),
        map_names::REASON_STATS => (MapType::PerCpuArray, u32s, size_of::<u64>() as u32),
        map_names::BACKEND_STATS => (MapType::PerCpuArray, u32s, size_of::<Counters>() as u32),
        map_names::SERVICE_LABELS => (MapType::Hash, u32s, size_of::<ServiceLabel>() as u32),
        map_names::STATUS => (MapType::Array, u32s, size_of::<DaemonStatus>() as u32),
        map_names::AFFINITY => (
            MapType::LruHash,
            size_of::<AffinityKey>() as u32,
            size_of::<AffinityValue>() as u32,
        ),
        map_names::BACKEND_MEMBERS => (MapType::Hash, size_of::<MemberKey>() as u32, u32s),
        map_names::FLOW_PASS_STATS => (MapType::PerCpuArray, u32s, size_of::<u64>() as u32),
        map_names::POLICED_PODS => (MapType::Hash, u32s, size_of::<ServiceLabel>() as u32),
        _ => return None,
    })
}

/// Unpins maps left by another version whose layout differs, so they are
/// created anew (their state is rebuilt; counters restart). Compatible pins
/// are kept and reused: flows and counters survive restarts and upgrades.
fn retire_incompatible_pins(pin_dir: &Path) -> Result<()> {
    for name in map_names::ALL {
        let path = pin_path(pin_dir, name);
        if !path.exists() {
            continue;
        }
        let Some((ty, key, value)) = expected_layout(name) else {
            continue;
        };
        let compatible = MapData::from_pin(&path)
            .ok()
            .and_then(|m| m.info().ok())
            .is_some_and(|info| {
                info.map_type().ok() == Some(ty)
                    && info.key_size() == key
                    && info.value_size() == value
                    && (!matches!(name, map_names::REASON_STATS | map_names::FLOW_PASS_STATS)
                        || info.max_entries() >= Reason::COUNT)
            });
        if !compatible {
            warn!(
                "pinned map {} has another layout (an older version?): creating it anew",
                path.display()
            );
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// The service maps and the sizes `limits` gives them.
fn service_map_sizes(limits: &crate::plan::Limits) -> [(&'static str, u32); 5] {
    [
        (map_names::FRONTENDS, limits.frontends),
        (map_names::BACKENDS, limits.backends),
        (map_names::BACKEND_MEMBERS, limits.backends),
        (map_names::SERVICE_STATS, limits.service_ports),
        (map_names::SERVICE_LABELS, limits.service_ports),
    ]
}

/// Identifies the programs as loaded: the embedded object and what the
/// loader patches into it.
pub fn object_hash(generation: u32) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    crate::EBPF_OBJECT.hash(&mut h);
    generation.hash(&mut h);
    h.finish()
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Datapath {
    /// Loads the object with its maps pinned (reusing compatible pins) and
    /// the programs verified. Nothing is attached yet: see [`Self::attach_external`].
    pub fn load(opts: &Options) -> Result<Self> {
        check_kernel()?;
        // Check the interfaces first: it is the likeliest mistake.
        for name in &opts.ifaces {
            netdev::ifindex(name)?;
        }
        let kernel = KernelVersion::current().context("reading the kernel version")?;
        let tc_way = TcWay::choose(opts.tc_attach, kernel)?;
        info!(
            "tc programs attach through {} (Linux {kernel})",
            tc_way.name()
        );
        ensure_bpffs(&opts.pin_dir)?;
        retire_incompatible_pins(&opts.pin_dir)?;
        let mut loader = EbpfLoader::new();
        let pins: Vec<(&str, PathBuf)> = map_names::ALL
            .iter()
            .map(|n| (*n, pin_path(&opts.pin_dir, n)))
            .collect();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        loader.map_max_entries(map_names::CONNTRACK, opts.conntrack_entries);
        for (name, size) in service_map_sizes(&opts.limits) {
            loader.map_max_entries(name, size);
        }
        loader.map_max_entries(map_names::CT_HALF_OPEN, opts.conntrack_half_open_entries);
        loader.override_global(GENERATION_GLOBAL, &opts.generation, true);
        // eBPF-side log lines only when debug logging is on (and they are
        // rate-limited in the programs); otherwise the check costs a load.
        let ebpf_log_level: u8 = if tracing::enabled!(tracing::Level::DEBUG) {
            aya_log::Level::Debug as u8
        } else {
            0
        };
        loader.override_global(aya_log::LEVEL, &ebpf_log_level, true);
        let (object, kfuncs) = crate::kfuncs::prepared_object()?;
        let missing: Vec<&str> = kfuncs
            .iter()
            .filter(|(_, found)| !**found)
            .map(|(name, _)| name.as_str())
            .collect();
        if missing.is_empty() {
            info!("nf_conntrack lookups: available (a SYN of a connection the kernel tracks stays with kube-proxy)");
        } else {
            warn!(
                "this kernel lacks {}: no nf_conntrack lookups; flows kube-proxy already carries stay with it only by their packets (the forwarder takes nothing but a new SYN)",
                missing.join(", ")
            );
        }
        let mut ebpf = loader.load(&object).map_err(explain_load_error)?;
        let mut maps = Maps::take(&mut ebpf)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!("eBPF log messages unavailable: {e}");
                None
            }
        };
        for (name, asked) in [
            (map_names::CONNTRACK, opts.conntrack_entries),
            (map_names::CT_HALF_OPEN, opts.conntrack_half_open_entries),
        ] {
            let size = MapData::from_pin(pin_path(&opts.pin_dir, name))
                .and_then(|m| m.info())
                .map(|i| i.max_entries())
                .unwrap_or(0);
            if size != asked {
                warn!(
                    "the pinned conntrack table {name} holds {size} entries, not the {asked} asked for: keeping it (and its flows); `forwarder uninstall` to resize"
                );
            }
        }
        // Pinned service maps keep their size too: a map swapped under
        // running programs is a window we do not open. The plan fits the
        // maps as they are.
        let size_of = |name: &str, asked: u32| {
            let size = MapData::from_pin(pin_path(&opts.pin_dir, name))
                .and_then(|m| m.info())
                .map(|i| i.max_entries())
                .unwrap_or(asked);
            if size != asked {
                warn!(
                    "the pinned map {name} holds {size} entries, not the {asked} asked for: keeping it; `forwarder uninstall` to resize"
                );
            }
            size
        };
        let limits = crate::plan::Limits {
            frontends: size_of(map_names::FRONTENDS, opts.limits.frontends),
            backends: size_of(map_names::BACKENDS, opts.limits.backends)
                .min(size_of(map_names::BACKEND_MEMBERS, opts.limits.backends)),
            service_ports: size_of(map_names::SERVICE_STATS, opts.limits.service_ports).min(
                size_of(map_names::SERVICE_LABELS, opts.limits.service_ports),
            ),
        };
        maps.config
            .set(0, opts.config, 0)
            .context("writing the datapath config")?;
        let previous = maps.status.get(&0, 0).ok().filter(|s| s.started_unix != 0);
        let object_hash = object_hash(opts.generation);
        match &previous {
            Some(p) if p.object_hash == object_hash => {
                info!("adopting the datapath left by pid {} (same eBPF object)", p.pid)
            }
            Some(p) => info!(
                "adopting the datapath left by pid {}: its eBPF object {:016x} is replaced by {object_hash:016x}",
                p.pid, p.object_hash
            ),
            None => {}
        }
        let status = DaemonStatus {
            object_hash,
            started_unix: unix_now(),
            heartbeat_unix: unix_now(),
            pid: std::process::id(),
            ..previous.unwrap_or_default()
        };
        maps.status.set(0, status, 0).context("writing STATUS")?;

        let xdp: &mut Xdp = program(&mut ebpf, program_names::XDP)?;
        xdp.load().context("loading the XDP program (verifier)")?;
        let tc: &mut SchedClassifier = program(&mut ebpf, program_names::TC)?;
        tc.load().context("loading the tc program (verifier)")?;

        let mut dp = Datapath {
            ebpf,
            maps,
            pin_dir: opts.pin_dir.clone(),
            external: Vec::new(),
            pod_devices: BTreeMap::new(),
            tc_way,
            adopted: previous,
            object_hash,
            logger,
            limits,
            purged: Default::default(),
            sweeper: None,
        };
        // The eviction counts start from here, not from the first sweep.
        let mut sweeper = dp.new_sweeper()?;
        for table in [CtTable::HalfOpen, CtTable::Established] {
            sweeper.walk_counting_evictions(table)?;
        }
        dp.sweeper = Some(sweeper);
        Ok(dp)
    }

    /// Attaches (or, after a restart, atomically replaces the programs of)
    /// XDP and tc ingress on every `--iface`.
    pub fn attach_external(&mut self, opts: &Options) -> Result<()> {
        for name in &opts.ifaces {
            if self.external.iter().any(|e| &e.name == name) {
                continue;
            }
            let ifindex = netdev::ifindex(name)?;
            self.attach_one_external(name, ifindex, opts)?;
        }
        Ok(())
    }

    fn attach_one_external(&mut self, name: &str, ifindex: u32, opts: &Options) -> Result<()> {
        let addrs = netdev::ipv4_addresses(name)?;
        let snat_addr = addrs.first().copied().unwrap_or(Ipv4Addr::UNSPECIFIED);
        if addrs.is_empty() {
            warn!("{name} has no IPv4 address: remote backends cannot be source-NATed from it");
        }
        let kind = netdev::kind(name);
        let previous = self.maps.ifaces.get(&ifindex, 0).ok();
        let xdp_pin = link_pin(&self.pin_dir, "xdp", name);
        let wanted = match opts.xdp_mode {
            XdpModeArg::Auto => None,
            XdpModeArg::Native => Some(Attached::Native),
            XdpModeArg::Generic => Some(Attached::Generic),
        };
        // A kept link keeps its mode: re-create it if another mode is asked for.
        if let (Some(prev), Some(want)) = (previous, wanted) {
            if Attached::from_flags(prev.flags) != want && xdp_pin.exists() {
                info!(
                    "{name}: switching XDP from {} to {} mode",
                    Attached::from_flags(prev.flags).name(),
                    want.name()
                );
                unpin_link(&xdp_pin);
            }
        }
        let xdp: &mut Xdp = program(&mut self.ebpf, program_names::XDP)?;
        let (xdp_link, mode) = match adopt_xdp(xdp, &xdp_pin)? {
            Some(link) => {
                let mode = previous.map_or(Attached::Native, |p| Attached::from_flags(p.flags));
                (Some(link), mode)
            }
            None => match opts.xdp_mode {
                XdpModeArg::Native => (
                    Some(attach_xdp(xdp, ifindex, name, XdpMode::Driver, &xdp_pin)?),
                    Attached::Native,
                ),
                XdpModeArg::Generic => (
                    Some(attach_xdp(xdp, ifindex, name, XdpMode::Skb, &xdp_pin)?),
                    Attached::Generic,
                ),
                XdpModeArg::Auto => match attach_xdp(xdp, ifindex, name, XdpMode::Driver, &xdp_pin)
                {
                    Ok(link) => (Some(link), Attached::Native),
                    Err(e) if is_foreign_program(&e) => return Err(e),
                    Err(e) => {
                        warn!("{name}: native XDP refused ({e:#}); trying generic XDP");
                        match attach_xdp(xdp, ifindex, name, XdpMode::Skb, &xdp_pin) {
                            Ok(link) => (Some(link), Attached::Generic),
                            Err(e) if is_foreign_program(&e) => return Err(e),
                            Err(e) => {
                                warn!("{name}: XDP refused altogether ({e:#}); tc ingress does all the work");
                                (None, Attached::TcOnly)
                            }
                        }
                    }
                },
            },
        };
        let xdp_tx = mode != Attached::TcOnly
            && match opts.xdp_tx {
                XdpTxArg::On => true,
                XdpTxArg::Off => false,
                XdpTxArg::Auto => !(mode == Attached::Native && kind == DeviceKind::Veth),
            };
        let mut flags = IFACE_F_EXTERNAL | self.tc_way.flags();
        if xdp_tx {
            flags |= IFACE_F_XDP_TX;
        }
        match mode {
            Attached::Generic => flags |= IFACE_F_XDP_GENERIC,
            Attached::TcOnly => flags |= IFACE_F_TC_ONLY,
            Attached::Native => {}
        }
        let info = IfaceInfo {
            snat_addr_be: u32::from_ne_bytes(snat_addr.octets()),
            flags,
            host_mac: host_mac(name, 0),
            ..IfaceInfo::default()
        };
        self.maps
            .ifaces
            .insert(ifindex, info, 0)
            .context("writing IFACES")?;
        let tc: &mut SchedClassifier = program(&mut self.ebpf, program_names::TC)?;
        let tc_link = attach_tc(tc, name, &link_pin(&self.pin_dir, "tc", name), self.tc_way)?;
        info!(
            "{name}: XDP {}, XDP transmit {}, tc ingress attached ({}), source-NAT address {snat_addr}",
            mode.name(),
            if xdp_tx { "on" } else { "off (tc forwards)" },
            self.tc_way.name(),
        );
        self.external.push(External {
            name: name.to_string(),
            ifindex,
            mode,
            _xdp: xdp_link,
            _tc: tc_link,
        });
        Ok(())
    }

    /// Passes the programs' (rate-limited, debug-level) log lines to our log.
    pub fn flush_logs(&mut self) {
        if let Some(l) = &mut self.logger {
            l.flush();
        }
    }

    /// Whether the external interfaces are attached yet.
    pub fn attached(&self) -> bool {
        !self.external.is_empty()
    }

    /// The external interfaces and the XDP mode each got.
    pub fn external_interfaces(&self) -> Vec<(String, Attached)> {
        self.external
            .iter()
            .map(|e| (e.name.clone(), e.mode))
            .collect()
    }

    /// IPv4 addresses of the external interfaces (nodePort candidates).
    pub fn external_addresses(&self, ifaces: &[String]) -> Result<Vec<Ipv4Addr>> {
        let mut out = Vec::new();
        for name in ifaces {
            out.extend(netdev::ipv4_addresses(name)?);
        }
        Ok(out)
    }

    /// Records what the daemon did in the pinned status map.
    pub fn update_status(&mut self, f: impl FnOnce(&mut DaemonStatus)) -> Result<()> {
        let mut s = self.maps.status.get(&0, 0).unwrap_or_default();
        f(&mut s);
        self.maps.status.set(0, s, 0).context("writing STATUS")
    }

    /// Follows MAC address changes of the devices we are attached to (XDP
    /// compares a frame's destination with the one in IFACES).
    fn refresh_host_macs(&mut self) -> Result<()> {
        let devices: Vec<(u32, String)> = self
            .external
            .iter()
            .map(|e| (e.ifindex, e.name.clone()))
            .chain(
                self.pod_devices
                    .iter()
                    .map(|(ifindex, (name, _))| (*ifindex, name.clone())),
            )
            .collect();
        for (ifindex, name) in devices {
            let Ok(mut info) = self.maps.ifaces.get(&ifindex, 0) else {
                continue;
            };
            let mac = host_mac(&name, info.master_ifindex);
            if mac != info.host_mac {
                info!("{name}: MAC address now {}", format_mac(&mac));
                info.host_mac = mac;
                self.maps
                    .ifaces
                    .insert(ifindex, info, 0)
                    .context("writing IFACES")?;
            }
        }
        Ok(())
    }

    /// Attaches tc ingress to the devices that lead to `local_pods` (replies
    /// from local pods enter the node there) and detaches it from devices no
    /// longer needed. Returns the attached device names.
    pub fn sync_pod_devices(&mut self, local_pods: &BTreeSet<Ipv4Addr>) -> Result<Vec<String>> {
        self.refresh_host_macs()?;
        let routes = netdev::routes()?;
        let external: BTreeSet<u32> = self.external.iter().map(|e| e.ifindex).collect();
        let external_names: BTreeSet<&str> =
            self.external.iter().map(|e| e.name.as_str()).collect();
        // ifindex -> (name, kind, the bridge it is a port of, or 0)
        let mut wanted: BTreeMap<u32, (String, DeviceKind, u32)> = BTreeMap::new();
        for pod in local_pods {
            let Some(dev) = netdev::route_device(&routes, *pod) else {
                warn!("no route to local pod {pod}: its replies cannot be translated");
                continue;
            };
            if external_names.contains(dev) {
                warn!("local pod {pod} is routed through external interface {dev}: its replies are handled there");
                continue;
            }
            let kind = netdev::kind(dev);
            let master = if kind == DeviceKind::Bridge {
                netdev::ifindex(dev).unwrap_or(0)
            } else {
                0
            };
            let devices = if kind == DeviceKind::Bridge {
                // Catch replies on the bridge ports, before the bridge (and
                // any br_netfilter hooks) see them.
                netdev::bridge_ports(dev)
                    .into_iter()
                    .map(|p| {
                        let k = netdev::kind(&p);
                        (p, k)
                    })
                    .collect()
            } else {
                vec![(dev.to_string(), kind)]
            };
            for (name, kind) in devices {
                match netdev::ifindex(&name) {
                    Ok(ifindex) if !external.contains(&ifindex) => {
                        wanted.insert(ifindex, (name, kind, master));
                    }
                    Ok(_) => {}
                    Err(e) => warn!("{e}"),
                }
            }
        }
        let gone: Vec<u32> = self
            .pod_devices
            .keys()
            .filter(|i| !wanted.contains_key(i))
            .copied()
            .collect();
        for ifindex in gone {
            if let Some((name, attachment)) = self.pod_devices.remove(&ifindex) {
                detach_tc(&name, attachment);
                let _ = self.maps.ifaces.remove(&ifindex);
                info!("{name}: tc ingress detached (no local backend behind it)");
            }
        }
        for (ifindex, (name, kind, master)) in &wanted {
            if self.pod_devices.contains_key(ifindex) {
                continue;
            }
            let info = IfaceInfo {
                snat_addr_be: 0,
                flags: self.tc_way.flags()
                    | if *kind == DeviceKind::Veth {
                        IFACE_F_VETH_PEER
                    } else {
                        0
                    },
                master_ifindex: *master,
                host_mac: host_mac(name, *master),
                _pad: 0,
            };
            self.maps
                .ifaces
                .insert(ifindex, info, 0)
                .context("writing IFACES")?;
            let tc: &mut SchedClassifier = program(&mut self.ebpf, program_names::TC)?;
            match attach_tc(tc, name, &link_pin(&self.pin_dir, "tc", name), self.tc_way) {
                Ok(attachment) => {
                    info!(
                        "{name}: tc ingress attached ({}; local pods' replies)",
                        self.tc_way.name()
                    );
                    self.pod_devices
                        .insert(*ifindex, (name.clone(), attachment));
                }
                Err(e) => {
                    let _ = self.maps.ifaces.remove(ifindex);
                    warn!("{name}: attaching tc ingress failed: {e:#}");
                }
            }
        }
        // Leftovers of an earlier daemon: links to devices no longer wanted,
        // interface entries of devices that are gone.
        let keep_names: BTreeSet<String> = self
            .pod_devices
            .values()
            .map(|(n, _)| format!("tc-{n}"))
            .chain(
                self.external
                    .iter()
                    .flat_map(|e| [format!("tc-{}", e.name), format!("xdp-{}", e.name)]),
            )
            .collect();
        if !self.external.is_empty() {
            if let Ok(rd) = fs::read_dir(links_dir(&self.pin_dir)) {
                for entry in rd.flatten() {
                    let file = entry.file_name().to_string_lossy().into_owned();
                    if !keep_names.contains(&file) {
                        info!("removing leftover link {file}");
                        unpin_link(&entry.path());
                    }
                }
            }
            let known: BTreeSet<u32> = external
                .iter()
                .chain(self.pod_devices.keys())
                .copied()
                .collect();
            let stale: Vec<(u32, IfaceInfo)> = self
                .maps
                .ifaces
                .iter()
                .filter_map(|k| k.ok())
                .filter(|(k, _)| !known.contains(k))
                .collect();
            for (k, info) in stale {
                // A netlink filter has no pin to tell of it: its entry does.
                if info.flags & IFACE_F_TC_NETLINK != 0 {
                    if let Some(name) = netdev::ifname(k) {
                        info!("removing the leftover tc filter on {name}");
                        detach_netlink_tc(&name);
                    }
                }
                let _ = self.maps.ifaces.remove(&k);
            }
        }
        Ok(self.pod_devices.values().map(|(n, _)| n.clone()).collect())
    }

    /// The service maps' sizes the plan must fit (as loaded).
    pub fn limits(&self) -> crate::plan::Limits {
        self.limits
    }

    /// What a sweep on another thread needs: the one made at load (its
    /// eviction counts start there), or, after the last one was lost with
    /// a failed task, a new one.
    pub fn sweeper(&mut self) -> Result<Sweeper> {
        match self.sweeper.take() {
            Some(s) => Ok(s),
            None => self.new_sweeper(),
        }
    }

    fn new_sweeper(&self) -> Result<Sweeper> {
        Ok(Sweeper {
            maps: Maps::open_pinned(&self.pin_dir)?,
            evicted_half_open: EvictionTally::default(),
            evicted_established: EvictionTally::default(),
            removed_by_sweeps: [0; 2],
            purged: self.purged.clone(),
        })
    }

    /// Deletes UDP flows whose backend left their frontend's backend list,
    /// so their next packet picks a live backend instead of a vanished pod
    /// (kube-proxy flushes those). TCP flows keep their backend until they
    /// end, as under kube-proxy: that is what lets a terminating pod drain.
    pub fn purge_stale_flows(&mut self, desired: &Desired) -> Result<usize> {
        let mut purged = 0;
        for table in [CtTable::HalfOpen, CtTable::Established] {
            let entries = conntrack_entries_of(self.maps.ct_table(table));
            let stale = stale_flows(&entries, desired);
            let map = self.maps.ct_table_mut(table);
            let mut removed = 0;
            for k in &stale {
                if map.remove(k).is_ok() {
                    removed += 1;
                }
            }
            self.purged[table.index()].fetch_add(removed, std::sync::atomic::Ordering::Relaxed);
            purged += stale.len();
        }
        Ok(purged)
    }

    /// Both tables' entries (a flow's two are always in the same one).
    fn conntrack_snapshot(&self) -> BTreeMap<CtKey, CtEntry> {
        let mut entries = conntrack_entries_of(&self.maps.ct_half_open);
        entries.append(&mut conntrack_entries_of(&self.maps.conntrack));
        entries
    }

    pub fn conntrack_entries(&self) -> usize {
        [&self.maps.ct_half_open, &self.maps.conntrack]
            .iter()
            .map(|m| m.keys().filter(|k| k.is_ok()).count())
            .sum()
    }

    /// Backends without source NAT (local pods) that conntrack entries
    /// still lead to: their devices must keep the tc program.
    pub fn local_backends_with_flows(&self) -> BTreeSet<Ipv4Addr> {
        local_backends_with_flows(&self.conntrack_snapshot())
    }

    /// Stops the daemon's part: by default the datapath stays in place.
    pub fn shutdown(self, on_exit: OnExit) -> Result<()> {
        let Datapath {
            ebpf,
            mut maps,
            pin_dir,
            external,
            pod_devices,
            ..
        } = self;
        match on_exit {
            OnExit::KeepForwarding => {
                if let Ok(mut s) = maps.status.get(&0, 0) {
                    s.heartbeat_unix = 0;
                    let _ = maps.status.set(0, s, 0);
                }
                drop((external, pod_devices, maps, ebpf));
                info!(
                    "left the datapath in place (pinned under {}): a new daemon adopts it; `forwarder uninstall` removes it",
                    pin_dir.display()
                );
                Ok(())
            }
            OnExit::Cleanup { drain_timeout } => {
                // The links and maps are pinned: dropping our handles
                // changes nothing for packets while the drain runs.
                drop((external, pod_devices, maps, ebpf));
                uninstall(&pin_dir, drain_timeout).map(|_| ())
            }
        }
    }
}

/// The conntrack table as user space holds it.
pub type ConntrackMap = HashMap<MapData, CtKey, CtEntry>;

/// The conntrack sweep, run on a thread of its own (a full table takes a
/// while: two syscalls per entry) with its own handles on the pinned maps.
/// It also infers LRU evictions: what each table holds against the
/// datapath's insert and delete counters (see [`EvictionTally`]), stored as
/// the `ct_*_evicted` counts.
pub struct Sweeper {
    maps: Maps,
    evicted_half_open: EvictionTally,
    evicted_established: EvictionTally,
    /// Entries the sweeps removed, per table (half-open, established).
    removed_by_sweeps: [u64; 2],
    /// Entries the daemon loop's purges removed (shared with the datapath).
    purged: std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>,
}

impl Sweeper {
    /// Deletes entries idle past their timeout (both directions), freeing
    /// their source ports, and reports what the remaining flows need.
    pub fn sweep(&mut self, config: &Config) -> Result<Sweep> {
        let now = monotonic_ns()?;
        let mut sweep = Sweep::default();
        let mut remaining = BTreeMap::new();
        for table in [CtTable::HalfOpen, CtTable::Established] {
            let (walk, evicted) = self.walk_counting_evictions(table)?;
            let mut entries = walk.entries;
            sweep.walk_cut |= walk.cut;
            sweep.walked += entries.len();
            let expired = expired_flows(&entries, config, now);
            let map = self.maps.ct_table_mut(table);
            for k in &expired {
                if map.remove(k).is_ok() {
                    self.removed_by_sweeps[table.index()] += 1;
                }
                entries.remove(k);
            }
            sweep.removed += expired.len();
            match table {
                CtTable::HalfOpen => sweep.evicted_half_open = evicted,
                CtTable::Established => sweep.evicted_established = evicted,
            }
            remaining.append(&mut entries);
        }
        sweep.local_backends = local_backends_with_flows(&remaining);
        Ok(sweep)
    }

    /// A bounded walk of `table`, and the evictions inferred from it (stored).
    fn walk_counting_evictions(&mut self, table: CtTable) -> Result<(Walk<CtKey, CtEntry>, u64)> {
        let before = self.maps.reason_totals()?;
        let walk = conntrack_walk(self.maps.ct_table(table));
        let after = self.maps.reason_totals()?;
        // The walk is not atomic: the counters midway through it match best.
        let [inserted, deleted] =
            [table.inserted(), table.deleted()].map(|r| (before[r.name()] + after[r.name()]) / 2);
        let i = table.index();
        let removed =
            self.removed_by_sweeps[i] + self.purged[i].load(std::sync::atomic::Ordering::Relaxed);
        let tally = match table {
            CtTable::HalfOpen => &mut self.evicted_half_open,
            CtTable::Established => &mut self.evicted_established,
        };
        tally.removed_by_daemon = removed;
        let stored = before[table.evicted().name()];
        let evicted = tally.update(inserted, deleted, walk.entries.len() as u64, stored);
        if evicted != stored {
            self.maps.set_reason_total(table.evicted(), evicted)?;
        }
        Ok((walk, evicted))
    }
}

/// What [`Sweeper::sweep`] did and found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Entries removed (a flow has two).
    pub removed: usize,
    /// Entries lost to LRU pressure so far, per table (inferred; see
    /// [`EvictionTally`]).
    pub evicted_half_open: u64,
    pub evicted_established: u64,
    /// See [`local_backends_with_flows`].
    pub local_backends: BTreeSet<Ipv4Addr>,
    /// Distinct entries the walk saw.
    pub walked: usize,
    /// The walk hit its step bound (see [`bounded_walk`]): entries churned
    /// under it, and some may not have been seen this time.
    pub walk_cut: bool,
}

/// The two conntrack tables (see forwarder-ebpf's `conntrack`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtTable {
    HalfOpen,
    Established,
}

impl CtTable {
    /// Its index in per-table arrays (half-open, established).
    const fn index(self) -> usize {
        match self {
            CtTable::HalfOpen => 0,
            CtTable::Established => 1,
        }
    }

    const fn inserted(self) -> Reason {
        match self {
            CtTable::HalfOpen => Reason::CtHalfOpenInserted,
            CtTable::Established => Reason::CtEstablishedInserted,
        }
    }

    const fn deleted(self) -> Reason {
        match self {
            CtTable::HalfOpen => Reason::CtHalfOpenDeleted,
            CtTable::Established => Reason::CtEstablishedDeleted,
        }
    }

    const fn evicted(self) -> Reason {
        match self {
            CtTable::HalfOpen => Reason::CtHalfOpenEvicted,
            CtTable::Established => Reason::CtEstablishedEvicted,
        }
    }
}

/// Infers one table's LRU evictions, which the kernel does silently: every
/// entry the datapath added (inserts never overwrite, so each counts one)
/// is either still there, removed by the datapath or the daemon (each
/// removal counted), or evicted. So `inserted - deleted - removed by the
/// daemon - live` grows by exactly the evictions, `live` being what a walk
/// finds. Inexact in two ways, both small against a flood: the walk of a
/// changing table is not a snapshot (entries added or removed meanwhile
/// blur `live`), and removals by anyone else (another process deleting
/// entries) count as evictions. Counted from this daemon's first sweep on
/// top of what the pinned counter held then (earlier daemons' counts); the
/// stored count is the highest estimate so far, so it never goes down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvictionTally {
    /// From the first sweep: the balance then, and the stored count then.
    baseline: Option<(i64, u64)>,
    /// Entries this daemon removed (sweeps, purges).
    pub removed_by_daemon: u64,
    highest: u64,
}

impl EvictionTally {
    /// The datapath's counters and the walk's count at one sweep, and the
    /// count stored now; returns the count to store.
    pub fn update(&mut self, inserted: u64, deleted: u64, live: u64, stored: u64) -> u64 {
        let balance =
            inserted as i64 - deleted as i64 - self.removed_by_daemon as i64 - live as i64;
        let (first_balance, first_stored) = *self.baseline.get_or_insert((balance, stored));
        let since_start = u64::try_from(balance - first_balance).unwrap_or(0);
        self.highest = self.highest.max(since_start);
        first_stored + self.highest
    }
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// No datapath config is pinned (nothing installed, or another
    /// version's layout): nothing to drain.
    NothingToDrain,
    /// No live TCP flow is left.
    Drained { waited: Duration },
    /// The deadline passed with `open` TCP flows still live.
    DeadlinePassed { open: usize },
    /// A daemon started meanwhile and wrote its own config, clearing the
    /// draining flag: it owns the datapath now, which stays in place.
    Cancelled,
}

/// How often a drain counts the live flows, and how often it says so.
const DRAIN_POLL: Duration = Duration::from_secs(1);
const DRAIN_PROGRESS: Duration = Duration::from_secs(5);

fn open_pinned_as<T: TryFrom<Map, Error = aya::maps::MapError>>(
    pin_dir: &Path,
    name: &str,
) -> Result<T> {
    let path = pin_path(pin_dir, name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    let map = Map::from_map_data(data).with_context(|| format!("map {}", path.display()))?;
    T::try_from(map).with_context(|| format!("map {} has another layout", path.display()))
}

/// What a drain reads and writes: the datapath's config and its flows.
pub trait DrainTarget {
    fn config(&self) -> Result<Config>;
    fn set_config(&mut self, config: Config) -> Result<()>;
    fn flows(&self) -> BTreeMap<CtKey, CtEntry>;
    /// The clock the datapath stamps flows with.
    fn now_ns(&self) -> Result<u64>;
}

/// The pinned maps of an installed datapath.
struct PinnedDatapath {
    config: Array<MapData, Config>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    ct_half_open: HashMap<MapData, CtKey, CtEntry>,
}

impl DrainTarget for PinnedDatapath {
    fn config(&self) -> Result<Config> {
        self.config
            .get(&0, 0)
            .context("reading the datapath config")
    }

    fn set_config(&mut self, config: Config) -> Result<()> {
        self.config
            .set(0, config, 0)
            .context("writing the datapath config")
    }

    fn flows(&self) -> BTreeMap<CtKey, CtEntry> {
        let mut flows = conntrack_entries_of(&self.ct_half_open);
        flows.append(&mut conntrack_entries_of(&self.conntrack));
        flows
    }

    fn now_ns(&self) -> Result<u64> {
        monotonic_ns()
    }
}

/// Sets `CONFIG_F_DRAINING` in the datapath pinned under `pin_dir` and
/// waits for its TCP flows (see [`drain_target`]).
pub fn drain(pin_dir: &Path, timeout: Duration) -> Result<DrainOutcome> {
    if !pin_path(pin_dir, map_names::CONFIG).exists() {
        return Ok(DrainOutcome::NothingToDrain);
    }
    let opened = open_pinned_as(pin_dir, map_names::CONFIG).and_then(|config| {
        Ok(PinnedDatapath {
            config,
            conntrack: open_pinned_as(pin_dir, map_names::CONNTRACK)?,
            ct_half_open: open_pinned_as(pin_dir, map_names::CT_HALF_OPEN)?,
        })
    });
    match opened {
        Ok(mut target) => drain_target(&mut target, timeout, DRAIN_POLL),
        Err(e) => {
            warn!("not draining: {e:#}");
            Ok(DrainOutcome::NothingToDrain)
        }
    }
}

/// Sets `CONFIG_F_DRAINING` (a read-modify-write of the config: the
/// datapath then sends new flows to the kernel, so kube-proxy, from their
/// first packet, and keeps translating its own), then checks every `poll`
/// until no live TCP flow is left, `timeout` passes, or a new daemon
/// cancels the drain by writing its own config. UDP flows are not waited
/// for: kube-proxy takes a UDP flow over from its next packet.
pub fn drain_target(
    target: &mut impl DrainTarget,
    timeout: Duration,
    poll: Duration,
) -> Result<DrainOutcome> {
    let mut config = target.config()?;
    config.flags |= CONFIG_F_DRAINING;
    target
        .set_config(config)
        .context("setting the datapath's draining flag")?;
    let started = Instant::now();
    let deadline = started + timeout;
    let mut last_progress: Option<Instant> = None;
    loop {
        let config = target.config()?;
        if config.flags & CONFIG_F_DRAINING == 0 {
            return Ok(DrainOutcome::Cancelled);
        }
        let live = live_tcp_flows(&target.flows(), &config, target.now_ns()?);
        if live == 0 {
            return Ok(DrainOutcome::Drained {
                waited: started.elapsed(),
            });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(DrainOutcome::DeadlinePassed { open: live });
        }
        if last_progress.is_none_or(|t| t.elapsed() >= DRAIN_PROGRESS) {
            info!(
                "draining: {live} live TCP flows, new flows go to kube-proxy ({} s left)",
                left.as_secs()
            );
            last_progress = Some(Instant::now());
        }
        std::thread::sleep(left.min(poll));
    }
}

/// What [`uninstall`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uninstalled {
    pub drain: DrainOutcome,
    /// Program attachments detached (0 when the drain was cancelled).
    pub detached: usize,
}

/// Drains for at most `drain_timeout` (see [`drain`]; zero: not at all),
/// then detaches every program we pinned and removes every pin under
/// `pin_dir`: the node is left as it was, and kube-proxy handles all
/// traffic again. Works without a daemon. A drain cancelled by a new
/// daemon leaves everything in place.
pub fn uninstall(pin_dir: &Path, drain_timeout: Duration) -> Result<Uninstalled> {
    let outcome = drain(pin_dir, drain_timeout)?;
    match outcome {
        DrainOutcome::Cancelled => {
            warn!("a forwarder daemon started while draining and took the datapath over: leaving it in place");
            return Ok(Uninstalled {
                drain: outcome,
                detached: 0,
            });
        }
        DrainOutcome::DeadlinePassed { open } => warn!(
            "drain timeout ({} s) passed with {open} TCP flows still open: detaching cuts them",
            drain_timeout.as_secs()
        ),
        DrainOutcome::Drained { waited } if !waited.is_zero() => info!(
            "drained: no live TCP flow left after {:.1} s",
            waited.as_secs_f64()
        ),
        DrainOutcome::Drained { .. } | DrainOutcome::NothingToDrain => {}
    }
    let mut detached = 0;
    // Netlink filters have no pin: the interface table says where they are.
    if let Ok(ifaces) =
        open_pinned_as::<HashMap<MapData, u32, IfaceInfo>>(pin_dir, map_names::IFACES)
    {
        for (ifindex, info) in ifaces.iter().filter_map(|e| e.ok()) {
            if info.flags & IFACE_F_TC_NETLINK == 0 {
                continue;
            }
            if let Some(name) = netdev::ifname(ifindex) {
                if netlink_tc_link(&name).is_ok_and(|l| l.detach().is_ok()) {
                    detached += 1;
                }
            }
        }
    }
    if let Ok(rd) = fs::read_dir(links_dir(pin_dir)) {
        for entry in rd.flatten() {
            unpin_link(&entry.path());
            detached += 1;
        }
    }
    let _ = fs::remove_dir(links_dir(pin_dir));
    for name in map_names::ALL {
        let path = pin_path(pin_dir, name);
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!("removing pin {}: {e}", path.display());
            }
        }
    }
    if let Err(e) = fs::remove_dir(pin_dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            bail!(
                "removing {}: {e} (something else is pinned there?)",
                pin_dir.display()
            );
        }
    }
    info!(
        "detached {detached} program attachments and removed the pins in {}",
        pin_dir.display()
    );
    Ok(Uninstalled {
        drain: outcome,
        detached,
    })
}

/// Removes a link's pin; once our handle is gone too the link detaches.
fn unpin_link(pin: &Path) {
    match PinnedLink::from_pin(pin) {
        Ok(link) => {
            if let Err(e) = link.unpin() {
                warn!("unpinning {}: {e}", pin.display());
            }
        }
        Err(_) => {
            let _ = fs::remove_file(pin);
        }
    }
}

/// Takes over a pinned XDP link, swapping in our program atomically.
fn adopt_xdp(xdp: &mut Xdp, pin: &Path) -> Result<Option<PinnedAttachment>> {
    if !pin.exists() {
        return Ok(None);
    }
    let adopted = (|| -> Result<FdLink> {
        let fd: FdLink = PinnedLink::from_pin(pin)?.into();
        let id = xdp.attach_to_link(XdpLink::try_from(fd)?)?;
        Ok(FdLink::try_from(xdp.take_link(id)?)?)
    })();
    match adopted {
        Ok(link) => Ok(Some(PinnedAttachment {
            _link: link,
            pin: pin.to_path_buf(),
        })),
        Err(e) => {
            // E.g. the device was re-created: the old link is defunct.
            warn!(
                "{}: cannot adopt the pinned XDP link ({e:#}); attaching anew",
                pin.display()
            );
            let _ = fs::remove_file(pin);
            Ok(None)
        }
    }
}

fn is_foreign_program(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("another XDP program is already attached")
}

fn attach_xdp(
    xdp: &mut Xdp,
    ifindex: u32,
    name: &str,
    mode: XdpMode,
    pin: &Path,
) -> Result<PinnedAttachment> {
    let id = xdp.attach_to_if_index(ifindex, mode).map_err(|e| match &e {
        ProgramError::SyscallError(s)
            if matches!(s.io_error.raw_os_error(), Some(libc::EBUSY) | Some(libc::EEXIST)) =>
        {
            anyhow!("{name}: another XDP program is already attached; refusing to replace it (detach it first)")
        }
        _ => anyhow!(e).context(format!("attaching XDP ({mode:?} mode) to {name}")),
    })?;
    let link = FdLink::try_from(xdp.take_link(id)?).map_err(|_| {
        anyhow!("{name}: the kernel attached XDP without a bpf link (needs Linux >= 5.9)")
    })?;
    pin_attachment(link, pin)
}

/// Attaches tc ingress `way`, adopting what an earlier daemon attached (a
/// pinned tcx link, or our netlink filter) by replacing its program
/// atomically. Whatever the other way left on the device is removed.
fn attach_tc(tc: &mut SchedClassifier, name: &str, pin: &Path, way: TcWay) -> Result<TcAttachment> {
    match way {
        TcWay::Tcx => {
            let attachment = attach_tcx(tc, name, pin)?;
            detach_netlink_tc(name);
            Ok(TcAttachment::Tcx(attachment))
        }
        TcWay::Netlink => {
            attach_netlink_tc(tc, name)?;
            if pin.exists() {
                unpin_link(pin);
            }
            Ok(TcAttachment::Netlink)
        }
    }
}

/// Our netlink filter on `name`, as a link handle (nothing is checked yet).
fn netlink_tc_link(name: &str) -> Result<SchedClassifierLink> {
    SchedClassifierLink::attached(
        name,
        TcAttachType::Ingress,
        NETLINK_TC_PRIORITY,
        TcHandle::from(NETLINK_TC_HANDLE),
        None,
    )
    .with_context(|| format!("{name}: no such device"))
}

fn attach_netlink_tc(tc: &mut SchedClassifier, name: &str) -> Result<()> {
    // Fails if the device already has one, which is fine; a real problem
    // shows in the attach below.
    let _ = tc::qdisc_add_clsact(name);
    // An earlier daemon's filter: swap in our program where it sits.
    let replaced = netlink_tc_link(name).and_then(|link| Ok(tc.attach_to_link(link)?));
    let id = match replaced {
        Ok(id) => id,
        Err(_) => tc
            .attach_with_options(
                name,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(NlOptions {
                    priority: NETLINK_TC_PRIORITY,
                    handle: TcHandle::from(NETLINK_TC_HANDLE),
                    ..NlOptions::default()
                }),
            )
            .with_context(|| format!("attaching tc ingress to {name} through netlink"))?,
    };
    // Dropping the link would detach the filter: it must outlive this
    // process, as a pinned link does (detach_netlink_tc removes it).
    std::mem::forget(tc.take_link(id)?);
    Ok(())
}

/// Removes our netlink filter from `name`, if it has one.
fn detach_netlink_tc(name: &str) {
    if let Ok(link) = netlink_tc_link(name) {
        // NotFound is the common case: nothing was attached that way.
        let _ = link.detach();
    }
}

fn detach_tc(name: &str, attachment: TcAttachment) {
    match attachment {
        TcAttachment::Tcx(a) => unpin_link(&a.pin),
        TcAttachment::Netlink => detach_netlink_tc(name),
    }
}

/// Attaches tc ingress through tcx, adopting a pinned link if there is one.
fn attach_tcx(tc: &mut SchedClassifier, name: &str, pin: &Path) -> Result<PinnedAttachment> {
    if pin.exists() {
        let adopted = (|| -> Result<FdLink> {
            let fd: FdLink = PinnedLink::from_pin(pin)?.into();
            let id = tc.attach_to_link(SchedClassifierLink::try_from(fd)?)?;
            Ok(FdLink::try_from(tc.take_link(id)?)?)
        })();
        match adopted {
            Ok(link) => {
                return Ok(PinnedAttachment {
                    _link: link,
                    pin: pin.to_path_buf(),
                })
            }
            Err(e) => {
                warn!(
                    "{}: cannot adopt the pinned tc link ({e:#}); attaching anew",
                    pin.display()
                );
                let _ = fs::remove_file(pin);
            }
        }
    }
    let id = tc
        .attach(name, TcAttachType::Ingress)
        .with_context(|| format!("attaching tc ingress to {name}"))?;
    let link = FdLink::try_from(tc.take_link(id)?)
        .map_err(|_| anyhow!("{name}: tc attached without tcx (needs Linux >= 6.6)"))?;
    pin_attachment(link, pin)
}

fn pin_attachment(link: FdLink, pin: &Path) -> Result<PinnedAttachment> {
    let pinned = link
        .pin(pin)
        .with_context(|| format!("pinning link at {}", pin.display()))?;
    Ok(PinnedAttachment {
        _link: pinned.into(),
        pin: pin.to_path_buf(),
    })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?;
    p.try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

/// The clock `bpf_ktime_get_coarse_ns` reads (CLOCK_MONOTONIC, coarse).
pub fn monotonic_ns() -> Result<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .context("clock_gettime")?;
    Ok(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// Keys of flows idle past their timeout: both entries of a flow go together,
/// judged by the more recent of the two.
pub fn expired_flows(entries: &BTreeMap<CtKey, CtEntry>, config: &Config, now: u64) -> Vec<CtKey> {
    let mut out = Vec::new();
    for (k, e) in entries {
        let peer = entries.get(&e.peer_key(k.proto));
        let last = peer.map_or(e.last_seen_ns, |p| p.last_seen_ns.max(e.last_seen_ns));
        let timeout = config.timeout_ns(k.proto, e.state);
        if now.saturating_sub(last) > timeout {
            out.push(*k);
        }
    }
    out
}

/// Every conntrack entry (a walk of a live map: entries may come and go).
fn conntrack_entries_of(map: &ConntrackMap) -> BTreeMap<CtKey, CtEntry> {
    let walk = conntrack_walk(map);
    if walk.cut {
        warn!(
            "conntrack walk cut after {} steps ({} entries seen): entries churned under it",
            walk.steps,
            walk.entries.len()
        );
    }
    walk.entries
}

/// Steps a walk of the conntrack table may take per entry the table can
/// hold (see [`bounded_walk`]).
pub const WALK_STEPS_PER_ENTRY: usize = 4;

fn conntrack_walk(map: &ConntrackMap) -> Walk<CtKey, CtEntry> {
    use aya::maps::IterableMap as _;
    let capacity = map
        .map()
        .info()
        .map(|i| i.max_entries() as usize)
        .unwrap_or(forwarder_common::DEFAULT_CONNTRACK_ENTRIES as usize);
    bounded_walk(
        map.keys(),
        |k| map.get(k, 0).ok(),
        WALK_STEPS_PER_ENTRY.saturating_mul(capacity.max(1)),
    )
}

/// What a bounded walk of a live hash map saw.
#[derive(Debug)]
pub struct Walk<K, V> {
    pub entries: BTreeMap<K, V>,
    /// Keys the walk was handed (repeats included).
    pub steps: usize,
    /// The walk stopped at its bound rather than at the end of the map.
    pub cut: bool,
}

/// Walks a live hash map key by key, taking at most `max_steps` keys.
///
/// `bpf_map_get_next_key` on a key that is no longer in the map answers
/// with the map's first key: a walk whose current entry is evicted (LRU
/// pressure) or deleted (the datapath closing a flow) starts over, and on a
/// busy table it might never reach the end. The bound makes it end; what it
/// missed, the next walk sees. Keys seen twice are kept once; a key that
/// vanished between the two syscalls is skipped.
pub fn bounded_walk<K: Ord, V, E: std::fmt::Display>(
    keys: impl IntoIterator<Item = Result<K, E>>,
    mut get: impl FnMut(&K) -> Option<V>,
    max_steps: usize,
) -> Walk<K, V> {
    let mut walk = Walk {
        entries: BTreeMap::new(),
        steps: 0,
        cut: false,
    };
    for key in keys {
        if walk.steps == max_steps {
            walk.cut = true;
            break;
        }
        walk.steps += 1;
        match key {
            Ok(k) => {
                if let Some(v) = get(&k) {
                    walk.entries.insert(k, v);
                }
            }
            // The key iterator ends after an error.
            Err(e) => log::debug!("map walk: {e}"),
        }
    }
    walk
}

/// How long a drain waits for a closing connection's last packets (the
/// final ACK, a retransmitted FIN): one round trip, with room. Detached
/// sooner, they would meet netfilter as INVALID.
const FIN_GRACE_NS: u64 = 2_000_000_000;

/// Whether the TCP flow of entry `e` is still open: not reset, not idle past
/// its state's timeout (judged by the more recent of its two entries), and
/// if finishing, not quiet for longer than its closing packets take.
pub fn is_live_tcp_flow(e: &CtEntry, peer: Option<&CtEntry>, config: &Config, now: u64) -> bool {
    let last = peer.map_or(e.last_seen_ns, |p| p.last_seen_ns.max(e.last_seen_ns));
    let idle = now.saturating_sub(last);
    match e.state {
        CT_STATE_CLOSED => false,
        CT_STATE_FIN => idle <= FIN_GRACE_NS,
        state => idle <= config.timeout_ns(IPPROTO_TCP, state),
    }
}

/// Open TCP flows, each counted once: by its forward entry, or by its reply
/// entry when LRU pressure evicted the forward one (the datapath rebuilds it).
pub fn live_tcp_flows(entries: &BTreeMap<CtKey, CtEntry>, config: &Config, now: u64) -> usize {
    entries
        .iter()
        .filter(|(k, _)| k.proto == IPPROTO_TCP)
        .filter(|(k, e)| {
            let peer = entries.get(&e.peer_key(k.proto));
            let counted_by_peer = e.flags & CT_F_REPLY != 0 && peer.is_some();
            !counted_by_peer && is_live_tcp_flow(e, peer, config, now)
        })
        .count()
}

/// Backends of flows without source NAT: local pods (remote backends are
/// source-NATed, and the Local policy, which is not, has only local
/// backends). Their replies come in through a pod device.
pub fn local_backends_with_flows(entries: &BTreeMap<CtKey, CtEntry>) -> BTreeSet<Ipv4Addr> {
    entries
        .iter()
        .filter(|(_, e)| e.flags & CT_F_SNAT == 0)
        .map(|(k, e)| {
            // A reply entry is keyed by the backend's packet.
            let backend = if e.flags & CT_F_REPLY != 0 {
                k.saddr_be
            } else {
                e.new_daddr_be
            };
            Ipv4Addr::from(backend.to_ne_bytes())
        })
        .collect()
}

/// Keys (both directions) of UDP flows whose backend is no longer a backend
/// of the frontend the client addressed. TCP flows are never stale: as
/// under kube-proxy, they keep their backend until they close or idle out.
pub fn stale_flows(entries: &BTreeMap<CtKey, CtEntry>, desired: &Desired) -> Vec<CtKey> {
    let mut out = Vec::new();
    for (k, e) in entries {
        if e.flags & CT_F_REPLY != 0 || k.proto != IPPROTO_UDP {
            continue;
        }
        let Some(proto) = Protocol::from_number(k.proto) else {
            continue;
        };
        let frontend = FrontendAddr {
            addr: Ipv4Addr::from(k.daddr_be.to_ne_bytes()),
            port: u16::from_be(k.dport_be),
            proto,
        };
        let backend = (
            Ipv4Addr::from(e.new_daddr_be.to_ne_bytes()),
            u16::from_be(e.new_dport_be),
        );
        let alive = desired
            .frontends
            .get(&frontend)
            .is_some_and(|f| f.backends.iter().any(|b| (b.addr, b.port) == backend));
        if !alive {
            out.push(*k);
            out.push(e.peer_key(k.proto));
        }
    }
    out
}

/// Validates a source-NAT port range against the node's other port owners.
pub fn check_snat_range(min: u16, max: u16, local_range: Option<(u16, u16)>) -> Result<()> {
    if min == 0 || min > max {
        bail!("source-NAT port range {min}-{max} is empty");
    }
    // NodePorts: kube-apiserver's default --service-node-port-range.
    if min <= 32767 && max >= 30000 {
        bail!("source-NAT port range {min}-{max} overlaps the NodePort range 30000-32767");
    }
    if let Some((lo, hi)) = local_range {
        if min <= hi && max >= lo {
            bail!(
                "source-NAT port range {min}-{max} overlaps net.ipv4.ip_local_port_range {lo}-{hi} (the node's own connections and kube-proxy's MASQUERADE use it); pick another with --snat-port-range"
            );
        }
    }
    Ok(())
}

/// kube-apiserver's default --service-node-port-range.
const NODE_PORTS: (u16, u16) = (30000, 32767);
/// Source ports below this stay unused (privileged ports carry meaning to
/// some servers).
const FIRST_SNAT_PORT: u16 = 1024;

/// The default source-NAT ports: every port from 1024 up that neither the
/// node's local port range nor the NodePort range uses, as the (at most)
/// two largest free ranges. With Linux's default local range
/// (32768-60999) that is 1024-29999 and 61000-65535: 33,512 ports for each
/// remote backend.
pub fn default_snat_ranges(local_range: Option<(u16, u16)>) -> Vec<(u16, u16)> {
    let mut taken = vec![NODE_PORTS];
    taken.extend(local_range);
    taken.sort();
    let mut free: Vec<(u16, u16)> = Vec::new();
    let mut next: u32 = FIRST_SNAT_PORT as u32;
    for (lo, hi) in taken {
        if (lo as u32) > next {
            free.push((next as u16, lo - 1));
        }
        next = next.max(hi as u32 + 1);
    }
    if next <= u16::MAX as u32 {
        free.push((next as u16, u16::MAX));
    }
    free.sort_by_key(|(lo, hi)| std::cmp::Reverse(hi - lo));
    free.truncate(2);
    free.sort();
    free
}

/// net.ipv4.ip_local_port_range of this network namespace.
pub fn local_port_range() -> Option<(u16, u16)> {
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().filter_map(|s| s.parse().ok());
    Some((it.next()?, it.next()?))
}

#[cfg(test)]
mod tests {
    use forwarder_common::{CT_STATE_ESTABLISHED, CT_STATE_NEW, CT_STATE_SYN_RECV};

    use super::*;
    use crate::model::{DesiredBackend, DesiredFrontend};

    #[test]
    fn evictions_are_what_was_added_and_neither_removed_nor_found() {
        let mut t = EvictionTally::default();
        // First sweep: a pinned table with history; an earlier daemon had
        // stored 7 evictions. Nothing is inferred about the past.
        assert_eq!(t.update(1000, 400, 500, 7), 7);
        // 300 added, 50 removed by the datapath, 20 by our sweep, 30 more
        // found: 200 evicted.
        t.removed_by_daemon += 20;
        assert_eq!(t.update(1300, 450, 530, 7), 207);
        // A walk that caught entries mid-change (the estimate dips) never
        // makes the count go down.
        assert_eq!(t.update(1300, 450, 560, 207), 207);
        // Nothing lost: the count stays.
        assert_eq!(t.update(1400, 550, 530, 207), 207);
        assert_eq!(t.update(1500, 550, 530, 207), 307);
    }

    fn pair(last_fwd: u64, last_rev: u64, proto: u8, state: u8) -> BTreeMap<CtKey, CtEntry> {
        let fwd_key = CtKey::new(1, 100, 2, 200, proto);
        let fwd = CtEntry {
            new_saddr_be: 3,
            new_sport_be: 300,
            new_daddr_be: 4,
            new_dport_be: 400,
            last_seen_ns: last_fwd,
            state,
            ..Default::default()
        };
        let rev_key = fwd.peer_key(proto);
        let rev = CtEntry {
            new_saddr_be: 2,
            new_sport_be: 200,
            new_daddr_be: 1,
            new_dport_be: 100,
            last_seen_ns: last_rev,
            state,
            flags: CT_F_REPLY,
            ..Default::default()
        };
        assert_eq!(rev.peer_key(proto), fwd_key);
        BTreeMap::from([(fwd_key, fwd), (rev_key, rev)])
    }

    #[test]
    fn idle_udp_flows_expire_as_a_pair() {
        let c = Config::default();
        let s = 1_000_000_000u64;
        let t = pair(0, 0, IPPROTO_UDP, CT_STATE_NEW);
        assert!(expired_flows(&t, &c, 29 * s).is_empty());
        assert_eq!(expired_flows(&t, &c, 31 * s).len(), 2);
    }

    #[test]
    fn one_busy_direction_keeps_both_entries() {
        let c = Config::default();
        let s = 1_000_000_000u64;
        let t = pair(0, 100 * s, IPPROTO_UDP, CT_STATE_ESTABLISHED);
        assert!(expired_flows(&t, &c, 200 * s).is_empty());
        assert_eq!(expired_flows(&t, &c, 221 * s).len(), 2);
    }

    #[test]
    fn established_tcp_lives_a_day() {
        let c = Config::default();
        let s = 1_000_000_000u64;
        let t = pair(0, 0, IPPROTO_TCP, CT_STATE_ESTABLISHED);
        assert!(expired_flows(&t, &c, 86_000 * s).is_empty());
        assert_eq!(expired_flows(&t, &c, 86_401 * s).len(), 2);
    }

    fn client_flow(proto: u8, backend_last: u8, flags: u8) -> (CtKey, CtEntry) {
        let client = CtKey::new(
            u32::from_ne_bytes([192, 0, 2, 100]),
            40000u16.to_be(),
            u32::from_ne_bytes([192, 0, 2, 1]),
            31380u16.to_be(),
            proto,
        );
        let entry = CtEntry {
            new_saddr_be: client.saddr_be,
            new_sport_be: client.sport_be,
            new_daddr_be: u32::from_ne_bytes([10, 244, 1, backend_last]),
            new_dport_be: 80u16.to_be(),
            flags,
            ..Default::default()
        };
        (client, entry)
    }

    fn frontend_to(proto: Protocol, backend_last: u8) -> (FrontendAddr, DesiredFrontend) {
        (
            FrontendAddr {
                addr: Ipv4Addr::new(192, 0, 2, 1),
                port: 31380,
                proto,
            },
            DesiredFrontend {
                service: "ns/s".into(),
                port_name: String::new(),
                backends: vec![DesiredBackend {
                    addr: Ipv4Addr::new(10, 244, 1, backend_last),
                    port: 80,
                    local: true,
                    policed: false,
                }],
                no_snat: false,
                drop_if_empty: false,
                affinity_timeout_s: 0,
            },
        )
    }

    #[test]
    fn udp_flows_to_a_removed_backend_are_stale_the_others_kept() {
        let (client, to10) = client_flow(IPPROTO_UDP, 10, 0);
        let entries = BTreeMap::from([(client, to10)]);
        let desired = |last| Desired {
            frontends: [frontend_to(Protocol::Udp, last)].into_iter().collect(),
        };
        assert!(stale_flows(&entries, &desired(10)).is_empty());
        let stale = stale_flows(&entries, &desired(11));
        assert_eq!(stale, vec![client, to10.peer_key(IPPROTO_UDP)]);
        assert_eq!(stale_flows(&entries, &Desired::default()).len(), 2);
    }

    #[test]
    fn tcp_flows_keep_their_backend_when_it_leaves_as_under_kube_proxy() {
        let (client, to10) = client_flow(IPPROTO_TCP, 10, 0);
        let reply_key = to10.peer_key(IPPROTO_TCP);
        let entries = BTreeMap::from([
            (client, to10),
            (
                reply_key,
                CtEntry {
                    flags: CT_F_REPLY,
                    ..Default::default()
                },
            ),
        ]);
        let moved = Desired {
            frontends: [frontend_to(Protocol::Tcp, 11)].into_iter().collect(),
        };
        assert!(stale_flows(&entries, &moved).is_empty());
        assert!(
            stale_flows(&entries, &Desired::default()).is_empty(),
            "not even when the Service is gone"
        );
    }

    #[test]
    fn live_tcp_flows_are_open_and_recent_each_counted_once() {
        let c = Config::default();
        let s = 1_000_000_000u64;
        let count = |t: &BTreeMap<CtKey, CtEntry>, now| live_tcp_flows(t, &c, now);
        // Both entries of an established flow: one live flow.
        let established = pair(0, 10 * s, IPPROTO_TCP, CT_STATE_ESTABLISHED);
        assert_eq!(count(&established, 20 * s), 1);
        // Idle past the established timeout (judged by the later entry).
        assert_eq!(count(&established, (10 + 86_400) * s), 1);
        assert_eq!(count(&established, (11 + 86_400) * s), 0);
        // Handshakes under way are live until their own timeouts.
        assert_eq!(count(&pair(0, 0, IPPROTO_TCP, CT_STATE_NEW), 119 * s), 1);
        assert_eq!(count(&pair(0, 0, IPPROTO_TCP, CT_STATE_NEW), 121 * s), 0);
        assert_eq!(
            count(&pair(0, 0, IPPROTO_TCP, CT_STATE_SYN_RECV), 59 * s),
            1
        );
        assert_eq!(
            count(&pair(0, 0, IPPROTO_TCP, CT_STATE_SYN_RECV), 61 * s),
            0
        );
        // Finishing flows only for their last packets; reset ones not at all.
        assert_eq!(count(&pair(0, 0, IPPROTO_TCP, CT_STATE_FIN), s), 1);
        assert_eq!(count(&pair(0, 0, IPPROTO_TCP, CT_STATE_FIN), 3 * s), 0);
        assert_eq!(count(&pair(0, 0, IPPROTO_TCP, CT_STATE_CLOSED), s), 0);
        // UDP is never waited for.
        assert_eq!(count(&pair(0, 0, IPPROTO_UDP, CT_STATE_ESTABLISHED), s), 0);
        // A reply entry whose forward entry was evicted still counts.
        let mut reply_only = established.clone();
        reply_only.retain(|_, e| e.flags & CT_F_REPLY != 0);
        assert_eq!(count(&reply_only, 20 * s), 1);
        let mut forward_only = established;
        forward_only.retain(|_, e| e.flags & CT_F_REPLY == 0);
        assert_eq!(count(&forward_only, 20 * s), 1);
    }

    #[test]
    fn local_backends_with_flows_are_the_backends_of_flows_without_snat() {
        let (k_local, local) = client_flow(IPPROTO_TCP, 10, 0);
        let (_, remote) = client_flow(IPPROTO_TCP, 20, CT_F_SNAT);
        let k_remote = CtKey::new(1, 1, 2, 2, IPPROTO_TCP);
        // The reply entry of another local flow, its forward entry evicted.
        let reply_key = CtKey::new(
            u32::from_ne_bytes([10, 244, 1, 11]),
            80u16.to_be(),
            u32::from_ne_bytes([192, 0, 2, 100]),
            40001u16.to_be(),
            IPPROTO_TCP,
        );
        let reply = CtEntry {
            flags: CT_F_REPLY,
            ..Default::default()
        };
        let entries = BTreeMap::from([(k_local, local), (k_remote, remote), (reply_key, reply)]);
        assert_eq!(
            local_backends_with_flows(&entries),
            BTreeSet::from([Ipv4Addr::new(10, 244, 1, 10), Ipv4Addr::new(10, 244, 1, 11)])
        );
    }

    /// Called with the poll number on each look at the flows.
    type PollHook = Box<dyn Fn(usize, &FakeDatapath)>;

    /// A datapath whose flows and config change as a drain polls it.
    struct FakeDatapath {
        config: std::cell::Cell<Config>,
        flows: std::cell::RefCell<BTreeMap<CtKey, CtEntry>>,
        polls: std::cell::Cell<usize>,
        on_poll: PollHook,
    }

    const NOW: u64 = 1_000 * 1_000_000_000;

    impl FakeDatapath {
        fn new(
            flows: BTreeMap<CtKey, CtEntry>,
            on_poll: impl Fn(usize, &FakeDatapath) + 'static,
        ) -> Self {
            FakeDatapath {
                config: std::cell::Cell::new(Config::default()),
                flows: std::cell::RefCell::new(flows),
                polls: std::cell::Cell::new(0),
                on_poll: Box::new(on_poll),
            }
        }
    }

    impl DrainTarget for FakeDatapath {
        fn config(&self) -> Result<Config> {
            Ok(self.config.get())
        }
        fn set_config(&mut self, config: Config) -> Result<()> {
            self.config.set(config);
            Ok(())
        }
        fn flows(&self) -> BTreeMap<CtKey, CtEntry> {
            let n = self.polls.get() + 1;
            self.polls.set(n);
            (self.on_poll)(n, self);
            self.flows.borrow().clone()
        }
        fn now_ns(&self) -> Result<u64> {
            Ok(NOW)
        }
    }

    fn established() -> BTreeMap<CtKey, CtEntry> {
        pair(NOW, NOW, IPPROTO_TCP, CT_STATE_ESTABLISHED)
    }

    const POLL: Duration = Duration::from_millis(1);

    #[test]
    fn a_drain_sets_the_flag_and_ends_when_the_last_tcp_flow_closes() {
        let mut dp = FakeDatapath::new(established(), |n, dp| {
            if n == 3 {
                // Closed, and its last packets are past.
                for e in dp.flows.borrow_mut().values_mut() {
                    e.state = CT_STATE_FIN;
                    e.last_seen_ns = NOW - 3_000_000_000;
                }
            }
        });
        let outcome = drain_target(&mut dp, Duration::from_secs(10), POLL).unwrap();
        assert!(
            matches!(outcome, DrainOutcome::Drained { .. }),
            "{outcome:?}"
        );
        assert_eq!(dp.polls.get(), 3);
        let c = dp.config.get();
        assert_eq!(c.flags, CONFIG_F_DRAINING, "flag set, and left set");
        assert_eq!(
            Config { flags: 0, ..c },
            Config::default(),
            "the rest of the config is kept"
        );
    }

    #[test]
    fn a_drain_does_not_wait_for_udp_or_quiet_closing_flows() {
        let mut flows = pair(NOW, NOW, IPPROTO_UDP, CT_STATE_ESTABLISHED);
        // Closed 3 s ago: past the grace for its last packets.
        let quiet = NOW - 3_000_000_000;
        let mut fin = pair(quiet, quiet, IPPROTO_TCP, CT_STATE_FIN);
        // Another tuple for the second flow.
        fin = fin
            .into_iter()
            .map(|(mut k, e)| {
                k.sport_be ^= 1;
                k.dport_be ^= 1;
                (k, e)
            })
            .collect();
        flows.extend(fin);
        let mut dp = FakeDatapath::new(flows, |_, _| {});
        let outcome = drain_target(&mut dp, Duration::from_secs(10), POLL).unwrap();
        assert!(
            matches!(outcome, DrainOutcome::Drained { .. }),
            "{outcome:?}"
        );
        assert_eq!(dp.polls.get(), 1);
    }

    #[test]
    fn a_drain_gives_up_at_the_deadline_and_counts_the_open_flows() {
        let mut dp = FakeDatapath::new(established(), |_, _| {});
        let timeout = Duration::from_millis(30);
        let started = Instant::now();
        let outcome = drain_target(&mut dp, timeout, POLL).unwrap();
        assert_eq!(outcome, DrainOutcome::DeadlinePassed { open: 1 });
        assert!(started.elapsed() >= timeout);
        // Zero: no wait at all, the open flows counted all the same.
        let mut dp = FakeDatapath::new(established(), |_, _| {});
        assert_eq!(
            drain_target(&mut dp, Duration::ZERO, POLL).unwrap(),
            DrainOutcome::DeadlinePassed { open: 1 }
        );
        assert_eq!(dp.polls.get(), 1);
    }

    #[test]
    fn a_daemon_that_writes_its_config_cancels_the_drain() {
        let mut dp = FakeDatapath::new(established(), |n, dp| {
            if n == 2 {
                dp.config.set(Config::default());
            }
        });
        let outcome = drain_target(&mut dp, Duration::from_secs(10), POLL).unwrap();
        assert_eq!(outcome, DrainOutcome::Cancelled);
    }

    #[test]
    fn nothing_pinned_is_nothing_to_drain() {
        let dir = std::env::temp_dir().join(format!("forwarder-drain-{}", std::process::id()));
        assert_eq!(
            drain(&dir, Duration::from_secs(1)).unwrap(),
            DrainOutcome::NothingToDrain
        );
    }

    #[test]
    fn kernels_before_5_11_are_refused_naming_what_they_lack() {
        let e = check_kernel_version(KernelVersion::new(5, 10, 0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Linux 5.10.0 lacks bpf_ktime_get_coarse_ns: forwarder needs Linux 5.11 or later"
        );
        let e = check_kernel_version(KernelVersion::new(5, 4, 0)).unwrap_err();
        assert!(
            e.to_string().contains("XDP bpf links, bpf_redirect_peer"),
            "{e}"
        );
        check_kernel_version(KernelVersion::new(5, 11, 0)).unwrap();
        check_kernel_version(KernelVersion::new(6, 1, 0)).unwrap();
    }

    #[test]
    fn tc_attaches_through_tcx_where_the_kernel_has_it_else_netlink() {
        let old = KernelVersion::new(6, 1, 0);
        let new = KernelVersion::new(6, 6, 0);
        assert_eq!(TcWay::choose(TcAttachArg::Auto, new).unwrap(), TcWay::Tcx);
        assert_eq!(
            TcWay::choose(TcAttachArg::Auto, old).unwrap(),
            TcWay::Netlink
        );
        assert_eq!(
            TcWay::choose(TcAttachArg::Netlink, new).unwrap(),
            TcWay::Netlink
        );
        let refused = TcWay::choose(TcAttachArg::Tcx, old)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("needs Linux 6.6"), "{refused}");
        for way in [TcWay::Tcx, TcWay::Netlink] {
            assert_eq!(TcWay::from_flags(way.flags() | IFACE_F_EXTERNAL), way);
        }
    }

    #[test]
    fn capabilities_are_read_from_cap_eff() {
        assert!(missing_capabilities("CapEff:\t000001ffffffffff\n").is_empty());
        assert_eq!(
            missing_capabilities("CapEff:\t0000000000000000\n"),
            vec!["CAP_NET_ADMIN", "CAP_BPF"]
        );
        // CAP_NET_ADMIN + CAP_BPF without CAP_SYS_ADMIN is enough to run.
        let net_admin_bpf = (1u64 << 12) | (1u64 << 39);
        assert!(missing_capabilities(&format!("CapEff: {net_admin_bpf:016x}")).is_empty());
        assert_eq!(
            missing_capabilities("no such line"),
            vec!["CAP_NET_ADMIN", "CAP_BPF"]
        );
    }

    #[test]
    fn default_snat_ranges_take_every_free_port() {
        assert_eq!(
            default_snat_ranges(Some((32768, 60999))),
            vec![(1024, 29999), (61000, 65535)]
        );
        // A local range below the NodePorts leaves three gaps: the two largest.
        assert_eq!(
            default_snat_ranges(Some((10000, 20000))),
            vec![(20001, 29999), (32768, 65535)]
        );
        assert_eq!(default_snat_ranges(Some((1024, 65535))), vec![]);
        assert_eq!(
            default_snat_ranges(None),
            vec![(1024, 29999), (32768, 65535)]
        );
        for (lo, hi) in default_snat_ranges(Some((32768, 60999))) {
            assert!(check_snat_range(lo, hi, Some((32768, 60999))).is_ok());
        }
    }

    #[test]
    fn snat_ranges_that_collide_are_refused() {
        assert!(check_snat_range(61000, 65535, Some((32768, 60999))).is_ok());
        assert!(check_snat_range(60000, 65535, Some((32768, 60999))).is_err());
        assert!(check_snat_range(31000, 31999, None).is_err());
        assert!(check_snat_range(5, 4, None).is_err());
        assert!(check_snat_range(61000, 65535, Some((1024, 65535))).is_err());
    }

    /// A hash map's key walk as the kernel does it: the next key after
    /// `after` in bucket order, or the first key when `after` is gone.
    /// `churn` runs after each step, as the datapath would meanwhile.
    fn kernel_walk<'a>(
        table: &'a std::cell::RefCell<Vec<u32>>,
        churn: impl Fn(&mut Vec<u32>, u32) + 'a,
    ) -> impl Iterator<Item = Result<u32, String>> + 'a {
        let mut at: Option<u32> = None;
        std::iter::from_fn(move || {
            let mut keys = table.borrow_mut();
            let next = match at.and_then(|a| keys.iter().position(|k| *k == a)) {
                Some(i) => keys.get(i + 1).copied(),
                None if at.is_some() => keys.first().copied(), // vanished: start over
                None => keys.first().copied(),
            }?;
            at = Some(next);
            churn(&mut keys, next);
            Some(Ok(next))
        })
    }

    #[test]
    fn a_walk_of_a_quiet_map_sees_every_key_once() {
        let table = std::cell::RefCell::new((0..1000).collect::<Vec<u32>>());
        let walk = bounded_walk(kernel_walk(&table, |_, _| {}), |k| Some(*k), 4 * 1000);
        assert!(!walk.cut);
        assert_eq!(walk.steps, 1000);
        assert_eq!(walk.entries.len(), 1000);
    }

    #[test]
    fn a_walk_whose_entries_vanish_under_it_ends_at_its_bound() {
        // LRU pressure: each key the walk stands on is evicted and a new
        // flow takes its place at the end. An unbounded walk restarts from
        // the first key at every step and never ends.
        const CAPACITY: usize = 1000;
        let table = std::cell::RefCell::new((0..CAPACITY as u32).collect::<Vec<u32>>());
        let fresh = std::cell::Cell::new(CAPACITY as u32);
        let evict_current = |keys: &mut Vec<u32>, current: u32| {
            keys.retain(|k| *k != current);
            keys.push(fresh.get());
            fresh.set(fresh.get() + 1);
        };
        let max = WALK_STEPS_PER_ENTRY * CAPACITY;
        let walk = bounded_walk(kernel_walk(&table, evict_current), |k| Some(*k), max);
        assert!(walk.cut, "the walk claimed to reach the end");
        assert_eq!(walk.steps, max);
        assert_eq!(table.borrow().len(), CAPACITY);
    }

    #[test]
    fn a_walk_with_some_churn_ends_and_keeps_repeats_once() {
        // Every 10th step deletes the current key (a flow closing): the
        // walk starts over, sees earlier keys again, and still finishes.
        let table = std::cell::RefCell::new((0..1000).collect::<Vec<u32>>());
        let steps = std::cell::Cell::new(0);
        let close_some = |keys: &mut Vec<u32>, current: u32| {
            steps.set(steps.get() + 1);
            if steps.get() % 100 == 0 {
                keys.retain(|k| *k != current);
            }
        };
        let walk = bounded_walk(kernel_walk(&table, close_some), |k| Some(*k), 4 * 1000);
        assert!(walk.steps > 1000, "no restart happened");
        let unique: BTreeSet<u32> = walk.entries.keys().copied().collect();
        assert_eq!(unique.len(), walk.entries.len());
        for k in table.borrow().iter() {
            assert!(walk.entries.contains_key(k) || walk.cut, "key {k} missed");
        }
    }

    #[test]
    fn a_key_gone_before_its_lookup_is_skipped() {
        let table = std::cell::RefCell::new(vec![1, 2, 3]);
        let walk = bounded_walk(
            kernel_walk(&table, |_, _| {}),
            |k| (*k != 2).then_some(*k),
            12,
        );
        assert_eq!(walk.entries.keys().copied().collect::<Vec<_>>(), [1, 3]);
    }
}
