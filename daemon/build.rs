//! Builds the eBPF programs in `probes-ebpf/` (nightly, bpfel target, bpf-linker) into OUT_DIR,
//! where `probes::object` embeds them with `include_bytes_aligned!`.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
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
