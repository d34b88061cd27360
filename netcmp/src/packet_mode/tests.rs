//! The packet mode's frontend over `unix:` ports, with this test as all three peers.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::*;
use crate::l2::build::{arp_request, udp_frame, Endpoints};

fn scratch() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "netcmp-packet-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn send(s: &mut UnixStream, frame: &[u8]) {
    s.write_all(&framing::encode(frame)).await.unwrap();
}

/// The next frame from netcmp, or None within `wait`.
async fn recv(s: &mut UnixStream, wait: Duration) -> Option<Vec<u8>> {
    tokio::time::timeout(wait, async {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.unwrap();
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut f).await.unwrap();
        f
    })
    .await
    .ok()
}

async fn until(what: &str, h: &PacketHandle, ok: impl Fn(&PacketStatus) -> bool) -> PacketStatus {
    for _ in 0..500 {
        let st = h.status();
        if ok(&st) {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: {:?}", h.status());
}

async fn peer(path: &Path, h: &PacketHandle, side: Side) -> UnixStream {
    let s = UnixStream::connect(path).await.unwrap();
    for _ in 0..500 {
        if h.connected(side) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{side} peer not seen");
}

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn frames_cross_the_ports_and_hostile_peers_are_dropped() {
    let dir = scratch();
    let (c, p, s) = (dir.join("c"), dir.join("p"), dir.join("s"));
    let cfg = PacketConfig::new(
        PortSpec::Unix(c.clone()),
        PortSpec::Unix(p.clone()),
        PortSpec::Unix(s.clone()),
    );
    let (link, events) = EpochLink::local();
    let proxy = PacketProxy::bind(cfg, link, events).await.unwrap();
    let h = proxy.handle();
    let (stop_tx, stop_rx) = watch::channel(false);
    let run = tokio::spawn(proxy.run(stop_rx));
    let mut cl = peer(&c, &h, Side::Client).await;
    let mut pr = peer(&p, &h, Side::Primary).await;
    let mut se = peer(&s, &h, Side::Secondary).await;

    // Non-IP from the client reaches both replicas.
    let arp = arp_request(
        [2, 0, 0, 0, 0, 2],
        [10, 0, 0, 2].into(),
        [10, 0, 0, 1].into(),
    );
    send(&mut cl, &arp).await;
    assert_eq!(recv(&mut pr, WAIT).await.as_deref(), Some(&arp[..]));
    assert_eq!(recv(&mut se, WAIT).await.as_deref(), Some(&arp[..]));

    // The primary's UDP reply waits for the secondary's, then reaches the client.
    let ep = Endpoints {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        vlan: None,
        src: "10.0.0.1".parse().unwrap(),
        dst: "10.0.0.2".parse().unwrap(),
    };
    let udp = udp_frame(&ep, 53, 4000, b"answer");
    send(&mut pr, &udp).await;
    assert_eq!(recv(&mut cl, Duration::from_millis(30)).await, None);
    send(&mut se, &udp).await;
    assert_eq!(recv(&mut cl, WAIT).await.as_deref(), Some(&udp[..]));
    let st = until("compared", &h, |st| st.bytes_compared >= 6).await;
    assert_eq!((st.mismatches, st.checkpoints_requested), (0, 0), "{st:?}");
    assert_eq!(st.added_latency_us.samples, 1, "{st:?}");

    // A different reply: released, a checkpoint, a resync at once (no epochs).
    send(&mut pr, &udp_frame(&ep, 53, 4000, b"one")).await;
    send(&mut se, &udp_frame(&ep, 53, 4000, b"two")).await;
    assert!(recv(&mut cl, WAIT).await.is_some());
    until("resynced", &h, |st| st.resyncs == 1 && st.mismatches == 1).await;

    // Hostile lengths and a frame cut short: the peer goes, the port stays.
    for bad in [
        vec![0u8; 4],
        (framing::MAX_FRAME as u32 + 1).to_be_bytes().to_vec(),
    ] {
        pr.write_all(&bad).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, pr.read_to_end(&mut rest)).await;
        pr = peer(&p, &h, Side::Primary).await;
    }
    pr.write_all(&framing::encode(&udp)[..20]).await.unwrap();
    drop(pr);
    let st = until("three bad framings", &h, |st| {
        st.ports.primary.bad_framing == 3
    })
    .await;
    assert_eq!(st.ports.primary.peers_dropped, 3, "{st:?}");
    // Garbage of a valid length: malformed, passed to the client as the primary's.
    let mut pr = peer(&p, &h, Side::Primary).await;
    send(&mut pr, &[0xff; 10]).await;
    assert_eq!(recv(&mut cl, WAIT).await.as_deref(), Some(&[0xff; 10][..]));
    assert_eq!(h.status().ports.primary.malformed, 1);

    // A newer peer replaces the current one.
    let mut se2 = UnixStream::connect(&s).await.unwrap();
    until("replaced", &h, |st| st.ports.secondary.peers_accepted == 2).await;
    send(&mut cl, &arp).await;
    assert_eq!(recv(&mut se2, WAIT).await.as_deref(), Some(&arp[..]));
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, se.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "the old peer got nothing more");

    // Without a peer, frames for a port are dropped and counted.
    drop(cl);
    until("client gone", &h, |st| !st.ports.client.connected).await;
    send(&mut pr, &arp).await;
    until("dropped", &h, |st| st.ports.client.dropped == 1).await;

    stop_tx.send_replace(true);
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    for sock in [&c, &p, &s] {
        assert!(!sock.exists(), "{} removed", sock.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_port_refuses_a_path_that_is_not_a_stale_socket() {
    let dir = scratch();
    let file = dir.join("file");
    std::fs::write(&file, b"keep me").unwrap();
    let cfg = PacketConfig::new(
        PortSpec::Unix(dir.join("c")),
        PortSpec::Unix(file.clone()),
        PortSpec::Unix(dir.join("s")),
    );
    let (link, events) = EpochLink::local();
    let e = PacketProxy::bind(cfg, link, events).await.unwrap_err();
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    let same = PortSpec::Unix(dir.join("x"));
    let cfg = PacketConfig::new(same.clone(), PortSpec::Unix(dir.join("y")), same);
    let (link, events) = EpochLink::local();
    let e = PacketProxy::bind(cfg, link, events).await.unwrap_err();
    assert!(e.contains("given twice"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn only_a_commit_paused_after_the_request_resyncs() {
    let dir = scratch();
    let (c, p, s) = (dir.join("c"), dir.join("p"), dir.join("s"));
    let cfg = PacketConfig::new(
        PortSpec::Unix(c.clone()),
        PortSpec::Unix(p.clone()),
        PortSpec::Unix(s.clone()),
    );
    // The link's own commits go nowhere; this test plays the primary daemon's events.
    let (link, _own) = EpochLink::local();
    let (events, rx) = tokio::sync::mpsc::unbounded_channel();
    let proxy = PacketProxy::bind(cfg, link, rx).await.unwrap();
    let h = proxy.handle();
    let (stop_tx, stop_rx) = watch::channel(false);
    let run = tokio::spawn(proxy.run(stop_rx));
    let mut cl = peer(&c, &h, Side::Client).await;
    let mut pr = peer(&p, &h, Side::Primary).await;
    let mut se = peer(&s, &h, Side::Secondary).await;
    let before = monotonic_ns();
    let ep = Endpoints {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        vlan: None,
        src: "10.0.0.1".parse().unwrap(),
        dst: "10.0.0.2".parse().unwrap(),
    };
    send(&mut pr, &udp_frame(&ep, 53, 4000, b"one")).await;
    send(&mut se, &udp_frame(&ep, 53, 4000, b"two")).await;
    assert!(recv(&mut cl, WAIT).await.is_some());
    until("requested", &h, |st| st.checkpoints_requested == 1).await;
    // A checkpoint that paused before the request does not cover the divergence.
    events
        .send(LinkEvent::Committed {
            epoch: 7,
            paused_at_ns: before,
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.status().resyncs, 0);
    // While the request is pending, the flow passes uncompared: no second request.
    send(&mut pr, &udp_frame(&ep, 53, 4000, b"three")).await;
    assert!(recv(&mut cl, WAIT).await.is_some());
    assert_eq!(h.status().checkpoints_requested, 1);
    events
        .send(LinkEvent::Committed {
            epoch: 8,
            paused_at_ns: monotonic_ns(),
        })
        .unwrap();
    until("resynced", &h, |st| st.resyncs == 1).await;
    // Compared again after the resync.
    send(&mut pr, &udp_frame(&ep, 53, 4000, b"four")).await;
    assert_eq!(recv(&mut cl, Duration::from_millis(30)).await, None);
    send(&mut se, &udp_frame(&ep, 53, 4000, b"four")).await;
    assert!(recv(&mut cl, WAIT).await.is_some());
    stop_tx.send_replace(true);
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
