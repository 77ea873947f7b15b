//! `cargo xtask setup`: installs the pinned npm tools.
//!
//! The tools live in `tools/node_modules` (git-ignored), installed with
//! `npm ci` from the committed `tools/package.json` and `package-lock.json`.
//! A stamp holding the lock file's contents makes a second run instant.

use std::process::Command;

use crate::util::{self, Result};

/// Installs the tools unless the stamp says the same lock file is installed.
pub(crate) fn run() -> Result {
    let tools = util::root().join("tools");
    let lock = std::fs::read(tools.join("package-lock.json"))
        .map_err(|e| format!("tools/package-lock.json: {e}"))?;
    let stamp = tools.join("node_modules").join(".perun-installed");
    let anvil = tools.join("node_modules").join(".bin").join("anvil");
    if anvil.exists() && std::fs::read(&stamp).is_ok_and(|s| s == lock) {
        return Ok(());
    }
    util::step("npm ci (anvil, solc, @openzeppelin/contracts)");
    util::run(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&tools),
    )
    .map_err(|e| format!("{e}\n(is Node.js with npm installed?)"))?;
    if !anvil.exists() {
        return Err(format!(
            "npm ci finished but {} is missing",
            anvil.display()
        ));
    }
    std::fs::write(&stamp, &lock).map_err(|e| format!("{}: {e}", stamp.display()))?;
    Ok(())
}
