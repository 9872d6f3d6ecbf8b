//! Quarantine responder.
