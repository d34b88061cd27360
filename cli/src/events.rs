//! `lockstep events`: a daemon's state changes as JSON lines, as they happen (what
//! `drbdsetup events2` is to DRBD).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use anyhow::{anyhow, Context};
use clap::Args;
use serde_json::Value;

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// The daemon's control socket (primary or secondary).
    #[arg(long)]
    control: PathBuf,
    /// Leave out the first line (the node's status when the stream starts).
    #[arg(long)]
    no_status: bool,
    /// Leave out checkpoint events (one per checkpoint: many per second at short
    /// intervals).
    #[arg(long)]
    no_checkpoints: bool,
}

pub fn run(a: EventsArgs) -> anyhow::Result<()> {
    let s = UnixStream::connect(&a.control)
        .with_context(|| format!("connecting to {}", a.control.display()))?;
    (&s).write_all(b"{\"cmd\":\"events\"}\n")
        .context("sending the request")?;
    let mut rd = BufReader::new(&s);
    let mut first = String::new();
    rd.read_line(&mut first).context("reading the answer")?;
    let v: Value = serde_json::from_str(&first)
        .map_err(|e| anyhow!("the daemon's answer is not JSON ({e}): {first:?}"))?;
    if v["ok"] != true {
        return Err(anyhow!(
            "{}",
            v["error"]
                .as_str()
                .unwrap_or("the daemon refused the request")
        ));
    }
    let mut out = std::io::stdout().lock();
    let mut emit = |line: &str| -> bool {
        // A reader that went away (`| head`) ends the stream quietly.
        out.write_all(line.as_bytes()).is_ok() && out.flush().is_ok()
    };
    if !a.no_status {
        let mut status = v;
        if let Value::Object(m) = &mut status {
            m.remove("ok");
        }
        if !emit(&format!("{status}\n")) {
            return Ok(());
        }
    }
    let mut line = String::new();
    loop {
        line.clear();
        match rd.read_line(&mut line) {
            Ok(0) => return Ok(()), // the daemon stopped
            Ok(_) => {}
            Err(e) => return Err(anyhow!("reading events: {e}")),
        }
        if a.no_checkpoints
            && serde_json::from_str::<Value>(&line).is_ok_and(|e| e["event"] == "checkpoint")
        {
            continue;
        }
        if !emit(&line) {
            return Ok(());
        }
    }
}
