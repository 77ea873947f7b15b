//! `cargo xtask gas`: measures every contract operation on anvil and writes
//! `target/bench/gas.json` (the `gas` example of the adjudicator crate).

use crate::util::{self, Result};

/// Runs the adjudicator's `gas` example (gas does not depend on the build profile).
pub(crate) fn run() -> Result {
    util::step("gas: deploy and run each operation on anvil");
    util::cargo(&[
        "run",
        "--quiet",
        "-p",
        "perun-adjudicator",
        "--features",
        "testing",
        "--example",
        "gas",
    ])
}
