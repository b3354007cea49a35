//! The benchmark's own tiny eBPF programs, assembled here and loaded with
//! bpf(2): the empty XDP program, the XDP_TX packet generator, XDP_DROP,
//! the bare redirect of variant B, and a tc drop at the receiver.
//!
//! They are a handful of instructions each, so writing them as bytecode keeps
//! the eBPF crate free of benchmark-only programs.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context, Result};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;

pub const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
pub const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_XDP: u32 = 37;
const BPF_TCX_INGRESS: u32 = 46;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

pub const XDP_DROP: i32 = 1;
pub const XDP_PASS: i32 = 2;
pub const XDP_TX: i32 = 3;
const TC_ACT_SHOT: i32 = 2;

const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_REDIRECT: i32 = 23;

/// One eBPF instruction.
#[derive(Clone, Copy, Debug)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            regs: (src << 4) | (dst & 0x0f),
            off,
            imm,
        }
    }

    fn encode(self) -> u64 {
        let mut b = [0u8; 8];
        b[0] = self.code;
        b[1] = self.regs;
        b[2..4].copy_from_slice(&self.off.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        u64::from_le_bytes(b)
    }
}

/// The few instructions the programs below need.
mod asm {
    use super::Insn;
    pub const fn mov_imm(dst: u8, imm: i32) -> Insn {
        Insn::new(0xb7, dst, 0, 0, imm)
    }
    pub const fn mov_reg(dst: u8, src: u8) -> Insn {
        Insn::new(0xbf, dst, src, 0, 0)
    }
    pub const fn add_imm(dst: u8, imm: i32) -> Insn {
        Insn::new(0x07, dst, 0, 0, imm)
    }
    pub const fn mod_imm(dst: u8, imm: i32) -> Insn {
        Insn::new(0x97, dst, 0, 0, imm)
    }
    /// dst = htobe16(dst)
    pub const fn be16(dst: u8) -> Insn {
        Insn::new(0xdc, dst, 0, 0, 16)
    }
    pub const fn ldx_w(dst: u8, src: u8, off: i16) -> Insn {
        Insn::new(0x61, dst, src, off, 0)
    }
    pub const fn stx_w(dst: u8, src: u8, off: i16) -> Insn {
        Insn::new(0x63, dst, src, off, 0)
    }
    pub const fn stx_h(dst: u8, src: u8, off: i16) -> Insn {
        Insn::new(0x6b, dst, src, off, 0)
    }
    pub const fn st_w(dst: u8, off: i16, imm: i32) -> Insn {
        Insn::new(0x62, dst, 0, off, imm)
    }
    pub const fn st_h(dst: u8, off: i16, imm: i32) -> Insn {
        Insn::new(0x6a, dst, 0, off, imm)
    }
    pub const fn st_b(dst: u8, off: i16, imm: i32) -> Insn {
        Insn::new(0x72, dst, 0, off, imm)
    }
    /// if dst > src (unsigned) goto +off
    pub const fn jgt_reg(dst: u8, src: u8, off: i16) -> Insn {
        Insn::new(0x2d, dst, src, off, 0)
    }
    /// if dst == imm goto +off
    pub const fn jeq_imm(dst: u8, imm: i32, off: i16) -> Insn {
        Insn::new(0x15, dst, 0, off, imm)
    }
    pub const fn call(helper: i32) -> Insn {
        Insn::new(0x85, 0, 0, 0, helper)
    }
    pub const fn exit() -> Insn {
        Insn::new(0x95, 0, 0, 0, 0)
    }
    /// The two halves of `dst = map_by_fd(fd)`.
    pub const fn ld_map_fd(dst: u8, fd: i32) -> [Insn; 2] {
        [Insn::new(0x18, dst, 1, 0, fd), Insn::new(0, 0, 0, 0, 0)]
    }
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> Result<libc::c_long> {
    // SAFETY: attr is a zero-initialised 128-byte `union bpf_attr` block,
    // valid for the duration of the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128usize) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("bpf(cmd {cmd})"));
    }
    Ok(rc)
}

fn owned_fd(rc: libc::c_long) -> Result<OwnedFd> {
    let fd = i32::try_from(rc).context("bpf(2) returned an impossible fd")?;
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn put_u32(attr: &mut [u64; 16], byte_off: usize, v: u32) {
    let word = byte_off / 8;
    let shift = (byte_off % 8) * 8;
    attr[word] &= !(0xffff_ffffu64 << shift);
    attr[word] |= u64::from(v) << shift;
}

/// A loaded program.
pub struct Prog {
    fd: OwnedFd,
}

impl Prog {
    pub fn load(prog_type: u32, name: &str, insns: &[Insn]) -> Result<Prog> {
        let code: Vec<u64> = insns.iter().map(|i| i.encode()).collect();
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let mut attr = [0u64; 16];
        put_u32(&mut attr, 0, prog_type);
        put_u32(
            &mut attr,
            4,
            u32::try_from(code.len()).context("program too long")?,
        );
        attr[1] = code.as_ptr() as u64;
        attr[2] = license.as_ptr() as u64;
        put_u32(&mut attr, 24, 1); // log_level
        put_u32(&mut attr, 28, log.len() as u32);
        attr[4] = log.as_mut_ptr() as u64;
        // prog_name at byte 48 (16 bytes).
        let mut pname = [0u8; 16];
        for (d, s) in pname.iter_mut().zip(name.bytes().take(15)) {
            *d = s;
        }
        attr[6] = u64::from_le_bytes(pname[..8].try_into().unwrap_or([0; 8]));
        attr[7] = u64::from_le_bytes(pname[8..].try_into().unwrap_or([0; 8]));
        if prog_type == BPF_PROG_TYPE_XDP {
            put_u32(&mut attr, 68, BPF_XDP); // expected_attach_type
        }
        match bpf(BPF_PROG_LOAD, &mut attr) {
            Ok(rc) => Ok(Prog { fd: owned_fd(rc)? }),
            Err(e) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                bail!(
                    "loading program {name}: {e:#}; verifier: {}",
                    String::from_utf8_lossy(&log[..end]).trim()
                )
            }
        }
    }

    /// `return action;`
    pub fn xdp_const(name: &str, action: i32) -> Result<Prog> {
        Prog::load(
            BPF_PROG_TYPE_XDP,
            name,
            &[asm::mov_imm(0, action), asm::exit()],
        )
    }

    /// `return bpf_redirect(ifindex, 0);` — no rewrite at all.
    pub fn xdp_redirect(ifindex: u32) -> Result<Prog> {
        let ifindex = i32::try_from(ifindex).context("ifindex out of range")?;
        Prog::load(
            BPF_PROG_TYPE_XDP,
            "bench_redirect",
            &[
                asm::mov_imm(1, ifindex),
                asm::mov_imm(2, 0),
                asm::call(HELPER_REDIRECT),
                asm::exit(),
            ],
        )
    }

    /// tc: `return TC_ACT_SHOT;`
    pub fn tc_drop() -> Result<Prog> {
        Prog::load(
            BPF_PROG_TYPE_SCHED_CLS,
            "bench_tc_drop",
            &[asm::mov_imm(0, TC_ACT_SHOT), asm::exit()],
        )
    }

    /// tc: sets the IPv4 TTL of an Ethernet frame to 127 by a direct write,
    /// leaving `skb->csum` as it was (what a test of the checksum check
    /// needs: a program that gets it wrong).
    pub fn tc_stale_csum() -> Result<Prog> {
        use asm::*;
        Prog::load(
            BPF_PROG_TYPE_SCHED_CLS,
            "test_stale_csum",
            &[
                ldx_w(2, 1, 76), // skb->data
                ldx_w(3, 1, 80), // skb->data_end
                mov_reg(4, 2),
                add_imm(4, 34),
                jgt_reg(4, 3, 1),
                st_b(2, 22, 127),
                mov_imm(0, 0),
                exit(),
            ],
        )
    }

    /// The generator: writes `header` (whole 32-bit words plus a 16-bit
    /// tail) over the frame's first bytes and returns XDP_TX. Live frames are
    /// recycled with whatever the path wrote into them (a NAT rewrite), so
    /// every frame is rewritten from the template. With `counter`, the UDP
    /// source port (bytes 34..36) becomes `1024 + n % 60000` where `n`
    /// counts the frames: every frame a new 5-tuple.
    pub fn xdp_generator(header: &[u8], counter: Option<&ArrayMap>) -> Result<Prog> {
        use asm::*;
        if header.len() % 4 != 2 || header.len() < 36 {
            bail!("generator template must be 4k+2 bytes and hold a UDP header");
        }
        let mut p: Vec<Insn> = vec![mov_reg(6, 1)];
        let mut null_check = None;
        if let Some(map) = counter {
            let fd = map.fd.as_raw_fd();
            p.extend(ld_map_fd(1, fd));
            p.extend([
                st_w(10, -4, 0),
                mov_reg(2, 10),
                add_imm(2, -4),
                call(HELPER_MAP_LOOKUP_ELEM),
            ]);
            // if r0 == 0: drop (never happens: the array has key 0)
            null_check = Some(p.len());
            p.push(jeq_imm(0, 0, 0));
            p.extend([
                ldx_w(8, 0, 0),
                add_imm(8, 1),
                stx_w(0, 8, 0),
                mod_imm(8, 60_000),
                add_imm(8, 1024),
                be16(8),
            ]);
        }
        p.extend([
            ldx_w(2, 6, 0),
            ldx_w(3, 6, 4),
            mov_reg(4, 2),
            add_imm(4, header.len() as i32),
            jgt_reg(4, 3, 0), // patched below
        ]);
        let bounds_check = p.len() - 1;
        for (i, chunk) in header.chunks(4).enumerate() {
            let off = (i * 4) as i16;
            if chunk.len() == 4 {
                let v = i32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                p.push(st_w(2, off, v));
            } else {
                let v = i32::from(u16::from_le_bytes([chunk[0], chunk[1]]));
                p.push(st_h(2, off, v));
            }
        }
        if counter.is_some() {
            p.push(stx_h(2, 8, 34));
        }
        p.extend([mov_imm(0, XDP_TX), exit()]);
        let drop_at = p.len();
        p.extend([mov_imm(0, XDP_DROP), exit()]);
        let patch = |p: &mut Vec<Insn>, at: usize| {
            p[at].off = (drop_at - at - 1) as i16;
        };
        patch(&mut p, bounds_check);
        if let Some(at) = null_check {
            patch(&mut p, at);
        }
        Prog::load(BPF_PROG_TYPE_XDP, "bench_gen", &p)
    }

    /// Attaches this XDP program in native mode to `ifindex` (of the
    /// calling thread's namespace) through a link; detached when the link
    /// is dropped.
    pub fn attach_xdp(&self, ifindex: u32) -> Result<OwnedFd> {
        self.link(ifindex, BPF_XDP, XDP_FLAGS_DRV_MODE)
    }

    /// Attaches this tc program at ingress of `ifindex` (tcx link).
    pub fn attach_tcx_ingress(&self, ifindex: u32) -> Result<OwnedFd> {
        self.link(ifindex, BPF_TCX_INGRESS, 0)
    }

    fn link(&self, ifindex: u32, attach_type: u32, flags: u32) -> Result<OwnedFd> {
        let mut attr = [0u64; 16];
        put_u32(&mut attr, 0, self.fd.as_raw_fd() as u32);
        put_u32(&mut attr, 4, ifindex);
        put_u32(&mut attr, 8, attach_type);
        put_u32(&mut attr, 12, flags);
        owned_fd(bpf(BPF_LINK_CREATE, &mut attr).with_context(|| {
            format!("attaching a program to ifindex {ifindex} (attach type {attach_type})")
        })?)
    }

    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

/// A one-entry array map of u32 (the generator's frame counter).
pub struct ArrayMap {
    fd: OwnedFd,
}

impl ArrayMap {
    pub fn counter() -> Result<ArrayMap> {
        let mut attr = [0u64; 16];
        put_u32(&mut attr, 0, BPF_MAP_TYPE_ARRAY);
        put_u32(&mut attr, 4, 4);
        put_u32(&mut attr, 8, 4);
        put_u32(&mut attr, 12, 1);
        Ok(ArrayMap {
            fd: owned_fd(bpf(BPF_MAP_CREATE, &mut attr).context("creating an array map")?)?,
        })
    }
}

/// What one BPF_PROG_TEST_RUN returned.
#[derive(Clone, Copy, Debug)]
pub struct RunResult {
    pub retval: u32,
    /// Kernel-measured nanoseconds per repetition.
    pub duration_ns: u32,
}

/// BPF_PROG_TEST_RUN of an XDP program fd on `frame`, `repeat` times, with
/// an `xdp_md` context naming `ingress_ifindex` (0: none). With
/// `live_batch`, frames are really transmitted (XDP live frames mode,
/// `repeat` frames in batches of that size).
pub fn test_run(
    prog_fd: i32,
    frame: &[u8],
    ingress_ifindex: u32,
    repeat: u32,
    live_batch: Option<u32>,
) -> Result<RunResult> {
    let ctx: Vec<u8> = [0u32, frame.len() as u32, 0, ingress_ifindex, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    let mut out = vec![0u8; frame.len() + 512];
    let mut attr = [0u64; 16];
    // struct { prog_fd, retval, data_size_in, data_size_out; data_in; data_out;
    //   repeat, duration; ctx_size_in, ctx_size_out; ctx_in; ctx_out; flags, cpu; batch_size }
    put_u32(&mut attr, 0, prog_fd as u32);
    put_u32(&mut attr, 8, frame.len() as u32);
    attr[2] = frame.as_ptr() as u64;
    put_u32(&mut attr, 32, repeat);
    put_u32(&mut attr, 40, ctx.len() as u32);
    attr[6] = ctx.as_ptr() as u64;
    if let Some(batch) = live_batch {
        put_u32(&mut attr, 64, BPF_F_TEST_XDP_LIVE_FRAMES);
        put_u32(&mut attr, 72, batch);
    } else {
        put_u32(&mut attr, 12, out.len() as u32);
        attr[3] = out.as_mut_ptr() as u64;
    }
    bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    let retval = (attr[0] >> 32) as u32;
    let duration_ns = (attr[4] >> 32) as u32;
    Ok(RunResult {
        retval,
        duration_ns,
    })
}
