//! Network namespaces and links, driven through iproute2 (`ip`), which every lab host has and
//! whose named namespaces (/run/netns/NAME) operators can inspect with the same tool.

use std::io::Write as _;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::LabError;

/// Where iproute2 keeps named network namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Named namespaces on this host.
pub fn list() -> Vec<String> {
    std::fs::read_dir(NETNS_RUN_DIR)
        .map(|entries| {
            entries.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str().map(str::to_string)).collect()
        })
        .unwrap_or_default()
}

pub fn add(name: &str) -> Result<(), LabError> {
    run_ip(&["netns", "add", name])
}

/// Kills the processes still inside the namespace (they would keep it and its veth alive after
/// the name is gone), then deletes the name. An absent namespace is not an error.
pub fn delete(name: &str) -> Result<(), LabError> {
    if !exists(name) {
        return Ok(());
    }
    let own_pid = std::process::id() as i32;
    for pid in pids_in(name) {
        if pid != own_pid {
            // SAFETY: kill(2) on a pid found in /proc; no memory is touched.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    match run_ip(&["netns", "delete", name]) {
        Ok(()) => Ok(()),
        Err(_) if !exists(name) => Ok(()),
        Err(err) => Err(err),
    }
}

/// Pids whose network namespace is the named one (what `ip netns pids` does).
pub fn pids_in(name: &str) -> Vec<i32> {
    let Ok(target) = std::fs::metadata(netns_path(name)) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .map(|m| m.ino() == target.ino() && m.dev() == target.dev())
                .unwrap_or(false)
        })
        .collect()
}

/// An open handle on the namespace, for setns(2).
pub fn open(name: &str) -> Result<OwnedFd, LabError> {
    let path = netns_path(name);
    std::fs::File::open(&path)
        .map(OwnedFd::from)
        .map_err(|source| LabError::Io { what: "open network namespace", path, source })
}

/// Whether `interface` exists in namespace `netns`.
pub fn link_exists(netns: &str, interface: &str) -> bool {
    Command::new("ip")
        .args(["-n", netns, "link", "show", "dev", interface])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The master (bridge) of `interface` in `netns`, if it has one.
pub fn link_master(netns: &str, interface: &str) -> Option<String> {
    let output = Command::new("ip").args(["-j", "-n", netns, "link", "show", "dev", interface]).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let links: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    links.get(0)?.get("master")?.as_str().map(str::to_string)
}

/// Global addresses on `interface` in `netns`.
pub fn addresses(netns: &str, interface: &str) -> Vec<IpAddr> {
    let Ok(output) = Command::new("ip").args(["-j", "-n", netns, "addr", "show", "dev", interface]).output() else {
        return Vec::new();
    };
    if !output.status.success() {
        return Vec::new();
    }
    parse_addresses(&output.stdout)
}

/// Global-scope addresses from `ip -j addr show` output.
fn parse_addresses(json: &[u8]) -> Vec<IpAddr> {
    let Ok(serde_json::Value::Array(links)) = serde_json::from_slice(json) else {
        return Vec::new();
    };
    links
        .iter()
        .filter_map(|link| link.get("addr_info")?.as_array())
        .flatten()
        .filter(|addr| addr.get("scope").and_then(|s| s.as_str()) == Some("global"))
        .filter_map(|addr| addr.get("local")?.as_str()?.parse().ok())
        .collect()
}

/// Runs `ip ARGS...`; a failure carries the command and what `ip` said.
pub fn run_ip(args: &[&str]) -> Result<(), LabError> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn { program: "ip".into(), source })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(LabError::Command {
            command: format!("ip {}", args.join(" ")),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Runs several `ip` commands inside `netns` with one process (`ip -n NS -batch -`): a pod
/// takes one fork instead of six.
pub fn batch(netns: &str, commands: &[String]) -> Result<(), LabError> {
    if commands.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn { program: "ip".into(), source })?;
    let script = commands.join("\n") + "\n";
    if let Some(mut stdin) = child.stdin.take() {
        // A write error means `ip` exited early; its status and stderr below say why.
        let _ = stdin.write_all(script.as_bytes());
    }
    let output = child.wait_with_output().map_err(|source| LabError::Spawn { program: "ip".into(), source })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(LabError::Command {
            command: format!("ip -n {netns} -batch - <<< {:?}", commands.join("; ")),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_global_addresses_only() {
        let json = br#"[{"ifindex":2,"ifname":"eth0","addr_info":[
            {"family":"inet","local":"198.18.1.10","prefixlen":15,"scope":"global"},
            {"family":"inet6","local":"2001:db8::10","prefixlen":64,"scope":"global"},
            {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]}]"#;
        let got = parse_addresses(json);
        assert_eq!(got, vec!["198.18.1.10".parse::<IpAddr>().unwrap(), "2001:db8::10".parse().unwrap()]);
        assert!(parse_addresses(b"garbage").is_empty());
    }
}
