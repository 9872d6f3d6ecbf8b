//! The API's request parsing, as the Unix-socket server does it for each request: the alert
//! query string (`/v1/alerts?...`) and the operator request body of the quarantine routes (the
//! first byte picks which). A parsed query prints back to a query string that parses to the same
//! query; a body is a request or a bad-request message; never a panic.
#![no_main]

#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::api_request(data));
