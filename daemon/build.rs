//! Builds the eBPF programs in `probes-ebpf/` (nightly, bpfel target, bpf-linker) into OUT_DIR,
//! where `probes::object` embeds them with `include_bytes_aligned!`.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    embed_defaults(std::path::Path::new(&manifest_dir))?;
    git_revision(std::path::Path::new(&manifest_dir));
    let root_dir = std::path::Path::new(&manifest_dir).join("../probes-ebpf");
    let root_dir = root_dir
        .canonicalize()
        .with_context(|| format!("probes crate not found at {}", root_dir.display()))?;
    let root_dir = root_dir.to_str().context("probes crate path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "palisade-probes", root_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}

/// `PALISADE_GIT_REVISION` for `palisade --version`: the commit built, `unknown` outside a git
/// checkout (a source tarball).
fn git_revision(manifest_dir: &std::path::Path) {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(manifest_dir)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let revision = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=PALISADE_GIT_REVISION={revision}");
    // Rebuild the version when HEAD moves (a commit, a checkout); in a worktree HEAD is its own.
    if let Some(head) = git(&["rev-parse", "--path-format=absolute", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={head}");
    }
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", &reference]) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

/// Generates `embedded_defaults.rs`: the default rule pack, policies and lab inventory, so the
/// binary runs with no files around it (`palisade run` with no arguments).
fn embed_defaults(manifest_dir: &std::path::Path) -> anyhow::Result<()> {
    let root = manifest_dir.join("..").canonicalize().context("workspace root")?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR not set")?);
    let mut code = String::new();
    let rules = collect(&root.join("rules"), &|p| {
        matches!(p.extension().and_then(|e| e.to_str()), Some("rego" | "json" | "yaml" | "yml"))
    })?;
    let policies = collect(&root.join("policies"), &|p| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        (name.ends_with(".yaml") || name.ends_with(".yml")) && !name.contains("inventory")
    })?;
    for (name, files) in [("DEFAULT_RULES", &rules), ("DEFAULT_POLICIES", &policies)] {
        code.push_str(&format!("pub static {name}: &[(&str, &str)] = &[\n"));
        for (rel, abs) in files {
            code.push_str(&format!("    ({rel:?}, include_str!({abs:?})),\n"));
        }
        code.push_str("];\n");
    }
    let inventory = root.join("policies/webapp-inventory.yaml");
    code.push_str(&format!("pub static DEFAULT_INVENTORY: &str = include_str!({:?});\n", inventory.display().to_string()));
    println!("cargo:rerun-if-changed={}", root.join("rules").display());
    println!("cargo:rerun-if-changed={}", root.join("policies").display());
    std::fs::write(out_dir.join("embedded_defaults.rs"), code).context("write embedded_defaults.rs")?;
    Ok(())
}

/// Files under `dir` (recursively) accepted by `keep`, as (relative path, absolute path), sorted.
fn collect(dir: &std::path::Path, keep: &dyn Fn(&std::path::Path) -> bool) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current).with_context(|| format!("read {}", current.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                println!("cargo:rerun-if-changed={}", path.display());
                stack.push(path);
            } else if keep(&path) {
                let rel = path.strip_prefix(dir)?.to_string_lossy().into_owned();
                out.push((rel, path.to_string_lossy().into_owned()));
            }
        }
    }
    out.sort();
    Ok(out)
}
