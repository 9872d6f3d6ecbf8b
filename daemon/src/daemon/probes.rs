//! The probes' wiring: the eBPF programs loaded and attached, then handed to their owner task.

use anyhow::Context as _;

use super::RunArgs;
use super::rules::{RulesStage, kinds_for, set_sensitive_prefixes};
use crate::endpoints::EndpointTable;
use crate::probes::host::ProbeHost;
use crate::probes::loader::{self, LoadOptions};

/// The eBPF programs loaded and attached, their owner task running with the pack's kinds and
/// prefilters and the endpoint table's monitored set; the two ring buffers wait for the
/// pipeline.
pub(super) struct ProbesStage {
    pub(super) host: ProbeHost,
    pub(super) rings: Option<(aya::maps::RingBuf<aya::maps::MapData>, aya::maps::RingBuf<aya::maps::MapData>)>,
}

impl ProbesStage {
    pub(super) async fn start(args: &RunArgs, rules: &RulesStage, table: &EndpointTable) -> anyhow::Result<ProbesStage> {
        let options = LoadOptions {
            monitor_all: args.host,
            try_kprobes: !args.no_kprobes,
            pin_dir: Some(args.pin_dir.clone()),
            budgets: Some(args.budgets),
            module_fallback: loader::ModuleFallback::Auto,
            syscall_entry: loader::SyscallEntry::RawDispatch,
            bulk_wakeup_bytes: palisade_common::BULK_WAKEUP_BYTES,
        };
        let mut probes = loader::load(&options).context("loading the eBPF programs")?;
        probes.attach_all(&options).context("attaching the eBPF programs")?;
        for status in &probes.programs {
            tracing::debug!(program = %status.program, target = %status.target, state = ?status.state, "program");
        }
        let ring = probes.take_ring_buffer()?;
        let priority_ring = probes.take_priority_ring_buffer()?;
        let host = ProbeHost::spawn(probes);
        let pack = rules.handle.current();
        host.set_enabled_kinds(kinds_for(&pack)).await?;
        set_sensitive_prefixes(&host, &rules.dir, &pack).await?;
        host.set_monitored(table.monitored()).await?;
        Ok(ProbesStage { host, rings: Some((priority_ring, ring)) })
    }

    /// The (priority, bulk) ring buffers, for the event reader.
    pub(super) fn take_rings(&mut self) -> anyhow::Result<(aya::maps::RingBuf<aya::maps::MapData>, aya::maps::RingBuf<aya::maps::MapData>)> {
        self.rings.take().context("the ring buffers were taken already")
    }
}
