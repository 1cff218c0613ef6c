//! Where the binaries of a test cluster come from.
//!
//! In order: `KUBE_PLAN_TOOLS` (a directory holding etcd, kube-apiserver and, for the whole cluster,
//! kube-controller-manager, kube-scheduler and kwok, with KWOK's node stages in `kwok-node-stages`
//! beside it or inside it); else `tools/tools.sh`, shipped with this crate, which builds them once
//! per machine from the Go module proxy (when Go is installed) and prints their directory.
//! `KUBEBUILDER_ASSETS` is handled by the caller.

use super::TestError;
use super::process::harness;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The environment variable naming a directory of cluster binaries.
pub(crate) const TOOLS: &str = "KUBE_PLAN_TOOLS";

/// The script that builds the binaries, as shipped with this crate.
const BUILDER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/tools.sh");

/// The binaries of a control plane, and what of a whole cluster is there.
#[derive(Clone, Debug)]
pub(crate) struct Tools {
    /// The directory holding the binaries.
    pub(crate) bin: PathBuf,
    /// KWOK's node stages (`fast/node-initialize.yaml`, `heartbeat-with-lease/…`), when KWOK is
    /// there.
    pub(crate) kwok_node_stages: Option<PathBuf>,
}

impl Tools {
    /// A directory of binaries as given (e.g. `KUBEBUILDER_ASSETS`).
    pub(crate) fn at(bin: &Path) -> Self {
        let kwok_node_stages = [
            bin.join("kwok-node-stages"),
            bin.join("../kwok-node-stages"),
        ]
        .into_iter()
        .find(|d| d.is_dir());
        Self {
            bin: bin.to_owned(),
            kwok_node_stages,
        }
    }

    /// `KUBE_PLAN_TOOLS`, else the crate's `tools/tools.sh ensure`.
    pub(crate) fn locate() -> Result<Self, TestError> {
        if let Some(dir) = std::env::var_os(TOOLS) {
            return Ok(Self::at(Path::new(&dir)));
        }
        let script = Path::new(BUILDER);
        if !script.is_file() {
            return Err(TestError::Harness(format!(
                "no cluster binaries: set KUBEBUILDER_ASSETS to a directory holding etcd and \
                 kube-apiserver (setup-envtest use -p path), or {TOOLS} to one that also holds \
                 kube-controller-manager, kube-scheduler and kwok ({BUILDER}, which builds them, \
                 is not there)"
            )));
        }
        let out = Command::new("bash")
            .arg(script)
            .arg("ensure")
            .output()
            .map_err(|e| harness(&format!("running {}", script.display()), e))?;
        if !out.status.success() {
            return Err(TestError::Harness(format!(
                "{} ensure failed ({}):\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let bin = stdout.lines().last().unwrap_or_default().trim();
        if bin.is_empty() {
            return Err(TestError::Harness(format!(
                "{} printed no directory",
                script.display()
            )));
        }
        Ok(Self::at(Path::new(bin)))
    }

    /// The path of binary `name`.
    pub(crate) fn binary(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// Whether binary `name` is there.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.binary(name).is_file()
    }
}
