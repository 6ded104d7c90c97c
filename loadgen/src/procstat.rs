//! CPU time and memory of a process, read from `/proc`: the server's cost per message and per
//! connection, and the load generator's own CPU use.

use std::time::Duration;

/// One reading of a process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// User + system CPU time so far.
    pub cpu: Duration,
    /// Resident set size, bytes.
    pub rss: u64,
}

/// Read `/proc/PID/stat` and `/proc/PID/status` (`pid` "self" for this process).
pub fn sample(pid: &str) -> Option<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Some(Sample { cpu: Duration::from_millis((utime + stime) * 1000 / clock_ticks()), rss: rss_kb * 1024 })
}

/// Clock ticks per second of `/proc/PID/stat` times.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let s = sample("self").unwrap();
        assert!(s.rss > 0);
        let mut x = 0u64;
        for i in 0..30_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(sample("self").unwrap().cpu >= s.cpu);
        assert!(sample("999999999").is_none());
    }
}
