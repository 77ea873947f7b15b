//! Small helpers for running commands from the workspace root.

use std::path::PathBuf;
use std::process::Command;

/// An xtask step's result; errors are printed and end the process.
pub(crate) type Result<T = ()> = std::result::Result<T, String>;

/// The workspace root (the parent of `xtask/`).
pub(crate) fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Prints a step header.
pub(crate) fn step(what: &str) {
    eprintln!("==> {what}");
}

/// Runs `cmd` and fails unless it exits successfully.
pub(crate) fn run(cmd: &mut Command) -> Result {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("could not start {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed with {status}"))
    }
}

/// The cargo that runs xtask, in the workspace root.
pub(crate) fn cargo_command() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Runs `cargo <args>` in the workspace root with the cargo that runs xtask.
pub(crate) fn cargo(args: &[&str]) -> Result {
    run(cargo_command().args(args))
}
