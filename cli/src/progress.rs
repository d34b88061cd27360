//! Progress of a long `lockstep verify`: a bar on a terminal (indicatif), a plain line every
//! few seconds otherwise, both on stderr; nothing for a verify that ends within a second.
//! The daemon reports progress in its status (`verify`: done and total chunks), which this
//! polls while the verify request runs.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use blkrep::replica::admin;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

/// How often the status is polled.
const POLL: Duration = Duration::from_millis(250);
/// A verify shorter than this shows nothing.
const QUIET_FOR: Duration = Duration::from_secs(1);
/// How often a plain line is printed when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// One verify's progress as shown.
struct Shown {
    start: Instant,
    bar: Option<ProgressBar>,
    last_line: Option<Instant>,
    terminal: bool,
}

impl Shown {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            bar: None,
            last_line: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn update(&mut self, done: u64, total: u64, differing: u64) {
        if self.start.elapsed() < QUIET_FOR || total == 0 {
            return;
        }
        if !self.terminal {
            if self.last_line.is_some_and(|t| t.elapsed() < LINE_EVERY) {
                return;
            }
            self.last_line = Some(Instant::now());
            eprintln!("{}", line(done, total, differing));
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "verify [{wide_bar}] {percent:>3}% {pos}/{len} chunks, {msg}, ETA {eta}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            b.set_style(style);
            b
        });
        bar.set_position(done);
        bar.set_message(format!("{differing} differ"));
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// The plain progress line.
fn line(done: u64, total: u64, differing: u64) -> String {
    format!(
        "verify: {:.0}% ({done} of {total} chunks compared, {differing} differ)",
        100.0 * done as f64 / total.max(1) as f64
    )
}

/// Send `verify` (with `repair`: `verify --repair`) to `control` and wait for its answer
/// (up to `timeout`), showing the progress the daemon's status reports meanwhile.
pub fn verify(control: &Path, repair: bool, timeout: Duration) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let req = json!({"cmd": "verify", "repair": repair});
        let answer = admin::request(control, &req, timeout);
        tokio::pin!(answer);
        let mut shown = Shown::new();
        let mut tick = tokio::time::interval(POLL);
        loop {
            tokio::select! {
                r = &mut answer => {
                    shown.finish();
                    return r.map_err(|e| anyhow!(e));
                }
                _ = tick.tick() => {
                    let status = json!({"cmd": "status"});
                    if let Ok(st) = admin::request(control, &status, POLL * 4).await {
                        let v = &st["verify"];
                        if v["state"] == "running" {
                            let n = |k: &str| v[k].as_u64().unwrap_or(0);
                            shown.update(n("done_chunks"), n("total_chunks"), n("differing_chunks"));
                        }
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_read_well() {
        assert_eq!(
            line(256, 1024, 3),
            "verify: 25% (256 of 1024 chunks compared, 3 differ)"
        );
    }

    #[test]
    fn quick_verifies_show_nothing() {
        let mut s = Shown::new();
        s.terminal = true;
        s.update(1, 2, 0);
        assert!(s.bar.is_none());
    }
}
