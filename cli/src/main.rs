//! `lockstep`: the command-line front end of the lockstep replication service.
//!
//! A thin clap layer: each subcommand parses its flags and calls into the library crates.
//! See `docs/operations.md` for how to run it.

mod config;
mod daemon;
mod demo;
mod events;
mod export;
mod memory;
mod netcmp;
mod replicate;
mod report;
mod secure;
mod service;
mod units;
mod vm;

use std::io::IsTerminal;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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
    /// Stream a daemon's state changes as JSON lines (mode, peer, sync, checkpoints,
    /// split-brain, failover) until it stops.
    Events(events::EventsArgs),
    /// Run a checkpoint now (on the primary).
    Checkpoint(replicate::CheckpointArgs),
    /// Fail the secondary over and serve its disk as an unprotected primary.
    Failover(replicate::FailoverArgs),
    /// Compare the primary's and the secondary's disks online, chunk by chunk, by crc64.
    Verify(replicate::VerifyArgs),
    /// Compare what a service's primary and secondary instances send (stream proxy), or
    /// hold the primary's output until its checkpoint commits.
    Netcmp(netcmp::NetcmpArgs),
    /// Continue a protected VM on the node that took over (QEMU started with -incoming
    /// defer), from the committed checkpoint's device state.
    VmResume(vm::VmResumeArgs),
    /// Delete a ublk device left by a daemon that will not come back (waiting I/O fails).
    UblkDelete(replicate::UblkDeleteArgs),
    /// Resource files (`--config FILE --node NAME`): check one.
    Config(config::ConfigArgs),
}

/// The command line's grammar: the derived one, with the daemons' `--config`/`--node`.
fn command() -> clap::Command {
    config::with_config_flags(Cli::command())
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
    let root = command();
    let args = match config::expand(std::env::args_os().collect(), &root) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lockstep: error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let cli = match Cli::from_arg_matches(&root.clone().get_matches_from(args)) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    blkrep::storage::keep_large_buffers_in_heap();
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Export(a) => export::run(a),
        Command::Primary(a) => replicate::primary(a),
        Command::Secondary(a) => replicate::secondary(a),
        Command::Status(a) => replicate::status(a),
        Command::Events(a) => events::run(a),
        Command::Checkpoint(a) => replicate::checkpoint(a),
        Command::Failover(a) => replicate::failover(a),
        Command::Verify(a) => replicate::verify(a),
        Command::Netcmp(a) => netcmp::run(a),
        Command::VmResume(a) => vm::resume(a),
        Command::UblkDelete(a) => replicate::ublk_delete(a),
        Command::Config(a) => config::run(a, &root),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lockstep: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::{CommandFactory, Parser};

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
        super::command().debug_assert();
    }

    /// Parse a command line, words split at spaces.
    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("lockstep").chain(line.split_whitespace()))
    }

    /// The message clap prints for `line`, which must be refused.
    fn refused(line: &str) -> String {
        parse(line).expect_err(line).to_string()
    }

    const PRIMARY: &str = "primary --disk d --control c";
    const SECONDARY: &str = "secondary --disk d --control c";

    #[test]
    fn every_endpoint_flag_takes_addr_port_or_unix_path() {
        for line in [
            "export --disk d --listen unix:/run/x.sock".to_string(),
            "export --disk d --listen [::1]:10809".into(),
            format!("{PRIMARY} --secondary unix:/s"),
            format!("{PRIMARY} --secondary b:1 --export unix:e"),
            format!("{SECONDARY} --listen unix:/l"),
            format!("{SECONDARY} --listen a:1 --export unix:e"),
        ] {
            parse(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        }
    }

    #[test]
    fn bad_endpoints_are_refused_with_a_reason() {
        let e = refused("export --disk d --listen localhost");
        assert!(e.contains("--listen") && e.contains("no port"), "{e}");
        let e = refused("export --disk d --socket /run/x.sock");
        assert!(e.contains("--socket"), "{e}");
        let e = refused(&format!("{PRIMARY} --secondary /s"));
        assert!(e.contains("write unix:/s"), "{e}");
        let e = refused(&format!("{SECONDARY} --listen a:b"));
        assert!(e.contains("not a port number"), "{e}");
    }

    #[test]
    fn durations_take_units_and_compounds() {
        let line = format!(
            "{PRIMARY} --secondary b:1 --reconnect-timeout 1h30m --heartbeat 250ms \
             --checkpoint-interval 0 --connect-timeout 90"
        );
        parse(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
    }

    #[test]
    fn bad_durations_are_refused_with_a_reason() {
        let e = refused("demo --duration 2x");
        assert!(
            e.contains("--duration") && e.contains("unknown time unit"),
            "{e}"
        );
        let e = refused("demo --interval 1h30");
        assert!(
            e.contains("--interval") && e.contains("not a duration"),
            "{e}"
        );
    }
}
