//! deploy/: every manifest parses as its Kubernetes API type (k8s-openapi) with nothing dropped
//! on the way (a misspelt field would be), the ClusterRole grants exactly `k8s::API_USES`, the
//! DaemonSet mounts and probes what the daemon needs, the response policy parses, the rules
//! ConfigMaps, laid out the way the kubelet writes a projected volume, load as the default pack,
//! the Quarantine CRD's schema matches what the agent writes and reads, and the CEL of the
//! admission policy and the CRD's validations decides sample requests as intended.
//!
//! `PALISADE_UPDATE_DEPLOY=1 cargo test -p palisade --test k8s_deploy` regenerates
//! deploy/rules-configmap.yaml from rules/.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ResourceQuota, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use palisade::k8s::{OPERATOR_LEASE_USES, OPERATOR_USES, all_api_uses};
use palisade::quarantine::ResponsePolicy;
use palisade::rules::pack::RulePack;
use serde::Deserialize as _;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

/// Every document of every deploy/*.yaml except the kustomization, as (file, JSON value).
fn documents() -> Vec<(String, Value)> {
    documents_in(&deploy(), "")
}

/// Every document of every DIR/*.yaml except the kustomization, as (PREFIX + file, JSON value).
fn documents_in(dir: &Path, prefix: &str) -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read manifest");
        let name = format!("{prefix}{}", file.file_name().and_then(|n| n.to_str()).unwrap_or("?"));
        for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: document {}: {e}", i + 1));
            if !value.is_null() {
                docs.push((name.clone(), value));
            }
        }
    }
    docs
}

/// Parses as `T` and checks the typed value serialises back to the same document: k8s-openapi
/// ignores unknown fields, so a misspelt or misplaced field shows up as a difference here.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(file: &str, value: &Value) -> T {
    let object: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
    let back = serde_json::to_value(&object).expect("serialise");
    let mut diffs = Vec::new();
    diff("", value, &back, &mut diffs);
    if !diffs.is_empty() {
        panic!("{file}: fields lost or changed when read as {}: {diffs:#?}", std::any::type_name::<T>());
    }
    object
}

fn diff(at: &str, want: &Value, got: &Value, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let path = format!("{at}.{k}");
                match b.get(k) {
                    Some(w) => diff(&path, v, w, out),
                    None => out.push(format!("{path}: dropped (unknown field?)")),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{at}.{k}: added"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff(&format!("{at}[{i}]"), x, y, out);
            }
        }
        // A schema's `minimum: 1` is a float in k8s-openapi (JSONSchemaProps): the same number.
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        _ if want != got => out.push(format!("{at}: {want} became {got}")),
        _ => {}
    }
}

struct Manifests {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    quotas: Vec<ResourceQuota>,
    services: Vec<Service>,
    network_policies: Vec<NetworkPolicy>,
    crds: Vec<CustomResourceDefinition>,
}

/// Kinds without a namespace.
fn cluster_scoped(kind: &str) -> bool {
    kind == "Namespace" || kind.starts_with("Cluster") || kind == "CustomResourceDefinition" || kind.starts_with("ValidatingAdmissionPolicy")
}

fn manifests() -> Manifests {
    let mut m = Manifests {
        namespaces: vec![],
        service_accounts: vec![],
        cluster_roles: vec![],
        bindings: vec![],
        config_maps: vec![],
        daemon_sets: vec![],
        quotas: vec![],
        services: vec![],
        network_policies: vec![],
        crds: vec![],
    };
    for (file, doc) in documents() {
        match (doc["apiVersion"].as_str(), doc["kind"].as_str()) {
            (Some("v1"), Some("Namespace")) => m.namespaces.push(typed(&file, &doc)),
            (Some("v1"), Some("ServiceAccount")) => m.service_accounts.push(typed(&file, &doc)),
            (Some("v1"), Some("ConfigMap")) => m.config_maps.push(typed(&file, &doc)),
            (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRole")) => m.cluster_roles.push(typed(&file, &doc)),
            (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRoleBinding")) => m.bindings.push(typed(&file, &doc)),
            (Some("apps/v1"), Some("DaemonSet")) => m.daemon_sets.push(typed(&file, &doc)),
            (Some("v1"), Some("ResourceQuota")) => m.quotas.push(typed(&file, &doc)),
            (Some("v1"), Some("Service")) => m.services.push(typed(&file, &doc)),
            (Some("networking.k8s.io/v1"), Some("NetworkPolicy")) => m.network_policies.push(typed(&file, &doc)),
            (Some("apiextensions.k8s.io/v1"), Some("CustomResourceDefinition")) => m.crds.push(typed(&file, &doc)),
            (api, kind) => panic!("{file}: unexpected object {api:?} {kind:?}"),
        }
    }
    m
}

fn config_map<'a>(m: &'a Manifests, name: &str) -> &'a ConfigMap {
    m.config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no ConfigMap {name}"))
}

const NAMESPACE: &str = "palisade-system";

#[test]
fn manifests_parse_and_the_kustomization_lists_them_all() {
    let m = manifests();
    assert_eq!(m.namespaces.len(), 1);
    assert_eq!(m.daemon_sets.len(), 1);
    // The agent's role, and the responder and view roles for people.
    assert_eq!(m.cluster_roles.len(), 3);
    assert_eq!(m.bindings.len(), 1);
    assert_eq!(m.crds.len(), 1);
    assert_eq!(m.service_accounts.len(), 1);

    let kustomization: Value =
        serde_norway::from_str(&std::fs::read_to_string(deploy().join("kustomization.yaml")).expect("kustomization"))
            .expect("kustomization yaml");
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect();
    let files: BTreeSet<String> = documents().into_iter().map(|(file, _)| file).collect();
    assert_eq!(listed, files, "kustomization resources vs deploy/*.yaml");
    assert_eq!(kustomization["namespace"], NAMESPACE);
    for (file, doc) in documents() {
        if !cluster_scoped(doc["kind"].as_str().unwrap_or("")) {
            assert_eq!(doc["metadata"]["namespace"], NAMESPACE, "{file}: {}", doc["metadata"]["name"]);
        }
    }
}

/// Every (API group, resource, verb) a ClusterRole grants, each once: no wildcard verb, no
/// resource names, no non-resource URLs.
fn granted(role: &ClusterRole) -> BTreeSet<(String, String, String)> {
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none(), "{rule:?}");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    assert_ne!(verb, "*", "wildcard verb");
                    assert!(granted.insert((group.clone(), resource.clone(), verb.clone())), "granted twice: {group} {resource} {verb}");
                }
            }
        }
    }
    granted
}

#[test]
fn the_cluster_role_grants_exactly_what_the_code_uses() {
    let m = manifests();
    let role = m.cluster_roles.iter().find(|r| r.metadata.name.as_deref() == Some("palisade")).expect("the agent's ClusterRole");
    let granted = granted(role);
    let used: BTreeSet<(String, String, String)> =
        all_api_uses().iter().map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string())).collect();
    let extra: Vec<_> = granted.difference(&used).collect();
    let missing: Vec<_> = used.difference(&granted).collect();
    assert!(extra.is_empty() && missing.is_empty(), "granted but unused: {extra:?}; used but not granted: {missing:?}");

    let binding = &m.bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(binding.role_ref.name.as_str()), role.metadata.name.as_deref());
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    let sa = &m.service_accounts[0];
    assert_eq!((subject.kind.as_str(), Some(subject.name.as_str())), ("ServiceAccount", sa.metadata.name.as_deref()));
    assert_eq!(subject.namespace.as_deref(), Some(NAMESPACE));
    let pod = m.daemon_sets[0].spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), sa.metadata.name.as_deref());
}

#[test]
fn the_daemonset_has_least_privilege_mounts_probes_and_resources() {
    let m = manifests();
    let ds = &m.daemon_sets[0];
    let pod = ds.spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.host_pid, Some(true), "procfs enrichment of host PIDs");
    assert_ne!(pod.host_network, Some(true), "no hostNetwork");
    let c = &pod.containers[0];

    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(added, BTreeSet::from(["BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE", "SYS_PTRACE"]));
    // Each added capability is justified by a comment right above it.
    let text = std::fs::read_to_string(deploy().join("daemonset.yaml")).expect("daemonset.yaml");
    let lines: Vec<&str> = text.lines().collect();
    for cap in &added {
        let at = lines.iter().position(|l| l.trim() == format!("- {cap}")).unwrap_or_else(|| panic!("{cap} line"));
        assert!(lines[at - 1].trim_start().starts_with('#'), "{cap} has no justification comment");
    }

    let host_paths: BTreeMap<String, String> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.host_path.as_ref().map(|h| (v.name.clone(), h.path.clone())))
        .collect();
    let mounts: BTreeMap<String, String> =
        c.volume_mounts.iter().flatten().map(|m| (m.name.clone(), m.mount_path.clone())).collect();
    for (path, mount) in [
        ("/sys/fs/bpf", "/sys/fs/bpf"),
        ("/sys/fs/cgroup", "/sys/fs/cgroup"),
        ("/sys/kernel/tracing", "/sys/kernel/tracing"),
        ("/var/lib/palisade", "/var/lib/palisade"),
    ] {
        let (volume, _) = host_paths.iter().find(|(_, p)| *p == path).unwrap_or_else(|| panic!("no hostPath {path}"));
        assert_eq!(mounts.get(volume).map(String::as_str), Some(mount), "{path} mounted at {mount}");
    }
    assert_eq!(host_paths.len(), 4, "no other host paths: {host_paths:?}");

    let port = c.ports.iter().flatten().find(|p| p.name.as_deref() == Some("metrics")).expect("metrics port");
    assert_eq!(port.container_port, 9464);
    // Start-up has its own probe (a slow first sync is not a dead agent); liveness and start-up
    // ask /healthz, readiness /readyz (synced at least once).
    for (what, probe, path) in [
        ("startup", &c.startup_probe, "/healthz"),
        ("liveness", &c.liveness_probe, "/healthz"),
        ("readiness", &c.readiness_probe, "/readyz"),
    ] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap_or_else(|| panic!("{what} httpGet"));
        assert_eq!(get.path.as_deref(), Some(path), "{what}");
        assert_eq!(serde_json::to_value(&get.port).expect("port"), "metrics", "{what}");
    }
    let startup = c.startup_probe.as_ref().expect("startupProbe");
    let budget = startup.period_seconds.unwrap_or(10) * startup.failure_threshold.unwrap_or(3);
    assert!(budget >= 180, "a slow node gets at least 3 minutes to start, not {budget} s");
    assert!(c.liveness_probe.as_ref().and_then(|p| p.initial_delay_seconds).is_none(), "the startupProbe covers start-up");

    // bpffs: the init container mounts it where the host has not, and shares the mount with the
    // host (Bidirectional); the agent sees it (HostToContainer). Only the init container is
    // privileged, and it runs the agent's own image.
    let init = pod.init_containers.iter().flatten().find(|i| i.name == "mount-bpffs").expect("mount-bpffs init container");
    assert_eq!(init.image, c.image, "the init container runs the agent's image");
    assert_eq!(init.args.as_deref(), Some(&["mount-bpffs".to_string(), "/sys/fs/bpf".to_string()][..]));
    assert_eq!(init.security_context.as_ref().and_then(|s| s.privileged), Some(true));
    let propagation = |mounts: &Option<Vec<k8s_openapi::api::core::v1::VolumeMount>>| {
        mounts.iter().flatten().find(|m| m.mount_path == "/sys/fs/bpf").and_then(|m| m.mount_propagation.clone())
    };
    assert_eq!(propagation(&init.volume_mounts).as_deref(), Some("Bidirectional"));
    assert_eq!(propagation(&c.volume_mounts).as_deref(), Some("HostToContainer"));
    let args = c.args.as_ref().expect("args");
    assert!(args.iter().any(|a| a == "--metrics-addr=0.0.0.0:9464"), "{args:?}");

    let resources = c.resources.as_ref().expect("resources");
    for key in ["cpu", "memory"] {
        assert!(resources.requests.as_ref().is_some_and(|r| r.contains_key(key)), "request {key}");
        assert!(resources.limits.as_ref().is_some_and(|r| r.contains_key(key)), "limit {key}");
    }
    let node_env = c.env.iter().flatten().find(|e| e.name == "NODE_NAME").expect("NODE_NAME");
    let field = node_env.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).expect("fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");

    // The args point into the mounts that exist: --rules is the parent of the two rule
    // ConfigMaps' directories (modules, lists).
    let rules_dir = args.iter().find_map(|a| a.strip_prefix("--rules=")).expect("--rules");
    assert_eq!(mounts.get("rules").map(String::as_str), Some(format!("{rules_dir}/modules").as_str()));
    assert_eq!(mounts.get("rule-lists").map(String::as_str), Some(format!("{rules_dir}/lists").as_str()));
    let config_mount = mounts.get("config").expect("config mount");
    assert!(args.iter().any(|a| a.starts_with(&format!("--response-policy={config_mount}/"))), "{args:?}");
}

#[test]
fn the_response_policy_parses_and_protects_palisade_itself() {
    let m = manifests();
    let text = config_map(&m, "palisade-config").data.as_ref().and_then(|d| d.get("response.yaml")).expect("response.yaml");
    let policy: ResponsePolicy = serde_norway::from_str(text).expect("response.yaml is a ResponsePolicy");
    policy.validate().expect("valid");
    assert!(policy.is_protected("kube-system") && policy.is_protected(NAMESPACE));
    assert!(policy.dry_run, "the shipped default starts in dry run");
}

// ---- the rule pack ConfigMaps ------------------------------------------------------------------

const RULES_CM: &str = "palisade-rules";
const LISTS_CM: &str = "palisade-rule-lists";

/// The default pack's files as the two ConfigMaps hold them: (rego modules, lists).
fn pack_files(dir: &Path) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let read = |dir: &Path, keep: &dyn Fn(&str) -> bool| -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(dir).expect("rules dir").flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_file() && keep(&name) {
                out.insert(name, std::fs::read_to_string(entry.path()).expect("read rule file"));
            }
        }
        out
    };
    let modules = read(dir, &|n| n.ends_with(".rego") && !n.ends_with("_test.rego"));
    let lists = read(&dir.join("lists"), &|n| n.ends_with(".yaml") || n.ends_with(".yml") || n.ends_with(".json"));
    (modules, lists)
}

fn render_rules_configmaps() -> String {
    let (modules, lists) = pack_files(&repo().join("rules"));
    // Literal block scalars, so `kubectl edit` and reviews show the rules as written.
    let cm = |name: &str, what: &str, data: BTreeMap<String, String>| {
        let mut out = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n  labels:\n    app.kubernetes.io/name: palisade\n  annotations:\n    palisade.io/contents: {what}\ndata:\n"
        );
        for (key, text) in data {
            let chomp = if !text.ends_with('\n') {
                "-"
            } else if text.ends_with("\n\n") {
                "+"
            } else {
                ""
            };
            out.push_str(&format!("  {key}: |{chomp}\n"));
            for line in text.lines() {
                if line.is_empty() {
                    out.push('\n');
                } else {
                    out.push_str(&format!("    {line}\n"));
                }
            }
        }
        out
    };
    format!(
        "# GENERATED from rules/ by `PALISADE_UPDATE_DEPLOY=1 cargo test -p palisade --test k8s_deploy`.\n\
         # Edit the rules in place with `kubectl edit configmap` (hot reload), or regenerate.\n{}---\n{}",
        cm(RULES_CM, "rego modules of the default rule pack (mounted at RULES_DIR/modules)", modules),
        cm(LISTS_CM, "tunable lists of the default rule pack (mounted at RULES_DIR/lists)", lists),
    )
}

/// Writes a projected volume the way the kubelet's atomic writer does: the payload in a
/// timestamped hidden directory, `..data` pointing at it, and one symlink per top-level entry.
fn write_projected(dir: &Path, version: &str, files: &BTreeMap<String, String>) {
    let payload = dir.join(format!("..{version}"));
    for (path, text) in files {
        let file = payload.join(path);
        std::fs::create_dir_all(file.parent().expect("parent")).expect("payload dir");
        std::fs::write(&file, text).expect("payload file");
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).expect("..data_tmp");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    let top: BTreeSet<&str> = files.keys().map(|p| p.split('/').next().unwrap_or(p)).collect();
    for name in top {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).expect("top-level symlink");
        }
    }
}

#[test]
fn the_rules_configmaps_load_as_the_default_pack_when_projected() {
    let generated = render_rules_configmaps();
    let path = deploy().join("rules-configmap.yaml");
    // The emitter keeps every byte of every file (tabs, blank lines, final newlines).
    let (want_modules, want_lists) = pack_files(&repo().join("rules"));
    let rendered: Vec<ConfigMap> = serde_norway::Deserializer::from_str(&generated)
        .map(|doc| ConfigMap::deserialize(doc).expect("rendered ConfigMap"))
        .collect();
    assert_eq!(rendered[0].data.as_ref(), Some(&want_modules), "rendered modules differ from rules/");
    assert_eq!(rendered[1].data.as_ref(), Some(&want_lists), "rendered lists differ from rules/lists");
    if std::env::var_os("PALISADE_UPDATE_DEPLOY").is_some() {
        std::fs::write(&path, &generated).expect("write rules-configmap.yaml");
    }
    // What ships must be the pack in rules/, byte for byte: a rule fixed in rules/ but not here
    // would run unfixed in clusters.
    let on_disk = std::fs::read_to_string(&path).expect("read rules-configmap.yaml");
    assert!(
        on_disk == generated,
        "deploy/rules-configmap.yaml is stale: regenerate it with `PALISADE_UPDATE_DEPLOY=1 cargo test -p palisade --test k8s_deploy`"
    );
    let m = manifests();
    let modules = config_map(&m, RULES_CM).data.clone().unwrap_or_default();
    let lists = config_map(&m, LISTS_CM).data.clone().unwrap_or_default();
    let total: usize = modules.values().chain(lists.values()).map(String::len).sum();
    assert!(total < 900 * 1024, "ConfigMaps are capped at 1 MiB; the pack is {total} bytes");

    // Each rules ConfigMap is mounted whole (no items): a key added with `kubectl edit` reaches
    // the pod without an edit to the DaemonSet.
    let pod = m.daemon_sets[0].spec.template.spec.as_ref().expect("pod spec");
    for (volume, cm) in [("rules", RULES_CM), ("rule-lists", LISTS_CM)] {
        let v = pod.volumes.iter().flatten().find(|v| v.name == volume).unwrap_or_else(|| panic!("{volume} volume"));
        let source = v.config_map.as_ref().unwrap_or_else(|| panic!("{volume}: a configMap volume"));
        assert_eq!(source.name, cm);
        assert!(source.items.is_none(), "{volume}: the whole ConfigMap, no item list");
    }
    let dir = std::env::temp_dir().join(format!("palisade-k8s-deploy-rules-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    // The kubelet's layout: each ConfigMap volume in its own directory below --rules.
    write_projected(&dir.join("modules"), "2024_01_01_00_00_00.000000001", &modules);
    let mut edited_lists = lists.clone();
    write_projected(&dir.join("lists"), "2024_01_01_00_00_00.000000001", &lists);
    let projected = RulePack::load(&dir).unwrap_or_else(|e| panic!("the mounted ConfigMaps do not load: {e}"));
    let default = RulePack::load(&repo().join("rules")).expect("rules/ loads");
    let ids = |pack: &RulePack| pack.rules().iter().map(|r| r.id.clone()).collect::<BTreeSet<_>>();
    assert_eq!(
        ids(&projected),
        ids(&default),
        "deploy/rules-configmap.yaml ships other rules than rules/: regenerate with \
         PALISADE_UPDATE_DEPLOY=1 cargo test -p palisade --test k8s_deploy"
    );
    assert_eq!(modules.keys().collect::<Vec<_>>(), want_modules.keys().collect::<Vec<_>>(), "module files; regenerate");
    assert_eq!(lists.keys().collect::<Vec<_>>(), want_lists.keys().collect::<Vec<_>>(), "list files; regenerate");

    // `kubectl edit configmap palisade-rule-lists` adding a key: the next payload carries it and
    // the pack loads it, with no DaemonSet change.
    edited_lists.insert("operator_extra.yaml".into(), "- /opt/vendor/secret.key\n".into());
    write_projected(&dir.join("lists"), "2024_01_02_00_00_00.000000001", &edited_lists);
    RulePack::load(&dir).expect("the edited lists load");
    let data = palisade::rules::pack::PackSources::read_dir(&dir).expect("read the pack").lists_data().expect("lists data");
    let extra = serde_json::to_value(&data["palisade"]["lists"]["operator_extra"]).expect("list as JSON");
    assert_eq!(extra, serde_json::json!(["/opt/vendor/secret.key"]), "a key added by kubectl edit must reach the pack");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- admission, metrics exposure and monitoring ------------------------------------------------

#[test]
fn system_node_critical_is_admitted_outside_kube_system_and_metrics_reach_only_prometheus() {
    let m = manifests();
    let pod = m.daemon_sets[0].spec.template.spec.as_ref().expect("pod spec");
    let pod_labels = m.daemon_sets[0].spec.template.metadata.as_ref().and_then(|md| md.labels.clone()).expect("pod labels");
    let selects_agents = |selector: &BTreeMap<String, String>| selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)) && !selector.is_empty();

    // A quota scoped to the DaemonSet's priority class, in its namespace (GKE and clusters with
    // the plugin's limitedResources refuse the pods otherwise).
    let class = pod.priority_class_name.as_deref().expect("priorityClassName");
    let quota = m.quotas.first().expect("a ResourceQuota");
    assert_eq!(quota.metadata.namespace.as_deref(), Some(NAMESPACE));
    let spec = quota.spec.as_ref().expect("quota spec");
    let scope = spec.scope_selector.as_ref().and_then(|s| s.match_expressions.as_ref()).expect("scopeSelector");
    assert!(
        scope.iter().any(|e| e.scope_name == "PriorityClass" && e.operator == "In" && e.values.iter().flatten().any(|v| v == class)),
        "the quota's scope must name {class}: {scope:?}"
    );
    let pods = spec.hard.as_ref().and_then(|h| h.get("pods")).expect("hard pods");
    assert!(["k", "M"].iter().any(|suffix| pods.0.ends_with(suffix)) || pods.0.parse::<u64>().is_ok_and(|n| n >= 5000), "room for one agent per node: {pods:?}");

    // The metrics Service selects the agents and targets their metrics port.
    let service = m.services.iter().find(|s| s.metadata.name.as_deref() == Some("palisade-metrics")).expect("metrics Service");
    let spec = service.spec.as_ref().expect("service spec");
    assert!(selects_agents(spec.selector.as_ref().expect("selector")), "the Service selects the agent pods");
    let port = spec.ports.iter().flatten().find(|p| p.name.as_deref() == Some("metrics")).expect("metrics port");
    assert_eq!(port.port, 9464);

    // The NetworkPolicy admits ingress to the agents on the metrics port only, from one namespace.
    let policy = m.network_policies.first().expect("a NetworkPolicy for the metrics port");
    let spec = policy.spec.as_ref().expect("policy spec");
    assert!(selects_agents(spec.pod_selector.as_ref().and_then(|s| s.match_labels.as_ref()).expect("podSelector")), "it selects the agents");
    assert_eq!(spec.policy_types.as_deref(), Some(&["Ingress".to_string()][..]));
    let ingress = spec.ingress.as_ref().expect("ingress rules");
    assert_eq!(ingress.len(), 1);
    let ports: Vec<String> = ingress[0].ports.iter().flatten().map(|p| serde_json::to_string(&p.port).unwrap_or_default()).collect();
    assert_eq!(ports, vec!["9464".to_string()], "only the metrics port");
    assert!(ingress[0].from.iter().flatten().all(|peer| peer.namespace_selector.is_some() && peer.ip_block.is_none()), "from namespaces only");
}

/// Metric families the daemon exports, as `# TYPE` names in its exposition.
fn exported_metric_families() -> BTreeSet<String> {
    let metrics = palisade::metrics::Metrics::new();
    metrics.encode().lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).map(str::to_string).collect()
}

/// `palisade_*` series names in a PromQL expression, reduced to their family (`_total`,
/// `_bucket`, `_sum`, `_count` removed).
fn metric_families_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("palisade_") {
        let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[at + name.len()..];
        let family = ["_total", "_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
        out.insert(family.to_string());
    }
    out
}

#[test]
fn monitoring_names_only_metrics_the_daemon_exports() {
    let exported = exported_metric_families();
    assert!(exported.contains("palisade_events_lost_by_pod"), "{exported:?}");
    let dir = deploy().join("monitoring");
    let rule: Value = serde_norway::from_str(&std::fs::read_to_string(dir.join("prometheusrule.yaml")).expect("prometheusrule.yaml")).expect("yaml");
    assert_eq!((rule["apiVersion"].as_str(), rule["kind"].as_str()), (Some("monitoring.coreos.com/v1"), Some("PrometheusRule")));
    let mut alerts = BTreeSet::new();
    for group in rule["spec"]["groups"].as_array().expect("groups") {
        for r in group["rules"].as_array().expect("rules") {
            let name = r["alert"].as_str().expect("alert name");
            let expr = r["expr"].as_str().unwrap_or_else(|| panic!("{name}: expr"));
            for family in metric_families_in(expr) {
                assert!(exported.contains(&family), "{name}: {family} is not a metric the daemon exports");
            }
            assert!(["critical", "warning"].contains(&r["labels"]["severity"].as_str().unwrap_or("")), "{name}: severity");
            alerts.insert(name.to_string());
        }
    }
    // The ones the operator must not miss.
    for want in ["PalisadeEventLoss", "PalisadeRuleErrors", "PalisadeDatapathSyncFailing", "PalisadeQuarantine", "PalisadeAgentDown"] {
        assert!(alerts.contains(want), "PrometheusRule lacks {want}");
    }
    let monitor: Value = serde_norway::from_str(&std::fs::read_to_string(dir.join("servicemonitor.yaml")).expect("servicemonitor.yaml")).expect("yaml");
    let service: Value = documents().into_iter().find(|(_, d)| d["kind"] == "Service").map(|(_, d)| d).expect("Service");
    assert_eq!(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"], "the ServiceMonitor selects the metrics Service");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], service["spec"]["ports"][0]["name"]);

    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("palisade-dashboard.json")).expect("dashboard")).expect("dashboard JSON");
    let mut used = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            for family in metric_families_in(target["expr"].as_str().expect("expr")) {
                assert!(exported.contains(&family), "dashboard panel {}: {family} is not exported", panel["title"]);
                used += 1;
            }
        }
    }
    assert!(used >= 8, "the dashboard shows the daemon's metrics");
}

/// The kustomize base and the monitoring base render (kubectl's built-in kustomize, as
/// `kubectl apply -k` would), and what they render still parses as the Kubernetes types.
#[test]
fn the_kustomize_bases_render() {
    let kubectl = ["/usr/bin/kubectl", "/usr/local/bin/kubectl"].into_iter().find(|p| Path::new(p).exists());
    let Some(kubectl) = kubectl else {
        panic!("kubectl (for `kubectl kustomize`) is not installed; scripts/setup.sh installs it");
    };
    for dir in [deploy(), deploy().join("monitoring"), deploy().join("admission"), deploy().join("operator")] {
        let out = std::process::Command::new(kubectl).arg("kustomize").arg(&dir).output().expect("run kubectl kustomize");
        assert!(out.status.success(), "kubectl kustomize {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).expect("utf-8");
        let mut kinds = Vec::new();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).expect("rendered YAML");
            let kind = value["kind"].as_str().unwrap_or("?").to_string();
            match kind.as_str() {
                "DaemonSet" => drop(typed::<DaemonSet>("rendered", &value)),
                "Deployment" => drop(typed::<Deployment>("rendered", &value)),
                "ConfigMap" => drop(typed::<ConfigMap>("rendered", &value)),
                "Service" => drop(typed::<Service>("rendered", &value)),
                "NetworkPolicy" => drop(typed::<NetworkPolicy>("rendered", &value)),
                "ResourceQuota" => drop(typed::<ResourceQuota>("rendered", &value)),
                "CustomResourceDefinition" => drop(typed::<CustomResourceDefinition>("rendered", &value)),
                "ValidatingAdmissionPolicy" => drop(typed::<ValidatingAdmissionPolicy>("rendered", &value)),
                "ValidatingAdmissionPolicyBinding" => drop(typed::<ValidatingAdmissionPolicyBinding>("rendered", &value)),
                _ => {}
            }
            if !cluster_scoped(&kind) {
                assert_eq!(value["metadata"]["namespace"], NAMESPACE, "rendered {kind}");
            }
            kinds.push(kind);
        }
        assert!(!kinds.is_empty(), "{} rendered nothing", dir.display());
    }
}

/// The init container's command on the real kernel: mounts bpffs where there is none, leaves an
/// existing one alone.
#[test]
fn mount_bpffs_mounts_once_and_is_idempotent() {
    if !support::require_kernel("mount_bpffs_mounts_once_and_is_idempotent") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("palisade-mount-bpffs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let run = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_palisade")).arg("mount-bpffs").arg(&dir).output().expect("run");
        assert!(out.status.success(), "mount-bpffs: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_ne!(palisade::sys::fs_type_at(&dir).expect("mountinfo").as_deref(), Some("bpf"));
    let first = run();
    let second = run();
    let mounted = palisade::sys::fs_type_at(&dir).expect("mountinfo");
    let _ = std::process::Command::new("umount").arg(&dir).status();
    let _ = std::fs::remove_dir(&dir);
    assert_eq!(first, format!("mounted bpffs at {}", dir.display()));
    assert_eq!(second, format!("bpffs already mounted at {}", dir.display()), "a second run must not stack a mount");
    assert_eq!(mounted.as_deref(), Some("bpf"));
}

// ---- The image -----------------------------------------------------------------------------

/// What the final stage's base (`gcr.io/distroless/cc-debian12`) provides for a dynamically
/// linked binary: glibc's libraries and the loader, and libgcc_s. Nothing else may be needed.
const RUNTIME_BASE: &str = "gcr.io/distroless/cc-debian12";
const BASE_LIBRARIES: &[&str] = &["libc.so.6", "libm.so.6", "libgcc_s.so.1", "libpthread.so.0", "libdl.so.2", "librt.so.1", "ld-linux-x86-64.so.2"];

/// The image as far as this machine allows (no registry to pull the bases from): the final
/// stage of deploy/Containerfile is laid out in an empty root (its COPY lines, the binary this
/// test run built standing in for the build stage's, and only the base's libraries the binary
/// needs), and run there with chroot: the binary starts with nothing else from the host, and
/// the rule pack and example policies it ships load from where the image puts them.
#[test]
fn the_image_final_stage_runs_in_an_empty_root_with_only_the_base_libraries() {
    if !nix::unistd::geteuid().is_root() {
        assert_ne!(std::env::var("PALISADE_REQUIRE_KERNEL").as_deref(), Ok("1"), "chroot needs root");
        eprintln!("SKIP: the image test needs root (chroot)");
        return;
    }
    let containerfile = std::fs::read_to_string(deploy().join("Containerfile")).expect("deploy/Containerfile");
    let final_stage = containerfile.rsplit_once("\nFROM ").map(|(_, stage)| stage).expect("a FROM line");
    let base = final_stage.split_whitespace().next().unwrap_or_default();
    assert!(base.starts_with(RUNTIME_BASE), "the final stage is FROM {base}: BASE_LIBRARIES describe {RUNTIME_BASE}");
    let root = std::env::temp_dir().join(format!("palisade-image-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut entrypoint = None;
    for line in final_stage.lines().map(str::trim) {
        if let Some(args) = line.strip_prefix("COPY ") {
            let words: Vec<&str> = args.split_whitespace().collect();
            let (from_build, paths) = match words.first() {
                Some(w) if w.starts_with("--from=") => (true, &words[1..]),
                _ => (false, &words[..]),
            };
            let [source, target] = paths else { panic!("COPY with other than one source: {line}") };
            let source = if from_build { PathBuf::from(env!("CARGO_BIN_EXE_palisade")) } else { repo().join(source) };
            let target = root.join(target.trim_start_matches('/'));
            copy_tree(&source, &target);
        } else if let Some(json) = line.strip_prefix("ENTRYPOINT ") {
            let words: Vec<String> = serde_json::from_str(json).expect("ENTRYPOINT in exec form");
            entrypoint = words.first().cloned();
        }
    }
    let entrypoint = entrypoint.expect("an ENTRYPOINT");
    let binary = root.join(entrypoint.trim_start_matches('/'));
    // The libraries the binary needs, from the host, where the loader looks for them.
    let ldd = std::process::Command::new("ldd").arg(&binary).output().expect("ldd");
    let ldd = String::from_utf8_lossy(&ldd.stdout).to_string();
    for line in ldd.lines().map(str::trim).filter(|l| !l.starts_with("linux-vdso")) {
        let path = line.split(" => ").last().unwrap_or(line).split(" (").next().unwrap_or_default().trim();
        let name = Path::new(path).file_name().and_then(|n| n.to_str()).unwrap_or(path);
        assert!(BASE_LIBRARIES.contains(&name), "the binary needs {name}, which {RUNTIME_BASE} does not ship:\n{ldd}");
        copy_tree(Path::new(path), &root.join(path.trim_start_matches('/')));
    }
    let run = |args: &[&str]| {
        let out = std::process::Command::new("chroot").arg(&root).arg(&entrypoint).args(args).env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").output().expect("chroot");
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let version = run(&["--version"]);
    let rules = run(&["rules", "check", "/usr/share/palisade/rules"]);
    let policies = run(&["policy", "check", "--inventory", "/usr/share/palisade/policies/webapp-inventory.yaml", "/usr/share/palisade/policies/webapp-netpol.yaml"]);
    let _ = std::fs::remove_dir_all(&root);
    assert!(version.0 && version.1.contains("palisade"), "--version in the image root: {}", version.1);
    assert!(rules.0, "the shipped rule pack in the image root: {}", rules.1);
    assert!(policies.0, "the shipped example policies in the image root: {}", policies.1);
}

/// Copies a file or a directory tree, making parents.
fn copy_tree(source: &Path, target: &Path) {
    if source.is_dir() {
        for entry in std::fs::read_dir(source).unwrap_or_else(|e| panic!("{}: {e}", source.display())).flatten() {
            copy_tree(&entry.path(), &target.join(entry.file_name()));
        }
        return;
    }
    std::fs::create_dir_all(target.parent().expect("a parent")).expect("parent directories");
    std::fs::copy(source, target).unwrap_or_else(|e| panic!("copying {} to {}: {e}", source.display(), target.display()));
}

// ---- The PeerSlice operator ----------------------------------------------------------------

/// deploy/operator/: the kustomization lists every file, each parses as its type with nothing
/// dropped; the operator's ClusterRole grants exactly `k8s::OPERATOR_USES` but the Lease, and a
/// Role in its namespace exactly `k8s::OPERATOR_LEASE_USES` (get and update narrowed to the
/// Lease the Deployment elects with) (issue 18), both bound to the Deployment's service
/// account; the Deployment runs `palisade operator` as two non-root replicas (leader election)
/// with the pod name as identity, a read-only root, a memory limit, probes on the status port,
/// which a NetworkPolicy opens to the monitoring namespace only.
#[test]
fn the_operator_role_grants_exactly_what_the_operator_uses() {
    let docs = documents_in(&deploy().join("operator"), "operator/");
    let kustomization: Value =
        serde_norway::from_str(&std::fs::read_to_string(deploy().join("operator/kustomization.yaml")).expect("kustomization"))
            .expect("kustomization yaml");
    let listed: BTreeSet<String> =
        kustomization["resources"].as_array().expect("resources").iter().filter_map(|r| r.as_str().map(|r| format!("operator/{r}"))).collect();
    let files: BTreeSet<String> = docs.iter().map(|(file, _)| file.clone()).collect();
    assert_eq!(listed, files, "deploy/operator kustomization resources vs files");
    let (mut roles, mut bindings, mut deployments, mut accounts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut lease_roles, mut lease_bindings, mut policies) = (Vec::new(), Vec::new(), Vec::new());
    for (file, doc) in &docs {
        match doc["kind"].as_str() {
            Some("ClusterRole") => roles.push(typed::<ClusterRole>(file, doc)),
            Some("ClusterRoleBinding") => bindings.push(typed::<ClusterRoleBinding>(file, doc)),
            Some("Role") => lease_roles.push(typed::<Role>(file, doc)),
            Some("RoleBinding") => lease_bindings.push(typed::<RoleBinding>(file, doc)),
            Some("Deployment") => deployments.push(typed::<Deployment>(file, doc)),
            Some("ServiceAccount") => accounts.push(typed::<ServiceAccount>(file, doc)),
            Some("NetworkPolicy") => policies.push(typed::<NetworkPolicy>(file, doc)),
            Some("CustomResourceDefinition") => drop(typed::<CustomResourceDefinition>(file, doc)),
            other => panic!("{file}: unexpected object {other:?}"),
        }
        if !cluster_scoped(doc["kind"].as_str().unwrap_or("")) {
            assert_eq!(doc["metadata"]["namespace"], NAMESPACE, "{file}");
        }
    }
    assert_eq!((roles.len(), bindings.len(), deployments.len(), accounts.len()), (1, 1, 1, 1));
    assert_eq!((lease_roles.len(), lease_bindings.len(), policies.len()), (1, 1, 1));
    let as_set = |uses: &[(&str, &str, &str)]| -> BTreeSet<(String, String, String)> {
        uses.iter().map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string())).collect()
    };
    let lease_uses = as_set(OPERATOR_LEASE_USES);
    let cluster_uses: BTreeSet<_> = as_set(OPERATOR_USES).difference(&lease_uses).cloned().collect();
    assert!(lease_uses.is_subset(&as_set(OPERATOR_USES)), "OPERATOR_LEASE_USES is part of OPERATOR_USES");
    assert_eq!(granted(&roles[0]), cluster_uses, "the operator's ClusterRole vs OPERATOR_USES without the Lease");
    assert_eq!(Some(bindings[0].role_ref.name.as_str()), roles[0].metadata.name.as_deref());
    let subject = &bindings[0].subjects.as_ref().expect("subjects")[0];
    assert_eq!(Some(subject.name.as_str()), accounts[0].metadata.name.as_deref());

    // The Lease: a Role in the namespace, get and update on the elected Lease by name only.
    let lease_name = "palisade-operator";
    let (lease_granted, named) = granted_rules(lease_roles[0].rules.as_deref().unwrap_or_default());
    assert_eq!(lease_granted, lease_uses, "the operator's Role vs OPERATOR_LEASE_USES");
    for verb in ["get", "update"] {
        assert_eq!(named.get(verb).map(Vec::as_slice), Some(&[lease_name.to_string()][..]), "{verb} narrowed to the Lease");
    }
    assert_eq!(lease_bindings[0].role_ref.kind, "Role");
    assert_eq!(Some(lease_bindings[0].role_ref.name.as_str()), lease_roles[0].metadata.name.as_deref());
    let subject = &lease_bindings[0].subjects.as_ref().expect("subjects")[0];
    assert_eq!((Some(subject.name.as_str()), subject.namespace.as_deref()), (accounts[0].metadata.name.as_deref(), Some(NAMESPACE)));

    let spec = &deployments[0].spec;
    assert_eq!(spec.replicas, Some(2), "a standby beside the leader");
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), accounts[0].metadata.name.as_deref());
    assert_eq!(pod.security_context.as_ref().and_then(|s| s.run_as_non_root), Some(true));
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("operator"));
    assert!(!args.iter().any(|a| a.starts_with("--lease-name")), "the Role names the default Lease: {args:?}");
    let env: BTreeMap<String, String> = container
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value_from.as_ref()?.field_ref.as_ref()?.field_path.clone())))
        .collect();
    assert_eq!(env.get("POD_NAME").map(String::as_str), Some("metadata.name"), "the identity is the pod's name");
    assert_eq!(env.get("POD_NAMESPACE").map(String::as_str), Some("metadata.namespace"));
    let security = container.security_context.as_ref().expect("container securityContext");
    assert_eq!((security.read_only_root_filesystem, security.allow_privilege_escalation), (Some(true), Some(false)));
    assert!(container.resources.as_ref().and_then(|r| r.limits.as_ref()).is_some_and(|l| l.contains_key("memory")));
    let port = container.ports.iter().flatten().find(|p| p.name.as_deref() == Some("metrics")).expect("the metrics port").container_port;
    assert!(args.iter().any(|a| *a == format!("--metrics-addr=0.0.0.0:{port}")), "{args:?}");
    for (probe, path) in [(&container.liveness_probe, "/healthz"), (&container.readiness_probe, "/readyz")] {
        assert_eq!(probe.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.as_deref()), Some(path));
    }
    let ingress = policies[0].spec.as_ref().and_then(|s| s.ingress.clone()).unwrap_or_default();
    assert_eq!(ingress.len(), 1);
    let ports: Vec<String> = ingress[0].ports.iter().flatten().filter_map(|p| p.port.as_ref()).map(|p| format!("{p:?}")).collect();
    assert_eq!(ports, [format!("{:?}", k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port))]);
}

/// (group, resource, verb) of a Role's rules, each once, and the resource names each verb is
/// narrowed to (no wildcard verb, no non-resource URLs).
fn granted_rules(rules: &[PolicyRule]) -> (BTreeSet<(String, String, String)>, BTreeMap<String, Vec<String>>) {
    let (mut granted, mut named) = (BTreeSet::new(), BTreeMap::new());
    for rule in rules {
        assert!(rule.non_resource_urls.is_none(), "{rule:?}");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    assert_ne!(verb, "*", "wildcard verb");
                    assert!(granted.insert((group.clone(), resource.clone(), verb.clone())), "granted twice: {group} {resource} {verb}");
                    if let Some(names) = &rule.resource_names {
                        named.insert(verb.clone(), names.clone());
                    }
                }
            }
        }
    }
    (granted, named)
}

// ---- The Quarantine resource -------------------------------------------------------------

fn crd() -> Value {
    documents().into_iter().find(|(_, d)| d["kind"] == "CustomResourceDefinition").map(|(_, d)| d).expect("the Quarantine CRD")
}

fn admission_policy() -> (Value, Value) {
    let text = std::fs::read_to_string(deploy().join("admission/quarantine-admission.yaml")).expect("admission policy");
    let docs: Vec<Value> = serde_norway::Deserializer::from_str(&text).map(|d| Value::deserialize(d).expect("yaml")).collect();
    let policy = docs.iter().find(|d| d["kind"] == "ValidatingAdmissionPolicy").cloned().expect("policy");
    let binding = docs.iter().find(|d| d["kind"] == "ValidatingAdmissionPolicyBinding").cloned().expect("binding");
    drop(typed::<ValidatingAdmissionPolicy>("quarantine-admission.yaml", &policy));
    drop(typed::<ValidatingAdmissionPolicyBinding>("quarantine-admission.yaml", &binding));
    (policy, binding)
}

/// Every key of `value` is a property of `schema` (OpenAPI v3, as the API server would prune
/// unknown fields): what the agent writes survives a real API server.
fn assert_in_schema(at: &str, value: &Value, schema: &Value) {
    let Value::Object(map) = value else { return };
    let properties = &schema["properties"];
    for (key, v) in map {
        let path = format!("{at}.{key}");
        let sub = &properties[key.as_str()];
        assert!(!sub.is_null(), "{path}: not in the CRD schema (the API server would drop it)");
        if sub["type"] == "object" {
            assert_in_schema(&path, v, sub);
        }
    }
}

#[test]
fn the_quarantine_crd_matches_what_the_agent_writes() {
    use palisade::k8s::quarantine_resource::{DropCounts, Quarantine, QuarantineSpec, QuarantineStatus, ReleaseRequest};
    let crd = crd();
    assert_eq!(crd["metadata"]["name"], "quarantines.palisade.io");
    assert_eq!(crd["spec"]["group"], palisade::k8s::quarantine_resource::GROUP);
    assert_eq!(crd["spec"]["names"]["kind"], palisade::k8s::quarantine_resource::KIND);
    assert_eq!(crd["spec"]["names"]["plural"], palisade::k8s::quarantine_resource::PLURAL);
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], palisade::k8s::quarantine_resource::VERSION);
    assert!(version["subresources"]["status"].is_object(), "status must be a subresource: only palisade writes it");
    let schema = &version["schema"]["openAPIV3Schema"];
    // Every field of a fully populated object, as the agent serialises it.
    let full = Quarantine {
        api_version: "palisade.io/v1".into(),
        kind: "Quarantine".into(),
        metadata: Default::default(),
        spec: QuarantineSpec {
            pod: "web".into(),
            reason: "reverse shell".into(),
            rule: Some("reverse_shell".into()),
            alert_id: Some("a-1".into()),
            node: Some("node-1".into()),
            release: Some(ReleaseRequest { reason: "fixed".into(), requested_by: "alice".into() }),
        },
        status: Some(QuarantineStatus {
            phase: "Enforced".into(),
            since: "2026-12-01T00:00:00Z".into(),
            node: "node-1".into(),
            message: "m".into(),
            drops: Some(DropCounts { egress: 3, ingress: 1, last_drop: "2026-12-01T00:00:01Z".into() }),
        }),
    };
    let value = serde_json::to_value(&full).expect("serialise");
    assert_in_schema("", &serde_json::json!({"spec": value["spec"], "status": value["status"]}), schema);
    // The phases the agent writes are the ones the schema allows.
    let phases: Vec<&str> = schema["properties"]["status"]["properties"]["phase"]["enum"].as_array().expect("enum").iter().filter_map(Value::as_str).collect();
    assert_eq!(
        phases,
        [
            palisade::k8s::quarantine_resource::PHASE_ENFORCED,
            palisade::k8s::quarantine_resource::PHASE_PENDING,
            palisade::k8s::quarantine_resource::PHASE_DRY_RUN,
        ]
    );
    // Printer columns point at fields that exist.
    for column in version["additionalPrinterColumns"].as_array().expect("columns") {
        let path = column["jsonPath"].as_str().expect("jsonPath");
        if path.starts_with(".metadata") {
            continue;
        }
        let mut at = schema;
        for part in path.trim_start_matches('.').split('.') {
            at = &at["properties"][part];
            assert!(!at.is_null(), "printer column {path}: not in the schema");
        }
    }
}

fn cel(expression: &str, variables: &[(&str, Value)]) -> bool {
    let program = cel_interpreter::Program::compile(expression).unwrap_or_else(|e| panic!("{expression}: {e}"));
    let mut context = cel_interpreter::Context::default();
    for (name, value) in variables {
        context.add_variable(*name, value.clone()).expect("variable");
    }
    match program.execute(&context) {
        Ok(cel_interpreter::Value::Bool(b)) => b,
        other => panic!("{expression}: {other:?}"),
    }
}

fn quarantine(release: Option<(&str, &str)>) -> Value {
    let mut q = serde_json::json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": {"pod": "web", "reason": "reverse shell"}});
    if let Some((by, reason)) = release {
        q["spec"]["release"] = serde_json::json!({"requestedBy": by, "reason": reason});
    }
    q
}

#[test]
fn the_admission_policy_makes_requested_by_the_authenticated_user() {
    let (policy, binding) = admission_policy();
    assert_eq!(binding["spec"]["policyName"], policy["metadata"]["name"]);
    assert_eq!(binding["spec"]["validationActions"], serde_json::json!(["Deny"]));
    assert_eq!(policy["spec"]["failurePolicy"], "Fail");
    let rules = &policy["spec"]["matchConstraints"]["resourceRules"][0];
    assert_eq!(rules["resources"], serde_json::json!(["quarantines"]), "status writes (quarantines/status) are not matched");
    let expression = policy["spec"]["validations"][0]["expression"].as_str().expect("expression");
    let admit = |object: Value, old: Value, user: &str| {
        cel(expression, &[("object", object), ("oldObject", old), ("request", serde_json::json!({"userInfo": {"username": user}}))])
    };
    let alice = "alice@example.com";
    // Creating a quarantine by hand, or palisade creating one: no release, admitted.
    assert!(admit(quarantine(None), Value::Null, "bob"));
    // Setting spec.release in one's own name: admitted; in someone else's: denied.
    assert!(admit(quarantine(Some((alice, "fixed"))), quarantine(None), alice));
    assert!(!admit(quarantine(Some((alice, "fixed"))), quarantine(None), "mallory"));
    // Creating an object that is released from the start, in another name: denied.
    assert!(!admit(quarantine(Some((alice, "fixed"))), Value::Null, "mallory"));
    // An update that leaves an existing release as it was (e.g. a label) is anyone's.
    assert!(admit(quarantine(Some((alice, "fixed"))), quarantine(Some((alice, "fixed"))), "system:serviceaccount:x:y"));
    // Rewriting who released it is a new release: must be the requester.
    assert!(!admit(quarantine(Some((alice, "fixed"))), quarantine(Some(("bob", "fixed"))), "mallory"));
}

#[test]
fn the_crd_validations_reject_a_renamed_pod_and_a_withdrawn_release() {
    let crd = crd();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let root_rule = schema["x-kubernetes-validations"][0]["rule"].as_str().expect("root rule");
    assert!(cel(root_rule, &[("self", quarantine(None))]));
    let mut renamed = quarantine(None);
    renamed["spec"]["pod"] = serde_json::json!("other");
    assert!(!cel(root_rule, &[("self", renamed)]), "an object may only name the pod it is named after");

    let spec_rules: Vec<&str> =
        schema["properties"]["spec"]["x-kubernetes-validations"].as_array().expect("spec rules").iter().filter_map(|r| r["rule"].as_str()).collect();
    let holds = |new: Value, old: Value| spec_rules.iter().all(|rule| cel(rule, &[("self", new["spec"].clone()), ("oldSelf", old["spec"].clone())]));
    assert!(holds(quarantine(None), quarantine(None)));
    assert!(holds(quarantine(Some(("alice", "fixed"))), quarantine(None)), "setting a release");
    assert!(!holds(quarantine(None), quarantine(Some(("alice", "fixed")))), "withdrawing a release");
    assert!(!holds(quarantine(Some(("bob", "other"))), quarantine(Some(("alice", "fixed")))), "rewriting a release");
    let mut moved = quarantine(None);
    moved["spec"]["pod"] = serde_json::json!("other");
    assert!(!holds(moved, quarantine(None)), "changing spec.pod");
}
