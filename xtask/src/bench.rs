//! `cargo xtask bench`: the end-to-end benchmark (`examples/bench`) in a
//! release build on a local anvil; writes `target/bench/summary.json`.

use crate::setup;
use crate::util::{self, Result};

/// Installs the tools, then runs the `bench` example in release mode
/// (debug builds are an order of magnitude slower at signing). `quick`
/// passes `--quick` (small counts, about a minute).
pub(crate) fn run(quick: bool) -> Result {
    setup::run()?;
    let out = util::root().join("target/bench/summary.json");
    let out = out.to_string_lossy();
    let mut args = vec![
        "run",
        "--quiet",
        "--release",
        "--example",
        "bench",
        "--",
        "--out",
        &out,
    ];
    if quick {
        args.push("--quick");
    }
    util::step(&format!("cargo {}", args.join(" ")));
    util::cargo(&args)
}
