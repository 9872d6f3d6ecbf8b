//! The embedded defaults: rule pack, policies and the lab inventory, built into the binary so
//! `palisade run` works with no files around it. They are written out under the state
//! directory so the usual directory loaders (and hot reload) apply to them too.
use std::path::{Path, PathBuf};

include!(concat!(env!("OUT_DIR"), "/embedded_defaults.rs"));

/// Writes `files` below `dir` (replacing what an earlier run wrote) and returns `dir`.
pub fn materialize(dir: &Path, files: &[(&str, &str)]) -> std::io::Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    for (rel, text) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text)?;
    }
    std::fs::create_dir_all(dir)?;
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_embedded_and_valid() {
        assert!(DEFAULT_RULES.iter().any(|(p, _)| p.ends_with(".rego")));
        assert!(!DEFAULT_POLICIES.is_empty());
        crate::inventory::Inventory::parse(DEFAULT_INVENTORY, Path::new("embedded inventory"))
            .expect("the embedded inventory is valid");
        let dir = std::env::temp_dir().join(format!("palisade-defaults-{}", std::process::id()));
        materialize(&dir, DEFAULT_RULES).expect("write");
        assert!(dir.join(DEFAULT_RULES[0].0).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
