//! The processes of a test cluster: how they are started, recorded, recognised and stopped.
//!
//! A component is started either *attached* (it dies with the test process: a parent-death signal
//! from a thread that lives as long as the process) or *detached* (a session of its own, outliving
//! the process that started it, so later test binaries and shells find it running). Either way it
//! is recorded in the cluster's state directory under `pids/`: `<name>` holds the PID, `<name>.exe`
//! the binary, `<name>.args` its arguments (JSON). A recorded PID counts as the component only while
//! `/proc/PID/exe` still names that binary: PIDs are reused, and a stale PID must never be killed.

use super::TestError;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How a component's life is tied to the process that starts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lifetime {
    /// Killed when the starting process ends (and on drop).
    Attached,
    /// Runs until stopped by its recorded PID.
    Detached,
}

/// How long a component has to end after SIGTERM before it gets SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(10);

pub(crate) fn harness(what: &str, e: impl std::fmt::Display) -> TestError {
    TestError::Harness(format!("{what}: {e}"))
}

fn pids(state: &Path) -> PathBuf {
    state.join("pids")
}

/// The log file of `name` in `state`.
pub(crate) fn log_path(state: &Path, name: &str) -> PathBuf {
    state.join("logs").join(format!("{name}.log"))
}

/// The last `lines` lines of `name`'s log.
pub(crate) fn log_tail(state: &Path, name: &str, lines: usize) -> String {
    let log = std::fs::read_to_string(log_path(state, name)).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// The recorded PID of `name`, whether or not it still runs.
pub(crate) fn recorded_pid(state: &Path, name: &str) -> Option<u32> {
    std::fs::read_to_string(pids(state).join(name))
        .ok()
        .and_then(|p| p.trim().parse().ok())
}

/// The recorded arguments of component `name`.
pub(crate) fn recorded_args(state: &Path, name: &str) -> Result<Vec<String>, TestError> {
    let path = pids(state).join(format!("{name}.args"));
    let text = std::fs::read_to_string(&path)
        .map_err(|e| harness(&format!("reading {}", path.display()), e))?;
    serde_json::from_str(&text).map_err(|e| harness(&format!("reading {}", path.display()), e))
}

/// The recorded binary of `name`.
pub(crate) fn recorded_exe(state: &Path, name: &str) -> Option<PathBuf> {
    std::fs::read_to_string(pids(state).join(format!("{name}.exe")))
        .ok()
        .map(|s| PathBuf::from(s.trim()))
}

/// Whether the recorded process `name` runs the binary recorded with it. A binary replaced while
/// its process runs reads as `<path> (deleted)`: still the same process.
pub(crate) fn alive(state: &Path, name: &str) -> bool {
    let (Some(pid), Some(exe)) = (recorded_pid(state, name), recorded_exe(state, name)) else {
        return false;
    };
    running_exe(pid).is_some_and(|running| running == exe)
}

/// What `/proc/PID/exe` names, without a " (deleted)" suffix; `None` for no process or a zombie.
fn running_exe(pid: u32) -> Option<PathBuf> {
    let link = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let text = link.to_string_lossy();
    Some(PathBuf::from(
        text.strip_suffix(" (deleted)").unwrap_or(&text).to_owned(),
    ))
}

/// The names with a recorded PID in `state` (components and processes that joined the cluster).
pub(crate) fn recorded_names(state: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(pids(state)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.contains('.'))
        .collect();
    names.sort();
    names
}

/// Starts `bin` with `args` as component `name` of the cluster in `state`, output appended to its
/// log, and records it. An attached component's `Child` is returned (to be waited for); a detached
/// one's is not kept.
pub(crate) fn start(
    state: &Path,
    name: &str,
    bin: &Path,
    args: &[String],
    lifetime: Lifetime,
) -> Result<Option<Child>, TestError> {
    let exe = std::fs::canonicalize(bin)
        .map_err(|e| harness(&format!("finding {}", bin.display()), e))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(state, name))
        .map_err(|e| harness("opening a log", e))?;
    let err = log.try_clone().map_err(|e| harness("opening a log", e))?;
    let mut cmd = Command::new(&exe);
    cmd.args(args).stdin(Stdio::null()).stdout(log).stderr(err);
    let child = match lifetime {
        Lifetime::Attached => spawner(cmd),
        Lifetime::Detached => spawn_detached(&mut cmd),
    }
    .map_err(|e| harness(&format!("starting {}", exe.display()), e))?;
    let dir = pids(state);
    let record = |file: String, text: String| {
        std::fs::write(dir.join(file), text).map_err(|e| harness("recording a process", e))
    };
    record(format!("{name}.exe"), exe.display().to_string())?;
    record(
        format!("{name}.args"),
        serde_json::to_string(args).map_err(|e| harness("recording a process", e))?,
    )?;
    // The PID last: a reader that sees it finds the rest.
    record(name.to_owned(), child.id().to_string())?;
    Ok(match lifetime {
        Lifetime::Attached => Some(child),
        Lifetime::Detached => None,
    })
}

/// Stops the recorded process `name`: SIGTERM, then SIGKILL after [`TERM_GRACE`]. `child` is its
/// handle when this process started it (then it is reaped, leaving no zombie behind).
pub(crate) fn stop(state: &Path, name: &str, child: Option<&mut Child>) {
    if !alive(state, name) {
        if let Some(child) = child {
            let _ = child.try_wait();
        }
        return;
    }
    let Some(pid) = recorded_pid(state, name).and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    signal(pid, Signal::Term);
    let deadline = Instant::now() + TERM_GRACE;
    match child {
        Some(child) => {
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        None => {
            while Instant::now() < deadline && alive(state, name) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if alive(state, name) {
                signal(pid, Signal::Kill);
            }
        }
    }
}

enum Signal {
    Term,
    Kill,
}

#[cfg(unix)]
fn signal(pid: i32, signal: Signal) {
    let sig = match signal {
        Signal::Term => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of this process.
    unsafe {
        libc::kill(pid, sig);
    }
}

#[cfg(not(unix))]
fn signal(_pid: i32, _signal: Signal) {}

/// Starts `cmd` in a session of its own: it outlives this process and gets none of its signals
/// (a Ctrl-C in the terminal that ran the test stops the test, not the shared cluster).
#[cfg(unix)]
fn spawn_detached(cmd: &mut Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
    cmd.spawn()
}

#[cfg(not(unix))]
fn spawn_detached(cmd: &mut Command) -> std::io::Result<Child> {
    cmd.spawn()
}

type Spawn = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from one thread that lives as long as the process, with a parent-death signal:
/// Linux sends it when the thread that spawned the child ends, so a child of a test's own thread
/// would die with that test, and one of this thread dies only with the process.
fn spawner(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Spawn>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Spawn>();
        std::thread::Builder::new()
            .name("kube-plan-test-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(spawn_with_parent_death(&mut cmd));
                }
                // The sender lives in a static: the loop ends only with the process.
            })
            .map(|_| ())
            .unwrap_or_default();
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    sender
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

#[cfg(target_os = "linux")]
fn spawn_with_parent_death(cmd: &mut Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl, which is
    // async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    cmd.spawn()
}

#[cfg(not(target_os = "linux"))]
fn spawn_with_parent_death(cmd: &mut Command) -> std::io::Result<Child> {
    cmd.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoke_a_recorded_process_counts_only_while_it_runs_its_binary() {
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(state.path().join("pids")).unwrap();
        std::fs::create_dir_all(state.path().join("logs")).unwrap();
        let sleep = PathBuf::from("/bin/sleep");
        let mut child = start(
            state.path(),
            "sleeper",
            &sleep,
            &["300".into()],
            Lifetime::Attached,
        )
        .unwrap()
        .unwrap();
        assert!(alive(state.path(), "sleeper"));
        assert_eq!(recorded_args(state.path(), "sleeper").unwrap(), ["300"]);
        assert_eq!(recorded_names(state.path()), ["sleeper"]);
        // Another binary under the same PID is not ours.
        std::fs::write(state.path().join("pids/sleeper.exe"), "/bin/true").unwrap();
        assert!(!alive(state.path(), "sleeper"));
        std::fs::write(
            state.path().join("pids/sleeper.exe"),
            std::fs::canonicalize(&sleep).unwrap().display().to_string(),
        )
        .unwrap();
        stop(state.path(), "sleeper", Some(&mut child));
        assert!(!alive(state.path(), "sleeper"));
        assert!(
            !Path::new(&format!("/proc/{}", child.id())).exists(),
            "reaped"
        );
    }
}
