pub static EBPF_OBJECT: &[u8] = &[];
