//! `cargo xtask bench`: the end-to-end benchmark (`examples/bench`) in a
//! release build on a local anvil; writes `target/bench/summary.json`.

use crate::setup;
use crate::util::{self, Result};

/// Installs the tools, then runs the `bench` example in release mode
/// (debug builds are an order of magnitude slower at signing). `--quick`
/// passes `--quick` (small counts, seconds) and writes
/// `target/bench/summary-quick.json` instead; `--only PART` runs one part
/// (`floor`, `durable`, `memory`, `restore`, `tower`, `tower_watch`,
/// `chain_index`) into `summary-PART.json`.
pub(crate) fn run(args: &[String]) -> Result {
    let quick = args.iter().any(|a| a == "--quick");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .map(|i| {
            args.get(i + 1)
                .cloned()
                .ok_or_else(|| "--only needs a part".to_string())
        })
        .transpose()?;
    setup::run()?;
    // A quick or partial run must not overwrite the full run's figures.
    let name = match (&only, quick) {
        (Some(part), false) => format!("summary-{part}.json"),
        (Some(part), true) => format!("summary-{part}-quick.json"),
        (None, true) => "summary-quick.json".to_string(),
        (None, false) => "summary.json".to_string(),
    };
    let out = util::root().join("target/bench").join(name);
    let out = out.to_string_lossy();
    let mut cargo_args = vec![
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
        cargo_args.push("--quick");
    }
    if let Some(part) = &only {
        cargo_args.extend(["--only", part.as_str()]);
    }
    util::step(&format!("cargo {}", cargo_args.join(" ")));
    util::cargo(&cargo_args)
}
