//! The API's request parsing, as the Unix-socket server does it for each request: the alert
//! query string (`/v1/alerts?...`) and the operator request body of the quarantine routes (the
//! first byte picks which). A parsed query prints back to a query string that parses to the same
//! query; a body is a request or a bad-request message; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade::alerts::query::AlertQuery;
use palisade::api::server::parse_operator_body;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    if which % 2 == 0 {
        let Ok(query) = std::str::from_utf8(rest) else { return };
        if let Ok(parsed) = AlertQuery::from_query_string(query, 1_700_000_000_000_000) {
            let again = AlertQuery::from_query_string(&parsed.to_query_string(), 1_700_000_000_000_000)
                .expect("a printed query parses");
            assert_eq!(format!("{parsed:?}"), format!("{again:?}"), "query string round trip");
        }
    } else if let Ok(request) = parse_operator_body(rest, 0, Some(1)) {
        assert!(!request.reason.trim().is_empty());
        assert!(!request.namespace.is_empty() && !request.name.is_empty());
    }
});
