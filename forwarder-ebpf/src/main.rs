//! forwarder's datapath: NodePort translation at XDP, with tc ingress where
//! the packet needs an skb (delivery into a local pod, unresolved neighbours,
//! replies leaving local pods).
//!
//! Both hooks run the same pipeline (`pipeline`): parse -> conntrack lookup,
//! or for a new flow lookup_frontend -> select_backend -> route (fib) ->
//! conntrack commit -> rewrite -> forward. Each returns its verdict from one
//! place and counts why.
#![no_std]
#![no_main]

mod conntrack;
mod fib;
mod icmp;
mod kernel_ct;
mod maps;
mod nat;
mod parse;
mod pipeline;
mod select;
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
