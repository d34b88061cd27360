//! A second checkpoint participant beside the block layer, whose halves talk over the
//! session's participant channel (as memrep's do): its share of an epoch commits exactly when
//! the block layer's does, an incomplete share aborts the checkpoint for both, messages of an
//! ended session are refused, a permanent refusal at connect ends the attempt for good, and
//! failover hands it the committed epoch.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::*;
use crate::epoch::{EpochError, Participant, PeerChannel};
use crate::replica::secondary::SecondaryParticipant;
use crate::sync::{BoxFuture, Locked};

const TEST_PARTICIPANT: u16 = 7;
/// Items the primary half sends per epoch.
const ITEMS: u64 = 3;

/// The participant's own "transport" between its halves, and what each half saw.
#[derive(Default)]
struct Shared {
    /// Items that reached the secondary, per epoch.
    arrived: BTreeMap<u64, u64>,
    /// Lose one item of the next epoch sent.
    lose_next: bool,
    /// Epochs the secondary half committed, in order.
    committed: Vec<u64>,
    /// Epochs it aborted.
    aborted: Vec<u64>,
    /// Epochs sessions resumed at.
    resumed: Vec<u64>,
    /// (target, committed epoch) of each failover.
    failovers: Vec<(FailoverTarget, u64)>,
    /// The channel of each session, in order.
    channels: Vec<Arc<dyn PeerChannel>>,
    /// Refuse the next connect for good (as two halves of different sizes would).
    refuse_next: bool,
}

struct PrimaryHalf(Arc<Mutex<Shared>>);

impl PrimaryHalf {
    fn channel(&self) -> Arc<dyn PeerChannel> {
        self.0.locked().channels.last().cloned().expect("connected")
    }
}
struct SecondaryHalf(Arc<Mutex<Shared>>);

impl Participant for PrimaryHalf {
    fn name(&self) -> &str {
        "test"
    }
    fn cut(&self, _epoch: Epoch) -> BoxFuture<'_, Result<(), EpochError>> {
        Box::pin(async { Ok(()) })
    }
    fn prepare(&self, epoch: Epoch) -> BoxFuture<'_, Result<EpochSummary, EpochError>> {
        Box::pin(async move {
            let sent = if std::mem::take(&mut self.0.locked().lose_next) {
                ITEMS - 1
            } else {
                ITEMS
            };
            let channel = self.channel();
            for _ in 0..sent {
                let answer = channel
                    .call(epoch.0.to_le_bytes().to_vec())
                    .await
                    .map_err(|reason| EpochError::PeerLost { epoch, reason })?;
                assert_eq!(answer, b"ok");
            }
            Ok(EpochSummary {
                participant: TEST_PARTICIPANT,
                items: ITEMS,
                bytes: 0,
                digest: 0,
            })
        })
    }
    fn peer_id(&self) -> Option<u16> {
        Some(TEST_PARTICIPANT)
    }
    fn connected(
        &self,
        channel: Arc<dyn PeerChannel>,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<(), EpochError>> {
        Box::pin(async move {
            if std::mem::take(&mut self.0.locked().refuse_next) {
                return Err(EpochError::Refused {
                    epoch,
                    reason: "regions of 1 and 2 pages".into(),
                });
            }
            self.0.locked().channels.push(channel);
            Ok(())
        })
    }
    fn commit(&self, _epoch: Epoch) {}
    fn abort(&self, _epoch: Epoch, _reason: &EpochError) {}
    fn status(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

impl SecondaryParticipant for SecondaryHalf {
    fn id(&self) -> u16 {
        TEST_PARTICIPANT
    }
    fn name(&self) -> &str {
        "test"
    }
    fn resume(&self, epoch: u64) {
        let mut s = self.0.locked();
        s.resumed.push(epoch);
        s.arrived.retain(|&e, _| e < epoch);
    }
    fn receive(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let epoch = u64::from_le_bytes(message.try_into().map_err(|_| "not an epoch")?);
        *self.0.locked().arrived.entry(epoch).or_default() += 1;
        Ok(b"ok".to_vec())
    }
    fn prepare<'a>(
        &'a self,
        epoch: u64,
        summary: &'a EpochSummary,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let got = self.0.locked().arrived.get(&epoch).copied().unwrap_or(0);
            if got == summary.items {
                Ok(())
            } else {
                Err(format!("{got} of {} items arrived", summary.items))
            }
        })
    }
    fn commit(&self, epoch: u64) {
        self.0.locked().committed.push(epoch);
    }
    fn abort(&self, epoch: u64, _reason: &str) {
        self.0.locked().aborted.push(epoch);
    }
    fn failover(
        &self,
        target: FailoverTarget,
        committed: u64,
    ) -> BoxFuture<'_, Result<(), String>> {
        self.0.locked().failovers.push((target, committed));
        Box::pin(async { Ok(()) })
    }
    fn status(&self) -> serde_json::Value {
        serde_json::json!({ "committed": self.0.locked().committed.last() })
    }
}

#[test]
fn a_second_participant_commits_and_aborts_together_with_the_block_layer() {
    rt().block_on(async {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        s.sec
            .add_participant(Arc::new(SecondaryHalf(shared.clone())))
            .unwrap();
        assert!(
            s.sec
                .add_participant(Arc::new(SecondaryHalf(shared.clone())))
                .is_err(),
            "a participant id is taken once"
        );
        let p = start_primary_joined(
            &s.ep,
            AckMode::Received,
            MemoryBackend::new(SIZE),
            NodeMeta::fresh(),
            None,
            vec![Arc::new(PrimaryHalf(shared.clone()))],
        )
        .await;
        tokio::spawn(p.repl.clone().run());
        let committed = |sec: &Secondary| sec.status().committed_epoch;

        // A complete epoch commits on both halves at once.
        fill_blocks(&p.primary, 0..4, 1).await;
        p.coord.checkpoint().await.unwrap();
        let good = committed(&s.sec);
        assert_eq!(shared.locked().committed.last(), Some(&good));
        assert_eq!(s.sec.status().participants["test"]["committed"], good);
        let at_good = p.disk.snapshot();

        // An item of the next epoch is lost: the block layer's share is complete, but the
        // checkpoint aborts for both, and neither commits it.
        shared.locked().lose_next = true;
        fill_blocks(&p.primary, 2..8, 2).await;
        let e = p.coord.checkpoint().await.unwrap_err();
        assert!(e.to_string().contains("test: 2 of 3 items arrived"), "{e}");
        assert_eq!(committed(&s.sec), good, "the block layer did not commit");
        assert_eq!(shared.locked().aborted, vec![good + 1]);
        assert_eq!(shared.locked().committed.last(), Some(&good));

        // The primary reconnects and resyncs; the next session commits on both again. The
        // old session's channel is fenced off.
        wait_for("the next session", || {
            s.sec.mode() == Mode::Replicating && shared.locked().channels.len() >= 2
        })
        .await;
        let old = shared.locked().channels[0].clone();
        let e = old.call(9u64.to_le_bytes().to_vec()).await.unwrap_err();
        assert!(e.contains("the session"), "{e}");
        assert!(!shared.locked().arrived.contains_key(&9));
        wait_for("the resync", || !p.primary.status().resyncing).await;
        let mut last = Err(EpochError::NotReplicating("not yet".into()));
        for _ in 0..100 {
            last = p.coord.checkpoint().await.map(|_| ());
            if last.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        last.unwrap();
        let after = committed(&s.sec);
        assert!(after > good);
        assert_eq!(shared.locked().committed.last(), Some(&after));
        let at_after = p.disk.snapshot();

        // Failover hands the participant the committed epoch, and the disk is that checkpoint.
        fill_blocks(&p.primary, 0..2, 3).await;
        wait_idle(&p.primary, Duration::from_secs(5)).await;
        drop(p);
        s.sec.failover(FailoverTarget::Checkpoint).await.unwrap();
        assert_eq!(
            shared.locked().failovers,
            vec![(FailoverTarget::Checkpoint, after)]
        );
        assert_eq!(s.disk.snapshot(), at_after);
        assert_ne!(at_after, at_good);
    });
}

#[test]
fn a_participant_refusal_at_connect_is_permanent_and_says_why() {
    rt().block_on(async {
        let shared = Arc::new(Mutex::new(Shared {
            refuse_next: true,
            ..Shared::default()
        }));
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        s.sec
            .add_participant(Arc::new(SecondaryHalf(shared.clone())))
            .unwrap();
        let table = DigestTable::scan(&MemoryBackend::new(SIZE)).await.unwrap();
        let primary = Primary::new(
            Arc::new(MemoryBackend::new(SIZE)),
            table,
            0,
            PrimaryOptions::default(),
            Arc::new(MetaStore::in_memory(NodeMeta::fresh())),
        );
        let (_stop, stop_rx) = watch::channel(false);
        let repl = Replicator::new(
            primary.clone(),
            test_options(&s.ep, AckMode::Received, None),
            stop_rx,
        );
        repl.set_participants(vec![Arc::new(PrimaryHalf(shared.clone()))]);
        let e = repl.attempt().await.unwrap_err();
        assert!(e.is_permanent_refusal(), "{e}");
        assert!(
            e.to_string().contains("test: regions of 1 and 2 pages"),
            "{e}"
        );
        // Refused once; the next attempt joins.
        repl.attempt().await.unwrap();
        assert_eq!(shared.locked().channels.len(), 1);
    });
}
