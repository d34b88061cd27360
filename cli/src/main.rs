//! `lockstep`: the command-line front end of the lockstep replication service.
//!
//! A thin clap layer: each subcommand parses its flags and calls into the library crates.
//! See `docs/operations.md` for how to run it.

mod config;
mod daemon;
mod demo;
mod docgen;
mod events;
mod export;
mod memory;
mod netcmp;
mod progress;
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
    #[command(after_help = units::FORMS_HELP)]
    Demo(demo::DemoArgs),
    /// Serve one or more disks over NBD (no replication).
    #[command(after_help = units::FORMS_HELP)]
    Export(export::ExportArgs),
    /// Serve a disk and replicate every write to a secondary.
    #[command(after_help = units::FORMS_HELP)]
    Primary(replicate::PrimaryArgs),
    /// Receive a primary's writes, keep checkpoints, take over on failover.
    #[command(after_help = units::FORMS_HELP)]
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
    #[command(after_help = units::FORMS_HELP)]
    Netcmp(netcmp::NetcmpArgs),
    /// Continue a protected VM on the node that took over (QEMU started with -incoming
    /// defer), from the committed checkpoint's device state.
    VmResume(vm::VmResumeArgs),
    /// Change a setting of a running primary: checkpoint-interval, checkpoint-bytes.
    Set(replicate::SetArgs),
    /// Delete a ublk device left by a daemon that will not come back (waiting I/O fails).
    UblkDelete(replicate::UblkDeleteArgs),
    /// Print a shell completion script (bash, zsh, fish, …).
    Completions(docgen::CompletionsArgs),
    /// Print the manual page (roff), or write one per subcommand with --dir.
    Man(docgen::ManArgs),
    /// Resource files (`--config FILE --node NAME`): check one.
    Config(config::ConfigArgs),
}

/// The command line's grammar: the derived one, with the daemons' `--config`/`--node`.
fn command() -> clap::Command {
    config::with_config_flags(Cli::command())
}

impl Command {
    /// A long-running daemon (not a command that prints and exits).
    fn is_daemon(&self) -> bool {
        matches!(
            self,
            Command::Demo(_)
                | Command::Export(_)
                | Command::Primary(_)
                | Command::Secondary(_)
                | Command::Netcmp(_)
        )
    }
}

/// Commands that print and exit die quietly of SIGPIPE when their reader goes away
/// (`lockstep status | head -1`), as Unix tools do, instead of panicking on the write. The
/// daemons keep it ignored: a peer that goes away must be an error on its socket, not death.
fn quiet_on_broken_pipe() {
    // SAFETY: setting a signal's disposition to the default, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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
    if !cli.command.is_daemon() {
        quiet_on_broken_pipe();
    }
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
        Command::Set(a) => replicate::set(a),
        Command::UblkDelete(a) => replicate::ublk_delete(a),
        Command::Config(a) => config::run(a, &root),
        Command::Completions(a) => docgen::completions(a, command()),
        Command::Man(a) => docgen::man(a, command()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A command that ran and has a verdict to give by its exit code (status).
        Err(e) if e.downcast_ref::<replicate::Exit>().is_some() => {
            std::process::ExitCode::from(e.downcast_ref::<replicate::Exit>().map_or(1, |x| x.0))
        }
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
             --checkpoint-interval 0 --connect-timeout 90s --forward-queue 1.5G"
        );
        parse(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
    }

    /// Run `program args…` with `input` on stdin: (success, stdout, stderr); None if the
    /// program is not installed.
    fn run_with_input(
        program: &str,
        args: &[&str],
        input: &[u8],
    ) -> Option<(bool, String, String)> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        Some((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        ))
    }

    #[test]
    fn bash_completion_is_valid_bash() {
        let mut script = Vec::new();
        let mut cmd = super::command();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut cmd,
            "lockstep",
            &mut script,
        );
        let text = String::from_utf8(script.clone()).unwrap();
        for word in [
            "failover",
            "--on-peer-loss",
            "checkpoint-interval",
            "received durable",
        ] {
            assert!(text.contains(word), "{word} not in the completion");
        }
        let (ok, _, err) = run_with_input("bash", &["-n"], &script).expect("bash");
        assert!(ok, "bash -n: {err}");
    }

    #[test]
    fn man_page_renders() {
        let mut page = Vec::new();
        clap_mangen::Man::new(super::command())
            .render(&mut page)
            .unwrap();
        let roff = String::from_utf8(page.clone()).unwrap();
        assert!(
            roff.starts_with(".ie") || roff.contains(".TH lockstep 1"),
            "{roff}"
        );
        // groff with preconv (-k), as man(1) runs it; warnings (-ww) are failures.
        let args = ["-k", "-man", "-Tutf8", "-ww", "-P", "-cbou"];
        match run_with_input("groff", &args, &page) {
            Some((ok, text, err)) => {
                assert!(ok && err.is_empty(), "groff: {err}");
                assert!(
                    text.contains("SUBCOMMANDS") && text.contains("failover"),
                    "{text}"
                );
            }
            None => eprintln!("groff is not installed: only generated, not rendered"),
        }
    }

    #[test]
    fn bad_durations_are_refused_with_a_reason() {
        let e = refused("demo --duration 2x");
        assert!(
            e.contains("--duration") && e.contains("unknown time unit"),
            "{e}"
        );
        let e = refused(&format!("{PRIMARY} --secondary b:1 --heartbeat 250"));
        assert!(
            e.contains("--heartbeat") && e.contains("250ms") && e.contains("250s"),
            "{e}"
        );
        let e = refused(&format!("{PRIMARY} --size 10GB --secondary b:1"));
        assert!(e.contains("--size") && e.contains("ambiguous"), "{e}");
        let e = refused("demo --interval 1h30");
        assert!(
            e.contains("--interval") && e.contains("not a duration"),
            "{e}"
        );
    }
}
