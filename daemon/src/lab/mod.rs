//! The lab: local pods (network namespace + veth into a lab bridge + cgroup) for one host.
//!
//! Every inventory endpoint becomes a pod: its own network namespace with `eth0` carrying the
//! endpoint's addresses, the other end of the veth on a bridge that lives in a dedicated lab
//! network namespace (never the host's, never routed out), and its own cgroup v2 directory, so
//! the datapath's cgroup_skb programs see the pod's traffic exactly as they would a real pod's.
//!
//! What a lab creates is written to a state file before it is created, so [`down`] cleans up
//! after crashes; names carry the lab name so labs (and parallel tests) coexist.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::net::IpAddr;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::inventory::{Endpoint, Inventory, Protocol};

mod cgroup;
pub mod cli;
pub mod naming;
mod netns;
pub mod probe;
pub mod state;

pub use cgroup::{cgroup2_mount, cgroup_id};
pub use naming::DEFAULT_LAB_NAME;
pub use probe::{ProbeMatrix, ProbeOptions, ProbeResult};
pub use state::{DEFAULT_STATE_DIR, PodRecord};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("invalid lab name: {0}")]
    InvalidName(String),
    #[error("no cgroup2 file system is mounted (see /proc/mounts)")]
    NoCgroup2,
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },
    #[error("lab state {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("pod {pod}: address {ip} is outside the lab ranges (198.18.0.0/15, 2001:db8::/32, fc00::/7)")]
    AddressOutsideLab { pod: String, ip: IpAddr },
    #[error("pods {first} and {second} would share the lab interface {interface}; rename one")]
    InterfaceClash { first: String, second: String, interface: String },
    #[error("cgroup {cgroup} of pod {pod} is already used by lab {other_lab}")]
    CgroupInUse { pod: String, cgroup: String, other_lab: String },
    #[error("lab {lab} has no pod {pod} (pods are NAMESPACE/NAME)")]
    NoSuchPod { lab: String, pod: String },
    #[error("no lab named {0} (no state file; run `palisade lab up` first)")]
    NoSuchLab(String),
    #[error("{protocol} is not supported by this kernel: {source}")]
    ProtocolUnsupported {
        protocol: Protocol,
        #[source]
        source: std::io::Error,
    },
    #[error("probe: {0}")]
    Probe(String),
    #[error("{call} failed: {source}")]
    Sys {
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// How to bring a lab up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabOptions {
    /// Lab name: a DNS label without dots, at most 32 characters.
    pub name: String,
    /// Where state files live (default /run/palisade-lab).
    pub state_dir: PathBuf,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions { name: DEFAULT_LAB_NAME.to_string(), state_dir: PathBuf::from(DEFAULT_STATE_DIR) }
    }
}

impl LabOptions {
    pub fn named(name: &str) -> LabOptions {
        LabOptions { name: name.to_string(), ..LabOptions::default() }
    }
}

/// What `down` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownReport {
    pub netns_removed: Vec<String>,
    pub cgroups_removed: Vec<PathBuf>,
}

/// A running lab. Dropping it leaves the lab in place (the CLI's `up` must outlive the
/// process); use [`Lab::into_guard`] for a lab that goes away with its handle.
#[derive(Debug, Clone)]
pub struct Lab {
    state: state::LabState,
    state_dir: PathBuf,
}

/// The cgroup directory of an inventory endpoint (`<cgroup2 mount>/<endpoint.cgroup>`), if it
/// names one. The daemon reads the endpoint's cgroup id from it with [`cgroup_id`].
pub fn endpoint_cgroup_dir(endpoint: &Endpoint) -> Result<Option<PathBuf>, LabError> {
    let Some(relative) = &endpoint.cgroup else {
        return Ok(None);
    };
    Ok(Some(cgroup2_mount()?.join(relative.trim_start_matches('/'))))
}

impl Lab {
    /// Creates (or reconciles) a pod for every endpoint of `inventory`. Pods that already exist
    /// as described are kept; pods that differ are rebuilt; pods no longer in the inventory
    /// are removed.
    pub fn up(inventory: &Inventory, options: &LabOptions) -> Result<Lab, LabError> {
        let started = Instant::now();
        let lab = options.name.as_str();
        naming::validate_lab_name(lab).map_err(LabError::InvalidName)?;
        let mount = cgroup2_mount()?;
        let _lock = state::lock(&options.state_dir, lab)?;
        let mut lab_state = match state::load(&options.state_dir, lab)? {
            Some(existing) => existing,
            None => state::LabState::new(lab, naming::lab_netns(lab), mount.clone()),
        };
        lab_state.cgroup2_mount = mount.clone();

        let desired = desired_pods(lab, inventory)?;
        check_cgroups_free(&options.state_dir, lab, &desired)?;

        // Record intent before touching the kernel: a crash from here on leaves a state file
        // that names everything that might exist.
        let stale: Vec<PodRecord> =
            lab_state.pods.iter().filter(|p| !desired.iter().any(|d| d.key == p.key)).cloned().collect();
        let previous: BTreeMap<String, PodRecord> =
            lab_state.pods.iter().map(|p| (p.key.clone(), p.clone())).collect();
        for pod in &desired {
            lab_state.upsert_pod(pod.clone());
        }
        state::save(&options.state_dir, &lab_state)?;

        ensure_lab_netns(&lab_state.lab_netns)?;

        let v6_subnets: BTreeSet<String> = desired
            .iter()
            .flat_map(|p| &p.ips)
            .filter_map(|ip| match ip {
                IpAddr::V6(v6) => Some(naming::ipv6_subnet(*v6)),
                IpAddr::V4(_) => None,
            })
            .collect();
        let mut bridge_ports = Vec::new();
        for pod in &desired {
            let healthy = previous.get(&pod.key) == Some(pod) && pod_is_healthy(&lab_state.lab_netns, pod);
            if healthy {
                tracing::debug!(pod = %pod.key, netns = %pod.netns, "pod exists as described");
            } else {
                create_pod_netns(&lab_state.lab_netns, pod)?;
                bridge_ports.push(format!("link set {} master {}", pod.host_veth, naming::BRIDGE_NAME));
                bridge_ports.push(format!("link set {} up", pod.host_veth));
                tracing::info!(lab, pod = %pod.key, netns = %pod.netns, ips = ?pod.ips, "created pod");
            }
            if v6_subnets.len() > 1 {
                // Pods in different /64s are still on one segment: make the other /64s on-link.
                let routes: Vec<String> = v6_subnets
                    .iter()
                    // No "-6" here: `ip -batch` takes no options on its lines; the prefix says v6.
                    .map(|subnet| format!("route replace {subnet} dev {}", naming::POD_INTERFACE))
                    .collect();
                netns::batch(&pod.netns, &routes)?;
            }
            for created in cgroup::create(&mount, &pod.cgroup)? {
                lab_state.remember_created_cgroup(&created);
            }
        }
        netns::batch(&lab_state.lab_netns, &bridge_ports)?;
        state::save(&options.state_dir, &lab_state)?;

        for pod in stale {
            remove_pod(&mount, &pod)?;
            lab_state.pods.retain(|p| p.key != pod.key);
            tracing::info!(lab, pod = %pod.key, "removed pod no longer in the inventory");
        }
        state::save(&options.state_dir, &lab_state)?;
        tracing::info!(lab, pods = lab_state.pods.len(), elapsed_ms = started.elapsed().as_millis() as u64, "lab up");
        Ok(Lab { state: lab_state, state_dir: options.state_dir.clone() })
    }

    /// A handle on a lab that is already up (from its state file).
    pub fn open(name: &str, state_dir: &Path) -> Result<Lab, LabError> {
        naming::validate_lab_name(name).map_err(LabError::InvalidName)?;
        match state::load(state_dir, name)? {
            Some(lab_state) => Ok(Lab { state: lab_state, state_dir: state_dir.to_path_buf() }),
            None => Err(LabError::NoSuchLab(name.to_string())),
        }
    }

    pub fn name(&self) -> &str {
        &self.state.lab
    }

    /// The network namespace holding the lab bridge.
    pub fn lab_netns(&self) -> &str {
        &self.state.lab_netns
    }

    pub fn pods(&self) -> &[PodRecord] {
        &self.state.pods
    }

    /// The pod `namespace/name`.
    pub fn pod(&self, key: &str) -> Result<&PodRecord, LabError> {
        self.state
            .pod(key)
            .ok_or_else(|| LabError::NoSuchPod { lab: self.state.lab.clone(), pod: key.to_string() })
    }

    /// The cgroup directory of pod `namespace/name`.
    pub fn pod_cgroup_dir(&self, key: &str) -> Result<PathBuf, LabError> {
        Ok(self.state.cgroup2_mount.join(&self.pod(key)?.cgroup))
    }

    /// Path of the pod's network namespace (/run/netns/NAME).
    pub fn pod_netns_path(&self, key: &str) -> Result<PathBuf, LabError> {
        Ok(netns::netns_path(&self.pod(key)?.netns))
    }

    /// A command that runs `program` inside pod `key`: the child joins the pod's network
    /// namespace and cgroup between fork and exec, so everything it does is the pod's.
    pub fn exec(&self, key: &str, program: impl AsRef<OsStr>) -> Result<Command, LabError> {
        let pod = self.pod(key)?;
        let netns_fd = netns::open(&pod.netns)?;
        let procs_path = self.pod_cgroup_dir(key)?.join("cgroup.procs");
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .map_err(|source| LabError::Io { what: "open", path: procs_path, source })?;
        let mut command = Command::new(program);
        // SAFETY: the closure runs between fork and exec and only makes two syscalls on file
        // descriptors opened before the fork (both close-on-exec); nothing allocates or locks.
        unsafe {
            command.pre_exec(move || {
                // Writing "0" to cgroup.procs moves the writer itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(netns_fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command)
    }

    /// Connects from every pod to every address of every pod (itself included) on `port` with
    /// real packets, from inside the source pod's netns and cgroup to listeners inside the
    /// destination pod's netns and cgroup. Blocking; takes about one timeout when flows are
    /// denied.
    pub fn probe(&self, port: u16, protocol: Protocol) -> Result<ProbeMatrix, LabError> {
        self.probe_with(port, protocol, &ProbeOptions::default())
    }

    pub fn probe_with(&self, port: u16, protocol: Protocol, options: &ProbeOptions) -> Result<ProbeMatrix, LabError> {
        probe::run(self, port, protocol, options)
    }

    /// Removes everything the lab made.
    pub fn down(self) -> Result<DownReport, LabError> {
        down(&self.state.lab, &self.state_dir)
    }

    /// A handle that brings the lab down when dropped (tests).
    pub fn into_guard(self) -> LabGuard {
        LabGuard { lab: Some(self) }
    }
}

/// Removes lab `name`: every pod netns and cgroup in its state file (processes in them are
/// killed first), the lab namespace, and, as a fallback for a lost state file, any namespace
/// whose name carries the lab's prefix and the lab's default cgroup root.
pub fn down(name: &str, state_dir: &Path) -> Result<DownReport, LabError> {
    naming::validate_lab_name(name).map_err(LabError::InvalidName)?;
    let _lock = state::lock(state_dir, name)?;
    let lab_state = state::load(state_dir, name)?;
    let mount = match &lab_state {
        Some(s) => s.cgroup2_mount.clone(),
        None => cgroup2_mount()?,
    };
    let mut report = DownReport::default();
    let mut first_error = None;
    let mut note = |result: Result<(), LabError>| {
        if let Err(err) = result {
            tracing::warn!(lab = name, error = %err, "lab down: could not remove a resource");
            first_error.get_or_insert(err);
        }
    };
    if let Some(lab_state) = &lab_state {
        for pod in &lab_state.pods {
            if netns::exists(&pod.netns) {
                report.netns_removed.push(pod.netns.clone());
            }
            let dir = mount.join(&pod.cgroup);
            if dir.exists() {
                report.cgroups_removed.push(dir);
            }
            note(remove_pod(&mount, pod));
        }
    }
    let lab_netns = naming::lab_netns(name);
    let prefix = naming::pod_netns_prefix(name);
    for ns in netns::list() {
        if ns.starts_with(&prefix) {
            report.netns_removed.push(ns.clone());
            note(netns::delete(&ns));
        }
    }
    if netns::exists(&lab_netns) {
        report.netns_removed.push(lab_netns.clone());
        note(netns::delete(&lab_netns));
    }
    let default_root = mount.join(naming::default_cgroup_root(name));
    if default_root.exists() {
        report.cgroups_removed.push(default_root.clone());
        note(cgroup::kill_and_remove(&default_root));
    }
    if let Some(lab_state) = &lab_state {
        // Parents this lab created, and empty parents under the lab roots (`palisade-*`; a
        // parent another lab created is left empty when that lab goes first), deepest first.
        // rmdir never removes a cgroup that still has children or processes.
        let mut parents: BTreeSet<String> = lab_state.created_cgroups.iter().cloned().collect();
        for pod in &lab_state.pods {
            if pod.cgroup.starts_with("palisade-") {
                let mut parent = pod.cgroup.as_str();
                while let Some((up, _)) = parent.rsplit_once('/') {
                    parents.insert(up.to_string());
                    parent = up;
                }
            }
        }
        let mut parents: Vec<String> = parents.into_iter().collect();
        parents.sort_by_key(|c| std::cmp::Reverse(c.matches('/').count()));
        for relative in parents {
            cgroup::remove_if_empty(&mount.join(relative));
        }
    }
    cgroup::remove_if_empty(&mount.join("palisade-lab"));
    if let Some(err) = first_error {
        return Err(err);
    }
    state::remove(state_dir, name)?;
    report.netns_removed.sort();
    report.netns_removed.dedup();
    tracing::info!(lab = name, netns = report.netns_removed.len(), cgroups = report.cgroups_removed.len(), "lab down");
    Ok(report)
}

/// Brings every lab with a state file down, plus any namespace named like a lab's.
pub fn down_all(state_dir: &Path) -> Result<Vec<String>, LabError> {
    let mut labs: BTreeSet<String> = state::list(state_dir)?.into_iter().collect();
    let prefix = format!("{}.", naming::NETNS_PREFIX);
    for ns in netns::list() {
        if let Some(lab) = ns.strip_prefix(&prefix).map(|rest| rest.split('.').next().unwrap_or(rest)) {
            if naming::validate_lab_name(lab).is_ok() {
                labs.insert(lab.to_string());
            }
        }
    }
    for lab in &labs {
        down(lab, state_dir)?;
    }
    Ok(labs.into_iter().collect())
}

/// Labs that have a state file.
pub fn list(state_dir: &Path) -> Result<Vec<String>, LabError> {
    state::list(state_dir)
}

/// Brings its lab down when dropped, logging (not panicking on) failures.
#[derive(Debug)]
pub struct LabGuard {
    lab: Option<Lab>,
}

impl LabGuard {
    /// Reconciles the lab with `inventory` as `Lab::up` does (pods added, rebuilt or removed);
    /// the guard then brings down what the lab holds now.
    pub fn reconcile(&mut self, inventory: &Inventory) -> Result<(), LabError> {
        let lab = self.lab.as_ref().ok_or_else(|| LabError::NoSuchLab("(guard already down)".into()))?;
        let options = LabOptions { name: lab.name().to_string(), state_dir: lab.state_dir.clone() };
        self.lab = Some(Lab::up(inventory, &options)?);
        Ok(())
    }

    /// Brings the lab down now, reporting errors.
    pub fn down(mut self) -> Result<DownReport, LabError> {
        match self.lab.take() {
            Some(lab) => lab.down(),
            None => Ok(DownReport::default()),
        }
    }
}

impl std::ops::Deref for LabGuard {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        // Only `down(self)` and `drop` take the lab, and both consume the guard.
        self.lab.as_ref().expect("lab guard used after down")
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Some(lab) = self.lab.take() {
            let name = lab.name().to_string();
            if let Err(err) = lab.down() {
                tracing::error!(lab = %name, error = %err, "cannot bring lab down");
                eprintln!("palisade lab {name}: cannot bring lab down: {err}");
            }
        }
    }
}

fn desired_pods(lab: &str, inventory: &Inventory) -> Result<Vec<PodRecord>, LabError> {
    let mut pods = Vec::with_capacity(inventory.endpoints.len());
    let mut veths: BTreeMap<String, String> = BTreeMap::new();
    for endpoint in &inventory.endpoints {
        let key = endpoint.key();
        if let Some(ip) = endpoint.ips.iter().find(|ip| !naming::is_lab_address(**ip)) {
            return Err(LabError::AddressOutsideLab { pod: key, ip: *ip });
        }
        let host_veth = naming::host_veth(&endpoint.namespace, &endpoint.name);
        if let Some(first) = veths.insert(host_veth.clone(), key.clone()) {
            return Err(LabError::InterfaceClash { first, second: key, interface: host_veth });
        }
        let cgroup = endpoint
            .cgroup
            .as_ref()
            .map(|c| c.trim_start_matches('/').to_string())
            .unwrap_or_else(|| naming::default_pod_cgroup(lab, &endpoint.namespace, &endpoint.name));
        pods.push(PodRecord {
            key,
            namespace: endpoint.namespace.clone(),
            name: endpoint.name.clone(),
            netns: naming::pod_netns(lab, &endpoint.namespace, &endpoint.name),
            host_veth,
            ips: endpoint.ips.clone(),
            cgroup,
        });
    }
    Ok(pods)
}

/// Two labs sharing a pod cgroup would kill each other's processes on `down`.
fn check_cgroups_free(state_dir: &Path, lab: &str, desired: &[PodRecord]) -> Result<(), LabError> {
    for other in state::list(state_dir)? {
        if other == lab {
            continue;
        }
        // An unreadable foreign state file is that lab's problem, not a reason to refuse.
        let Ok(Some(other_state)) = state::load(state_dir, &other) else {
            continue;
        };
        for pod in desired {
            if other_state.pods.iter().any(|p| p.cgroup == pod.cgroup) {
                return Err(LabError::CgroupInUse { pod: pod.key.clone(), cgroup: pod.cgroup.clone(), other_lab: other });
            }
        }
    }
    Ok(())
}

fn ensure_lab_netns(lab_netns: &str) -> Result<(), LabError> {
    if !netns::exists(lab_netns) {
        netns::add(lab_netns)?;
    }
    if !netns::link_exists(lab_netns, naming::BRIDGE_NAME) {
        // No multicast snooping: without an MLD querier it can starve IPv6 neighbour discovery.
        netns::batch(
            lab_netns,
            &[
                "link set lo up".to_string(),
                format!("link add {} type bridge mcast_snooping 0", naming::BRIDGE_NAME),
                format!("link set {} up", naming::BRIDGE_NAME),
            ],
        )?;
    }
    Ok(())
}

fn pod_is_healthy(lab_netns: &str, pod: &PodRecord) -> bool {
    if !netns::exists(&pod.netns) {
        return false;
    }
    let have: BTreeSet<IpAddr> = netns::addresses(&pod.netns, naming::POD_INTERFACE).into_iter().collect();
    let want: BTreeSet<IpAddr> = pod.ips.iter().copied().collect();
    have == want && netns::link_master(lab_netns, &pod.host_veth).as_deref() == Some(naming::BRIDGE_NAME)
}

/// (Re)creates the pod's namespace with its veth; the bridge side is enslaved by the caller.
fn create_pod_netns(lab_netns: &str, pod: &PodRecord) -> Result<(), LabError> {
    // Deleting the namespace also deletes its veth and so the peer on the bridge.
    netns::delete(&pod.netns)?;
    netns::add(&pod.netns)?;
    let eth = naming::POD_INTERFACE;
    let mut commands = vec![
        "link set lo up".to_string(),
        // Created inside the pod namespace and the peer moved straight into the lab
        // namespace: nothing ever appears in the host namespace.
        format!("link add {eth} type veth peer name {} netns {lab_netns}", pod.host_veth),
    ];
    for ip in &pod.ips {
        let cidr = naming::pod_address_cidr(*ip);
        match ip {
            IpAddr::V4(_) => commands.push(format!("addr add {cidr} dev {eth}")),
            // No duplicate address detection: the address is usable at once, and the lab
            // already guarantees uniqueness.
            IpAddr::V6(_) => commands.push(format!("addr add {cidr} dev {eth} nodad")),
        }
    }
    commands.push(format!("link set {eth} up"));
    netns::batch(&pod.netns, &commands)
}

fn remove_pod(mount: &Path, pod: &PodRecord) -> Result<(), LabError> {
    // Processes first (they are what keeps a namespace alive), then the namespace.
    let cgroup_result = cgroup::kill_and_remove(&mount.join(&pod.cgroup));
    netns::delete(&pod.netns)?;
    cgroup_result
}
