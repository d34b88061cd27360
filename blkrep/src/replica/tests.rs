//! A primary and a secondary in one process, over real loopback sockets: a model-based
//! property test of the replication semantics, and the secondary against hostile peers.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::frame::{read_message, write_message};
use super::meta::{MetaStore, NodeMeta};
use super::peer::{Hello, LinkOptions, PeerLink};
use super::primary::{wait_idle, BlockParticipant, Primary, PrimaryMode, PrimaryOptions};
use super::secondary::{Mode, PeerLossPolicy, Secondary, SecondaryOptions};
use super::session::{Replicator, ReplicatorOptions};
use super::wire::{AckMode, Message, SyncKind};
use super::REPLICA_EXPORT;
use super::{FailoverTarget, PARTICIPANT_BLOCK};
use crate::auth::PeerKey;
use crate::digest::DigestTable;
use crate::epoch::{CoordinatorOptions, Epoch, EpochCoordinator, EpochSummary, NoGuest};
use crate::nbd::client::{connect_control, ClientOptions, NbdClient};
use crate::nbd::server::{Export, NbdServer, ServerOptions};
use crate::nbd::{Endpoint, Listener};
use crate::storage::{Backend, IoBuf, MemoryBackend};
use lockstep_tests::proxy::CutProxy;

mod fuzz;
mod powercut;

const SIZE: u64 = 64 * 4096 + 1000;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

struct SecondarySide {
    sec: Arc<Secondary>,
    disk: MemoryBackend,
    ep: Endpoint,
    _stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

async fn start_secondary(policy: PeerLossPolicy, buffer_memory: u64) -> SecondarySide {
    start_secondary_with(policy, buffer_memory, None, false).await
}

/// A secondary; `meta` Some: a disk that was in sync with generation `meta.generation`.
async fn start_secondary_with(
    policy: PeerLossPolicy,
    buffer_memory: u64,
    meta: Option<NodeMeta>,
    discard_my_data: bool,
) -> SecondarySide {
    start_secondary_keyed(policy, buffer_memory, meta, discard_my_data, None).await
}

/// A secondary whose port demands `key` when given.
async fn start_secondary_keyed(
    policy: PeerLossPolicy,
    buffer_memory: u64,
    meta: Option<NodeMeta>,
    discard_my_data: bool,
    key: Option<PeerKey>,
) -> SecondarySide {
    let dir = tempfile::tempdir().unwrap();
    let disk = MemoryBackend::new(SIZE);
    let known = meta.is_some();
    let sec = Secondary::with_meta(
        Arc::new(disk.clone()),
        SecondaryOptions {
            buffer_memory,
            spill_path: dir.path().join("spill"),
            on_peer_loss: policy,
            heartbeat_misses: 3,
            hello_timeout: Duration::from_millis(300),
            discard_my_data,
        },
        MetaStore::in_memory(meta.unwrap_or_else(NodeMeta::fresh)),
        known,
    );
    let (ep, stop) = serve_secondary(&sec, key).await;
    SecondarySide {
        sec,
        disk,
        ep,
        _stop: stop,
        _dir: dir,
    }
}

/// Serve `sec`'s replication export and control protocol on a loopback port, demanding
/// `key` when given.
async fn serve_secondary(
    sec: &Arc<Secondary>,
    key: Option<PeerKey>,
) -> (Endpoint, watch::Sender<bool>) {
    serve_secondary_at(sec, key, "127.0.0.1:0").await
}

/// Like [`serve_secondary`], on `addr`; waits for a server that is stopping to let go of it.
async fn serve_secondary_at(
    sec: &Arc<Secondary>,
    key: Option<PeerKey>,
    addr: &str,
) -> (Endpoint, watch::Sender<bool>) {
    let sink = sec.replica_sink();
    let mut srv = NbdServer::new(
        vec![Export {
            name: REPLICA_EXPORT.into(),
            description: String::new(),
            backend: sink.clone(),
            read_only: false,
            epochs: Some(sink),
        }],
        ServerOptions::default(),
    )
    .unwrap()
    .with_control(sec.control());
    if let Some(k) = key {
        srv = srv.with_auth(k, sec.clone());
    }
    let srv = Arc::new(srv);
    let mut tries = 0;
    let l = loop {
        match Listener::bind(&Endpoint::Tcp(addr.into())).await {
            Ok(l) => break l,
            Err(e) => {
                tries += 1;
                assert!(tries < 500, "binding {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let ep = l.local_endpoint();
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(srv.serve(l, stop_rx));
    (ep, stop)
}

struct PrimarySide {
    primary: Arc<Primary>,
    disk: MemoryBackend,
    coord: Arc<EpochCoordinator>,
    repl: Arc<Replicator>,
    _stop: watch::Sender<bool>,
}

impl PrimarySide {
    fn link(&self) -> Arc<PeerLink> {
        self.repl.current_link().expect("a session is up")
    }
}

fn link_options() -> LinkOptions {
    LinkOptions {
        heartbeat: Duration::from_millis(100),
        misses: 20,
        commit_timeout: Duration::from_secs(10),
    }
}

async fn start_primary(ep: &Endpoint, ack: AckMode) -> PrimarySide {
    start_primary_on(ep, ack, MemoryBackend::new(SIZE), NodeMeta::fresh()).await
}

async fn start_primary_on(
    ep: &Endpoint,
    ack: AckMode,
    disk: MemoryBackend,
    meta: NodeMeta,
) -> PrimarySide {
    start_primary_keyed(ep, ack, disk, meta, None).await
}

async fn start_primary_keyed(
    ep: &Endpoint,
    ack: AckMode,
    disk: MemoryBackend,
    meta: NodeMeta,
    key: Option<PeerKey>,
) -> PrimarySide {
    let table = DigestTable::scan(&disk).await.unwrap();
    let primary = Primary::new(
        Arc::new(disk.clone()),
        table,
        0,
        PrimaryOptions {
            ack,
            queue_bytes: 1 << 20,
            max_inflight: 8,
        },
        Arc::new(MetaStore::in_memory(meta)),
    );
    let (stop, stop_rx) = watch::channel(false);
    let repl = Replicator::new(
        primary.clone(),
        ReplicatorOptions {
            secondary: ep.clone(),
            link: link_options(),
            ack,
            connect_timeout: Duration::from_secs(5),
            reconnect_timeout: Duration::from_secs(5),
            retry: Duration::from_millis(50),
            key,
            tls: None,
        },
        stop_rx,
    );
    repl.attempt().await.unwrap();
    let coord = EpochCoordinator::new(
        vec![Arc::new(BlockParticipant(primary.clone()))],
        Arc::new(NoGuest),
        repl.clone(),
        Epoch(primary.resume_epoch()),
        CoordinatorOptions {
            interval: None,
            bytes: 0,
        },
    );
    wait_for("the initial sync", || {
        primary.status()["resyncing"] == serde_json::Value::Bool(false)
    })
    .await;
    // The checkpoint that completes the initial sync (the daemon requests it by itself).
    coord.checkpoint().await.unwrap();
    PrimarySide {
        primary,
        disk,
        coord,
        repl,
        _stop: stop,
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// A primary write of `len` bytes of `fill` (varied per byte) at `off`.
    Write {
        off: u64,
        len: u64,
        fill: u8,
    },
    Trim {
        off: u64,
        len: u64,
    },
    Zero {
        off: u64,
        len: u64,
    },
    /// A write by the secondary itself (COLO running secondary).
    Local {
        off: u64,
        len: u64,
        fill: u8,
    },
    /// Close the current epoch and drain it to the secondary, without committing yet:
    /// later writes belong to the next epoch while this one waits (pipelined checkpoints).
    Cut,
    /// Commit the oldest cut epoch.
    Commit,
    /// Cut and commit everything.
    Checkpoint,
}

fn range(aligned: bool) -> impl Strategy<Value = (u64, u64)> {
    if aligned {
        (0..64u64, 1..6u64)
            .prop_map(|(b, n)| (b * 4096, (n * 4096).min(SIZE - b * 4096)))
            .boxed()
    } else {
        (0..SIZE - 1)
            .prop_flat_map(|off| (Just(off), 1..(SIZE - off).min(20_000)))
            .boxed()
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (any::<bool>(), any::<u8>()).prop_flat_map(|(a, fill)| range(a).prop_map(move |(off, len)| Step::Write { off, len, fill })),
        1 => range(false).prop_map(|(off, len)| Step::Trim { off, len }),
        1 => range(true).prop_map(|(off, len)| Step::Zero { off, len }),
        2 => (any::<bool>(), any::<u8>()).prop_flat_map(|(a, fill)| range(a).prop_map(move |(off, len)| Step::Local { off, len, fill })),
        1 => Just(Step::Cut),
        1 => Just(Step::Commit),
        1 => Just(Step::Checkpoint),
    ]
}

fn pattern(off: u64, len: u64, fill: u8) -> Vec<u8> {
    (0..len)
        .map(|i| fill ^ ((off + i) as u8).wrapping_mul(31))
        .collect()
}

/// The model: the primary's disk, the last committed image, and the secondary's view.
struct Model {
    primary: Vec<u8>,
    committed: Vec<u8>,
    view: Vec<u8>,
    local_writes: bool,
}

async fn read_all(b: &dyn Backend) -> Vec<u8> {
    b.read_at(0, SIZE as usize).await.unwrap().to_vec()
}

async fn run_case(steps: Vec<Step>, end: FailoverTarget, ack: AckMode, spill: bool) {
    use crate::epoch::{CheckpointLink, Participant};
    let s = start_secondary(PeerLossPolicy::Wait, if spill { 8 * 4096 } else { 1 << 20 }).await;
    let p = start_primary(&s.ep, ack).await;
    let block = BlockParticipant(p.primary.clone());
    let view = s.sec.view();
    let mut m = Model {
        primary: vec![0; SIZE as usize],
        committed: vec![0; SIZE as usize],
        view: vec![0; SIZE as usize],
        local_writes: false,
    };
    let mut next = p.coord.current().0;
    let mut pending: std::collections::VecDeque<(u64, EpochSummary, Vec<u8>)> = Default::default();
    let mut steps = steps;
    steps.push(Step::Commit); // sometimes leaves a cut epoch open before the failover
    for (i, st) in steps.iter().enumerate() {
        let mut commits = 0;
        match st {
            Step::Write { off, len, fill } => {
                let data = pattern(*off, *len, *fill);
                p.primary
                    .write_at(*off, IoBuf::from_slice(&data), false)
                    .await
                    .unwrap();
                m.primary[*off as usize..(*off + *len) as usize].copy_from_slice(&data);
            }
            Step::Trim { off, len } => {
                p.primary.discard(*off, *len).await.unwrap();
                m.primary[*off as usize..(*off + *len) as usize].fill(0);
            }
            Step::Zero { off, len } => {
                p.primary.write_zeroes(*off, *len, false).await.unwrap();
                m.primary[*off as usize..(*off + *len) as usize].fill(0);
            }
            Step::Local { off, len, fill } => {
                let data = pattern(*off, *len, *fill);
                view.write_at(*off, IoBuf::from_slice(&data), false)
                    .await
                    .unwrap();
                m.view[*off as usize..(*off + *len) as usize].copy_from_slice(&data);
                m.local_writes = true;
            }
            Step::Cut | Step::Checkpoint if pending.len() < 3 => {
                block.cut(Epoch(next)).await.unwrap();
                let summary = block.prepare(Epoch(next)).await.unwrap();
                assert_eq!(
                    summary.digest,
                    {
                        let t = DigestTable::scan(&p.disk).await.unwrap();
                        t.sum()
                    },
                    "step {i}: the cut's digest is the primary disk's"
                );
                pending.push_back((next, summary, m.primary.clone()));
                next += 1;
                if matches!(st, Step::Checkpoint) {
                    commits = pending.len();
                }
            }
            Step::Commit => commits = 1.min(pending.len()),
            Step::Cut | Step::Checkpoint => {}
        }
        for _ in 0..commits {
            let (e, summary, image) = pending.pop_front().unwrap();
            p.link().checkpoint(Epoch(e), vec![summary]).await.unwrap();
            block.commit(Epoch(e));
            m.committed = image.clone();
            m.view = image;
            m.local_writes = false;
            if pending.is_empty() && m.committed == m.primary {
                // Nothing written since the cut: the secondary disk equals the primary's.
                assert!(
                    s.disk.snapshot() == m.primary,
                    "step {i}: disk != primary after checkpoint"
                );
                let (img, cp) = s.sec.verify_checkpoint().await.unwrap();
                assert_eq!(Some(img), cp, "step {i}: digest of the checkpoint");
            }
            assert_eq!(s.sec.status()["committed_epoch"], e);
        }
        assert!(
            p.disk.snapshot() == m.primary,
            "step {i} {st:?}: primary disk != model"
        );
        assert!(
            read_all(&*view).await == m.view,
            "step {i} {st:?}: secondary view != model"
        );
        let _ = &p.coord;
    }
    if end == FailoverTarget::Latest && ack == AckMode::Local {
        assert!(wait_idle(&p.primary, Duration::from_secs(10)).await);
    }
    let rep = s.sec.failover(end).await.unwrap();
    let expect = match end {
        FailoverTarget::Checkpoint => &m.view,
        FailoverTarget::Latest => &m.primary,
    };
    assert!(
        s.disk.snapshot() == *expect,
        "after failover to {end:?}: disk != model"
    );
    assert_eq!(s.sec.mode(), Mode::Primary);
    if end == FailoverTarget::Checkpoint {
        assert_eq!(rep.comparable, !m.local_writes);
        if !m.local_writes {
            let (img, cp) = s.sec.verify_checkpoint().await.unwrap();
            assert_eq!(Some(img), cp, "failover to the checkpoint: digest");
        }
    }
    // After failover the view is the disk.
    assert!(read_all(&*view).await == *expect);
    drop(p);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn replication_matches_the_model(
        steps in proptest::collection::vec(step(), 1..40),
        latest in any::<bool>(),
        ack in prop_oneof![Just(AckMode::Local), Just(AckMode::Received), Just(AckMode::Durable)],
        spill in any::<bool>(),
    ) {
        let end = if latest { FailoverTarget::Latest } else { FailoverTarget::Checkpoint };
        rt().block_on(run_case(steps, end, ack, spill));
    }
}

/// Concurrent writers to overlapping blocks: both disks must end up identical (the forwarder
/// keeps the local order per block).
#[test]
fn concurrent_overlapping_writes_stay_in_order() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        let p = start_primary(&s.ep, AckMode::Local).await;
        let mut tasks = Vec::new();
        for k in 0..8u64 {
            let pr = p.primary.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200u64 {
                    let off = ((k * 7 + i * 13) % 60) * 4096 + (i % 3) * 1000;
                    let data = pattern(off, 5000, (k * 31 + i) as u8);
                    pr.write_at(off, IoBuf::from_slice(&data), false)
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        p.coord.checkpoint().await.unwrap();
        assert!(s.disk.snapshot() == p.disk.snapshot());
        let (img, cp) = s.sec.verify_checkpoint().await.unwrap();
        assert_eq!(Some(img), cp);
    });
}

// ---------------------------------------------------------------------------------------------
// The secondary against hostile or broken peers.

async fn control_conn(
    ep: &Endpoint,
) -> (
    tokio::io::BufReader<crate::nbd::transport::ReadHalf>,
    tokio::io::BufWriter<crate::nbd::transport::WriteHalf>,
) {
    let (rd, wr, _) = connect_control(ep, Duration::from_secs(5), None, None)
        .await
        .unwrap();
    (rd, wr)
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn last_error(s: &Secondary) -> String {
    s.status()["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn hello_of(size: u64, generation: u64) -> Message {
    Message::Hello {
        size,
        generation,
        history: vec![],
        tracked: 0,
        committed: 0,
        session: 7,
        ack: AckMode::Received,
        heartbeat_ms: 50,
    }
}

fn hello() -> Message {
    hello_of(SIZE, 42)
}

/// Say HELLO, expect WELCOME, RESUME in epoch 1: forwarded writes are taken from now on.
async fn raw_session(
    rd: &mut tokio::io::BufReader<crate::nbd::transport::ReadHalf>,
    wr: &mut tokio::io::BufWriter<crate::nbd::transport::WriteHalf>,
) -> SyncKind {
    write_message(wr, &hello()).await.unwrap();
    let Message::Welcome { sync, .. } = read_message(rd).await.unwrap() else {
        panic!("no WELCOME")
    };
    write_message(wr, &Message::Resume { epoch: 1 })
        .await
        .unwrap();
    assert_eq!(
        read_message(rd).await.unwrap(),
        Message::ResumeAck { epoch: 1 }
    );
    sync
}

#[test]
fn garbage_bad_versions_and_stalls_get_clear_errors_and_no_session() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        // Garbage.
        let (_rd, mut wr) = control_conn(&s.ep).await;
        wr.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        wr.flush().await.unwrap();
        wait_for("garbage error", || {
            last_error(&s.sec).contains("bad frame magic")
        })
        .await;
        // A frame of a future version.
        let (_rd, mut wr) = control_conn(&s.ep).await;
        let mut f = hello().encode();
        f[5] = 9;
        wr.write_all(&f).await.unwrap();
        wr.flush().await.unwrap();
        wait_for("version error", || {
            last_error(&s.sec).contains("version 9 is not supported")
        })
        .await;
        // A damaged frame.
        let (_rd, mut wr) = control_conn(&s.ep).await;
        let mut f = hello().encode();
        f[14] ^= 0x40;
        wr.write_all(&f).await.unwrap();
        wr.flush().await.unwrap();
        wait_for("checksum error", || {
            last_error(&s.sec).contains("checksum mismatch")
        })
        .await;
        // Half a frame, then silence.
        let (_rd, mut wr) = control_conn(&s.ep).await;
        let f = hello().encode();
        wr.write_all(&f[..10]).await.unwrap();
        wr.flush().await.unwrap();
        wait_for("stall error", || {
            last_error(&s.sec).contains("no HELLO within")
        })
        .await;
        // A HELLO for a disk of another size.
        let (mut rd, mut wr) = control_conn(&s.ep).await;
        write_message(&mut wr, &hello_of(SIZE + 4096, 1))
            .await
            .unwrap();
        let m = read_message(&mut rd).await.unwrap();
        assert!(
            matches!(&m, Message::Refused { reason } if reason.contains("disk sizes differ")),
            "{m:?}"
        );
        assert_eq!(s.sec.mode(), Mode::Waiting);
        // After all that, a real primary still replicates.
        let p = start_primary(&s.ep, AckMode::Received).await;
        p.primary
            .write_at(4096, IoBuf::from_slice(&[7; 4096]), false)
            .await
            .unwrap();
        p.coord.checkpoint().await.unwrap();
        assert_eq!(s.sec.status()["committed_epoch"], 2);
    });
}

#[test]
fn hostile_numbers_are_refused_and_reveal_no_generation() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        // A heartbeat period that would hold the session for years.
        for ms in [0, 9, 60_001, u32::MAX] {
            let (mut rd, mut wr) = control_conn(&s.ep).await;
            let mut h = hello();
            if let Message::Hello { heartbeat_ms, .. } = &mut h {
                *heartbeat_ms = ms;
            }
            write_message(&mut wr, &h).await.unwrap();
            let m = read_message(&mut rd).await.unwrap();
            assert!(
                matches!(&m, Message::Refused { reason } if reason.contains("heartbeat period")),
                "{ms} ms: {m:?}"
            );
            assert_eq!(s.sec.mode(), Mode::Waiting);
        }
        // WELCOME does not carry the secondary's generation.
        let (mut rd, mut wr) = control_conn(&s.ep).await;
        write_message(&mut wr, &hello()).await.unwrap();
        let m = read_message(&mut rd).await.unwrap();
        assert!(matches!(m, Message::Welcome { generation: 0, .. }), "{m:?}");
        // Units past the end of the disk, up to u64::MAX: refused before any work, and the
        // connection ends.
        let nblocks = crate::digest::blocks(SIZE);
        for (unit_blocks, unit) in [(1u32, u64::MAX), (1 << 16, u64::MAX / 2), (1, nblocks)] {
            let units: roaring::RoaringTreemap = [0, unit].into_iter().collect();
            write_message(
                &mut wr,
                &Message::SumsRequest {
                    id: 1,
                    unit_blocks,
                    units,
                },
            )
            .await
            .unwrap();
            let m = read_message(&mut rd).await.unwrap();
            assert!(
                matches!(&m, Message::Refused { reason } if reason.contains("past the end of the disk")),
                "{m:?}"
            );
            assert!(read_message(&mut rd).await.is_err(), "the connection ends");
            wait_for("the session to end", || s.sec.mode() == Mode::Paused).await;
            let (r, w) = control_conn(&s.ep).await;
            (rd, wr) = (r, w);
            write_message(&mut wr, &hello()).await.unwrap();
            let m = read_message(&mut rd).await.unwrap();
            assert!(matches!(m, Message::Welcome { .. }), "{m:?}");
        }
        // The last unit, partly past the end, is answered.
        let units: roaring::RoaringTreemap = [(nblocks - 1) / 16].into_iter().collect();
        write_message(
            &mut wr,
            &Message::SumsRequest {
                id: 2,
                unit_blocks: 16,
                units,
            },
        )
        .await
        .unwrap();
        let m = read_message(&mut rd).await.unwrap();
        assert!(matches!(&m, Message::Sums { id: 2, sums } if sums.len() == 1), "{m:?}");
    });
}

/// A disk whose flushes wait while the gate is closed, and are counted when they complete.
#[derive(Debug)]
struct GatedFlush {
    disk: MemoryBackend,
    open: watch::Sender<bool>,
    flushed: std::sync::atomic::AtomicU64,
    /// Flushes fail (after the gate) while set.
    fail: std::sync::atomic::AtomicBool,
    /// Reads wait while this is false; how many wait or run now, and the most at once.
    reads_open: watch::Sender<bool>,
    reading: std::sync::atomic::AtomicU64,
    most_reading: std::sync::atomic::AtomicU64,
}

impl GatedFlush {
    fn new(disk: MemoryBackend) -> Arc<Self> {
        Arc::new(Self {
            disk,
            open: watch::channel(true).0,
            flushed: Default::default(),
            fail: Default::default(),
            reads_open: watch::channel(true).0,
            reading: Default::default(),
            most_reading: Default::default(),
        })
    }
    fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
    fn flushed(&self) -> u64 {
        self.flushed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Backend for GatedFlush {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn alignment(&self) -> u32 {
        1
    }
    fn read_at(&self, offset: u64, len: usize) -> crate::storage::IoFuture<'_, IoBuf> {
        use std::sync::atomic::Ordering::SeqCst;
        Box::pin(async move {
            let now = self.reading.fetch_add(1, SeqCst) + 1;
            self.most_reading.fetch_max(now, SeqCst);
            let mut rx = self.reads_open.subscribe();
            let _ = rx.wait_for(|o| *o).await;
            let r = self.disk.read_at(offset, len).await;
            self.reading.fetch_sub(1, SeqCst);
            r
        })
    }
    fn write_at(&self, offset: u64, data: IoBuf, fua: bool) -> crate::storage::IoFuture<'_, ()> {
        self.disk.write_at(offset, data, fua)
    }
    fn flush(&self) -> crate::storage::IoFuture<'_, ()> {
        Box::pin(async move {
            let mut rx = self.open.subscribe();
            let _ = rx.wait_for(|o| *o).await;
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(crate::storage::StorageError::Io {
                    op: crate::storage::Op::Flush,
                    path: "gated test disk".into(),
                    offset: 0,
                    len: 0,
                    source: std::io::Error::from_raw_os_error(libc::EIO),
                });
            }
            self.disk.flush().await?;
            self.flushed
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        })
    }
    fn discard(&self, offset: u64, len: u64) -> crate::storage::IoFuture<'_, ()> {
        self.disk.discard(offset, len)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> crate::storage::IoFuture<'_, ()> {
        self.disk.write_zeroes(offset, len, may_unmap)
    }
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> crate::storage::IoFuture<'_, Vec<crate::storage::Extent>> {
        self.disk.block_status(offset, len)
    }
}

#[test]
fn metadata_claims_about_the_disk_follow_its_flush() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let disk = GatedFlush::new(MemoryBackend::new(SIZE));
        let meta_file = dir.path().join("d.img.lockstep-meta");
        let (meta, known) = MetaStore::open(meta_file.clone()).unwrap();
        let stored = || super::meta::load(&meta_file).unwrap().unwrap();
        let mine = stored().generation;
        let sec = Secondary::with_meta(
            disk.clone(),
            SecondaryOptions {
                buffer_memory: 1 << 20,
                spill_path: dir.path().join("spill"),
                on_peer_loss: PeerLossPolicy::Wait,
                heartbeat_misses: 3,
                hello_timeout: Duration::from_millis(300),
                discard_my_data: false,
            },
            meta,
            known,
        );
        let (ep, _stop) = serve_secondary(&sec, None).await;
        let (mut rd, mut wr) = control_conn(&ep).await;
        raw_session(&mut rd, &mut wr).await;
        assert!(!stored().clean, "RESUME marks the disk unclean at once");
        let c = NbdClient::connect(
            &ep,
            &ClientOptions {
                export: REPLICA_EXPORT.into(),
                ..ClientOptions::default()
            },
        )
        .await
        .unwrap();
        c.write(0, &[1; 4096], false).await.unwrap();
        let mark = c.submit_epoch_mark(2).await.unwrap();
        c.send_submitted().await.unwrap();
        mark.wait().await.unwrap();
        // The first commit after the sync adopts the primary's generation (42): not before
        // the epoch's data is durable.
        disk.set_open(false);
        let before = disk.flushed();
        let summaries = vec![EpochSummary {
            participant: PARTICIPANT_BLOCK,
            items: 1,
            bytes: 4096,
            digest: 0,
        }];
        write_message(
            &mut wr,
            &Message::Checkpoint {
                epoch: 1,
                summaries,
            },
        )
        .await
        .unwrap();
        // Heartbeats are answered while the flush waits (and keep the session alive).
        for seq in 0..5 {
            write_message(&mut wr, &Message::Heartbeat { seq })
                .await
                .unwrap();
            let m = tokio::time::timeout(Duration::from_secs(10), read_message(&mut rd))
                .await
                .expect("a heartbeat answer");
            assert_eq!(m.unwrap(), Message::HeartbeatAck { seq });
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        assert_eq!(stored().generation, mine, "adopted before the flush");
        assert_eq!(stored().committed, 0);
        disk.set_open(true);
        assert_eq!(
            read_message(&mut rd).await.unwrap(),
            Message::Committed { epoch: 1 }
        );
        assert!(disk.flushed() > before);
        let m = stored();
        assert_eq!((m.generation, m.committed, m.clean), (42, 1, false));
        // GOODBYE claims a checkpoint at rest: not before the disk is flushed.
        let mark = c.submit_epoch_mark(3).await.unwrap();
        c.send_submitted().await.unwrap();
        mark.wait().await.unwrap();
        write_message(
            &mut wr,
            &Message::Checkpoint {
                epoch: 2,
                summaries: vec![EpochSummary {
                    participant: PARTICIPANT_BLOCK,
                    ..Default::default()
                }],
            },
        )
        .await
        .unwrap();
        assert_eq!(
            read_message(&mut rd).await.unwrap(),
            Message::Committed { epoch: 2 }
        );
        disk.set_open(false);
        let before = disk.flushed();
        write_message(
            &mut wr,
            &Message::Goodbye {
                reason: "test".into(),
            },
        )
        .await
        .unwrap();
        wait_for("the session to end", || sec.mode() == Mode::Waiting).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!stored().clean, "marked clean before the flush");
        disk.set_open(true);
        wait_for("the clean mark", || stored().clean).await;
        assert!(disk.flushed() > before);
        assert_eq!(stored().committed, 2);
    });
}

/// A secondary over a [`GatedFlush`] disk, served on a loopback port.
async fn gated_secondary(
    dir: &tempfile::TempDir,
) -> (
    Arc<GatedFlush>,
    Arc<Secondary>,
    Endpoint,
    watch::Sender<bool>,
) {
    let disk = GatedFlush::new(MemoryBackend::new(SIZE));
    let sec = Secondary::new(
        disk.clone(),
        SecondaryOptions {
            buffer_memory: 1 << 20,
            spill_path: dir.path().join("spill"),
            on_peer_loss: PeerLossPolicy::Wait,
            heartbeat_misses: 20,
            hello_timeout: Duration::from_secs(5),
            discard_my_data: false,
        },
    );
    let (ep, stop) = serve_secondary(&sec, None).await;
    (disk, sec, ep, stop)
}

#[test]
fn sums_requests_are_computed_one_at_a_time_and_a_flood_ends_the_session() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (disk, sec, ep, _stop) = gated_secondary(&dir).await;
        disk.disk
            .write_at(0, IoBuf::from_slice(&[1; 4096]), false)
            .await
            .unwrap();
        let (mut rd, mut wr) = control_conn(&ep).await;
        write_message(&mut wr, &hello()).await.unwrap();
        assert!(matches!(
            read_message(&mut rd).await.unwrap(),
            Message::Welcome { .. }
        ));
        disk.reads_open.send_replace(false);
        let ask = |id| Message::SumsRequest {
            id,
            unit_blocks: 1,
            units: [0u64].into_iter().collect(),
        };
        for id in 0..3 {
            write_message(&mut wr, &ask(id)).await.unwrap();
        }
        wait_for("the first read", || {
            disk.reading.load(std::sync::atomic::Ordering::SeqCst) == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        disk.reads_open.send_replace(true);
        // Answered by id, in whatever order the computations got their turn.
        let mut ids = Vec::new();
        for _ in 0..3 {
            match read_message(&mut rd).await.unwrap() {
                Message::Sums { id, sums } if sums.len() == 1 => ids.push(id),
                m => panic!("{m:?}"),
            }
        }
        ids.sort();
        assert_eq!(ids, vec![0, 1, 2]);
        assert_eq!(
            disk.most_reading.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one SUMS computation at a time"
        );
        // A flood: more than 8 outstanding requests end the session.
        disk.reads_open.send_replace(false);
        for id in 0..=8 {
            write_message(&mut wr, &ask(id)).await.unwrap();
        }
        let m = read_message(&mut rd).await.unwrap();
        assert!(
            matches!(&m, Message::Refused { reason } if reason.contains("SUMS requests at once")),
            "{m:?}"
        );
        wait_for("the session to end", || sec.mode() == Mode::Paused).await;
        disk.reads_open.send_replace(true);
    });
}

#[test]
fn a_client_flush_completes_with_the_secondarys_flush() {
    rt().block_on(async {
        for ack in [AckMode::Received, AckMode::Durable, AckMode::Local] {
            let dir = tempfile::tempdir().unwrap();
            let (disk, _sec, ep, _stop) = gated_secondary(&dir).await;
            let p = start_primary(&ep, ack).await;
            p.primary
                .write_at(0, IoBuf::from_slice(&[3; 4096]), false)
                .await
                .unwrap();
            disk.set_open(false);
            let primary = p.primary.clone();
            let mut flush = tokio::spawn(async move { primary.flush().await });
            let early = tokio::time::timeout(Duration::from_millis(300), &mut flush).await;
            // `local` is DRBD's protocol A: the local flush is the answer.
            assert_eq!(early.is_err(), ack != AckMode::Local, "{ack:?}");
            disk.set_open(true);
            match early {
                Ok(r) => r.unwrap().unwrap(),
                Err(_) => flush.await.unwrap().unwrap(),
            }
            assert_eq!(p.primary.mode(), PrimaryMode::Replicating);
            // A secondary that fails the flush: the primary pauses (the blocks are dirty)
            // before the client's flush completes, and the client still succeeds.
            disk.fail.store(true, std::sync::atomic::Ordering::SeqCst);
            p.primary.flush().await.unwrap();
            if ack != AckMode::Local {
                assert_eq!(p.primary.mode(), PrimaryMode::Paused, "{ack:?}");
                assert!(p.primary.status()["dirty_blocks"].as_u64().unwrap() >= 1);
            }
            wait_for("the primary to pause", || {
                p.primary.mode() == PrimaryMode::Paused
            })
            .await;
            // With the link down the local flush suffices, even with a stuck secondary.
            disk.set_open(false);
            tokio::time::timeout(Duration::from_secs(5), p.primary.flush())
                .await
                .expect("a paused primary's flush does not wait for the secondary")
                .unwrap();
            disk.set_open(true);
        }
    });
}

#[test]
fn lying_checkpoints_are_aborted_never_committed() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        let (mut rd, mut wr) = control_conn(&s.ep).await;
        let sync = raw_session(&mut rd, &mut wr).await;
        assert!(matches!(sync, SyncKind::Full | SyncKind::Checksum), "a fresh disk: {sync:?}");
        // One real forwarded write in epoch 1.
        let c = NbdClient::connect(&s.ep, &ClientOptions { export: REPLICA_EXPORT.into(), ..ClientOptions::default() })
            .await
            .unwrap();
        c.write(0, &[1; 4096], false).await.unwrap();
        let summary = |items, bytes| vec![EpochSummary { participant: PARTICIPANT_BLOCK, items, bytes, digest: 0 }];
        let mut ask = async |epoch, s: Vec<EpochSummary>| {
            write_message(&mut wr, &Message::Checkpoint { epoch, summaries: s }).await.unwrap();
            read_message(&mut rd).await.unwrap()
        };
        // Epoch 1 is still open (no epoch mark yet).
        let m = ask(1, summary(1, 4096)).await;
        assert!(matches!(&m, Message::Aborted { reason, .. } if reason.contains("still open")), "{m:?}");
        let mark = c.submit_epoch_mark(2).await.unwrap();
        c.send_submitted().await.unwrap();
        mark.wait().await.unwrap();
        // Wrong epoch.
        let m = ask(5, summary(1, 4096)).await;
        assert!(matches!(&m, Message::Aborted { reason, .. } if reason.contains("expected a checkpoint of epoch 1")), "{m:?}");
        // Counts that do not match what arrived.
        let m = ask(1, summary(2, 8192)).await;
        assert!(matches!(&m, Message::Aborted { reason, .. } if reason.contains("2 writes")), "{m:?}");
        // Unknown participant.
        let mut bad = summary(1, 4096);
        bad.push(EpochSummary { participant: 99, ..Default::default() });
        let m = ask(1, bad).await;
        assert!(matches!(&m, Message::Aborted { reason, .. } if reason.contains("unknown participant")), "{m:?}");
        assert_eq!(s.sec.status()["committed_epoch"], 0);
        assert_eq!(s.sec.status()["checkpoints_aborted"], 4);
        // Failover to the checkpoint undoes the uncommitted write.
        s.sec.failover(FailoverTarget::Checkpoint).await.unwrap();
        assert!(s.disk.snapshot().iter().all(|&b| b == 0));
        // The truthful checkpoint would have committed (on a fresh pair).
    });
}

#[test]
fn a_silent_primary_is_lost_and_the_policy_fails_over() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Failover, 1 << 20).await;
        let (mut rd, mut wr) = control_conn(&s.ep).await;
        raw_session(&mut rd, &mut wr).await;
        let c = NbdClient::connect(
            &s.ep,
            &ClientOptions {
                export: REPLICA_EXPORT.into(),
                ..ClientOptions::default()
            },
        )
        .await
        .unwrap();
        c.write(8192, &[3; 4096], false).await.unwrap();
        // No heartbeats: 3 misses of 50 ms.
        wait_for("failover", || s.sec.mode() == Mode::Primary).await;
        assert!(
            last_error(&s.sec).contains("missed heartbeats"),
            "{}",
            last_error(&s.sec)
        );
        // Rolled back to epoch 0 (all zero); forwarded writes are refused now.
        assert!(s.disk.snapshot().iter().all(|&b| b == 0));
        let e = c.write(0, &[1; 512], false).await.unwrap_err();
        assert!(
            e.to_string().contains("interrupted session")
                || e.to_string().contains("forwarded writes are refused"),
            "{e}"
        );
    });
}

#[test]
fn the_primary_survives_a_vanished_secondary() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        let p = start_primary(&s.ep, AckMode::Durable).await;
        p.primary
            .write_at(0, IoBuf::from_slice(&[1; 4096]), false)
            .await
            .unwrap();
        p.coord.checkpoint().await.unwrap();
        p.primary
            .write_at(4096, IoBuf::from_slice(&[2; 4096]), false)
            .await
            .unwrap();
        drop(s); // the secondary's server stops: its connections close
                 // Writes keep succeeding; the primary goes unprotected and records dirty blocks.
        for i in 0..20u64 {
            p.primary
                .write_at(i * 4096 + 8192, IoBuf::from_slice(&[3; 4096]), false)
                .await
                .unwrap();
        }
        wait_for("paused", || p.primary.mode() == PrimaryMode::Paused).await;
        p.primary
            .write_at(40 * 4096, IoBuf::from_slice(&[4; 100]), false)
            .await
            .unwrap();
        let dirty = p.primary.dirty_blocks();
        assert!(dirty.contains(1) && dirty.contains(40), "{dirty:?}");
        assert!(!dirty.contains(0), "block 0 was committed before the loss");
        assert!(p.coord.checkpoint().await.is_err());
    });
}

#[test]
fn not_a_secondary_is_a_clear_error() {
    rt().block_on(async {
        let srv = Arc::new(
            NbdServer::new(
                vec![Export::new("x", Arc::new(MemoryBackend::new(4096)))],
                ServerOptions::default(),
            )
            .unwrap(),
        );
        let l = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".into()))
            .await
            .unwrap();
        let ep = l.local_endpoint();
        let (_stop, rx) = watch::channel(false);
        tokio::spawn(srv.serve(l, rx));
        let hello = Hello {
            size: 4096,
            generation: 1,
            history: vec![],
            tracked: 0,
            committed: 0,
            ack: AckMode::Local,
            heartbeat: Duration::from_millis(100),
        };
        let opts = LinkOptions {
            heartbeat: Duration::from_millis(100),
            misses: 3,
            commit_timeout: Duration::from_secs(1),
        };
        let Err(e) = PeerLink::connect(&ep, hello, opts, Duration::from_secs(5), None, None).await
        else {
            panic!("a plain NBD server accepted the control protocol");
        };
        let e = e.to_string();
        assert!(e.contains("not a lockstep secondary"), "{e}");
    });
}

/// The cutting proxy of the end-to-end harness (the one copy, `tests/src/proxy.rs`) in front
/// of the secondary at `target`: the proxy, and the endpoint the primary connects to instead.
fn cut_proxy(target: &Endpoint) -> (CutProxy, Endpoint) {
    let Endpoint::Tcp(target) = target else {
        panic!("tcp only")
    };
    let proxy = CutProxy::start(target);
    let via = Endpoint::Tcp(proxy.addr.clone());
    (proxy, via)
}

async fn fill_blocks(p: &Primary, blocks: impl Iterator<Item = u64>, fill: u8) {
    for b in blocks {
        let data = pattern(b * 4096, 4096, fill ^ b as u8);
        p.write_at(b * 4096, IoBuf::from_slice(&data), false)
            .await
            .unwrap();
    }
}

#[test]
fn a_cut_link_pauses_both_sides_and_an_incremental_resync_restores_them() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        let (proxy, via) = cut_proxy(&s.ep);
        let p = start_primary(&via, AckMode::Received).await;
        tokio::spawn(p.repl.clone().run());
        fill_blocks(&p.primary, 0..8, 1).await;
        p.coord.checkpoint().await.unwrap();
        let committed = s.disk.snapshot();
        // Writes of an epoch that will never commit, then the cut.
        fill_blocks(&p.primary, 4..12, 2).await;
        proxy.cut();
        fill_blocks(&p.primary, 20..30, 3).await; // while the link is down
        wait_for("both paused", || {
            p.primary.mode() == PrimaryMode::Paused && s.sec.mode() == Mode::Paused
        })
        .await;
        assert!(
            p.coord.checkpoint().await.is_err(),
            "no checkpoint while paused"
        );
        // The secondary still holds the last checkpoint in its view.
        assert_eq!(read_all(&*s.sec.view()).await, committed);
        let dirty = p.primary.dirty_blocks();
        assert!(
            dirty.contains(4) && dirty.contains(11) && dirty.contains(29),
            "{dirty:?}"
        );
        assert!(!dirty.contains(0), "committed blocks are not dirty");
        proxy.heal();
        wait_for("resumed and resynced", || {
            p.primary.mode() == PrimaryMode::Replicating
                && p.primary.status()["resyncing"] == serde_json::Value::Bool(false)
        })
        .await;
        let r = p.primary.resync_stats();
        assert_eq!(r.kind, Some("incremental"));
        assert!(
            r.sent_bytes <= 18 * 4096,
            "resent more than what was dirty: {r:?}"
        );
        p.coord.checkpoint().await.unwrap();
        assert_eq!(
            s.disk.snapshot(),
            p.disk.snapshot(),
            "images equal after the resync"
        );
        assert_eq!(read_all(&*s.sec.view()).await, p.disk.snapshot());
        assert_eq!(s.sec.status()["consistent"], true);
        assert!(s.sec.status()["resyncing"].is_null());
    });
}

#[test]
fn split_brain_is_refused_and_discard_my_data_converges_by_checksum() {
    rt().block_on(async {
        // The secondary was in sync with generation 111; the primary's data is generation
        // 222, unrelated: both wrote on their own.
        let theirs = NodeMeta {
            generation: 111,
            history: vec![],
            clean: true,
            committed: 5,
        };
        let s =
            start_secondary_with(PeerLossPolicy::Wait, 1 << 20, Some(theirs.clone()), false).await;
        s.disk
            .write_at(0, IoBuf::from_slice(&[9; 8192]), false)
            .await
            .unwrap();
        let pdisk = MemoryBackend::new(SIZE);
        pdisk
            .write_at(40 * 4096, IoBuf::from_slice(&[5; 4096]), false)
            .await
            .unwrap();
        let mine = NodeMeta {
            generation: 222,
            history: vec![100],
            clean: true,
            committed: 0,
        };
        let table = DigestTable::scan(&pdisk).await.unwrap();
        let primary = Primary::new(
            Arc::new(pdisk.clone()),
            table,
            0,
            PrimaryOptions::default(),
            Arc::new(MetaStore::in_memory(mine.clone())),
        );
        let (_stop, stop_rx) = watch::channel(false);
        let repl = Replicator::new(
            primary,
            ReplicatorOptions {
                secondary: s.ep.clone(),
                link: link_options(),
                ack: AckMode::Received,
                connect_timeout: Duration::from_secs(5),
                reconnect_timeout: Duration::from_secs(5),
                retry: Duration::from_millis(50),
                key: None,
                tls: None,
            },
            stop_rx,
        );
        let e = repl.attempt().await.unwrap_err().to_string();
        assert!(
            e.contains("split-brain") && e.contains("--discard-my-data"),
            "{e}"
        );
        // The peer is not told this node's generation; the local log and status are.
        assert!(!e.contains(&format!("{:016x}", 111)), "{e}");
        assert!(last_error(&s.sec).contains(&format!("{:016x}", 111)));
        assert_eq!(s.sec.mode(), Mode::Waiting);
        assert_eq!(
            s.sec.meta().generation,
            111,
            "nothing changed on the secondary"
        );
        drop(s);
        // The same secondary disk, told to discard its data.
        let s = start_secondary_with(PeerLossPolicy::Wait, 1 << 20, Some(theirs), true).await;
        s.disk
            .write_at(0, IoBuf::from_slice(&[9; 8192]), false)
            .await
            .unwrap();
        let p = start_primary_on(&s.ep, AckMode::Received, pdisk.clone(), mine).await;
        let r = p.primary.resync_stats();
        assert_eq!(r.kind, Some("checksum"));
        let chunk = 16 * 4096;
        assert_eq!(
            r.sent_bytes,
            2 * chunk,
            "only the two differing 64 KiB chunks travel: {r:?}"
        );
        assert_eq!(s.disk.snapshot(), pdisk.snapshot());
        assert_eq!(
            s.sec.meta().generation,
            222,
            "the secondary joined the primary's lineage"
        );
    });
}

#[test]
fn connections_of_an_interrupted_session_are_fenced_off() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        let (mut rd, mut wr) = control_conn(&s.ep).await;
        write_message(&mut wr, &hello()).await.unwrap();
        assert!(matches!(
            read_message(&mut rd).await.unwrap(),
            Message::Welcome { .. }
        ));
        // A data connection opened before RESUME (think: left over from the last session).
        let opts = ClientOptions {
            export: REPLICA_EXPORT.into(),
            ..ClientOptions::default()
        };
        let old = NbdClient::connect(&s.ep, &opts).await.unwrap();
        write_message(&mut wr, &Message::Resume { epoch: 1 })
            .await
            .unwrap();
        assert_eq!(
            read_message(&mut rd).await.unwrap(),
            Message::ResumeAck { epoch: 1 }
        );
        let e = old.write(0, &[1; 4096], false).await.unwrap_err();
        assert!(e.to_string().contains("interrupted session"), "{e}");
        let new = NbdClient::connect(&s.ep, &opts).await.unwrap();
        new.write(4096, &[2; 4096], false).await.unwrap();
        let disk = s.disk.snapshot();
        assert!(
            disk[..4096].iter().all(|&b| b == 0),
            "the fenced write landed"
        );
        assert!(
            disk[4096..8192].iter().all(|&b| b == 2),
            "the session's write is missing"
        );
    });
}

#[test]
fn online_verify_finds_a_block_that_differs_and_only_that() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        let p = start_primary(&s.ep, AckMode::Received).await;
        fill_blocks(&p.primary, 0..40, 7).await;
        p.coord.checkpoint().await.unwrap();
        let v = p.repl.verify().await.unwrap();
        assert_eq!(v["differing_chunks"], 0, "{v}");
        assert_eq!(v["total_chunks"], 5, "{v}");
        // Damage the secondary's disk behind replication's back: chunk 2 (blocks 32..48).
        s.disk
            .write_at(33 * 4096 + 17, IoBuf::from_slice(&[0xee; 3]), false)
            .await
            .unwrap();
        let v = p.repl.verify().await.unwrap();
        assert_eq!(v["differing_chunks"], 1, "{v}");
        assert_eq!(v["differing"][0]["offset"], 32 * 4096, "{v}");
        assert_eq!(v["differing"][0]["len"], 16 * 4096, "{v}");
    });
}

// ---------------------------------------------------------------------------------------------
// Peer authentication: only a node that holds the key becomes the peer.

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
    let e = NbdClient::connect(
        &s.ep,
        &ClientOptions {
            export: REPLICA_EXPORT.into(),
            ..ClientOptions::default()
        },
    )
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
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        let (proxy, via) = cut_proxy(&s.ep);
        let p = start_primary(&via, AckMode::Received).await;
        tokio::spawn(p.repl.clone().run());
        fill_blocks(&p.primary, 0..8, 1).await;
        p.coord.checkpoint().await.unwrap();
        // The stranger: a data connection of the running session, one 4 KiB write to a
        // block the primary never touches.
        let c = NbdClient::connect(
            &s.ep,
            &ClientOptions {
                export: REPLICA_EXPORT.into(),
                ..ClientOptions::default()
            },
        )
        .await
        .unwrap();
        c.write_at(40 * 4096, IoBuf::from_slice(&[0x55; 4096]), false)
            .await
            .unwrap();
        assert_eq!(s.disk.snapshot()[40 * 4096], 0x55, "the write landed");
        fill_blocks(&p.primary, 2..4, 2).await;
        // Its epoch cannot commit (the secondary counted a write the primary did not send).
        assert!(p.coord.checkpoint().await.is_err());
        // The abort pauses the primary, which reconnects: a second session.
        wait_for("a second session, resynced", || {
            p.repl.status()["sessions"].as_u64() >= Some(2)
                && p.primary.mode() == PrimaryMode::Replicating
                && p.primary.status()["resyncing"] == serde_json::Value::Bool(false)
        })
        .await;
        p.coord.checkpoint().await.unwrap();
        assert_eq!(
            s.disk.snapshot(),
            p.disk.snapshot(),
            "the stranger's block survived the resync"
        );
        drop(proxy);
        assert_eq!(s.sec.status()["consistent"], true);
    });
}
