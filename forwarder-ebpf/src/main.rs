//! forwarder's datapath: NodePort translation at XDP, with tc ingress where
//! the packet needs an skb (delivery into a local pod, unresolved neighbours,
//! replies leaving local pods).
//!
//! Both hooks run the same pipeline: parse -> conntrack/frontend lookup ->
//! route (fib) -> rewrite -> forward. Each returns its verdict from one place
//! and counts why.
#![no_std]
#![no_main]

mod conntrack;
mod fib;
mod maps;
mod nat;
mod parse;
mod stats;
mod tc;
mod verdict;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
