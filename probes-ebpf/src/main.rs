//! palisade's eBPF programs. One file per event family; each program is a thin wrapper over a
//! `try_*` function. Every emitted record starts with `EventHeader` (palisade-common).
#![no_std]
#![no_main]
#![allow(static_mut_refs)]
// Atomic adds on shared map values (the bpfel target's core has no atomic read-modify-write
// methods): datapath.rs `atomic_add`.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod common;
mod datapath;
mod escape;
mod kprobes;
mod process;
mod syscalls;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists only for the linker.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
