//! The coordinator's tests.

use super::*;

#[derive(Default)]
struct Recorder {
    log: Mutex<Vec<String>>,
}

impl Participant for Recorder {
    fn name(&self) -> &str {
        "rec"
    }
    fn cut(&self, e: Epoch) -> BoxFuture<'_, Result<(), EpochError>> {
        self.log.lock().unwrap().push(format!("cut {}", e.0));
        Box::pin(async { Ok(()) })
    }
    fn prepare(&self, e: Epoch) -> BoxFuture<'_, Result<EpochSummary, EpochError>> {
        self.log.lock().unwrap().push(format!("prepare {}", e.0));
        Box::pin(async move {
            Ok(EpochSummary {
                participant: 1,
                items: e.0,
                ..Default::default()
            })
        })
    }
    fn commit(&self, e: Epoch) {
        self.log.lock().unwrap().push(format!("commit {}", e.0));
    }
    fn abort(&self, e: Epoch, _: &EpochError) {
        self.log.lock().unwrap().push(format!("abort {}", e.0));
    }
    fn status(&self) -> serde_json::Value {
        serde_json::json!({})
    }
}

struct Link {
    fail_at: u64,
}

impl CheckpointLink for Link {
    fn checkpoint(
        &self,
        epoch: Epoch,
        s: Vec<EpochSummary>,
    ) -> BoxFuture<'_, Result<(), EpochError>> {
        Box::pin(async move {
            assert_eq!(s[0].items, epoch.0);
            if epoch.0 == self.fail_at {
                Err(EpochError::PeerLost {
                    epoch,
                    reason: "test".into(),
                })
            } else {
                Ok(())
            }
        })
    }
}

#[tokio::test]
async fn checkpoints_run_in_order_and_a_lost_peer_aborts_one() {
    let rec = Arc::new(Recorder::default());
    let c = EpochCoordinator::new(
        vec![rec.clone()],
        Arc::new(NoGuest),
        Arc::new(Link { fail_at: 3 }),
        Epoch(1),
        CoordinatorOptions {
            interval: Some(Duration::from_millis(5)),
            bytes: 0,
        },
    );
    let (stop_tx, stop) = watch::channel(false);
    let h = tokio::spawn(c.clone().run(stop));
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.status().checkpoints < 3 {
        assert!(
            Instant::now() < deadline,
            "checkpoints stopped after the failure"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop_tx.send(true).unwrap();
    h.await.unwrap().unwrap();
    let log = rec.log.lock().unwrap().clone();
    assert_eq!(
        log[..12],
        [
            "cut 1",
            "prepare 1",
            "commit 1",
            "cut 2",
            "prepare 2",
            "commit 2",
            "cut 3",
            "prepare 3",
            "abort 3",
            "cut 4",
            "prepare 4",
            "commit 4"
        ]
    );
    let st = c.status();
    assert_eq!(st.checkpoint_failures, 1);
    assert_eq!(
        c.trigger().request().await.unwrap_err().to_string(),
        "not replicating: the coordinator has stopped"
    );
}

#[tokio::test]
async fn byte_threshold_and_requests_trigger() {
    let rec = Arc::new(Recorder::default());
    let c = EpochCoordinator::new(
        vec![rec.clone()],
        Arc::new(NoGuest),
        Arc::new(Link { fail_at: 0 }),
        Epoch(1),
        CoordinatorOptions {
            interval: None,
            bytes: 1000,
        },
    );
    let (stop_tx, stop) = watch::channel(false);
    let h = tokio::spawn(c.clone().run(stop));
    let t = c.trigger();
    let rep = t.request().await.unwrap();
    assert_eq!(rep.epoch, Epoch(1));
    t.add_bytes(600);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(c.current(), Epoch(2));
    t.add_bytes(600);
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.current() != Epoch(3) {
        assert!(Instant::now() < deadline, "byte trigger did not fire");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop_tx.send(true).unwrap();
    h.await.unwrap().unwrap();
}

#[test]
fn percentiles() {
    let mut l = Latencies::default();
    for i in 1..=100 {
        l.record(Duration::from_micros(i));
    }
    assert_eq!(l.percentile(50.0), 50);
    assert_eq!(l.percentile(99.0), 99);
    assert_eq!(l.percentile(100.0), 100);
}
