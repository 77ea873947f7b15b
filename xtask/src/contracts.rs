//! `cargo xtask contracts [--check]`: compiles the Solidity sources with the
//! pinned solc-js into the committed artifacts, or (with `--check`) fails if
//! the committed artifacts differ from a rebuild.

use std::process::Command;

use crate::util::{self, Result};

/// Runs `adjudicator/contracts/build.js` with node.
pub(crate) fn run(check: bool) -> Result {
    let dir = util::root().join("adjudicator").join("contracts");
    if !util::root().join("tools/node_modules/solc").exists() {
        return Err("solc-js is missing from tools/node_modules: run cargo xtask setup".into());
    }
    util::step(if check {
        "check contract artifacts against a rebuild"
    } else {
        "compile contracts"
    });
    let mut cmd = Command::new("node");
    cmd.arg("build.js").current_dir(&dir);
    if check {
        cmd.arg("--check");
    }
    util::run(&mut cmd)
}
