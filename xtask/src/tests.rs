//! The test run of `cargo xtask test`: every test binary of the workspace,
//! a few at a time.
//!
//! `cargo test` runs one test binary after another. Most of ours wait (on
//! timeouts, on anvil, on a chain clock) rather than compute: run one by
//! one they kept the two cores mostly idle and took about ten of the
//! twenty minutes `cargo xtask test` may take. Here the binaries that
//! `cargo test --no-run` builds run [`jobs`] at a time, each as `cargo
//! test` runs it (in its package's directory, no arguments), the slow ones
//! first. A binary's output goes to `<target>/xtask-test/<name>.log` and is
//! printed if it fails; every binary runs even after one failed. A binary
//! still running after [`timeout`] is killed with every process it started
//! (anvil, a peer) and counts as failed: a hang fails the run instead of
//! holding it until CI gives up.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::util::{Result, root};

/// Binaries that take the longest (seconds on the 2-vCPU CI machine), started
/// first so the run does not end waiting on one of them alone.
const SLOW_FIRST: &[&str] = &[
    "tests/chaos.rs",          // 120 (its anvil half)
    "tests/nparty_hostile.rs", // 100
    "tests/consistency.rs",    // 35 alone, 85 beside others
    "tests/malicious.rs",      // 52
    "tests/towers.rs",         // 42
    "tests/crash.rs",          // 30
    "tests/flood.rs",          // 30
    "tests/fuzz_peer.rs",      // 25
    "tests/payments_attack.rs",
    "tests/watcher_faults.rs",
];

/// How many test binaries run at once: `PERUN_TEST_JOBS`, by default 3.
fn jobs() -> usize {
    std::env::var("PERUN_TEST_JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .filter(|&j| j > 0)
        .unwrap_or(3)
}

/// How long one test binary may run: `PERUN_TEST_TIMEOUT` seconds, by
/// default 600 (the slowest takes about 120 beside others).
fn timeout() -> Duration {
    std::env::var("PERUN_TEST_TIMEOUT")
        .ok()
        .and_then(|t| t.parse().ok())
        .filter(|&t| t > 0)
        .map_or(Duration::from_secs(600), Duration::from_secs)
}

/// One test binary to run.
struct Binary {
    /// Where it lives in the workspace, e.g. `wire/tests/failures.rs`.
    name: String,
    exe: PathBuf,
    /// Its package's directory: `cargo test` runs a binary there.
    dir: PathBuf,
}

/// Builds every test binary (`cargo test --workspace --all-targets
/// --no-run`), runs them, then the doc tests.
pub(crate) fn run() -> Result {
    let binaries = build()?;
    let jobs = jobs();
    let timeout = timeout();
    crate::util::step(&format!(
        "{} test binaries, {jobs} at a time (PERUN_TEST_JOBS), each for at most {} s (PERUN_TEST_TIMEOUT)",
        binaries.len(),
        timeout.as_secs()
    ));
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    let logs = target.join("xtask-test");
    std::fs::create_dir_all(&logs).map_err(|e| format!("creating {}: {e}", logs.display()))?;
    let started = Instant::now();
    let failed = run_all(binaries, jobs, timeout, &logs);
    eprintln!(
        "==> test binaries done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        for (name, log) in &failed {
            eprintln!("\n==> {name} FAILED; its output ({}):", log.display());
            match std::fs::read_to_string(log) {
                Ok(out) => eprintln!("{out}"),
                Err(e) => eprintln!("(could not read it: {e})"),
            }
        }
        let names: Vec<&str> = failed.iter().map(|(n, _)| n.as_str()).collect();
        return Err(format!("test binaries failed: {}", names.join(", ")));
    }
    crate::util::step("cargo test --workspace --doc");
    crate::util::cargo(&["test", "--workspace", "--doc"])
}

/// Builds the test binaries and lists them, slow ones first.
fn build() -> Result<Vec<Binary>> {
    crate::util::step("cargo test --workspace --all-targets --no-run");
    let out = crate::util::cargo_command()
        .args([
            "test",
            "--workspace",
            "--all-targets",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("could not start cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("building the tests failed with {}", out.status));
    }
    let root = root();
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        binaries.extend(binary(line, &root)?);
    }
    if binaries.is_empty() {
        return Err("cargo built no test binary".into());
    }
    binaries.sort_by_key(|b| {
        SLOW_FIRST
            .iter()
            .position(|s| b.name == *s)
            .unwrap_or(SLOW_FIRST.len())
    });
    Ok(binaries)
}

/// The test binary a line of cargo's JSON output announces, if any: an
/// artifact with an executable, built by the test profile (examples are
/// built but not run, as with `cargo test`). A line that announces one we
/// cannot read is an error: skipping it would pass without running it.
fn binary(line: &str, root: &Path) -> Result<Option<Binary>> {
    if !line.contains(r#""reason":"compiler-artifact""#) || line.contains(r#""executable":null"#) {
        return Ok(None);
    }
    let unreadable = || format!("cannot read cargo's line for a test binary: {line}");
    let profile = field_object(line, "profile").ok_or_else(unreadable)?;
    if !profile.contains(r#""test":true"#) {
        return Ok(None);
    }
    let field = |key| string_field(line, key).ok_or_else(unreadable);
    let exe = PathBuf::from(field("executable")?);
    let manifest = PathBuf::from(field("manifest_path")?);
    let dir = manifest.parent().ok_or_else(unreadable)?.to_path_buf();
    let src = PathBuf::from(field("src_path")?);
    let name = src.strip_prefix(root).unwrap_or(&src).display().to_string();
    Ok(Some(Binary { name, exe, dir }))
}

/// The value of `"key":"…"` in a line of JSON (cargo's paths carry no
/// escapes on the platforms we run on; one that does is not taken).
fn string_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(r#""{key}":""#))? + key.len() + 4;
    let len = line[start..].find('"')?;
    let value = &line[start..start + len];
    (!value.contains('\\')).then_some(value)
}

/// The flat object `"key":{…}` in a line of JSON.
fn field_object<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(r#""{key}":{{"#))? + key.len() + 3;
    let len = line[start..].find('}')?;
    Some(&line[start..start + len])
}

/// Runs `binaries`, `jobs` at a time; returns the failed ones and their logs.
fn run_all(
    binaries: Vec<Binary>,
    jobs: usize,
    timeout: Duration,
    logs: &Path,
) -> Vec<(String, PathBuf)> {
    let queue = Mutex::new(VecDeque::from(binaries));
    let failed = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                while let Some(b) = next(&queue) {
                    let log = logs.join(format!("{}.log", b.name.replace('/', "_")));
                    let started = Instant::now();
                    let result = run_one(&b, &log, timeout);
                    let took = started.elapsed();
                    report(&b.name, &result, took);
                    if result.is_err() {
                        push(&failed, (b.name, log));
                    }
                }
            });
        }
    });
    failed.into_inner().unwrap_or_else(|e| e.into_inner())
}

fn next(queue: &Mutex<VecDeque<Binary>>) -> Option<Binary> {
    queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
}

fn push<T>(list: &Mutex<Vec<T>>, item: T) {
    list.lock().unwrap_or_else(|e| e.into_inner()).push(item);
}

/// Runs one binary with its output in `log`, for at most `timeout`.
fn run_one(b: &Binary, log: &Path, timeout: Duration) -> Result {
    let out = File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("sharing {}: {e}", log.display()))?;
    let mut child = Command::new(&b.exe)
        .current_dir(&b.dir)
        .env("CARGO_MANIFEST_DIR", &b.dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("could not start {}: {e}", b.exe.display()))?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(None) => {
                kill_tree(child.id());
                // Our own SIGKILL too: it needs no `kill` program, and the
                // child, not yet waited for, cannot be another process.
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "still running after {} s: killed (PERUN_TEST_TIMEOUT)",
                    timeout.as_secs()
                ));
            }
            Err(e) => {
                kill_tree(child.id());
                let _ = child.kill();
                return Err(format!("waiting for {}: {e}", b.exe.display()));
            }
        }
    };
    if status.success() {
        Ok(())
    } else {
        Err(format!("{status}"))
    }
}

/// SIGKILLs `pid` and every process below it (read from `/proc`, so on
/// Linux; elsewhere only `pid`). Children first found, then all killed at
/// once, so none is reparented out of reach in between (stopped first).
fn kill_tree(pid: u32) {
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let _ = Command::new("kill")
            .args(["-STOP", &tree[i].to_string()])
            .stderr(Stdio::null())
            .status();
        tree.extend(children(tree[i]));
        i += 1;
    }
    let mut kill = Command::new("kill");
    kill.arg("-KILL");
    for p in &tree {
        kill.arg(p.to_string());
    }
    let _ = kill.stderr(Stdio::null()).status();
}

/// The processes whose parent is `pid`, from `/proc/<pid>/stat`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| parent(p) == Some(pid))
        .collect()
}

/// A process's state letter and parent, from `/proc/<pid>/stat`: the two
/// fields after the `)` that ends its name.
fn stat(pid: u32) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut after = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = after.next()?.to_owned();
    Some((state, after.next()?.parse().ok()?))
}

fn parent(pid: u32) -> Option<u32> {
    stat(pid).map(|(_, parent)| parent)
}

/// Whether `pid` runs: it exists and is not a zombie (dead, not yet reaped).
#[cfg(test)]
fn running(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != "Z")
}

fn report(name: &str, result: &Result, took: Duration) {
    let secs = took.as_secs_f64();
    match result {
        Ok(()) => eprintln!("    ok     {secs:6.1} s  {name}"),
        Err(e) => eprintln!("    FAILED {secs:6.1} s  {name} ({e})"),
    }
}

#[cfg(test)]
mod unit {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const ROOT: &str = "/w";

    fn line(exe: &str, test: bool) -> String {
        format!(
            r#"{{"reason":"compiler-artifact","manifest_path":"/w/wire/Cargo.toml","target":{{"kind":["test"],"src_path":"/w/wire/tests/x.rs","test":true}},"profile":{{"opt_level":"0","test":{test}}},"executable":{exe},"fresh":true}}"#
        )
    }

    #[test]
    fn reads_test_binaries_and_skips_the_rest() {
        let root = Path::new(ROOT);
        let b = binary(&line(r#""/w/target/debug/deps/x-1""#, true), root)
            .unwrap()
            .unwrap();
        assert_eq!(b.name, "wire/tests/x.rs");
        assert_eq!(b.dir, Path::new("/w/wire"));
        assert_eq!(b.exe, Path::new("/w/target/debug/deps/x-1"));
        // Built for running, not testing (an example, a bin): not run.
        assert!(binary(&line(r#""/w/x""#, false), root).unwrap().is_none());
        assert!(binary(&line("null", true), root).unwrap().is_none());
        assert!(
            binary(r#"{"reason":"build-finished"}"#, root)
                .unwrap()
                .is_none()
        );
        // A test binary whose path we cannot read fails the run.
        assert!(binary(&line(r#""/w/a\"b""#, true), root).is_err());
    }

    /// A binary past its time is killed with what it started, and fails.
    #[test]
    fn a_hung_binary_is_killed_with_its_children() {
        let dir = std::env::temp_dir().join(format!("xtask-hang-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("hang.sh");
        let pidfile = dir.join("child.pid");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nsleep 300 &\necho $! > {}\nsleep 300\n",
                pidfile.display()
            ),
        )
        .unwrap();
        Command::new("chmod")
            .arg("+x")
            .arg(&script)
            .status()
            .unwrap();
        let b = Binary {
            name: "hang".into(),
            exe: script,
            dir: dir.clone(),
        };
        let started = Instant::now();
        let e = run_one(&b, &dir.join("hang.log"), Duration::from_secs(3)).unwrap_err();
        assert!(e.contains("killed"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(15));
        let child: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            !running(child)
        });
        assert!(gone, "the binary's child {child} is still running");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
