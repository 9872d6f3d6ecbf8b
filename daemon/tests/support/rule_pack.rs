//! A rule pack written to a temporary directory and the `palisade` CLI run on it, for the rule
//! tests that need no kernel (`#[path = "support/rule_pack.rs"] mod rule_pack;`: the rest of
//! `support/` brings the lab and kernel helpers along).
use std::path::{Path, PathBuf};
use std::process::Command;

/// Writes `files` (name, content) into a fresh directory named after `name` and this process.
pub fn write(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    for (file, text) in files {
        std::fs::write(dir.join(file), text).unwrap_or_else(|e| panic!("writing {file}: {e}"));
    }
    dir
}

/// `palisade ARGS`: the exit code and stdout followed by stderr.
pub fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_palisade")).args(args).output().expect("run palisade");
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}
