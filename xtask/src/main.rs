//! `cargo xtask`: the project's automation, in Rust so it runs wherever cargo does.
//!
//! | command | does |
//! |---|---|
//! | `setup` | installs the pinned npm tools (anvil, solc, OpenZeppelin) into `tools/node_modules` |
//! | `test` | setup, contract artifacts check, `cargo fmt --check`, clippy with `-D warnings`, every test (test binaries 3 at a time: `PERUN_TEST_JOBS`; each killed after 600 s: `PERUN_TEST_TIMEOUT`) |
//! | `vectors` | regenerates `channel/tests/vectors.json` |
//! | `contracts [--check]` | rebuilds the contract artifacts (or checks the committed ones) |
//! | `gas` | measures contract gas on anvil into `target/bench/gas.json` |
//! | `bench [--quick] [--only PART[,PART]] [--runs N]` | end-to-end client figures (release, anvil + libp2p) into `target/bench/summary.json` (some parts, e.g. `chain_index`: `summary-PART.json`; `--runs N`: medians and ranges of N runs) |
//! | `chaos [--ledger sim\|anvil] [--schedules N] [--seed S]` | a long run of the chaos suite; replays a failing seed |
//! | `fuzz [--seeds N\|A..B\|A,B,C] [--steps N] [--ledger sim\|anvil\|both]` | the protocol fuzzer with a hostile peer over more seeds |
//! | `demo [payment\|payments\|dispute\|watchtower\|tictactoe]` | runs `examples/payment_channel.rs` (or `payments.rs`, `dispute.rs`, `watchtower.rs`, `tictactoe.rs`) on a local anvil |

mod bench;
mod chaos;
mod contracts;
mod fuzz;
mod gas;
mod setup;
mod tests;
mod util;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::run(),
        Some("test") => test(),
        Some("vectors") => util::cargo(&[
            "run",
            "--quiet",
            "-p",
            "perun-channel",
            "--example",
            "gen_vectors",
        ]),
        Some("contracts") => contracts::run(args.get(1).is_some_and(|a| a == "--check")),
        Some("gas") => gas::run(),
        Some("bench") => bench::run(&args[1..]),
        Some("chaos") => chaos::run(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("demo") => demo(args.get(1).map(String::as_str)),
        _ => {
            eprintln!(
                "usage: cargo xtask <setup|test|vectors|contracts [--check]|gas|bench [--quick] [--only PART[,PART]] [--runs N]|chaos [--ledger sim|anvil] [--schedules N] [--seed S]|fuzz [--seeds N|A..B|A,B,C] [--steps N] [--ledger sim|anvil|both]|demo [payment|payments|dispute|watchtower|tictactoe]>"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs an example end to end on a fresh local anvil.
fn demo(which: Option<&str>) -> util::Result {
    let example = match which.unwrap_or("payment") {
        "payment" => "payment_channel",
        "dispute" => "dispute",
        "watchtower" => "watchtower",
        "payments" => "payments",
        "tictactoe" => "tictactoe",
        other => {
            return Err(format!(
                "unknown demo {other:?}; try: payment, payments, dispute, watchtower, tictactoe"
            ));
        }
    };
    setup::run()?;
    if example == "watchtower" {
        // The example starts the tower as its own process.
        util::step("cargo build -p perun-watchtower --bin perun-watchtower");
        util::cargo(&[
            "build",
            "--quiet",
            "-p",
            "perun-watchtower",
            "--bin",
            "perun-watchtower",
        ])?;
    }
    util::step(&format!("cargo run --example {example}"));
    util::cargo(&["run", "--quiet", "--example", example])
}

/// The one test command: what `.ci/run` and the README run.
fn test() -> util::Result {
    setup::run()?;
    util::step("cargo xtask contracts --check");
    contracts::run(true)?;
    util::step("cargo fmt --all --check");
    util::cargo(&["fmt", "--all", "--check"])?;
    util::step("cargo clippy --workspace --all-targets -- -D warnings");
    util::cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The client builds the tower crate without its server: keep that
    // build compiling (the workspace build above unifies `server` in).
    util::step("cargo clippy -p perun-watchtower --no-default-features -- -D warnings");
    util::cargo(&[
        "clippy",
        "-p",
        "perun-watchtower",
        "--no-default-features",
        "--",
        "-D",
        "warnings",
    ])?;
    tests::run()
}
