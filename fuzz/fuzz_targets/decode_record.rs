//! The ring-buffer record decoder on any bytes, every event kind: the first byte picks the kind
//! written into the header, the second whether the record keeps its length (truncated or
//! oversized) or is cut to the kind's exact wire size, so both the length checks and every
//! kind's field decoding are reached. An error or an event, never a panic.
#![no_main]

#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::decode_record(data));
