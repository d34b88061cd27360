//! `lockstep netcmp`: compare the output of a service's primary and secondary instances (or
//! buffer the primary's output until checkpoints commit), joined to a primary daemon's
//! epochs through its control socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use blkrep::epoch::BoxFuture;
use blkrep::replica::admin::{self, AdminHandler};
use clap::Args;
use netcmp::{EpochLink, PassRule, Proto, Proxy, ProxyConfig, ProxyHandle};
use serde_json::Value;

use crate::daemon;
use crate::units::{parse_duration, parse_size};

#[derive(Debug, Args)]
pub struct NetcmpArgs {
    /// Where clients connect (stream proxy).
    #[arg(long)]
    listen: SocketAddr,
    /// The primary instance of the service.
    #[arg(long)]
    primary: SocketAddr,
    /// The secondary instance. Without it, the primary's output is buffered until the
    /// checkpoint that makes it safe commits (needs --control).
    #[arg(long)]
    secondary: Option<SocketAddr>,
    /// The primary daemon's control socket: netcmp asks it for checkpoints and learns of
    /// commits through it. Without it (compare mode only), divergences are counted and
    /// comparison restarts at once: a determinism check, no replication.
    #[arg(long)]
    control: Option<PathBuf>,
    /// netcmp's own control socket, for `lockstep status --control PATH`.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// How long the primary's output waits for the secondary's before it is released and a
    /// checkpoint requested.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    compare_timeout: Duration,
    /// The most output held in memory (compare: unconfirmed; buffer: uncommitted).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    max_held: u64,
    /// Connections served at once.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Flows never compared, as `proto=tcp|udp|icmp,port=N,addr=IP` (any of the three;
    /// repeatable), e.g. `port=123` for a clock service.
    #[arg(long, value_parser = parse_pass_rule)]
    passthrough: Vec<PassRule>,
}

fn parse_pass_rule(s: &str) -> Result<PassRule, String> {
    let mut r = PassRule::default();
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected key=value (proto, port, addr)"))?;
        match k {
            "proto" => {
                r.proto = Some(match v {
                    "tcp" => Proto::Tcp,
                    "udp" => Proto::Udp,
                    "icmp" => Proto::Icmp,
                    _ => return Err(format!("proto {v:?}: expected tcp, udp or icmp")),
                })
            }
            "port" => r.port = Some(v.parse().map_err(|_| format!("port {v:?}: not a port"))?),
            "addr" => {
                r.addr = Some(
                    v.trim_matches(|c| c == '[' || c == ']')
                        .parse()
                        .map_err(|_| format!("addr {v:?}: not an IP address"))?,
                )
            }
            _ => return Err(format!("{k:?}: unknown key (proto, port, addr)")),
        }
    }
    if r.port.is_none() && r.addr.is_none() {
        return Err("a rule needs port= or addr=".into());
    }
    Ok(r)
}

pub fn run(a: NetcmpArgs) -> anyhow::Result<()> {
    let mut cfg = ProxyConfig::new(a.listen, a.primary, a.secondary);
    cfg.compare.compare_timeout = a.compare_timeout;
    cfg.compare.max_held_bytes = usize::try_from(a.max_held).context("--max-held")?;
    cfg.compare.passthrough.rules = a.passthrough;
    cfg.buffer_bytes = cfg.compare.max_held_bytes;
    cfg.max_connections = a.max_connections;
    if a.secondary.is_none() && a.control.is_none() {
        return Err(anyhow!(
            "without --secondary, netcmp buffers output until checkpoints commit: give the primary daemon's --control socket"
        ));
    }
    // One thread: every connection's comparison goes through one lock anyway, and waking a
    // task on the same thread costs less than across threads (measured in bench/netcmp.py:
    // the added round trip halves).
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(async move {
            let (link, events) = match &a.control {
                Some(c) => EpochLink::connect(c.clone())
                    .await
                    .map_err(|e| anyhow!("joining the primary daemon's epochs: {e}"))?,
                None => EpochLink::local(),
            };
            let proxy = Proxy::bind(cfg, link, events)
                .await
                .map_err(|e| anyhow!(e))?;
            let handle = proxy.handle();
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let admin_task = match a.socket {
                Some(p) => Some(
                    admin::serve(p, Arc::new(NetcmpAdmin(handle.clone())), stop_rx.clone())
                        .await
                        .context("netcmp's control socket")?,
                ),
                None => None,
            };
            let st = handle.status();
            tracing::info!(
                listen = %proxy.local_addr(),
                primary = %st.primary,
                secondary = st.secondary.as_deref().unwrap_or("-"),
                mode = %st.mode,
                "netcmp stream proxy running"
            );
            let run = tokio::spawn(proxy.run(stop_rx));
            daemon::shutdown_signal().await;
            stop_tx.send_replace(true);
            let _ = run.await;
            if let Some(t) = admin_task {
                let _ = t.await;
            }
            let st = handle.status();
            if st.held_bytes > 0 {
                tracing::warn!(held = st.held_bytes, "stopped: held output was not sent");
            }
            Ok(())
        })
}

struct NetcmpAdmin(ProxyHandle);

impl AdminHandler for NetcmpAdmin {
    fn handle(&self, cmd: String, _req: Value) -> BoxFuture<'_, Result<Value, String>> {
        Box::pin(async move {
            match cmd.as_str() {
                "status" => serde_json::to_value(self.0.status()).map_err(|e| e.to_string()),
                other => Err(format!("unknown command {other:?} (netcmp answers status)")),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_rules_parse_and_bad_ones_say_why() {
        let r = parse_pass_rule("proto=udp,port=123").unwrap();
        assert_eq!(
            (r.proto, r.port, r.addr),
            (Some(Proto::Udp), Some(123), None)
        );
        let r = parse_pass_rule("addr=[2001:db8::7]").unwrap();
        assert_eq!(r.addr, Some("2001:db8::7".parse().unwrap()));
        assert!(parse_pass_rule("proto=tcp")
            .unwrap_err()
            .contains("port= or addr="));
        assert!(parse_pass_rule("port=x")
            .unwrap_err()
            .contains("not a port"));
        assert!(parse_pass_rule("colour=red")
            .unwrap_err()
            .contains("unknown key"));
    }
}
