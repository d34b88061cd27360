//! `lockstep netcmp`: compare the output of a service's primary and secondary instances (or
//! buffer the primary's output until checkpoints commit), joined to a primary daemon's
//! epochs through its control socket. Two frontends: the stream proxy (`--listen`, TCP
//! connections to the instances) and the packet mode (`--packet`, Ethernet frames on TAP
//! interfaces or QEMU `-netdev stream` sockets).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use blkrep::epoch::BoxFuture;
use blkrep::replica::admin::{self, AdminHandler};
use clap::Args;
use netcmp::{
    EpochLink, LinkEvent, PacketConfig, PacketHandle, PacketProxy, PassRule, PortSpec, Proto,
    Proxy, ProxyConfig, ProxyHandle,
};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::daemon;
use crate::units::{parse_duration, parse_size};

#[derive(Debug, Args)]
pub struct NetcmpArgs {
    /// Packet mode: compare Ethernet frames between three L2 ports (--client-port,
    /// --primary-port, --secondary-port) instead of proxying TCP connections.
    #[arg(
        long,
        requires_all = ["client_port", "primary_port", "secondary_port"],
        conflicts_with_all = ["listen", "primary", "secondary", "max_connections"]
    )]
    packet: bool,
    /// Packet mode: the clients' side, `tap:NAME` (a TAP interface, created if missing) or
    /// `unix:PATH` (a socket netcmp listens on, for QEMU's `-netdev stream,server=off`).
    #[arg(long, value_name = "tap:NAME|unix:PATH", requires = "packet")]
    client_port: Option<PortSpec>,
    /// Packet mode: the primary replica's NIC (as --client-port).
    #[arg(long, value_name = "tap:NAME|unix:PATH", requires = "packet")]
    primary_port: Option<PortSpec>,
    /// Packet mode: the secondary replica's NIC (as --client-port).
    #[arg(long, value_name = "tap:NAME|unix:PATH", requires = "packet")]
    secondary_port: Option<PortSpec>,
    /// Stream proxy: where clients connect.
    #[arg(long, required_unless_present = "packet")]
    listen: Option<SocketAddr>,
    /// Stream proxy: the primary instance of the service.
    #[arg(long, required_unless_present = "packet")]
    primary: Option<SocketAddr>,
    /// Stream proxy: the secondary instance. Without it, the primary's output is buffered
    /// until the checkpoint that makes it safe commits (needs --control).
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
    /// The most output held in memory (compare: unconfirmed; buffer: uncommitted; packet
    /// mode: the primary's frames held, and separately the comparator's bytes).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    max_held: u64,
    /// Stream proxy: connections served at once [default: 4096].
    #[arg(long)]
    max_connections: Option<usize>,
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
    let max_held = usize::try_from(a.max_held).context("--max-held")?;
    let mode = if a.packet {
        let (Some(c), Some(p), Some(s)) = (
            a.client_port.clone(),
            a.primary_port.clone(),
            a.secondary_port.clone(),
        ) else {
            return Err(anyhow!(
                "--packet needs --client-port, --primary-port and --secondary-port"
            ));
        };
        let mut cfg = PacketConfig::new(c, p, s);
        cfg.engine.compare.compare_timeout = a.compare_timeout;
        cfg.engine.compare.max_held_bytes = max_held;
        cfg.engine.compare.passthrough.rules = a.passthrough.clone();
        cfg.engine.max_held_frame_bytes = max_held;
        Mode::Packet(cfg)
    } else {
        let (Some(listen), Some(primary)) = (a.listen, a.primary) else {
            return Err(anyhow!(
                "the stream proxy needs --listen and --primary (or use --packet)"
            ));
        };
        let mut cfg = ProxyConfig::new(listen, primary, a.secondary);
        cfg.compare.compare_timeout = a.compare_timeout;
        cfg.compare.max_held_bytes = max_held;
        cfg.compare.passthrough.rules = a.passthrough.clone();
        cfg.buffer_bytes = max_held;
        if let Some(n) = a.max_connections {
            cfg.max_connections = n;
        }
        if a.secondary.is_none() && a.control.is_none() {
            return Err(anyhow!(
                "without --secondary, netcmp buffers output until checkpoints commit: give the primary daemon's --control socket"
            ));
        }
        Mode::Stream(cfg)
    };
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
            match mode {
                Mode::Stream(cfg) => stream(cfg, link, events, a.socket).await,
                Mode::Packet(cfg) => packet(cfg, link, events, a.socket).await,
            }
        })
}

enum Mode {
    Stream(ProxyConfig),
    Packet(PacketConfig),
}

/// Serve netcmp's control socket, if any, until `stop`.
async fn admin_socket(
    socket: Option<PathBuf>,
    handler: NetcmpAdmin,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    Ok(match socket {
        Some(p) => Some(
            admin::serve(p, Arc::new(handler), stop)
                .await
                .context("netcmp's control socket")?,
        ),
        None => None,
    })
}

/// Run a frontend until SIGINT or SIGTERM, then stop it and netcmp's control socket.
async fn until_signal(
    frontend: impl std::future::Future<Output = ()> + Send + 'static,
    stop: tokio::sync::watch::Sender<bool>,
    admin_task: Option<tokio::task::JoinHandle<()>>,
) {
    let run = tokio::spawn(frontend);
    match crate::service::signals() {
        Ok(signal) => {
            crate::service::ready("netcmp running");
            tracing::info!("{} received", signal.await);
            crate::service::stopping("stopping");
        }
        Err(e) => {
            crate::service::ready("netcmp running");
            tracing::error!("{e:#}");
            daemon::shutdown_signal().await;
        }
    }
    stop.send_replace(true);
    let _ = run.await;
    if let Some(t) = admin_task {
        let _ = t.await;
    }
}

async fn stream(
    cfg: ProxyConfig,
    link: EpochLink,
    events: mpsc::UnboundedReceiver<LinkEvent>,
    socket: Option<PathBuf>,
) -> anyhow::Result<()> {
    let proxy = Proxy::bind(cfg, link, events)
        .await
        .map_err(|e| anyhow!(e))?;
    let handle = proxy.handle();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin_task =
        admin_socket(socket, NetcmpAdmin::Stream(handle.clone()), stop_rx.clone()).await?;
    let st = handle.status();
    tracing::info!(
        listen = %proxy.local_addr(),
        primary = %st.primary,
        secondary = st.secondary.as_deref().unwrap_or("-"),
        mode = %st.mode,
        "netcmp stream proxy running"
    );
    until_signal(proxy.run(stop_rx), stop_tx, admin_task).await;
    let st = handle.status();
    if st.held_bytes > 0 {
        tracing::warn!(held = st.held_bytes, "stopped: held output was not sent");
    }
    Ok(())
}

async fn packet(
    cfg: PacketConfig,
    link: EpochLink,
    events: mpsc::UnboundedReceiver<LinkEvent>,
    socket: Option<PathBuf>,
) -> anyhow::Result<()> {
    let proxy = PacketProxy::bind(cfg, link, events)
        .await
        .map_err(|e| anyhow!(e))?;
    let handle = proxy.handle();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin_task =
        admin_socket(socket, NetcmpAdmin::Packet(handle.clone()), stop_rx.clone()).await?;
    let st = handle.status();
    tracing::info!(
        client = %st.ports.client.port,
        primary = %st.ports.primary.port,
        secondary = %st.ports.secondary.port,
        "netcmp packet mode running"
    );
    until_signal(proxy.run(stop_rx), stop_tx, admin_task).await;
    let st = handle.status();
    if st.held_frames > 0 {
        tracing::warn!(
            frames = st.held_frames,
            "stopped: held frames were not sent"
        );
    }
    Ok(())
}

enum NetcmpAdmin {
    Stream(ProxyHandle),
    Packet(PacketHandle),
}

impl AdminHandler for NetcmpAdmin {
    fn handle(&self, cmd: String, _req: Value) -> BoxFuture<'_, Result<Value, String>> {
        Box::pin(async move {
            match cmd.as_str() {
                "status" => match self {
                    NetcmpAdmin::Stream(h) => serde_json::to_value(h.status()),
                    NetcmpAdmin::Packet(h) => serde_json::to_value(h.status()),
                }
                .map_err(|e| e.to_string()),
                other => Err(format!("unknown command {other:?} (netcmp answers status)")),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        a: NetcmpArgs,
    }

    fn parse(args: &str) -> Result<NetcmpArgs, String> {
        Cli::try_parse_from(std::iter::once("netcmp").chain(args.split_whitespace()))
            .map(|c| c.a)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_stream_proxy_flags_still_parse() {
        let a = parse("--listen 127.0.0.1:1 --primary 127.0.0.1:2 --secondary 127.0.0.1:3 --max-connections 5").unwrap();
        assert!(!a.packet);
        assert_eq!(a.max_connections, Some(5));
        assert!(parse("--listen 127.0.0.1:1")
            .unwrap_err()
            .contains("--primary"));
    }

    #[test]
    fn the_packet_mode_takes_three_ports_and_none_of_the_proxy_flags() {
        let a = parse("--packet --client-port tap:lsc0 --primary-port unix:/run/p.sock --secondary-port tap:lss0 --compare-timeout 50ms").unwrap();
        assert_eq!(a.client_port, Some(PortSpec::Tap("lsc0".into())));
        assert_eq!(a.primary_port, Some(PortSpec::Unix("/run/p.sock".into())));
        assert_eq!(a.compare_timeout, Duration::from_millis(50));
        assert!(a.listen.is_none());
        let e = parse("--packet --client-port tap:a --primary-port tap:b").unwrap_err();
        assert!(e.contains("--secondary-port"), "{e}");
        let e = parse("--packet --client-port tap:a --primary-port tap:b --secondary-port tap:c --listen 127.0.0.1:1").unwrap_err();
        assert!(e.contains("cannot be used with"), "{e}");
        let e = parse("--packet --client-port tap:a --primary-port tap:b --secondary-port tap:c --max-connections 3").unwrap_err();
        assert!(e.contains("cannot be used with"), "{e}");
        let e =
            parse("--listen 127.0.0.1:1 --primary 127.0.0.1:2 --client-port tap:a").unwrap_err();
        assert!(e.contains("--packet"), "{e}");
        let e = parse("--packet --client-port eth0 --primary-port tap:b --secondary-port tap:c")
            .unwrap_err();
        assert!(e.contains("tap:NAME or unix:PATH"), "{e}");
    }

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
