//! Daemon configuration: defaults, the optional config file, and command-line overrides.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/palisade";
