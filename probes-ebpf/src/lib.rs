#![no_std]
//! Host-side library target so the daemon can name this crate as a build-dependency.
