//! What the load generators read from the servers they measure: CPU times
//! from `/proc/PID/stat` and a Prometheus `GET /metrics`. Shared by
//! `corvidctl bench` and `corvidctl imap-bench`.

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Linux reports times in USER_HZ, which is 100 on every architecture
/// Corvid runs on.
pub const TICKS_PER_SEC: f64 = 100.0;

/// CPU times of one process, in ticks: its own and its reaped children's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcTimes {
    /// Parent process id.
    pub ppid: i32,
    /// utime + cutime.
    pub user_ticks: u64,
    /// stime + cstime.
    pub sys_ticks: u64,
}

/// The CPU times of process `pid` (a number, as `/proc` names it), or
/// `None` if it is gone.
pub fn proc_times(pid: &str) -> Option<ProcTimes> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses one `/proc/PID/stat` line. The command name, in brackets, may
/// hold spaces and brackets itself, hence the split at the last `)`.
fn parse_stat(stat: &str) -> Option<ProcTimes> {
    let after = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields counted from `state` (field 3 of proc(5)): utime is 14.
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some(ProcTimes {
        ppid: f.get(1)?.parse().ok()?,
        user_ticks: num(11) + num(13),
        sys_ticks: num(12) + num(14),
    })
}

/// GET http://ADDR/metrics (bounded in size and time).
pub async fn fetch_metrics(addr: &str) -> anyhow::Result<String> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("metrics at {addr}"))?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut body = Vec::new();
        s.take(16 << 20).read_to_end(&mut body).await?;
        let text = String::from_utf8_lossy(&body).into_owned();
        if !text.starts_with("HTTP/1.") || text.split(' ').nth(1).is_none_or(|c| c != "200") {
            bail!(
                "metrics at {addr}: {}",
                text.lines().next().unwrap_or_default()
            );
        }
        Ok(text)
    })
    .await
    .map_err(|_| anyhow::anyhow!("metrics at {addr}: no answer in 10 s"))?
}

/// The sum of every series of metric `name` (any labels) in a Prometheus
/// text exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names() {
        let line = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 75 3 4 20 0 9 0 123 456 789";
        assert_eq!(
            parse_stat(line),
            Some(ProcTimes {
                ppid: 1,
                user_ticks: 253,
                sys_ticks: 79
            })
        );
        assert_eq!(parse_stat("4242 (x"), None);
    }

    #[test]
    fn this_process_has_cpu_times() {
        let me = proc_times(&std::process::id().to_string()).expect("own stat");
        assert!(me.ppid > 0);
    }

    #[test]
    fn sums_a_metric_over_its_labels_only() {
        let text = "# TYPE a_total counter\na_total{x=\"1\"} 2\na_total{x=\"2\"} 3\n\
                    a_total_more 100\nb_total 7\n";
        assert_eq!(metric_sum(text, "a_total"), 5.0);
        assert_eq!(metric_sum(text, "b_total"), 7.0);
        assert_eq!(metric_sum(text, "c_total"), 0.0);
    }
}
