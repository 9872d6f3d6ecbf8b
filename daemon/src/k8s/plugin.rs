//! `kubectl palisade`: the cluster-wide view, from the Kubernetes API (no ssh to nodes).
//! The `palisade` binary installed (or linked) as `kubectl-palisade` on the PATH is a kubectl
//! plugin; `palisade kubectl ...` is the same thing without the link.
//!
//! - `kubectl palisade alerts [-A|-n NS] [--follow] [-o table|json]`: the alerts every agent
//!   wrote as Events (quarantines, releases, and the alert Events of `--alert-events`), with the
//!   node that reported each.
//! - `kubectl palisade quarantine list [-A|-n NS] [-o table|json]`: the Quarantine objects.
//! - `kubectl palisade quarantine release NS/POD --reason TEXT`: sets `spec.release` with
//!   `requestedBy` = the user the API server authenticates (SelfSubjectReview, what
//!   `kubectl auth whoami` asks), so the admission policy accepts it.
//! - `kubectl palisade quarantine add NS/POD --reason TEXT`: a Quarantine object by hand.

use std::io::Write as _;

use futures::StreamExt as _;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde::Serialize;

use super::EVENT_COMPONENT;
use super::quarantine_resource::{Quarantine, QuarantineSpec, ReleaseRequest};
use crate::output::{Cell, OutputFormat, Table, colour_wanted};

/// The field manager of the plugin's writes (the release alert names it).
pub const PLUGIN_FIELD_MANAGER: &str = "kubectl-palisade";

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("no Kubernetes client configuration (KUBECONFIG, ~/.kube/config or in-cluster): {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0:?} is not NAMESPACE/POD")]
    BadPod(String),
    #[error(
        "cannot tell who you are (SelfSubjectReview: {0}); pass --requested-by with the user name the API server knows you as"
    )]
    WhoAmI(String),
    #[error("{pod} is not quarantined (no Quarantine object)")]
    NotQuarantined { pod: String },
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

#[derive(clap::Parser, Debug)]
#[command(name = "kubectl-palisade", about = "palisade across the cluster: alerts and quarantines from the Kubernetes API")]
pub struct PluginCli {
    /// The kubeconfig context (default: the current one).
    #[arg(long, global = true)]
    pub context: Option<String>,
    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Scope {
    /// Every namespace.
    #[arg(short = 'A', long = "all-namespaces")]
    pub all_namespaces: bool,
    /// One namespace (default: the context's, else `default`).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum PluginCommand {
    /// The alerts the agents wrote as Events, with the node that reported each.
    Alerts {
        #[command(flatten)]
        scope: Scope,
        /// Keep printing new ones as they arrive.
        #[arg(short = 'f', long)]
        follow: bool,
        #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Quarantined pods: list, release, add.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
}

#[derive(clap::Subcommand, Debug)]
pub enum QuarantineCommand {
    /// The Quarantine objects.
    List {
        #[command(flatten)]
        scope: Scope,
        #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Release a pod: sets spec.release on its Quarantine object (RBAC on quarantines decides).
    Release {
        /// NAMESPACE/POD
        pod: String,
        #[arg(long)]
        reason: String,
        /// Who asks (default: the user the API server authenticates you as).
        #[arg(long)]
        requested_by: Option<String>,
    },
    /// Quarantine a pod by hand: creates its Quarantine object; the pod's node enforces it.
    Add {
        /// NAMESPACE/POD
        pod: String,
        #[arg(long)]
        reason: String,
    },
}

/// One alert Event, as the plugin prints it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClusterAlert {
    pub namespace: String,
    pub pod: String,
    pub node: String,
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
    pub count: i32,
    pub last_seen: String,
    pub message: String,
}

/// One Quarantine, as the plugin prints it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClusterQuarantine {
    pub namespace: String,
    pub pod: String,
    pub phase: String,
    pub rule: String,
    pub node: String,
    pub since: String,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseRequest>,
}

/// Runs the plugin (on its own runtime: it is a short-lived client).
pub fn run(cli: PluginCli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let client = client(cli.context.as_deref()).await?;
        let mut out = std::io::stdout().lock();
        match cli.command {
            PluginCommand::Alerts { scope, follow, output } => alerts(&client, &scope, follow, output, &mut out).await?,
            PluginCommand::Quarantine(QuarantineCommand::List { scope, output }) => {
                let list = quarantines(&client, &scope).await?;
                print_quarantines(&list, output, &mut out)?;
            }
            PluginCommand::Quarantine(QuarantineCommand::Release { pod, reason, requested_by }) => {
                let by = release(&client, &pod, &reason, requested_by).await?;
                writeln!(out, "{pod}: release requested by {by}; the agent on the pod's node lifts the quarantine and deletes the object")?;
            }
            PluginCommand::Quarantine(QuarantineCommand::Add { pod, reason }) => {
                add(&client, &pod, &reason).await?;
                writeln!(out, "{pod}: Quarantine object created; the agent on the pod's node enforces it")?;
            }
        }
        Ok(())
    })
}

async fn client(context: Option<&str>) -> Result<Client, PluginError> {
    let options = kube::config::KubeConfigOptions { context: context.map(str::to_string), ..Default::default() };
    let config = match kube::Config::from_kubeconfig(&options).await {
        Ok(config) => config,
        Err(kubeconfig) => kube::Config::incluster().map_err(|_| PluginError::Config(kubeconfig.to_string()))?,
    };
    Client::try_from(config).map_err(|e| PluginError::Config(e.to_string()))
}

fn scoped<K>(client: &Client, scope: &Scope) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match (&scope.namespace, scope.all_namespaces) {
        (_, true) => Api::all(client.clone()),
        (Some(ns), false) => Api::namespaced(client.clone(), ns),
        (None, false) => Api::default_namespaced(client.clone()),
    }
}

/// Whether an Event was written by a palisade agent.
fn is_palisade(event: &Event) -> bool {
    event.source.as_ref().and_then(|s| s.component.as_deref()) == Some(EVENT_COMPONENT)
        || event.reporting_component.as_deref() == Some(&format!("palisade.io/{EVENT_COMPONENT}"))
}

pub fn cluster_alert(event: &Event) -> ClusterAlert {
    let last_seen = event
        .last_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .or_else(|| event.event_time.as_ref().map(|t| t.0.to_string()))
        .unwrap_or_default();
    ClusterAlert {
        namespace: event.involved_object.namespace.clone().unwrap_or_default(),
        pod: event.involved_object.name.clone().unwrap_or_default(),
        node: event
            .reporting_instance
            .clone()
            .or_else(|| event.source.as_ref().and_then(|s| s.host.clone()))
            .unwrap_or_default(),
        type_: event.type_.clone().unwrap_or_default(),
        reason: event.reason.clone().unwrap_or_default(),
        count: event.count.unwrap_or(1),
        last_seen,
        message: event.message.clone().unwrap_or_default(),
    }
}

async fn alerts(client: &Client, scope: &Scope, follow: bool, output: OutputFormat, out: &mut impl std::io::Write) -> Result<(), PluginError> {
    let api: Api<Event> = scoped(client, scope);
    let listed = api
        .list(&ListParams::default())
        .await
        .map_err(|source| PluginError::Api { what: "listing Events".into(), source })?;
    let mut alerts: Vec<ClusterAlert> = listed.items.iter().filter(|e| is_palisade(e)).map(cluster_alert).collect();
    alerts.sort_by(|a, b| a.last_seen.cmp(&b.last_seen));
    print_alerts(&alerts, output, out, true)?;
    if !follow {
        return Ok(());
    }
    out.flush()?;
    // From the list's resourceVersion on: only what is new. A watch ends after its timeout and
    // is resumed from the last version seen; `410 Gone` resumes from now.
    let mut version = listed.metadata.resource_version.unwrap_or_default();
    let params = kube::api::WatchParams::default().timeout(290);
    loop {
        let stream = api.watch(&params, &version).await.map_err(|source| PluginError::Api { what: "watching Events".into(), source })?;
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(kube::api::WatchEvent::Added(event) | kube::api::WatchEvent::Modified(event)) => {
                    if let Some(v) = event.metadata.resource_version.clone() {
                        version = v;
                    }
                    if is_palisade(&event) {
                        print_alerts(&[cluster_alert(&event)], output, out, false)?;
                        out.flush()?;
                    }
                }
                Ok(kube::api::WatchEvent::Bookmark(b)) => version = b.metadata.resource_version,
                Ok(kube::api::WatchEvent::Error(e)) if e.code == 410 => {
                    let fresh = api.list(&ListParams::default().limit(1)).await.map_err(|source| PluginError::Api { what: "relisting Events".into(), source })?;
                    version = fresh.metadata.resource_version.unwrap_or_default();
                    break;
                }
                Ok(_) => {}
                Err(source) => return Err(PluginError::Api { what: "watching Events".into(), source }),
            }
        }
    }
}

fn print_alerts(alerts: &[ClusterAlert], output: OutputFormat, out: &mut impl std::io::Write, header: bool) -> Result<(), PluginError> {
    match output {
        OutputFormat::Json => {
            for alert in alerts {
                writeln!(out, "{}", serde_json::to_string(alert).unwrap_or_default())?;
            }
        }
        OutputFormat::Table => {
            let mut table = Table::new(&["LAST SEEN", "NAMESPACE", "POD", "NODE", "TYPE", "REASON", "COUNT", "MESSAGE"]).align_right(&[6]);
            for a in alerts {
                table.push(vec![
                    Cell::plain(&a.last_seen),
                    Cell::plain(&a.namespace),
                    Cell::plain(&a.pod),
                    Cell::plain(&a.node),
                    Cell::plain(&a.type_),
                    Cell::plain(&a.reason),
                    Cell::plain(a.count.to_string()),
                    Cell::plain(&a.message),
                ]);
            }
            let text = if header { table.render(colour_wanted()) } else { table.render_rows(colour_wanted()) };
            write!(out, "{text}")?;
        }
    }
    Ok(())
}

pub async fn quarantines(client: &Client, scope: &Scope) -> Result<Vec<ClusterQuarantine>, PluginError> {
    let api: Api<Quarantine> = scoped(client, scope);
    let listed = api
        .list(&ListParams::default())
        .await
        .map_err(|source| PluginError::Api { what: "listing Quarantines".into(), source })?;
    Ok(listed
        .items
        .into_iter()
        .map(|q| {
            let status = q.status.clone().unwrap_or_default();
            ClusterQuarantine {
                namespace: q.metadata.namespace.clone().unwrap_or_default(),
                pod: q.spec.pod.clone(),
                phase: if status.phase.is_empty() { "Requested".into() } else { status.phase },
                rule: q.spec.rule.clone().unwrap_or_default(),
                node: if status.node.is_empty() { q.spec.node.clone().unwrap_or_default() } else { status.node },
                since: status.since,
                reason: q.spec.reason.clone(),
                release: q.spec.release.clone(),
            }
        })
        .collect())
}

fn print_quarantines(list: &[ClusterQuarantine], output: OutputFormat, out: &mut impl std::io::Write) -> Result<(), PluginError> {
    match output {
        OutputFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(list).unwrap_or_default())?,
        OutputFormat::Table => {
            let mut table = Table::new(&["NAMESPACE", "POD", "PHASE", "RULE", "NODE", "SINCE", "RELEASE BY", "REASON"]);
            for q in list {
                table.push(vec![
                    Cell::plain(&q.namespace),
                    Cell::plain(&q.pod),
                    Cell::plain(&q.phase),
                    Cell::plain(&q.rule),
                    Cell::plain(&q.node),
                    Cell::plain(&q.since),
                    Cell::plain(q.release.as_ref().map(|r| r.requested_by.as_str()).unwrap_or("")),
                    Cell::plain(&q.reason),
                ]);
            }
            write!(out, "{}", table.render(colour_wanted()))?;
        }
    }
    Ok(())
}

fn split(pod: &str) -> Result<(&str, &str), PluginError> {
    match pod.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok((ns, name)),
        _ => Err(PluginError::BadPod(pod.to_string())),
    }
}

/// Who the API server says we are.
async fn whoami(client: &Client) -> Result<String, PluginError> {
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let review = api.create(&PostParams::default(), &SelfSubjectReview::default()).await.map_err(|e| PluginError::WhoAmI(e.to_string()))?;
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| PluginError::WhoAmI("the review named no user".into()))
}

async fn release(client: &Client, pod: &str, reason: &str, requested_by: Option<String>) -> Result<String, PluginError> {
    let (namespace, name) = split(pod)?;
    let by = match requested_by {
        Some(by) => by,
        None => whoami(client).await?,
    };
    let api: Api<Quarantine> = Api::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({"spec": {"release": ReleaseRequest { reason: reason.to_string(), requested_by: by.clone() }}});
    let params = PatchParams { field_manager: Some(PLUGIN_FIELD_MANAGER.to_string()), ..Default::default() };
    match api.patch(name, &params, &Patch::Merge(&patch)).await {
        Ok(_) => Ok(by),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(PluginError::NotQuarantined { pod: pod.to_string() }),
        Err(source) => Err(PluginError::Api { what: format!("releasing {pod}"), source }),
    }
}

async fn add(client: &Client, pod: &str, reason: &str) -> Result<(), PluginError> {
    let (namespace, name) = split(pod)?;
    let api: Api<Quarantine> = Api::namespaced(client.clone(), namespace);
    let object = Quarantine {
        api_version: format!("{}/{}", super::quarantine_resource::GROUP, super::quarantine_resource::VERSION),
        kind: super::quarantine_resource::KIND.to_string(),
        metadata: kube::api::ObjectMeta { name: Some(name.to_string()), namespace: Some(namespace.to_string()), ..Default::default() },
        spec: QuarantineSpec { pod: name.to_string(), reason: reason.to_string(), ..Default::default() },
        status: None,
    };
    let params = PostParams { field_manager: Some(PLUGIN_FIELD_MANAGER.to_string()), ..Default::default() };
    api.create(&params, &object).await.map_err(|source| PluginError::Api { what: format!("quarantining {pod}"), source })?;
    Ok(())
}
