//! `lockstep`: the command-line front end of the lockstep replication service.
//!
//! A thin clap layer: each subcommand parses its flags and calls into the library crates.
//! See `docs/operations.md` for how to run it.

mod export;
mod units;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "lockstep",
    version,
    about = "COLO-style replicated disks: serve, replicate, checkpoint, fail over"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one or more disks over NBD (no replication).
    Export(export::ExportArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Export(a) => export::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lockstep: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
