fn main() {
    println!("{} bytes of eBPF", forwarder::EBPF_OBJECT.len());
}
