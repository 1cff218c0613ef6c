//! The local cluster from a shell: `make demo`, `make test` and a developer's terminal use the same
//! code as the tests (`kube_plan::testing`), so there is one way a cluster is started.
//!
//! The state directory is `KUBE_PLAN_CLUSTER_STATE`, else `target/kube-plan-cluster` (the one the
//! tests share). A real node joins with `tests/harness/realnode.sh ensure`; `down` stops it first.

use clap::{Parser, Subcommand};
use kube_plan::testing::{Component, TestCluster};
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    about = "A local Kubernetes cluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and KWOK"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Reuse the cluster if every component runs, else start one; print `export KUBECONFIG=…`.
    Ensure {
        /// Simulated nodes (`kwok-node-<i>`).
        #[arg(long, default_value_t = 3)]
        nodes: u32,
    },
    /// Stop every process of the cluster (and that joined it), and remove its state.
    Down,
    /// Print `export KUBECONFIG=…`.
    Env,
    /// Say which components run; fails unless all do.
    Status,
    /// Print a component's log (or a joined process's, e.g. `drop`).
    Logs { name: String },
    /// Stop a component and start it again with the same flags, ports and data.
    Restart { component: Component },
}

fn main() -> ExitCode {
    kube_plan::install_crypto_provider();
    let state = TestCluster::default_state_dir();
    match run(Cli::parse().command, &state) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("[cluster] error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Cmd, state: &Path) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Cmd::Ensure { nodes } => {
            let started = Instant::now();
            let cluster = TestCluster::builder().nodes(nodes).shared_at(state)?;
            eprintln!(
                "[cluster] up in {:.1} s (state: {})",
                started.elapsed().as_secs_f64(),
                state.display()
            );
            println!("export KUBECONFIG={}", cluster.kubeconfig().display());
        }
        Cmd::Down => {
            if TestCluster::down(state)? {
                eprintln!("[cluster] down");
            } else {
                eprintln!("[cluster] nothing to stop");
            }
        }
        Cmd::Env => {
            let kubeconfig = state.join("kubeconfig");
            if !kubeconfig.is_file() {
                return Err(format!("no cluster in {}", state.display()).into());
            }
            println!("export KUBECONFIG={}", kubeconfig.display());
        }
        Cmd::Status => {
            let status = TestCluster::status(state);
            for (component, pid) in &status {
                match pid {
                    Some(pid) => println!("{component}: running (pid {pid})"),
                    None => println!("{component}: stopped"),
                }
            }
            if status.is_empty() || status.iter().any(|(_, pid)| pid.is_none()) {
                return Err("not every component runs".into());
            }
        }
        Cmd::Logs { name } => {
            let log = state.join("logs").join(format!("{name}.log"));
            print!(
                "{}",
                std::fs::read_to_string(&log).map_err(|e| format!("{}: {e}", log.display()))?
            );
        }
        Cmd::Restart { component } => {
            TestCluster::restart_in(state, component)?;
            eprintln!("[cluster] {component} restarted");
        }
    }
    Ok(())
}
