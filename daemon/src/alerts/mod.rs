//! Alert stream.
