//! The programs call kernel functions (kfuncs: the nf_conntrack lookups of
//! `forwarder-ebpf/src/kernel_ct.rs`). Rust does not emit the BTF that
//! describes such extern calls, so aya cannot resolve them; this does, on
//! a copy of the object, before aya sees it: each `call` to an undefined
//! symbol becomes a kfunc call (`src_reg` BPF_PSEUDO_KFUNC_CALL, `imm` the
//! function's id in the kernel's BTF). A kfunc the kernel does not have
//! (older than 6.0, nf_conntrack built as a module, no BTF) becomes
//! `r0 = 0`: its caller then reads "nothing found", a safe answer for a
//! lookup whose hit only makes us leave a flow to the kernel.
use std::collections::BTreeMap;

use anyhow::{bail, Context as _, Result};
use aya_obj::btf::{Btf, BtfKind};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

/// `BPF_JMP | BPF_CALL`.
const CALL: u8 = 0x85;
const PSEUDO_CALL: u8 = 1;
const PSEUDO_KFUNC_CALL: u8 = 2;
/// `BPF_ALU64 | BPF_MOV | BPF_K` into r0.
const MOV64_IMM: u8 = 0xb7;

/// Which kfuncs the kernel resolved (true) or lacks (false).
pub type Resolved = BTreeMap<String, bool>;

/// The embedded object with its kfunc calls resolved for this kernel.
pub fn prepared_object() -> Result<(Vec<u8>, Resolved)> {
    let kernel = Btf::from_sys_fs().ok();
    resolve(crate::EBPF_OBJECT, |name| {
        kernel
            .as_ref()
            .and_then(|btf| btf.id_by_type_name_kind(name, BtfKind::Func).ok())
    })
}

/// Rewrites every call to an undefined symbol of `elf` with the BTF id
/// `lookup` gives for its name, or into `r0 = 0` where it gives none.
pub fn resolve(elf: &[u8], lookup: impl Fn(&str) -> Option<u32>) -> Result<(Vec<u8>, Resolved)> {
    let mut patched = elf.to_vec();
    let mut resolved = Resolved::new();
    let mut patches: Vec<(usize, String, Option<u32>)> = Vec::new();
    {
        let file = object::File::parse(elf).context("parsing the eBPF object")?;
        for section in file.sections() {
            let Some((section_off, _)) = section.file_range() else {
                continue;
            };
            for (rel_off, rel) in section.relocations() {
                let RelocationTarget::Symbol(index) = rel.target() else {
                    continue;
                };
                let symbol = file.symbol_by_index(index).context("relocation symbol")?;
                if !symbol.is_undefined() {
                    continue;
                }
                let name = symbol.name().context("relocation symbol name")?.to_string();
                let id = lookup(&name);
                resolved.insert(name.clone(), id.is_some());
                patches.push(((section_off + rel_off) as usize, name, id));
            }
        }
    }
    for (off, name, id) in patches {
        let Some(insn) = patched.get_mut(off..off + 8) else {
            bail!("the call to {name} lies outside the object");
        };
        if insn[0] != CALL || insn[1] >> 4 != PSEUDO_CALL {
            bail!("the reference to {name} is not a call: {insn:02x?}");
        }
        match id {
            Some(id) => {
                insn[1] = (PSEUDO_KFUNC_CALL << 4) | (insn[1] & 0x0f);
                // off 0: the function is in vmlinux's BTF.
                insn[2..4].copy_from_slice(&0i16.to_le_bytes());
                insn[4..8].copy_from_slice(&id.to_le_bytes());
            }
            None => {
                insn.copy_from_slice(&[MOV64_IMM, 0, 0, 0, 0, 0, 0, 0]);
            }
        }
    }
    Ok((patched, resolved))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kfunc_calls(elf: &[u8]) -> Vec<[u8; 8]> {
        let file = object::File::parse(elf).unwrap();
        let mut out = Vec::new();
        for section in file.sections() {
            let Some((section_off, _)) = section.file_range() else {
                continue;
            };
            for (rel_off, rel) in section.relocations() {
                if let RelocationTarget::Symbol(i) = rel.target() {
                    if file.symbol_by_index(i).unwrap().is_undefined() {
                        let at = (section_off + rel_off) as usize;
                        out.push(elf[at..at + 8].try_into().unwrap());
                    }
                }
            }
        }
        out
    }

    #[test]
    fn the_object_calls_the_conntrack_kfuncs_and_they_are_resolved_or_stubbed() {
        let (_, names) = resolve(crate::EBPF_OBJECT, |_| None).unwrap();
        for kfunc in ["bpf_xdp_ct_lookup", "bpf_skb_ct_lookup", "bpf_ct_release"] {
            assert!(names.contains_key(kfunc), "{kfunc} not called: {names:?}");
        }
        let (stubbed, _) = resolve(crate::EBPF_OBJECT, |_| None).unwrap();
        for insn in kfunc_calls(&stubbed) {
            assert_eq!(insn, [MOV64_IMM, 0, 0, 0, 0, 0, 0, 0]);
        }
        let (linked, _) = resolve(crate::EBPF_OBJECT, |name| Some(name.len() as u32)).unwrap();
        for insn in kfunc_calls(&linked) {
            assert_eq!(insn[0], CALL);
            assert_eq!(insn[1] >> 4, PSEUDO_KFUNC_CALL);
            assert!(u32::from_le_bytes(insn[4..8].try_into().unwrap()) > 0);
        }
    }
}
