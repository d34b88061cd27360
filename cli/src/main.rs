//! `lockstep`: the command-line front end of the lockstep replication service.
//!
//! A thin clap layer: each subcommand parses its flags and calls into the library crates.
//! See `docs/operations.md` for how to run it.

mod daemon;
mod demo;
mod export;
mod replicate;
mod secure;
mod units;

use std::io::IsTerminal;

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
    /// Run the replication demo: a primary and a secondary on loopback, a workload,
    /// checkpoints, a killed primary, a failover, and a checksum proof.
    Demo(demo::DemoArgs),
    /// Serve one or more disks over NBD (no replication).
    Export(export::ExportArgs),
    /// Serve a disk and replicate every write to a secondary.
    Primary(replicate::PrimaryArgs),
    /// Receive a primary's writes, keep checkpoints, take over on failover.
    Secondary(replicate::SecondaryArgs),
    /// Show a daemon's state.
    Status(replicate::StatusArgs),
    /// Run a checkpoint now (on the primary).
    Checkpoint(replicate::CheckpointArgs),
    /// Fail the secondary over and serve its disk as an unprotected primary.
    Failover(replicate::FailoverArgs),
    /// Compare the primary's and the secondary's disks online, chunk by chunk, by crc64.
    Verify(replicate::VerifyArgs),
    /// Delete a ublk device left by a daemon that will not come back (waiting I/O fails).
    UblkDelete(replicate::UblkDeleteArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal; files, pipes and journals get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    blkrep::storage::keep_large_buffers_in_heap();
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Export(a) => export::run(a),
        Command::Primary(a) => replicate::primary(a),
        Command::Secondary(a) => replicate::secondary(a),
        Command::Status(a) => replicate::status(a),
        Command::Checkpoint(a) => replicate::checkpoint(a),
        Command::Failover(a) => replicate::failover(a),
        Command::Verify(a) => replicate::verify(a),
        Command::UblkDelete(a) => replicate::ublk_delete(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lockstep: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
