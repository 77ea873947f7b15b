//! `cargo xtask bench`: the end-to-end benchmark (`examples/bench`) in a
//! release build on a local anvil; writes `target/bench/summary.json`.

use crate::setup;
use crate::util::{self, Result};

/// Installs the tools, then runs the `bench` example in release mode
/// (debug builds are an order of magnitude slower at signing). `--quick`
/// passes `--quick` (small counts, seconds) and writes
/// `target/bench/summary-quick.json` instead; `--only PART[,PART...]` runs
/// those parts (`floor`, `durable`, `memory`, `restore`, `tower`,
/// `tower_watch`, `chain_index`, `payments`) into `summary-PART.json`.
/// `--runs N` runs it N times (each run's figures in
/// `target/bench/runs/`) and writes the medians, with each figure's range,
/// to the summary.
pub(crate) fn run(args: &[String]) -> Result {
    let quick = args.iter().any(|a| a == "--quick");
    let value = |flag: &str| -> Result<Option<String>> {
        args.iter()
            .position(|a| a == flag)
            .map(|i| {
                args.get(i + 1)
                    .cloned()
                    .ok_or_else(|| format!("{flag} needs a value"))
            })
            .transpose()
    };
    let only = value("--only")?;
    let runs: usize = match value("--runs")? {
        None => 1,
        Some(n) => n
            .parse()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| format!("--runs {n:?}: a number of runs, at least 1"))?,
    };
    setup::run()?;
    // A quick or partial run must not overwrite the full run's figures.
    let stem = match (&only, quick) {
        (Some(part), false) => format!("summary-{}", part.replace(',', "-")),
        (Some(part), true) => format!("summary-{}-quick", part.replace(',', "-")),
        (None, true) => "summary-quick".to_string(),
        (None, false) => "summary".to_string(),
    };
    let dir = util::root().join("target/bench");
    let out = dir.join(format!("{stem}.json"));
    let mut run_files = Vec::with_capacity(runs);
    for i in 1..=runs {
        let file = if runs == 1 {
            out.clone()
        } else {
            dir.join("runs").join(format!("{stem}-run{i}.json"))
        };
        let file_s = file.to_string_lossy().into_owned();
        let mut cargo_args = bench_example(&["--out", &file_s]);
        if quick {
            cargo_args.push("--quick");
        }
        if let Some(part) = &only {
            cargo_args.extend(["--only", part.as_str()]);
        }
        util::step(&format!(
            "run {i} of {runs}: cargo {}",
            cargo_args.join(" ")
        ));
        util::cargo(&cargo_args)?;
        run_files.push(file_s);
    }
    if runs == 1 {
        return Ok(());
    }
    let out_s = out.to_string_lossy().into_owned();
    let mut cargo_args = bench_example(&["--merge", &out_s]);
    cargo_args.extend(run_files.iter().map(String::as_str));
    util::step(&format!("medians of {runs} runs"));
    util::cargo(&cargo_args)
}

/// `cargo` arguments that run the `bench` example in release with `args`.
fn bench_example<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["run", "--quiet", "--release", "--example", "bench", "--"];
    all.extend_from_slice(args);
    all
}
