//! Kubernetes mode's view of quarantines: the `palisade.io/quarantined` label and Events follow
//! the responder, and a label changed by anyone else is put back with a `tamper` alert.

use super::QuarantineService;
use crate::alerts::AlertSink;

/// Kubernetes mode: quarantines made visible (label + Event), label removals by anyone else
/// undone with a `tamper` alert (release only through the API socket), and a periodic
/// reconciliation so the labels follow the responder (also across restarts).
pub fn spawn_cluster_quarantine(
    quarantine: QuarantineService,
    alerts: AlertSink,
    source: &mut crate::k8s::KubeSource,
    mut releases: tokio::sync::mpsc::UnboundedReceiver<super::ReleaseRecord>,
) {
    use crate::k8s::ClusterQuarantineSink as _;
    let sink = source.quarantine_sink();
    let labels = source.labelled_pods();
    let Some(mut removals) = source.take_label_removals() else { return };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            tokio::select! {
                removal = removals.recv() => {
                    let Some(removal) = removal else { return };
                    let quarantined = quarantine.list_async().await.into_iter().find(|r| r.pod == removal.pod);
                    if let Some(record) = quarantined {
                        // The reconciler below may have put it back already.
                        let relabel = if labels.current().contains(&record.pod) {
                            Ok(())
                        } else {
                            sink.quarantined(&record.pod, &record.rule_id, &record.alert_id).await.map_err(|e| e.to_string())
                        };
                        if let Err(err) = &relabel {
                            tracing::error!(pod = %record.pod, %err, "putting the quarantine label back");
                        }
                        alerts.try_emit(super::api::tamper_alert(&record, &removal.change, relabel.err()));
                    }
                }
                Some(record) = releases.recv() => {
                    release_label(&sink, &record).await;
                }
                _ = tick.tick() => {}
            }
            // Releases not handled yet go first, so their Event names who released and why
            // rather than the reconciler's "not quarantined on this node".
            while let Ok(record) = releases.try_recv() {
                release_label(&sink, &record).await;
            }
            let quarantined = quarantine.list_async().await;
            let labelled = labels.current();
            for record in quarantined.iter().filter(|r| !labelled.contains(&r.pod)) {
                if let Err(err) = sink.quarantined(&record.pod, &record.rule_id, &record.alert_id).await {
                    tracing::warn!(pod = %record.pod, %err, "labelling a quarantined pod");
                }
            }
            for pod in labelled.iter().filter(|p| !quarantined.iter().any(|r| &r.pod == *p)) {
                if let Err(err) = sink.released(pod, "not quarantined on this node").await {
                    tracing::warn!(%pod, %err, "removing a stale quarantine label");
                }
            }
        }
    });
}

/// Removes the quarantine label after an API release; the Normal `Released` Event says who
/// released the pod and why.
async fn release_label(sink: &dyn crate::k8s::ClusterQuarantineSink, record: &super::ReleaseRecord) {
    let reason = format!("released by {}: {}", record.by, record.reason);
    if let Err(err) = sink.released(&record.pod, &reason).await {
        tracing::warn!(pod = %record.pod, %err, "removing the quarantine label after a release");
    }
}
