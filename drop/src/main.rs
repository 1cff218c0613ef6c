//! The `drop` operator binary.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Drop keeps container images cached on Kubernetes nodes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML, or write one file per CRD into a directory.
    Crd {
        /// Write `<plural>.yaml` files into this directory instead of printing.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd { dir } => match print_crds(dir.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn print_crds(dir: Option<&std::path::Path>) -> Result<(), Box<dyn std::error::Error>> {
    let crds = drop::api::crds();
    match dir {
        None => print!("{}", framework::crd::to_yaml_stream(&crds)?),
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            for (file, yaml) in drop::api::crd_files()? {
                let path = dir.join(file);
                std::fs::write(&path, yaml)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
            }
        }
    }
    Ok(())
}
