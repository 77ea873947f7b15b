//! `cargo xtask bench`: the end-to-end benchmark (`examples/bench`) in a
//! release build on a local anvil; writes `target/bench/summary.json`.

use crate::setup;
use crate::util::{self, Result};

/// Installs the tools, then runs the `bench` example in release mode
/// (debug builds are an order of magnitude slower at signing). `quick`
/// passes `--quick` (small counts, seconds) and writes
/// `target/bench/summary-quick.json` instead.
pub(crate) fn run(quick: bool) -> Result {
    setup::run()?;
    // A quick run exercises the harness; it must not overwrite real figures.
    let name = if quick {
        "summary-quick.json"
    } else {
        "summary.json"
    };
    let out = util::root().join("target/bench").join(name);
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
