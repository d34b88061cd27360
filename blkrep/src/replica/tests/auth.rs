//! Authenticated pairs: a peer key on the secondary's port, strangers refused, and blocks a
//! stranger wrote rolled back by the next session.

use super::*;

async fn control_refusal(ep: &Endpoint, key: Option<&PeerKey>) -> String {
    match connect_control(ep, Duration::from_secs(5), key, None).await {
        Ok(_) => panic!("the control channel opened"),
        Err(e) => e.to_string(),
    }
}

fn peer_key(secret: &str) -> PeerKey {
    PeerKey::from_secret(secret.as_bytes()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_pair_replicates_and_strangers_get_nothing() {
    let key = peer_key("the key both nodes share, 32+ bytes");
    let key2 = key.clone();
    let s = start_secondary_keyed(
        PeerLossPolicy::Wait,
        1 << 20,
        None,
        false,
        Some(key.clone()),
    )
    .await;
    let p = start_primary_keyed(
        &s.ep,
        AckMode::Received,
        MemoryBackend::new(SIZE),
        NodeMeta::fresh(),
        Some(key),
    )
    .await;
    p.primary
        .write_at(8192, IoBuf::from_slice(&[7u8; 4096]), false)
        .await
        .unwrap();
    let epoch = p.coord.checkpoint().await.unwrap().epoch;
    assert_eq!(s.sec.mode(), Mode::Replicating);
    let before = s.disk.snapshot();

    // Without a key: the port speaks no NBD, so neither the control option nor the replica
    // export can be reached.
    let e = control_refusal(&s.ep, None).await;
    assert!(e.contains("--psk-file"), "{e}");
    let e = NbdClient::connect(&s.ep, &export(REPLICA_EXPORT))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("--psk-file"), "{e}");
    // A wrong key.
    let wrong = peer_key("another key of at least 16 bytes");
    let e = control_refusal(&s.ep, Some(&wrong)).await;
    assert!(e.contains("refused our key"), "{e}");
    // A forger that sends a HELLO frame and an NBD write straight away: read no further
    // than the key exchange, then closed.
    let crate::nbd::Endpoint::Tcp(addr) = &s.ep else {
        unreachable!()
    };
    let mut raw = tokio::net::TcpStream::connect(addr.as_str()).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut junk = hello().encode();
    junk.extend_from_slice(&[0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1]);
    junk.resize(4096, 0xab);
    let _ = raw.write_all(&junk).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut got))
        .await
        .unwrap();
    assert!(
        got.starts_with(&crate::auth::MAGIC),
        "the port answered {got:02x?}"
    );
    assert!(
        got.len() <= 40 + 33,
        "more than the exchange came back: {} bytes",
        got.len()
    );
    // A control channel with the right key whose session never resumed: its key opens no
    // data connection (only the running session's does).
    let (_rd, _wr, other) = connect_control(&s.ep, Duration::from_secs(5), Some(&key2), None)
        .await
        .unwrap();
    let e = NbdClient::connect(
        &s.ep,
        &ClientOptions {
            export: REPLICA_EXPORT.into(),
            session: other,
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("session has ended"), "{e}");

    // The pair never noticed.
    assert_eq!(s.sec.mode(), Mode::Replicating);
    assert_eq!(s.disk.snapshot(), before);
    p.primary
        .write_at(0, IoBuf::from_slice(&[9u8; 4096]), false)
        .await
        .unwrap();
    let next = p.coord.checkpoint().await.unwrap().epoch;
    assert!(next > epoch);
    assert_eq!(s.disk.snapshot(), p.disk.snapshot());
}

// ---------------------------------------------------------------------------------------------
// Divergence the protocol did not cause: a stranger on a port without a key writes a block
// through the replica export. The checkpoint of that epoch aborts; the reconnect rolls the
// interrupted epochs back to the checkpoint, so the resync restores the block even though the
// primary never wrote it.

#[test]
fn a_block_written_by_a_stranger_is_rolled_back_by_the_next_session() {
    rt().block_on(async {
        let (s, proxy, p) = pair_behind_proxy().await;
        // The stranger: a data connection of the running session, one 4 KiB write to a
        // block the primary never touches.
        let c = NbdClient::connect(&s.ep, &export(REPLICA_EXPORT))
            .await
            .unwrap();
        c.write_at(40 * 4096, IoBuf::from_slice(&[0x55; 4096]), false)
            .await
            .unwrap();
        // The session acks on receipt (`received`): the write lands right after its answer.
        wait_for("the write to land", || s.disk.snapshot()[40 * 4096] == 0x55).await;
        fill_blocks(&p.primary, 2..4, 2).await;
        // Its epoch cannot commit (the secondary counted a write the primary did not send).
        assert!(p.coord.checkpoint().await.is_err());
        // The abort pauses the primary, which reconnects: a second session.
        wait_for("a second session, resynced", || {
            p.repl.status().sessions >= 2
                && p.primary.mode() == PrimaryMode::Replicating
                && !p.primary.status().resyncing
        })
        .await;
        p.coord.checkpoint().await.unwrap();
        assert_eq!(
            s.disk.snapshot(),
            p.disk.snapshot(),
            "the stranger's block survived the resync"
        );
        drop(proxy);
        assert!(s.sec.status().consistent);
    });
}
