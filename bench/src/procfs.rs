//! Process figures from /proc (Linux).

/// Resident set size of `pid`, in KB (`VmRSS` in /proc/PID/status).
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Open file descriptors of `pid`.
pub fn open_fds(pid: u32) -> Option<u64> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(entries.count() as u64)
}

/// This process's resident set size, in KB.
pub fn self_rss_kb() -> Option<u64> {
    rss_kb(std::process::id())
}

/// UDP datagrams the kernel dropped for a full receive buffer, machine-wide
/// (`RcvbufErrors` in /proc/net/snmp).
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let column = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(column)?.parse().ok()
}

/// Kernel CPU time units (`USER_HZ`): /proc reports clock ticks of 1/100 s on every
/// architecture Linux runs this bench on, whatever the kernel's own tick rate.
const TICKS_PER_S: f64 = 100.0;

/// CPU time of the whole machine and, optionally, of one process, at one moment.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    machine: Option<MachineTicks>,
    process: Option<u64>,
}

/// What two [`CpuSample`]s show, per message handled meanwhile.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuFigures {
    /// CPU the machine was busy for (every process and the kernel, steal excluded), µs per
    /// message.
    pub machine_us_per_msg: Option<f64>,
    /// Share of the machine's CPU time that was idle or waiting for I/O, in percent.
    pub machine_idle_pct: Option<f64>,
    /// CPU of the sampled process (all its threads), µs per message.
    pub process_us_per_msg: Option<f64>,
}

/// Busy and idle clock ticks of all CPUs together (the `cpu` line of /proc/stat).
#[derive(Debug, Clone, Copy, PartialEq)]
struct MachineTicks {
    busy: u64,
    idle: u64,
}

impl CpuSample {
    /// Now; `pid` is the process to account separately, if any.
    pub fn take(pid: Option<u32>) -> Self {
        Self {
            machine: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|stat| machine_ticks(&stat)),
            process: pid.and_then(process_ticks),
        }
    }

    /// From this sample to `later`, divided over `messages`.
    pub fn to(&self, later: &CpuSample, messages: u64) -> CpuFigures {
        figures(self, later, messages)
    }
}

fn figures(before: &CpuSample, after: &CpuSample, messages: u64) -> CpuFigures {
    let per_msg = |ticks: u64| -> Option<f64> {
        (messages > 0).then(|| ticks as f64 / TICKS_PER_S * 1e6 / messages as f64)
    };
    let machine = before
        .machine
        .zip(after.machine)
        .map(|(b, a)| (a.busy.saturating_sub(b.busy), a.idle.saturating_sub(b.idle)));
    CpuFigures {
        machine_us_per_msg: machine.and_then(|(busy, _)| per_msg(busy)),
        machine_idle_pct: machine
            .filter(|(busy, idle)| busy + idle > 0)
            .map(|(busy, idle)| idle as f64 * 100.0 / (busy + idle) as f64),
        process_us_per_msg: before
            .process
            .zip(after.process)
            .and_then(|(b, a)| per_msg(a.saturating_sub(b))),
    }
}

/// The `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal …
fn machine_ticks(stat: &str) -> Option<MachineTicks> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(MachineTicks {
        busy: at(0) + at(1) + at(2) + at(5) + at(6),
        idle: at(3) + at(4),
    })
}

/// User and system ticks of every thread of `pid` (fields 14 and 15 of /proc/PID/stat).
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_process_ticks(&stat)
}

fn parse_process_ticks(stat: &str) -> Option<u64> {
    // The command name is in parentheses and may hold spaces or parentheses itself: the
    // fields to count start after the last ')', at field 3 (the state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ticks_count_irq_time_as_busy_and_iowait_as_idle() {
        let stat = "cpu  100 5 50 1000 20 3 7 9 0 0\ncpu0 50 2 25 500 10 1 3 4 0 0\n";
        assert_eq!(
            machine_ticks(stat),
            Some(MachineTicks {
                busy: 100 + 5 + 50 + 3 + 7,
                idle: 1000 + 20
            })
        );
        assert_eq!(machine_ticks("intr 1 2 3\n"), None);
    }

    #[test]
    fn process_ticks_are_found_after_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (tern (x) y) S 1 4242 4242 0 -1 4194560 500 0 0 0 1234 567 0 0 20 0 5 0";
        assert_eq!(parse_process_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_process_ticks("4242 (short"), None);
    }

    #[test]
    fn figures_divide_the_ticks_between_two_samples_over_the_messages() {
        let at = |busy, idle, process| CpuSample {
            machine: Some(MachineTicks { busy, idle }),
            process: Some(process),
        };
        // 2 s busy, 0.5 s idle, 1 s in the process, over 50,000 messages.
        let f = figures(&at(1000, 500, 300), &at(1200, 550, 400), 50_000);
        assert_eq!(f.machine_us_per_msg, Some(40.0));
        assert_eq!(f.machine_idle_pct, Some(20.0));
        assert_eq!(f.process_us_per_msg, Some(20.0));
        let none = figures(&at(1000, 500, 300), &at(1200, 550, 400), 0);
        assert_eq!(none.machine_us_per_msg, None);
        assert_eq!(none.process_us_per_msg, None);
    }
}
