//! Where the workspace and its build output are, and running the commands xtask drives: the
//! one place that decides, so builds, tests and benches agree on the binaries they use.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent().map(PathBuf::from).unwrap_or(dir)
}

/// `$CARGO_TARGET_DIR` (a relative one taken from the workspace root, where every cargo we
/// run starts), else `<root>/target`.
pub fn target_dir() -> PathBuf {
    let root = root();
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_relative() { root.join(d) } else { d })
        .unwrap_or_else(|| root.join("target"))
}

pub fn flanneld_release() -> PathBuf {
    target_dir().join("release/flanneld")
}

/// `cargo` started in the workspace root with the target dir spelled out, so it builds
/// exactly where [`target_dir`] looks.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .env("CARGO_TARGET_DIR", target_dir());
    cmd
}

/// Runs `cmd` (echoed first), failing unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}
