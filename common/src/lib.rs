//! Wire types shared by palisade's eBPF programs and the daemon.
//!
//! Rules for everything in this crate (see DESIGN.md, "Wire types"):
//! `#[repr(C)]`, fixed-width integers, explicit padding fields, no `bool` and no Rust enums on the
//! wire (kinds are `u32` constants, converted with `TryFrom` on the user side), and a compile-time
//! size assertion per type. User space decodes ring-buffer records by checking the length and
//! reading unaligned; it never transmutes.
#![no_std]

pub mod event;
pub mod maps;
pub mod net;

pub use event::*;
pub use maps::*;
pub use net::*;


/// Compile-time size check: a wire type whose layout drifts fails the build on both sides.
#[macro_export]
macro_rules! assert_wire_size {
    ($ty:ty, $size:expr) => {
        const _: () = assert!(core::mem::size_of::<$ty>() == $size);
    };
}
