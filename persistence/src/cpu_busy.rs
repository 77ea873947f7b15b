//! Whether this machine's CPUs are all busy, and this process among those
//! keeping them so, read from `/proc/stat` and `/proc/self/stat`.
//!
//! The writer thread waits for more writes before a batch only then
//! ([`crate::redb_store::BatchWait::WhenCpusBusy`]): every other thread is
//! signing, checking or sending for some other channel, so a batch that
//! waits costs no throughput, and each `fsync` and commit it saves is CPU
//! those threads get. With a CPU idle, waiting would only add latency; with
//! the CPUs busy with other processes while this one mostly waits for its
//! disk, it would too. Off Linux, or when either file cannot be read, the
//! CPUs never count as busy.

use std::fs::File;
use std::io::Read;
use std::time::{Duration, Instant};

/// How often `/proc/stat` is read at most: its counters tick every 10 ms,
/// so a shorter span would see a handful of ticks per CPU.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// The CPUs count as busy while less than this share of their time since
/// the last sample was idle (or waiting for I/O with nothing to run).
const IDLE_BELOW: f64 = 0.10;
/// ... and while this process used at least this many CPUs meanwhile.
const OWN_CPUS_FROM: f64 = 0.5;
/// A sample older than this is no baseline: it would average the present
/// with a past that may have been quite different.
const STALE_AFTER: Duration = Duration::from_secs(1);

/// The CPUs' cumulated time, in `/proc/stat`'s ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Times {
    /// Idle, or waiting for I/O with nothing else to run.
    idle: u64,
    /// Every state, idle included.
    total: u64,
    /// This process's CPU time (user and system), in the same ticks.
    own: u64,
}

/// Samples `/proc/stat` and `/proc/self/stat`, and answers from the last
/// two samples.
#[derive(Debug, Default)]
pub(crate) struct CpuBusy {
    last: Option<(Instant, Times)>,
    busy: bool,
    /// The CPUs `/proc/stat`'s totals sum over, counted on first use.
    cpus: Option<usize>,
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
        let cpus = *self.cpus.get_or_insert_with(online_cpus);
        self.busy = match self.last {
            Some((at, before)) if now.duration_since(at) < STALE_AFTER => {
                busy_between(before, times, cpus)
            }
            _ => false,
        };
        self.last = Some((now, times));
        self.busy
    }
}

/// Whether less than [`IDLE_BELOW`] of the CPUs' time from `before` to
/// `after` was idle while this process used at least [`OWN_CPUS_FROM`] of
/// `cpus` CPUs; a span without ticks (or counters that went back) is not.
fn busy_between(before: Times, after: Times, cpus: usize) -> bool {
    let total = after.total.saturating_sub(before.total);
    let idle = after.idle.saturating_sub(before.idle);
    let own = after.own.saturating_sub(before.own);
    // `total` is the ticks of every CPU together: one CPU's share of it is
    // `total / cpus`.
    let own_cpus = own as f64 * cpus.max(1) as f64 / total.max(1) as f64;
    total > 0 && (idle as f64) < IDLE_BELOW * total as f64 && own_cpus >= OWN_CPUS_FROM
}

/// The CPUs `/proc/stat`'s first line sums over: its `cpuN` lines (not
/// this process's affinity or quota, which the totals do not follow).
fn online_cpus() -> usize {
    std::fs::read_to_string("/proc/stat").map_or(1, |stat| count_cpus(&stat))
}

/// Counts the `cpuN` lines of a `/proc/stat` (at least 1).
fn count_cpus(stat: &str) -> usize {
    stat.lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count()
        .max(1)
}

/// The machine's and this process's CPU times.
fn read() -> Option<Times> {
    let (idle, total) = read_machine()?;
    Some(Times {
        idle,
        total,
        own: read_own()?,
    })
}

/// The machine's idle and total CPU ticks, from the first line of
/// `/proc/stat`.
fn read_machine() -> Option<(u64, u64)> {
    // The first line (every CPU together) comes first and is short; the
    // rest of the file (per CPU, interrupts) is not needed.
    let mut buf = [0u8; 512];
    let n = File::open("/proc/stat").ok()?.read(&mut buf).ok()?;
    parse(std::str::from_utf8(buf.get(..n)?).ok()?)
}

/// This process's user and system ticks, from `/proc/self/stat`.
fn read_own() -> Option<u64> {
    let mut buf = [0u8; 1024];
    let n = File::open("/proc/self/stat").ok()?.read(&mut buf).ok()?;
    parse_own(std::str::from_utf8(buf.get(..n)?).ok()?)
}

/// Parses `cpu  user nice system idle iowait irq softirq steal ...` into
/// idle and total ticks; `guest` and `guest_nice` are already inside
/// `user` and `nice`.
fn parse(stat: &str) -> Option<(u64, u64)> {
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
    Some((
        idle.checked_add(iowait)?,
        ticks.iter().try_fold(0u64, |sum, t| sum.checked_add(*t))?,
    ))
}

/// Parses `pid (comm) state ppid ... utime stime ...`: `utime` and
/// `stime` are the 14th and 15th fields, counted after the command name,
/// which may itself hold spaces and parentheses (hence the last `)`).
fn parse_own(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_line_is_parsed() {
        let stat = "cpu  100 5 50 800 40 1 2 3 0 0\ncpu0 50 2 25 400 20 0 1 1 0 0\nintr 1 2 3\n";
        assert_eq!(parse(stat), Some((840, 1001)));
        // Older kernels print fewer columns.
        assert_eq!(parse("cpu 1 2 3 4 5\n"), Some((9, 15)));
        assert_eq!(count_cpus(stat), 1);
        assert_eq!(count_cpus("cpu 1\ncpu0 1\ncpu1 1\ncpufreq 3\nintr 1\n"), 2);
        assert_eq!(count_cpus(""), 1);
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
        for stat in [
            "",
            "12 (x) S",
            "12 (a) b) S 1 2 3 4 5 6 7 8 9 10 x 12",
            "no parenthesis",
        ] {
            assert_eq!(parse_own(stat), None, "{stat:?}");
        }
    }

    #[test]
    fn a_process_line_is_parsed_whatever_its_name() {
        let line = |comm: &str| {
            format!("4242 ({comm}) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 70 0 0 20 0 9 0 1 2 3")
        };
        for comm in ["bench", "a b", "x) S 1 (y", ")"] {
            assert_eq!(parse_own(&line(comm)), Some(320), "{comm:?}");
        }
    }

    #[test]
    fn busy_means_little_idle_time_and_a_share_of_our_own() {
        let at = |idle, total, own| Times { idle, total, own };
        // Two CPUs, 100 ticks in all: this process used 60 (1.2 CPUs).
        assert!(busy_between(at(100, 1000, 0), at(105, 1100, 60), 2));
        // Too much idle time.
        assert!(!busy_between(at(100, 1000, 0), at(110, 1100, 60), 2));
        assert!(!busy_between(at(100, 1000, 0), at(190, 1100, 60), 2));
        // Busy, but with others' work: we used 20 ticks (0.4 CPUs).
        assert!(!busy_between(at(100, 1000, 0), at(105, 1100, 20), 2));
        // No ticks between the samples, or counters that went back.
        assert!(!busy_between(at(100, 1000, 0), at(100, 1000, 0), 2));
        assert!(!busy_between(at(100, 1000, 50), at(0, 10, 60), 2));
    }

    #[test]
    fn this_machine_can_be_read_on_linux() {
        if cfg!(target_os = "linux") {
            let times = read().expect("/proc/stat and /proc/self/stat");
            assert!(times.total >= times.idle);
        }
    }
}
