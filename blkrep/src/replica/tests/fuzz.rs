//! The secondary's replication port against generated hostile sessions: well-formed frames
//! with any field values in any order (a forged HELLO with any numbers, SUMS for any units,
//! CHECKPOINTs that lie, RESUMEs out of place), bit-flipped frames and raw bytes, on a port
//! with and without a peer key. Afterwards no server task has panicked, the port still
//! answers a new control connection, and the secondary is in a state it can be in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use proptest::collection::vec;
use tokio::io::AsyncReadExt;

use super::*;
use crate::replica::wire::tests::message;

/// Panics on tokio worker threads (server tasks), counted by a hook that keeps the default
/// report.
fn server_panics() -> u64 {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("tokio-runtime-worker"))
            {
                COUNT.fetch_add(1, Ordering::SeqCst);
            }
            default(info);
        }));
    });
    COUNT.load(Ordering::SeqCst)
}

/// One hostile control session: `frames` (encoded, the `flip`-th bit of the stream flipped
/// when given), then `junk`; reads whatever comes back until the port closes or 1 s passes.
async fn hostile_session(ep: &Endpoint, frames: &[Message], flip: Option<usize>, junk: &[u8]) {
    let (mut rd, mut wr) = control_conn(ep).await;
    let mut stream: Vec<u8> = frames.iter().flat_map(|m| m.encode()).collect();
    if let Some(bit) = flip.filter(|_| !stream.is_empty()) {
        let bit = bit % (stream.len() * 8);
        stream[bit / 8] ^= 1 << (bit % 8);
    }
    stream.extend_from_slice(junk);
    let _ = wr.write_all(&stream).await;
    let _ = wr.flush().await;
    let mut sink = vec![0u8; 1 << 16];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// The port still works: a new control connection gets an answer to HELLO.
async fn still_answers(ep: &Endpoint) -> Message {
    let (mut rd, mut wr) = control_conn(ep).await;
    write_message(&mut wr, &hello()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), read_message(&mut rd))
        .await
        .expect("an answer to HELLO")
        .expect("a frame")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn hostile_control_sessions_never_break_the_secondary(
        hello_first in any::<bool>(),
        frames in vec(message(), 0..10),
        flip in proptest::option::of(any::<usize>()),
        junk in vec(any::<u8>(), 0..96),
    ) {
        let before = server_panics();
        rt().block_on(async {
            let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
            let mut all = Vec::new();
            if hello_first {
                all.push(hello());
            }
            all.extend(frames);
            hostile_session(&s.ep, &all, flip, &junk).await;
            // The hostile session is over; its connection is gone.
            wait_for("the session to end", || {
                !matches!(s.sec.mode(), Mode::Syncing | Mode::Replicating)
            })
            .await;
            match still_answers(&s.ep).await {
                Message::Welcome { .. } | Message::Refused { .. } => {}
                other => panic!("HELLO answered with {other:?}"),
            }
        });
        prop_assert_eq!(server_panics(), before, "a server task panicked");
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn strangers_on_a_keyed_port_never_get_past_the_exchange(
        stream in vec(any::<u8>(), 0..512),
    ) {
        let before = server_panics();
        rt().block_on(async {
            let key = PeerKey::from_secret(b"the key of this fuzz test, 32 bytes").unwrap();
            let s = start_secondary_keyed(PeerLossPolicy::Wait, 1 << 20, None, false, Some(key)).await;
            let crate::nbd::Endpoint::Tcp(addr) = &s.ep else { unreachable!() };
            let mut c = tokio::net::TcpStream::connect(addr.as_str()).await.unwrap();
            let _ = c.write_all(&stream).await;
            let mut got = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(6), c.read_to_end(&mut got)).await;
            assert!(got.len() <= 40 + 33, "{} bytes came back", got.len());
            assert_eq!(s.sec.mode(), Mode::Waiting);
            assert_eq!(s.sec.buffer_stats().blocks, 0);
            assert!(s.disk.snapshot().iter().all(|&b| b == 0), "the disk was written");
        });
        prop_assert_eq!(server_panics(), before, "a server task panicked");
    }
}
