//! Percentiles of latency samples, and the process's resident memory.

use std::time::Duration;

use crate::Res;

/// Latency samples, sorted once.
#[derive(Debug, Clone)]
pub(crate) struct Samples(Vec<Duration>);

impl Samples {
    /// Sorts `samples`.
    pub(crate) fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self(samples)
    }

    /// The `p` quantile (0..=1) in milliseconds, by nearest rank; 0 if empty.
    pub(crate) fn ms(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let rank = ((self.0.len() as f64 * p).ceil() as usize).clamp(1, self.0.len());
        self.0[rank - 1].as_secs_f64() * 1e3
    }

    /// Whether there are no samples.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The median in milliseconds.
    pub(crate) fn p50(&self) -> f64 {
        self.ms(0.50)
    }

    /// The mean in milliseconds.
    pub(crate) fn mean_ms(&self) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.iter().sum::<Duration>().as_secs_f64() * 1e3 / self.0.len() as f64
    }
}

/// Resident set size of this process in bytes (`VmRSS` of
/// `/proc/self/status`, the same figure as `statm`'s resident pages times
/// the page size).
pub(crate) fn rss_bytes() -> Res<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or("no VmRSS in /proc/self/status")?;
    Ok(kib * 1024)
}
