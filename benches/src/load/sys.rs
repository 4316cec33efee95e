//! The few OS calls the generator needs: its own file limit, huge-page setting and CPU time,
//! and the gateway's CPU time, I/O counters and memory from /proc. All `unsafe` of the crate is
//! here.

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::time::Duration;

/// Keeps the generator's heap off transparent huge pages, as the gateway does by default: the
/// first touch of each 2 MiB page stalls the thread for milliseconds on a virtual machine, which
/// would show up as latency of the messages it was reading. Best effort.
pub fn no_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Raises the soft open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `want` is a valid rlimit; the call only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return want.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` on a socket about to be bound to `(ip, 0)`: the kernel then
/// picks the local port at `connect`, unique only per 4-tuple, instead of reserving one at `bind`.
/// Without it every such bind searches the port range for a port unused on that address (in use
/// or in TIME_WAIT, towards any destination), which with ~10 000 ports taken costs milliseconds
/// of kernel time per connection and stalls the single-threaded generator.
pub fn bind_address_no_port(fd: RawFd) -> std::io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `fd` is an open socket owned by the caller; the option value is a valid c_int
    // whose size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// CPU time (user + system) this process has used.
pub fn self_cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is valid and writable for the duration of the call.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// True if the peer closed the socket (or it failed); false if it is open, with or without
/// unread data. Does not block and consumes nothing.
pub fn peer_closed(fd: RawFd) -> bool {
    let mut b = 0u8;
    // SAFETY: `b` is one valid writable byte; `fd` is an open socket owned by the caller.
    let n = unsafe {
        libc::recv(
            fd,
            (&raw mut b).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n == 0 {
        return true;
    }
    n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// utime + stime from a /proc/.../stat line.
fn stat_cpu(stat: &str) -> Option<(String, Duration)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the comm: state is field 3, utime 14, stime 15 (proc(5)).
    let ticks = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    Some((
        comm,
        Duration::from_micros(ticks * 1_000_000 / clock_ticks()),
    ))
}

/// The number in a `Key:   123 kB` line of /proc/PID/status.
fn num(line: &str) -> u64 {
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A snapshot of the gateway process.
#[derive(Debug, Clone, Default)]
pub struct ProcSnap {
    pub cpu: Duration,
    /// CPU per thread name (threads with the same name summed).
    pub threads: BTreeMap<String, Duration>,
    pub rss_kib: u64,
    /// /proc/PID/io: read and write syscalls (io_uring operations are not counted), bytes that
    /// reached the block layer.
    pub syscr: u64,
    pub syscw: u64,
    pub write_bytes: u64,
    /// Voluntary + involuntary context switches of all threads.
    pub ctx_switches: u64,
    /// Open file descriptors (sockets included); needs the same user as the gateway (or root).
    pub fds: u64,
}

impl ProcSnap {
    pub fn take(pid: u32) -> Result<ProcSnap, String> {
        let base = format!("/proc/{pid}");
        let stat = std::fs::read_to_string(format!("{base}/stat"))
            .map_err(|e| format!("gateway pid {pid}: {e}"))?;
        let (_, cpu) = stat_cpu(&stat).ok_or("unparsable /proc/PID/stat")?;
        let mut snap = ProcSnap {
            cpu,
            ..ProcSnap::default()
        };
        if let Ok(dir) = std::fs::read_dir(format!("{base}/task")) {
            for t in dir.flatten() {
                if let Ok(s) = std::fs::read_to_string(t.path().join("stat"))
                    && let Some((comm, c)) = stat_cpu(&s)
                {
                    *snap.threads.entry(comm).or_default() += c;
                }
                let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
                snap.ctx_switches += status
                    .lines()
                    .filter(|l| l.contains("ctxt_switches:"))
                    .map(num)
                    .sum::<u64>();
            }
        }
        let status = std::fs::read_to_string(format!("{base}/status")).unwrap_or_default();
        if let Some(line) = status.lines().find(|l| l.starts_with("VmRSS:")) {
            snap.rss_kib = num(line);
        }
        snap.fds = open_fds(pid);
        // Needs the same user as the gateway (or root); missing counters stay 0.
        let io = std::fs::read_to_string(format!("{base}/io")).unwrap_or_default();
        for line in io.lines() {
            let mut it = line.split(": ");
            let (Some(k), Some(v)) = (it.next(), it.next()) else {
                continue;
            };
            let v = v.trim().parse().unwrap_or(0);
            match k {
                "syscr" => snap.syscr = v,
                "syscw" => snap.syscw = v,
                "write_bytes" => snap.write_bytes = v,
                _ => {}
            }
        }
        Ok(snap)
    }
}

/// Open file descriptors of process `pid` (0 if /proc does not let us look).
pub fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// The counter `name` of table `table` (`Udp`, `TcpExt`, ...) in the text of /proc/net/snmp or
/// /proc/net/netstat, where each table is a line of names followed by a line of values, both
/// starting with `table:`; 0 if absent.
pub fn net_counter(text: &str, table: &str, name: &str) -> u64 {
    let prefix = format!("{table}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .position(|n| n == name)
        .and_then(|i| values.split_whitespace().nth(i))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// UDP datagrams received and sent by the whole machine so far (`/proc/net/snmp`: `Udp:
/// InDatagrams`, `OutDatagrams`). On loopback every datagram is counted once sent, once received.
pub fn udp_datagrams() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    (
        net_counter(&text, "Udp", "InDatagrams"),
        net_counter(&text, "Udp", "OutDatagrams"),
    )
}

/// Connection requests the whole machine's listeners dropped so far (`/proc/net/netstat`:
/// `TcpExt: ListenOverflows`, the accept queue was full; `ListenDrops`, for any reason). The
/// client of a dropped SYN retries it after 1 s, then 3 s, ...
pub fn listen_drops() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    (
        net_counter(&text, "TcpExt", "ListenOverflows"),
        net_counter(&text, "TcpExt", "ListenDrops"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_counters_are_read_by_table_and_name() {
        let text =
            "Tcp: RtoMin ActiveOpens\nTcp: 200 17\nUdp: InDatagrams OutDatagrams\nUdp: 5 6\n";
        assert_eq!(net_counter(text, "Udp", "OutDatagrams"), 6);
        assert_eq!(net_counter(text, "Tcp", "ActiveOpens"), 17);
        assert_eq!(net_counter(text, "Tcp", "Missing"), 0);
        assert_eq!(net_counter(text, "TcpExt", "ListenDrops"), 0);
    }
}
