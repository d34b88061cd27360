//! A node's state changes as a stream of JSON objects, for `lockstep events` (what
//! `drbdsetup events2` is to DRBD) and for anything that reacts to them.
//!
//! Every event has `event` (its kind), `seq` (consecutive per daemon: a gap means the
//! subscriber fell behind), `time` (Unix seconds) and its own fields:
//!
//! | event | fields | emitted when |
//! |---|---|---|
//! | `mode` | `role`, `mode`, `previous`, `reason` | the node's mode changes |
//! | `peer` | `state` (`connected`, `lost`, `ended`), `peer`, `reason` | a session starts or ends |
//! | `sync` | `state` (`started`, `progress`, `done`), `kind`, block and byte counts | a resync runs |
//! | `checkpoint` | `state` (`committed`, `aborted`), `epoch`, `error` | a checkpoint ends |
//! | `split-brain` | `peer`, `reason` | a session is refused because both nodes wrote |
//! | `failover` | `to`, `committed_epoch`, `restored_blocks` | this node took over |
//! | `verify` | `state` (`done`, `failed`), chunk counts, `error` | an online verify ends |
//! | `lagged` | `missed` | the subscriber fell behind and missed events |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

/// How many events wait for a slow subscriber before it misses some.
const BACKLOG: usize = 1024;

/// Where a node publishes its events; cheap to clone.
#[derive(Debug, Clone)]
pub struct NodeEvents {
    tx: broadcast::Sender<Value>,
    seq: Arc<AtomicU64>,
}

impl Default for NodeEvents {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(BACKLOG).0,
            seq: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl NodeEvents {
    /// Publish event `kind` with `fields` (a JSON object). Nobody listening is fine.
    pub fn emit(&self, kind: &str, fields: Value) {
        let mut m = match fields {
            Value::Object(m) => m,
            other => {
                let mut m = Map::new();
                m.insert("value".into(), other);
                m
            }
        };
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let mut e = Map::new();
        e.insert("event".into(), json!(kind));
        e.insert(
            "seq".into(),
            json!(self.seq.fetch_add(1, Ordering::Relaxed) + 1),
        );
        e.insert("time".into(), json!((time * 1000.0).round() / 1000.0));
        e.append(&mut m);
        let _ = self.tx.send(Value::Object(e));
    }

    /// A mode change from `previous` to `mode` (nothing when they are equal).
    pub fn mode(&self, role: &str, previous: &str, mode: &str, reason: Option<&str>) {
        if previous != mode {
            self.emit(
                "mode",
                json!({"role": role, "mode": mode, "previous": previous, "reason": reason}),
            );
        }
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.tx.subscribe()
    }

    /// The event a subscriber gets for `missed` events it fell behind by.
    pub fn lagged(missed: u64) -> Value {
        json!({"event": "lagged", "missed": missed})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_numbered_and_carry_their_fields() {
        let ev = NodeEvents::default();
        let mut rx = ev.subscribe();
        ev.mode("primary", "paused", "paused", None);
        ev.mode("primary", "paused", "replicating", None);
        ev.emit("checkpoint", json!({"state": "committed", "epoch": 4}));
        let a = rx.try_recv().unwrap();
        let b = rx.try_recv().unwrap();
        assert!(rx.try_recv().is_err(), "an unchanged mode is no event");
        assert_eq!(a["event"], "mode");
        assert_eq!(a["mode"], "replicating");
        assert_eq!(a["previous"], "paused");
        assert_eq!(b["event"], "checkpoint");
        assert_eq!(b["epoch"], 4);
        assert_eq!(b["seq"].as_u64(), Some(a["seq"].as_u64().unwrap() + 1));
        assert!(b["time"].as_f64().unwrap() > 1.6e9);
    }
}
