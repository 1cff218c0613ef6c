//! The operator under measurement: the release `drop` binary in its own process.

use super::Error;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Builds the operator with cargo profile `profile` (`dist` is how the image ships it:
/// `cargo build --profile dist -p drop`), and returns its path.
///
/// It gets a target directory of its own: built alone, drop's dependencies have fewer features than
/// in this benchmark's build, and cargo names both builds' files alike, so in one directory each
/// build would overwrite the other's and every run would rebuild both.
pub fn build(profile: &str) -> Result<PathBuf, Error> {
    eprintln!("[fleet] building the operator (profile {profile})");
    let repo = e2e::repo();
    let target = e2e::target_dir().join("fleet-operator");
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--profile", profile, "-q", "-p", "drop"])
        .current_dir(&repo)
        .env("CARGO_TARGET_DIR", &target)
        .status()?;
    if !status.success() {
        return Err(format!("cargo build --profile {profile} -p drop failed").into());
    }
    Ok(target.join(profile).join("drop"))
}

/// A running operator.
pub struct Operator {
    child: Child,
    /// Run under `FLEET_OPERATOR_WRAPPER`: the child is the wrapper, leading its process group.
    wrapped: bool,
    metrics: String,
    health: String,
}

fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Operator {
    /// Starts `bin run` as the identity of `kubeconfig`, logging (at `filter`) into `dir/drop.log`.
    pub fn start(
        bin: &Path,
        kubeconfig: &Path,
        namespace: &str,
        dir: &Path,
        filter: &str,
    ) -> Result<Self, Error> {
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let health = format!("127.0.0.1:{}", free_port()?);
        let log = std::fs::File::create(dir.join("drop.log"))?;
        // `FLEET_OPERATOR_WRAPPER` (e.g. `heaptrack -o /tmp/drop`) runs the operator under a
        // profiler, in a process group of its own so that stopping it stops both.
        let wrapper = std::env::var("FLEET_OPERATOR_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let program = words.next();
        let wrapped = program.is_some();
        let mut command = match program {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(bin).process_group(0);
                c
            }
            None => Command::new(bin),
        };
        let child = command
            .args([
                "run",
                "--install-crds",
                "--pod-namespace",
                namespace,
                "--metrics-bind-address",
                &metrics,
                "--health-probe-bind-address",
                &health,
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Self {
            child,
            wrapped,
            metrics,
            health,
        })
    }

    /// Waits until `/readyz` answers.
    pub async fn wait_ready(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = format!("http://{}/readyz", self.health);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(format!("the operator exited at start: {status}").into());
            }
            if reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("the operator was not ready within 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// CachedImage reconciles so far (`controller_runtime_reconcile_total`, every result).
    pub async fn reconciles(&self) -> Result<u64, Error> {
        let text = reqwest::get(format!("http://{}/metrics", self.metrics))
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|l| {
                l.starts_with("controller_runtime_reconcile_total{")
                    && l.contains("controller=\"cachedimage\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64)
    }

    fn proc_file(&self, name: &str) -> Result<String, Error> {
        Ok(std::fs::read_to_string(format!(
            "/proc/{}/{name}",
            self.pid()
        ))?)
    }

    /// The operator's process id: the child's, or under a wrapper, that of the `drop` process in
    /// the child's process group.
    fn pid(&self) -> u32 {
        let group = self.child.id();
        if !self.wrapped {
            return group;
        }
        Command::new("pgrep")
            .args(["-g", &group.to_string(), "-x", "drop"])
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(group)
    }

    /// (peak, current) resident memory in MiB.
    pub fn memory(&self) -> Result<(f64, f64), Error> {
        let status = self.proc_file("status")?;
        let kib = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Ok((kib("VmHWM:") / 1024.0, kib("VmRSS:") / 1024.0))
    }

    /// User and system CPU time so far, in seconds.
    pub fn cpu_seconds(&self) -> Result<f64, Error> {
        let stat = self.proc_file("stat")?;
        // The fields after the command name (which may hold spaces, inside parentheses).
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
        Ok((ticks(11) + ticks(12)) / clock_ticks())
    }

    /// Stops the operator. Under a wrapper, the process group is asked to end (so that a profiler
    /// writes its data), then killed if it has not within five minutes.
    pub fn stop(&mut self) {
        if self.wrapped {
            // Only the operator: a profiler's own processes are still writing its data.
            let group = self.child.id().to_string();
            let _ = Command::new("pkill")
                .args(["-TERM", "-g", &group, "-x", "drop"])
                .status();
            let deadline = Instant::now() + Duration::from_secs(300);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{group}")])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Clock ticks per second of `/proc/PID/stat` times.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}
