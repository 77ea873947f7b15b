//! Crash points for the crash-recovery tests (cargo feature `failpoints`).
//!
//! When the environment variable `PERUN_FAILPOINT` names a point the client
//! reaches, the process lets messages already handed to the transport
//! leave, prints `FAILPOINT <name>` on stdout and stops itself (`SIGSTOP`),
//! so that the test can kill it with `SIGKILL` exactly there. Without the
//! feature every point compiles to nothing.

/// Stops the process here if `PERUN_FAILPOINT` is `name`, after giving a
/// message just handed to the transport time to leave.
#[cfg(feature = "failpoints")]
pub(crate) async fn hit(name: &str) {
    if armed(name) {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        stop(name).await;
    }
}

/// Stops the process here, at once, if `PERUN_FAILPOINT` is `name`.
#[cfg(feature = "failpoints")]
pub(crate) async fn hit_now(name: &str) {
    if armed(name) {
        stop(name).await;
    }
}

/// Whether `PERUN_FAILPOINT` names `name`. Read once per process: points
/// sit on the update path, and builds with the feature (the workspace's
/// tests and benchmarks) must not read the environment on every update.
#[cfg(feature = "failpoints")]
fn armed(name: &str) -> bool {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var("PERUN_FAILPOINT").ok())
        .as_deref()
        == Some(name)
}

#[cfg(feature = "failpoints")]
async fn stop(name: &str) {
    use std::io::Write;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "FAILPOINT {name}");
        let _ = out.flush();
    }
    let _ = std::process::Command::new("kill")
        .args(["-STOP", &std::process::id().to_string()])
        .stderr(std::process::Stdio::null())
        .status();
    // Only reached if the stop failed: wait for the kill regardless.
    std::future::pending::<()>().await;
}

/// Without the `failpoints` feature: nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) async fn hit(_name: &str) {}

/// Without the `failpoints` feature: nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) async fn hit_now(_name: &str) {}
