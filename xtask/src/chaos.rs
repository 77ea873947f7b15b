//! `cargo xtask chaos [--ledger sim|anvil] [--schedules N] [--seed S]`: a
//! longer run of the chaos suite (`tests/chaos.rs`) than `cargo xtask test`
//! makes. It prints `chaos: N schedules, F chain faults injected, C connections cut (R payment attempts retried), L wei lost`;
//! a failing schedule names its seed and the command that replays it.

use crate::setup;
use crate::util::{self, Result};

/// Parses the flags and runs the suite's test(s) with them.
pub(crate) fn run(args: &[String]) -> Result {
    let mut ledger: Option<String> = None;
    let mut schedules: Option<u64> = None;
    let mut seed: Option<u64> = None;
    let mut parallel: Option<u64> = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--ledger" => {
                let v = value()?;
                if v != "sim" && v != "anvil" {
                    return Err(format!("--ledger {v:?}: sim or anvil"));
                }
                ledger = Some(v);
            }
            "--schedules" => schedules = Some(number(&value()?)?),
            "--seed" => seed = Some(number(&value()?)?),
            "--parallel" => parallel = Some(number(&value()?)?),
            other => {
                return Err(format!(
                    "unknown flag {other}; usage: cargo xtask chaos [--ledger sim|anvil] [--schedules N] [--seed S] [--parallel P]"
                ));
            }
        }
    }
    setup::run()?;
    let mut cmd = util::cargo_command();
    cmd.args(["test", "--quiet", "--test", "chaos"]);
    if let Some(l) = &ledger {
        cmd.arg(format!("chaos_{l}"));
        cmd.env("PERUN_CHAOS_LEDGER", l);
    }
    cmd.args(["--", "--nocapture", "--test-threads", "1"]);
    if let Some(n) = schedules {
        cmd.env("PERUN_CHAOS_SCHEDULES", n.to_string());
    }
    if let Some(s) = seed {
        cmd.env("PERUN_CHAOS_SEED", s.to_string());
    }
    if let Some(p) = parallel {
        cmd.env("PERUN_CHAOS_PARALLEL", p.to_string());
    }
    util::step(&format!("{cmd:?}"));
    util::run(&mut cmd)
}

fn number(s: &str) -> Result<u64> {
    s.parse().map_err(|_| format!("{s:?} is not a number"))
}
