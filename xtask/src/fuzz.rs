//! `cargo xtask fuzz [--seeds SPEC] [--steps N] [--ledger sim|anvil|both]`:
//! the protocol fuzzer (`tests/fuzz_peer.rs`) over more seeds than
//! `cargo xtask test` runs (`SPEC`: `n`, `a..b` or `a,b,c`; default
//! `1..51`). A failing seed prints its violations; `--seeds N` replays it.

use crate::setup;
use crate::util::{self, Result};

/// Parses the flags and runs the fuzzer.
pub(crate) fn run(args: &[String]) -> Result {
    let mut seeds = "1..51".to_string();
    let mut steps: Option<String> = None;
    let mut ledger: Option<String> = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--seeds" => seeds = value()?,
            "--steps" => {
                let v = value()?;
                v.parse::<u64>()
                    .map_err(|_| format!("--steps {v:?} is not a number"))?;
                steps = Some(v);
            }
            "--ledger" => {
                let v = value()?;
                if !matches!(v.as_str(), "sim" | "anvil" | "both") {
                    return Err(format!("--ledger {v:?}: sim, anvil or both"));
                }
                ledger = Some(v);
            }
            other => {
                return Err(format!(
                    "unknown flag {other}; usage: cargo xtask fuzz [--seeds N|A..B|A,B,C] [--steps N] [--ledger sim|anvil|both]"
                ));
            }
        }
    }
    setup::run()?;
    let mut fuzz = util::cargo_command();
    fuzz.args([
        "test",
        "--quiet",
        "--test",
        "fuzz_peer",
        "--",
        "--nocapture",
    ])
    .env("FUZZ_SEEDS", &seeds);
    if let Some(n) = &steps {
        fuzz.env("FUZZ_STEPS", n);
    }
    if let Some(l) = &ledger {
        fuzz.env("FUZZ_LEDGER", l);
    }
    util::step(&format!("{fuzz:?}"));
    util::run(&mut fuzz)
}
