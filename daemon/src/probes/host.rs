//! The one task that owns the loaded eBPF object. Everything else sends it commands and gets
//! replies on oneshot channels, so map updates never race each other.

use std::collections::BTreeSet;

use aya::Ebpf;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::loader::{self, KindCounters, LoaderError, ProgramStatus};
use crate::endpoints::CgroupId;
use crate::events::kind::EventKind;

type EbpfJob = Box<dyn FnOnce(&mut Ebpf) + Send>;

enum Command {
    /// Replace the monitored cgroup set.
    SetMonitored { cgroups: BTreeSet<CgroupId>, reply: oneshot::Sender<Result<(), LoaderError>> },
    SetEnabledKinds { kinds: Vec<EventKind>, reply: oneshot::Sender<Result<(), LoaderError>> },
    Status { reply: oneshot::Sender<ProbeStatus> },
    /// Run a job against the object on the owner task (segmentation and quarantine map updates).
    With(EbpfJob),
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeStatus {
    pub programs: Vec<ProgramStatus>,
    pub monitored_cgroups: usize,
    pub enabled_kinds: Vec<EventKind>,
    pub counters: Option<KindCounters>,
    pub counters_error: Option<String>,
    pub task_offsets_from_btf: bool,
    pub monitor_all: bool,
}

/// Handle to the owner task; cheap to clone.
#[derive(Clone)]
pub struct ProbeHost {
    tx: mpsc::Sender<Command>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("the eBPF owner task has stopped")]
    Stopped,
    #[error(transparent)]
    Loader(#[from] LoaderError),
}

struct Owner {
    ebpf: Ebpf,
    programs: Vec<ProgramStatus>,
    monitored: BTreeSet<CgroupId>,
    enabled: Vec<EventKind>,
    offsets_valid: bool,
    monitor_all: bool,
}

impl ProbeHost {
    /// Starts the owner task for an attached object on the current runtime.
    pub fn spawn(probes: loader::LoadedProbes) -> ProbeHost {
        Self::spawn_on(&tokio::runtime::Handle::current(), probes)
    }

    /// Starts the owner task on `runtime`.
    pub fn spawn_on(runtime: &tokio::runtime::Handle, probes: loader::LoadedProbes) -> ProbeHost {
        let (tx, mut rx) = mpsc::channel::<Command>(64);
        let mut owner = Owner {
            offsets_valid: probes.config.task_offsets_valid != 0,
            monitor_all: probes.config.monitor_all != 0,
            ebpf: probes.ebpf,
            programs: probes.programs,
            monitored: BTreeSet::new(),
            enabled: Vec::new(),
        };
        runtime.spawn(async move {
            while let Some(cmd) = rx.recv().await {
                owner.handle(cmd);
            }
            tracing::debug!("eBPF owner task stopping; programs detach with the object");
        });
        ProbeHost { tx }
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, HostError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| HostError::Stopped)?;
        rx.await.map_err(|_| HostError::Stopped)
    }

    /// Replaces the monitored cgroup set (ids, or bare `u64`s from a test's own cgroup).
    pub async fn set_monitored(&self, cgroups: impl IntoIterator<Item = impl Into<CgroupId>>) -> Result<(), HostError> {
        let cgroups: BTreeSet<CgroupId> = cgroups.into_iter().map(Into::into).collect();
        Ok(self.call(|reply| Command::SetMonitored { cgroups, reply }).await??)
    }

    pub async fn set_enabled_kinds(&self, kinds: Vec<EventKind>) -> Result<(), HostError> {
        Ok(self.call(|reply| Command::SetEnabledKinds { kinds, reply }).await??)
    }

    pub async fn status(&self) -> Result<ProbeStatus, HostError> {
        self.call(|reply| Command::Status { reply }).await
    }

    /// Runs `job` with exclusive access to the loaded object and returns its result.
    pub async fn with<T: Send + 'static>(&self, job: impl FnOnce(&mut Ebpf) -> T + Send + 'static) -> Result<T, HostError> {
        let (reply, rx) = oneshot::channel();
        let job: EbpfJob = Box::new(move |ebpf| {
            let _ = reply.send(job(ebpf));
        });
        self.tx.send(Command::With(job)).await.map_err(|_| HostError::Stopped)?;
        rx.await.map_err(|_| HostError::Stopped)
    }
}

impl Owner {
    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::SetMonitored { cgroups, reply } => {
                let _ = reply.send(self.set_monitored(cgroups));
            }
            Command::SetEnabledKinds { kinds, reply } => {
                let result = loader::set_enabled_kinds(&mut self.ebpf, &kinds);
                if result.is_ok() {
                    self.enabled = kinds;
                }
                let _ = reply.send(result);
            }
            Command::Status { reply } => {
                let (counters, counters_error) = match loader::read_counters(&self.ebpf) {
                    Ok(c) => (Some(c), None),
                    Err(e) => (None, Some(e.to_string())),
                };
                let _ = reply.send(ProbeStatus {
                    programs: self.programs.clone(),
                    monitored_cgroups: self.monitored.len(),
                    enabled_kinds: self.enabled.clone(),
                    counters,
                    counters_error,
                    task_offsets_from_btf: self.offsets_valid,
                    monitor_all: self.monitor_all,
                });
            }
            Command::With(job) => job(&mut self.ebpf),
        }
    }

    /// Adds before it removes, so a cgroup in both the old and new set is never unwatched.
    fn set_monitored(&mut self, cgroups: BTreeSet<CgroupId>) -> Result<(), LoaderError> {
        for (slot, id) in cgroups.iter().enumerate() {
            if !self.monitored.contains(id) {
                loader::monitor_cgroup(&mut self.ebpf, id.get(), slot as u32)?;
                self.monitored.insert(*id);
            }
        }
        let stale: Vec<CgroupId> = self.monitored.difference(&cgroups).copied().collect();
        for id in stale {
            loader::unmonitor_cgroup(&mut self.ebpf, id.get())?;
            self.monitored.remove(&id);
        }
        Ok(())
    }
}
