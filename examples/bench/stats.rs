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

/// CPU time this process has used so far, user and system, from
/// `/proc/self/stat` (in clock ticks of `USER_HZ`, 100 on Linux).
pub(crate) fn cpu_time() -> Res<Duration> {
    cpu_time_of(std::path::Path::new("/proc/self/stat"))
}

/// The same for the process whose `/proc/<pid>/stat` is at `path`.
pub(crate) fn cpu_time_of(path: &std::path::Path) -> Res<Duration> {
    let stat = std::fs::read_to_string(path)?;
    // The command name (field 2) may hold spaces; fields count from after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("bad /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Res<u64> {
        Ok(fields
            .get(i)
            .ok_or("short /proc/<pid>/stat")?
            .parse::<u64>()?)
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    let ticks = tick(11)? + tick(12)?;
    Ok(Duration::from_millis(ticks * 10))
}
