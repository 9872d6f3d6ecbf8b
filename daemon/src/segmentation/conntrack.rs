//! The user side of the datapath's connection tracking: its settings (`--established-flows`,
//! idle timeouts per state) and the policy generation that strict mode judges entries against.
//!
//! The kernel side (`probes-ebpf/src/datapath.rs`, `policy`) keeps one SEG_CONNTRACK entry per
//! normalized 5-tuple: which (orientation, hook) allowed it, its TCP state (SYN, established,
//! closing after a RST or a FIN from each side), when it was last seen, and the policy generation
//! each side's bits were judged under. A TCP SYN never passes on an entry (a closed 5-tuple
//! reused later is judged as a new connection); an entry idle past its state's timeout is
//! forgotten; in strict mode an entry of an older generation is judged again on its next packet,
//! so after a policy change the flows the new policy does not allow stop at their next packet.
//!
//! Per-pod accounting: SEG_CONNTRACK is a hash map, not an LRU, so no flow's entry is ever
//! evicted to make room for another's. Each new key is charged to the pod whose hook created it
//! (SEG_CT_PODS), within a quota (`--conntrack-per-pod`, default 16,384 of 262,144); a pod over
//! its quota has its own new flows refused (counted, `conntrack_full` drop records), and other
//! pods' connections, open or new, are untouched. Expired entries are removed by the [`Sweeper`]:
//! it reads the table, and hands the keys it finds expired to the `seg_ct_sweep` program, which
//! checks them again with the datapath's clock, removes them and uncharges their owners (the
//! counts stay exact: only the kernel writes them).

use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::path::Path;

use aya::Ebpf;
use aya::maps::{Array, HashMap, Map, MapData, MapType};
use aya::programs::SocketFilter;
use palisade_common::{
    CT_DEFAULT_OTHER_S, CT_DEFAULT_PER_ENDPOINT_MAX, CT_DEFAULT_TCP_CLOSING_S, CT_DEFAULT_TCP_ESTABLISHED_S,
    CT_DEFAULT_TCP_SYN_S, CT_SWEEP_BATCH, CtConfig, CtKey, CtPodUsage, CtValue, ESTABLISHED_FLOWS_KEEP,
    ESTABLISHED_FLOWS_STRICT, MAP_SEG_CONNTRACK, MAP_SEG_CT_CONFIG, MAP_SEG_CT_PODS, PROG_SEG_CT_SWEEP, ct_timeout_s,
};
use serde::Serialize;

use super::datapath::{DatapathError, program};

/// What a policy change does to flows that are already open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EstablishedFlows {
    /// Judged again under the new policy at their next packet; those it does not allow stop.
    #[default]
    Strict,
    /// Connection-setup-only: a flow allowed when it opened stays allowed until it closes or
    /// idles out.
    Keep,
}

impl EstablishedFlows {
    fn wire(self) -> u32 {
        match self {
            EstablishedFlows::Strict => ESTABLISHED_FLOWS_STRICT,
            EstablishedFlows::Keep => ESTABLISHED_FLOWS_KEEP,
        }
    }
}

/// Idle timeouts per conntrack state, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CtTimeouts {
    /// TCP after an allowed SYN, before anything was acknowledged.
    pub tcp_syn_s: u32,
    pub tcp_established_s: u32,
    /// TCP after a RST or a FIN from each side.
    pub tcp_closing_s: u32,
    /// UDP, SCTP, ICMP and everything else.
    pub other_s: u32,
}

impl Default for CtTimeouts {
    fn default() -> CtTimeouts {
        CtTimeouts {
            tcp_syn_s: CT_DEFAULT_TCP_SYN_S,
            tcp_established_s: CT_DEFAULT_TCP_ESTABLISHED_S,
            tcp_closing_s: CT_DEFAULT_TCP_CLOSING_S,
            other_s: CT_DEFAULT_OTHER_S,
        }
    }
}

/// The kernel refreshes an entry's last-seen time at most once a second, so shorter timeouts
/// would forget busy flows.
pub const MIN_TIMEOUT_S: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ConntrackSettings {
    pub established_flows: EstablishedFlows,
    pub timeouts: CtTimeouts,
    /// Entries one pod may hold.
    pub per_pod: u32,
}

impl Default for ConntrackSettings {
    fn default() -> ConntrackSettings {
        ConntrackSettings {
            established_flows: EstablishedFlows::Strict,
            timeouts: CtTimeouts::default(),
            per_pod: CT_DEFAULT_PER_ENDPOINT_MAX,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("conntrack timeout {field} = {value} s is below the minimum of {MIN_TIMEOUT_S} s")]
    TimeoutTooShort { field: &'static str, value: u32 },
    #[error("--conntrack-per-pod must be at least 1")]
    ZeroQuota,
    #[error("conntrack sweeper: {0}")]
    Sweep(String),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

impl ConntrackSettings {
    pub fn validate(&self) -> Result<(), ConntrackError> {
        let t = &self.timeouts;
        for (field, value) in [
            ("tcp_syn_s", t.tcp_syn_s),
            ("tcp_established_s", t.tcp_established_s),
            ("tcp_closing_s", t.tcp_closing_s),
            ("other_s", t.other_s),
        ] {
            if value < MIN_TIMEOUT_S {
                return Err(ConntrackError::TimeoutTooShort { field, value });
            }
        }
        if self.per_pod == 0 {
            return Err(ConntrackError::ZeroQuota);
        }
        Ok(())
    }
}

fn config_map(bpf: &mut Ebpf) -> Result<Array<&mut MapData, CtConfig>, DatapathError> {
    Array::try_from(bpf.map_mut(MAP_SEG_CT_CONFIG).ok_or(DatapathError::MissingMap { name: MAP_SEG_CT_CONFIG })?)
        .map_err(|source| DatapathError::Map { name: MAP_SEG_CT_CONFIG, source })
}

fn map_err(source: aya::maps::MapError) -> DatapathError {
    DatapathError::Map { name: MAP_SEG_CT_CONFIG, source }
}

/// What SEG_CT_CONFIG holds (zeros before anything was written: strict, default timeouts).
pub fn read_config(bpf: &mut Ebpf) -> Result<CtConfig, DatapathError> {
    config_map(bpf)?.get(&0, 0).map_err(map_err)
}

/// Writes the settings, keeping the policy generation.
pub fn configure(bpf: &mut Ebpf, settings: &ConntrackSettings) -> Result<(), ConntrackError> {
    settings.validate()?;
    let mut map = config_map(bpf)?;
    let mut cfg = map.get(&0, 0).map_err(map_err)?;
    cfg.established_flows = settings.established_flows.wire();
    cfg.tcp_syn_s = settings.timeouts.tcp_syn_s;
    cfg.tcp_established_s = settings.timeouts.tcp_established_s;
    cfg.tcp_closing_s = settings.timeouts.tcp_closing_s;
    cfg.other_s = settings.timeouts.other_s;
    cfg.per_endpoint_max = settings.per_pod;
    map.set(0, cfg, 0).map_err(map_err)?;
    Ok(())
}

/// Starts a new policy generation: in strict mode every entry is judged again at its next packet.
/// Called after each sync that changed the policy maps (once their new contents are complete).
pub fn bump_policy_generation(bpf: &mut Ebpf) -> Result<u32, DatapathError> {
    let mut map = config_map(bpf)?;
    let mut cfg = map.get(&0, 0).map_err(map_err)?;
    cfg.policy_generation = cfg.policy_generation.wrapping_add(1);
    map.set(0, cfg, 0).map_err(map_err)?;
    Ok(cfg.policy_generation)
}

/// Removes a pinned conntrack map whose key or value layout is not this build's (a daemon
/// upgraded across a layout change would otherwise fail to load its programs). Conntrack is soft
/// state: the new map starts empty and open flows are judged by the policy again. Returns the
/// names of the maps removed.
pub fn drop_incompatible_pins(dir: &Path) -> Vec<&'static str> {
    let mut dropped = Vec::new();
    // (name, type, key size, value size, max entries when it must match too)
    let expected = [
        (MAP_SEG_CONNTRACK, MapType::Hash, std::mem::size_of::<CtKey>() as u32, std::mem::size_of::<CtValue>() as u32, None),
        (MAP_SEG_CT_PODS, MapType::LruHash, 4, std::mem::size_of::<CtPodUsage>() as u32, None),
        // Counters only: a table of an older count of counters is replaced (they restart at 0).
        (palisade_common::MAP_SEG_COUNTERS, MapType::PerCpuArray, 4, 8, Some(palisade_common::CNT_COUNT)),
    ];
    for (name, map_type, key_size, value_size, max_entries) in expected {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = match MapData::from_pin(&path).and_then(|map| map.info()) {
            Ok(info) => info,
            Err(err) => {
                // Left in place: loading reports it with the path.
                tracing::warn!(path = %path.display(), %err, "reading a pinned conntrack map");
                continue;
            }
        };
        let same_type = info.map_type().map(|t| t == map_type).unwrap_or(false);
        let same_size = max_entries.is_none_or(|m| info.max_entries() == m);
        if !same_type || info.key_size() != key_size || info.value_size() != value_size || !same_size {
            tracing::warn!(
                path = %path.display(),
                key_size = info.key_size(),
                value_size = info.value_size(),
                "pinned datapath map has an older layout: replaced by an empty one"
            );
            match std::fs::remove_file(&path) {
                Ok(()) => dropped.push(name),
                Err(err) => tracing::error!(path = %path.display(), %err, "removing an incompatible pinned map"),
            }
        }
    }
    dropped
}

/// One pod's conntrack accounting, as the kernel counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PodUsage {
    pub entries: u64,
    pub quota_drops: u64,
    pub table_full_drops: u64,
}

/// What one sweep did and saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SweepStats {
    /// Entries in the table when it was read.
    pub entries: u64,
    /// Expired entries removed.
    pub removed: u64,
    /// Sweep-program runs that failed (each logged).
    pub errors: u64,
    pub elapsed_ms: f64,
}

/// Removes expired conntrack entries and reads the per-pod counts, with its own handles on the
/// maps and the sweep program (so it can run on its own thread, never holding up the eBPF owner).
pub struct Sweeper {
    conntrack: HashMap<MapData, CtKey, CtValue>,
    /// The same map, for batched reads (BPF_MAP_LOOKUP_BATCH).
    conntrack_fd: OwnedFd,
    pods: HashMap<MapData, u32, CtPodUsage>,
    config: Array<MapData, CtConfig>,
    program: OwnedFd,
}

fn dup_map(bpf: &Ebpf, name: &'static str) -> Result<MapData, DatapathError> {
    let map = bpf.map(name).ok_or(DatapathError::MissingMap { name })?;
    let fd = match map {
        Map::HashMap(m) | Map::LruHashMap(m) | Map::Array(m) => m.fd().as_fd().try_clone_to_owned(),
        _ => return Err(DatapathError::Map { name, source: aya::maps::MapError::InvalidName { name: name.to_string() } }),
    }
    .map_err(|e| DatapathError::Pin { path: name.into(), message: format!("duplicating the map fd: {e}") })?;
    MapData::from_fd(fd).map_err(|source| DatapathError::Map { name, source })
}

impl Sweeper {
    /// Loads the sweep program (once) and takes its own handles on the maps.
    pub fn new(bpf: &mut Ebpf) -> Result<Sweeper, DatapathError> {
        let name = PROG_SEG_CT_SWEEP;
        let prog: &mut SocketFilter = program(bpf, name)?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        let program = prog
            .fd()
            .map_err(|source| DatapathError::Program { name, source })?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| DatapathError::Pin { path: name.into(), message: format!("duplicating the program fd: {e}") })?;
        let conntrack_data = dup_map(bpf, MAP_SEG_CONNTRACK)?;
        let conntrack_fd = conntrack_data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| DatapathError::Pin { path: MAP_SEG_CONNTRACK.into(), message: format!("duplicating the map fd: {e}") })?;
        let conntrack = HashMap::try_from(Map::HashMap(conntrack_data))
            .map_err(|source| DatapathError::Map { name: MAP_SEG_CONNTRACK, source })?;
        let pods = HashMap::try_from(Map::LruHashMap(dup_map(bpf, MAP_SEG_CT_PODS)?))
            .map_err(|source| DatapathError::Map { name: MAP_SEG_CT_PODS, source })?;
        let config = Array::try_from(Map::Array(dup_map(bpf, MAP_SEG_CT_CONFIG)?))
            .map_err(|source| DatapathError::Map { name: MAP_SEG_CT_CONFIG, source })?;
        Ok(Sweeper { conntrack, conntrack_fd, pods, config, program })
    }

    /// One pass: reads every entry, and has the kernel remove the ones idle past their timeout.
    pub fn sweep(&mut self) -> SweepStats {
        let started = std::time::Instant::now();
        let mut stats = SweepStats::default();
        let cfg = self.config.get(&0, 0).unwrap_or_default();
        let now = coarse_monotonic_ns();
        let mut expired: Vec<CtKey> = Vec::new();
        let mut consider = |key: CtKey, value: CtValue| {
            stats.entries += 1;
            let timeout_ns = u64::from(ct_timeout_s(&cfg, value.state)) * 1_000_000_000;
            if now.saturating_sub(value.last_seen_ns) > timeout_ns {
                expired.push(key);
            }
        };
        // Batched (thousands of entries per system call); one entry per call where the kernel
        // has no batch operations for this map.
        if let Err(err) = read_batched(&self.conntrack_fd, &mut consider) {
            tracing::debug!(%err, "batched conntrack read unavailable, reading entry by entry");
            for kv in self.conntrack.iter() {
                let Ok((key, value)) = kv else { continue };
                consider(key, value);
            }
        }
        for batch in expired.chunks(CT_SWEEP_BATCH as usize) {
            match run_sweep_program(&self.program, batch) {
                Ok(removed) => stats.removed += u64::from(removed),
                Err(err) => {
                    stats.errors += 1;
                    tracing::error!(%err, "conntrack sweep program run failed");
                }
            }
        }
        stats.elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        stats
    }

    /// Every pod's counts, by endpoint id.
    pub fn usage(&self) -> Vec<(u32, PodUsage)> {
        self.pods
            .iter()
            .filter_map(Result::ok)
            .map(|(id, u)| {
                (id, PodUsage { entries: u.entries.max(0) as u64, quota_drops: u.quota_drops, table_full_drops: u.table_full_drops })
            })
            .collect()
    }
}

/// What status shows about connection tracking (kept up to date by the sweeper thread).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConntrackStatus {
    pub settings: ConntrackSettings,
    pub table_size: u32,
    pub sweep_interval_s: u64,
    pub sweeps: u64,
    pub last_sweep: Option<SweepStats>,
    /// Every pod the kernel keeps counts for, by endpoint id.
    pub pods: Vec<(u32, PodUsage)>,
}

/// Sweeps every `interval` on its own thread for the daemon's lifetime; returns the status it
/// keeps current.
pub fn spawn_sweeper(
    mut sweeper: Sweeper,
    settings: ConntrackSettings,
    interval: std::time::Duration,
) -> std::io::Result<std::sync::Arc<std::sync::Mutex<ConntrackStatus>>> {
    let status = std::sync::Arc::new(std::sync::Mutex::new(ConntrackStatus {
        settings,
        table_size: palisade_common::SEG_MAX_CONNTRACK,
        sweep_interval_s: interval.as_secs(),
        ..ConntrackStatus::default()
    }));
    let shared = status.clone();
    std::thread::Builder::new().name("ct-sweeper".into()).spawn(move || {
        loop {
            std::thread::sleep(interval);
            let stats = sweeper.sweep();
            let pods = sweeper.usage();
            if let Ok(mut status) = shared.lock() {
                status.sweeps += 1;
                status.last_sweep = Some(stats);
                status.pods = pods;
            }
        }
    })?;
    Ok(status)
}

/// Reads every entry of a conntrack map with BPF_MAP_LOOKUP_BATCH. An error on the first call
/// (nothing handed over yet, e.g. a kernel without batch operations) is returned for the caller
/// to fall back; a later one ends this pass with what was read (logged; the next pass retries).
fn read_batched(map: &OwnedFd, each: &mut impl FnMut(CtKey, CtValue)) -> std::io::Result<()> {
    const CHUNK: usize = 4096;
    let mut keys = vec![CtKey::default(); CHUNK];
    let mut values = vec![CtValue::default(); CHUNK];
    // The hash map's batch token is a bucket index (u32); 8 bytes leave room.
    let mut in_batch = [0u8; 8];
    let mut out_batch = [0u8; 8];
    let mut first = true;
    loop {
        // union bpf_attr, batch member: in_batch, out_batch, keys, values (u64 pointers),
        // count (u32, in/out), map_fd (u32), elem_flags, flags (u64).
        let mut attr = [0u8; 56];
        let in_ptr = if first { 0 } else { in_batch.as_ptr() as u64 };
        attr[0..8].copy_from_slice(&in_ptr.to_ne_bytes());
        attr[8..16].copy_from_slice(&(out_batch.as_mut_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(keys.as_mut_ptr() as u64).to_ne_bytes());
        attr[24..32].copy_from_slice(&(values.as_mut_ptr() as u64).to_ne_bytes());
        attr[32..36].copy_from_slice(&(CHUNK as u32).to_ne_bytes());
        attr[36..40].copy_from_slice(&(map.as_raw_fd() as u32).to_ne_bytes());
        // SAFETY: attr is a valid bpf_attr for BPF_MAP_LOOKUP_BATCH; the key and value buffers
        // hold `count` repr(C) entries of the map's key and value sizes, and outlive the call.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, 24 /* BPF_MAP_LOOKUP_BATCH */, attr.as_mut_ptr(), attr.len()) };
        let err = (rc != 0).then(std::io::Error::last_os_error);
        let count = (u32::from_ne_bytes([attr[32], attr[33], attr[34], attr[35]]) as usize).min(CHUNK);
        for i in 0..count {
            each(keys[i], values[i]);
        }
        match err {
            None => {}
            // ENOENT: the last batch (possibly empty) was read.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Some(e) if first && count == 0 => return Err(e),
            Some(e) => {
                tracing::warn!(%e, "batched conntrack read stopped part way; the next sweep reads again");
                return Ok(());
            }
        }
        in_batch = out_batch;
        first = false;
    }
}

/// CLOCK_MONOTONIC_COARSE, the clock `bpf_ktime_get_coarse_ns` reads.
fn coarse_monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// BPF_PROG_TEST_RUN of the sweep program on a batch of keys; returns how many it removed.
fn run_sweep_program(program: &OwnedFd, keys: &[CtKey]) -> std::io::Result<u32> {
    // A 14-byte Ethernet header (the kernel strips it for socket filters), then the keys.
    let mut data = vec![0u8; 14 + std::mem::size_of_val(keys)];
    data[12] = 0x08; // ethertype IPv4: any value the test run accepts
    for (i, key) in keys.iter().enumerate() {
        let at = 14 + i * std::mem::size_of::<CtKey>();
        // SAFETY: CtKey is repr(C) plain bytes with explicit padding; read as bytes.
        let bytes = unsafe { std::slice::from_raw_parts((key as *const CtKey).cast::<u8>(), std::mem::size_of::<CtKey>()) };
        data[at..at + bytes.len()].copy_from_slice(bytes);
    }
    // union bpf_attr, test member: prog_fd, retval, data_size_in, data_size_out, data_in,
    // data_out, repeat, duration, ... (the kernel zero-checks the tail).
    let mut attr = [0u8; 80];
    attr[0..4].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&(data.len() as u32).to_ne_bytes());
    attr[16..24].copy_from_slice(&(data.as_ptr() as u64).to_ne_bytes());
    attr[32..36].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: attr is a valid bpf_attr for BPF_PROG_TEST_RUN; data outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 10 /* BPF_PROG_TEST_RUN */, attr.as_mut_ptr(), attr.len()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u32::from_ne_bytes([attr[4], attr[5], attr[6], attr[7]]))
}

#[cfg(test)]
mod tests {
    use palisade_common::{
        CT_FIN_HI, CT_FIN_LO, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_OTHER, CT_STATE_SYN, PROTO_TCP, PROTO_UDP,
        TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ct_next_state, ct_timeout_s,
    };

    use super::*;

    #[test]
    fn tcp_states_follow_syn_fin_rst() {
        let tcp = |state, fin, flags, from_lo| ct_next_state(state, fin, PROTO_TCP, flags, from_lo);
        assert_eq!(tcp(0, 0, TCP_SYN, true), (CT_STATE_SYN, 0));
        assert_eq!(tcp(CT_STATE_SYN, 0, TCP_SYN | TCP_ACK, false), (CT_STATE_ESTABLISHED, 0));
        assert_eq!(tcp(0, 0, TCP_ACK, true), (CT_STATE_ESTABLISHED, 0), "picked up mid-stream");
        // One FIN: half-closed, still established; the other side's FIN closes.
        assert_eq!(tcp(CT_STATE_ESTABLISHED, 0, TCP_FIN | TCP_ACK, true), (CT_STATE_ESTABLISHED, CT_FIN_LO));
        assert_eq!(tcp(CT_STATE_ESTABLISHED, CT_FIN_LO, TCP_FIN | TCP_ACK, true), (CT_STATE_ESTABLISHED, CT_FIN_LO));
        assert_eq!(tcp(CT_STATE_ESTABLISHED, CT_FIN_LO, TCP_FIN | TCP_ACK, false), (CT_STATE_CLOSING, CT_FIN_LO | CT_FIN_HI));
        // The last ACK keeps it closing.
        assert_eq!(tcp(CT_STATE_CLOSING, CT_FIN_LO | CT_FIN_HI, TCP_ACK, true).0, CT_STATE_CLOSING);
        assert_eq!(tcp(CT_STATE_ESTABLISHED, 0, TCP_RST, false).0, CT_STATE_CLOSING);
        assert_eq!(tcp(CT_STATE_SYN, 0, TCP_RST | TCP_ACK, false).0, CT_STATE_CLOSING);
        assert_eq!(ct_next_state(0, 0, PROTO_UDP, 0, true), (CT_STATE_OTHER, 0));
    }

    #[test]
    fn timeouts_default_per_state_and_reject_too_short() {
        let cfg = CtConfig::default();
        assert_eq!(ct_timeout_s(&cfg, CT_STATE_SYN), CT_DEFAULT_TCP_SYN_S);
        assert_eq!(ct_timeout_s(&cfg, CT_STATE_ESTABLISHED), CT_DEFAULT_TCP_ESTABLISHED_S);
        assert_eq!(ct_timeout_s(&cfg, CT_STATE_CLOSING), CT_DEFAULT_TCP_CLOSING_S);
        assert_eq!(ct_timeout_s(&cfg, CT_STATE_OTHER), CT_DEFAULT_OTHER_S);
        let cfg = CtConfig { tcp_established_s: 5, ..CtConfig::default() };
        assert_eq!(ct_timeout_s(&cfg, CT_STATE_ESTABLISHED), 5);
        let short = ConntrackSettings { timeouts: CtTimeouts { tcp_closing_s: 1, ..CtTimeouts::default() }, ..Default::default() };
        let err = short.validate().expect_err("1 s is too short");
        assert!(err.to_string().contains("tcp_closing_s = 1"), "{err}");
        assert!(ConntrackSettings::default().validate().is_ok());
    }
}
