//! The alert log reader on any file content (corrupt, truncated, not UTF-8, huge lines): every
//! line is an alert or a counted bad line, never a panic.
#![no_main]

#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::alert_log(data));
