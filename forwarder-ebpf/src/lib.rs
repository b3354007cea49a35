//! Host-side placeholder so the userspace crate can depend on this package for
//! rebuild tracking (as aya-template does); the programs are in `main.rs`.
#![no_std]
