//! Whether this machine's CPUs are all busy, read from `/proc/stat`.
//!
//! The writer thread waits for more writes before a batch only when they
//! are ([`crate::redb_store::BatchWait::WhenCpusBusy`]): then every other
//! thread is signing, checking or sending for some other channel, so a
//! batch that waits costs no throughput, and each `fsync` and commit it
//! saves is CPU those threads get. With a CPU idle, waiting would only add
//! latency. Off Linux, or when `/proc/stat` cannot be read, the CPUs never
//! count as busy.

use std::fs::File;
use std::io::Read;
use std::time::{Duration, Instant};

/// How often `/proc/stat` is read at most: its counters tick every 10 ms,
/// so a shorter span would see a handful of ticks per CPU.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// The CPUs count as busy while less than this share of their time since
/// the last sample was idle (or waiting for I/O with nothing to run).
const IDLE_BELOW: f64 = 0.10;

/// The CPUs' cumulated time, in `/proc/stat`'s ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Times {
    /// Idle, or waiting for I/O with nothing else to run.
    pub(crate) idle: u64,
    /// Every state, idle included.
    pub(crate) total: u64,
}

/// Samples `/proc/stat` and answers from the last two samples.
#[derive(Debug, Default)]
pub(crate) struct CpuBusy {
    last: Option<(Instant, Times)>,
    busy: bool,
}

impl CpuBusy {
    /// Whether the CPUs were busy between the last two samples, taking a
    /// new one when the last is older than [`SAMPLE_EVERY`].
    pub(crate) fn busy(&mut self) -> bool {
        let now = Instant::now();
        if let Some((at, _)) = self.last
            && now.duration_since(at) < SAMPLE_EVERY
        {
            return self.busy;
        }
        let Some(times) = read() else {
            self.busy = false;
            return false;
        };
        if let Some((_, before)) = self.last {
            self.busy = busy_between(before, times);
        }
        self.last = Some((now, times));
        self.busy
    }
}

/// Whether less than [`IDLE_BELOW`] of the time from `before` to `after`
/// was idle; a span without ticks (or counters that went back) is not.
pub(crate) fn busy_between(before: Times, after: Times) -> bool {
    let total = after.total.saturating_sub(before.total);
    let idle = after.idle.saturating_sub(before.idle);
    total > 0 && (idle as f64) < IDLE_BELOW * total as f64
}

/// The machine's CPU times, from the first line of `/proc/stat`.
fn read() -> Option<Times> {
    // The first line (every CPU together) comes first and is short; the
    // rest of the file (per CPU, interrupts) is not needed.
    let mut buf = [0u8; 512];
    let n = File::open("/proc/stat").ok()?.read(&mut buf).ok()?;
    parse(std::str::from_utf8(buf.get(..n)?).ok()?)
}

/// Parses `cpu  user nice system idle iowait irq softirq steal ...`;
/// `guest` and `guest_nice` are already inside `user` and `nice`.
pub(crate) fn parse(stat: &str) -> Option<Times> {
    let line = stat.lines().next()?;
    let mut fields = line.split_ascii_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let [_user, _nice, _system, idle, iowait, ..] = ticks[..] else {
        return None;
    };
    Some(Times {
        idle: idle.checked_add(iowait)?,
        total: ticks.iter().try_fold(0u64, |sum, t| sum.checked_add(*t))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_line_is_parsed() {
        let stat = "cpu  100 5 50 800 40 1 2 3 0 0\ncpu0 50 2 25 400 20 0 1 1 0 0\nintr 1 2 3\n";
        assert_eq!(
            parse(stat),
            Some(Times {
                idle: 840,
                total: 1001
            })
        );
        // Older kernels print fewer columns.
        assert_eq!(parse("cpu 1 2 3 4 5\n"), Some(Times { idle: 9, total: 15 }));
    }

    #[test]
    fn garbage_is_not_parsed() {
        for stat in [
            "",
            "cpu0 1 2 3 4 5\n",
            "cpu 1 2 x 4 5\n",
            "cpu 1 2 3\n",
            "cpu 18446744073709551615 1 1 1 1\n",
            "intr 1 2 3\n",
        ] {
            assert_eq!(parse(stat), None, "{stat:?}");
        }
    }

    #[test]
    fn busy_means_little_idle_time() {
        let at = |idle, total| Times { idle, total };
        assert!(busy_between(at(100, 1000), at(105, 1100)));
        assert!(!busy_between(at(100, 1000), at(110, 1100)));
        assert!(!busy_between(at(100, 1000), at(190, 1100)));
        // No ticks between the samples, or counters that went back.
        assert!(!busy_between(at(100, 1000), at(100, 1000)));
        assert!(!busy_between(at(100, 1000), at(0, 10)));
    }

    #[test]
    fn this_machine_can_be_read_on_linux() {
        if cfg!(target_os = "linux") {
            let times = read().expect("/proc/stat");
            assert!(times.total >= times.idle);
        }
    }
}
