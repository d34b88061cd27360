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
use super::wire::{AckMode, Message, RefusalCode, SyncKind};
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

mod auth;
mod durability;
mod faults;
mod fuzz;
mod hostile;
mod links;
mod model;
mod participants;
mod powercut;
mod repair;

const SIZE: u64 = 64 * 4096 + 1000;

fn rt() -> tokio::runtime::Runtime {
    crate::test_runtime()
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
            description: Default::default(),
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
    start_primary_joined(ep, ack, disk, meta, key, Vec::new()).await
}

/// A primary whose checkpoints include `others` besides the block layer.
/// Replicator settings for tests: quick heartbeats, short timeouts and retries.
fn test_options(ep: &Endpoint, ack: AckMode, key: Option<PeerKey>) -> ReplicatorOptions {
    ReplicatorOptions {
        secondary: ep.clone(),
        link: link_options(),
        ack,
        connect_timeout: Duration::from_secs(5),
        reconnect_timeout: Duration::from_secs(5),
        retry: Duration::from_millis(50),
        key,
        tls: None,
    }
}

async fn start_primary_joined(
    ep: &Endpoint,
    ack: AckMode,
    disk: MemoryBackend,
    meta: NodeMeta,
    key: Option<PeerKey>,
    others: Vec<Arc<dyn crate::epoch::Participant>>,
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
    let repl = Replicator::new(primary.clone(), test_options(ep, ack, key), stop_rx);
    let mut participants: Vec<Arc<dyn crate::epoch::Participant>> =
        vec![Arc::new(BlockParticipant(primary.clone()))];
    participants.extend(others);
    let coord = EpochCoordinator::new(
        participants,
        Arc::new(NoGuest),
        repl.clone(),
        Epoch(primary.resume_epoch()),
        CoordinatorOptions {
            interval: None,
            bytes: 0,
        },
    );
    repl.set_participants(coord.participants().to_vec());
    repl.attempt().await.unwrap();
    wait_for("the initial sync", || !primary.status().resyncing).await;
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

// ---------------------------------------------------------------------------------------------
// The secondary against hostile or broken peers.

async fn control_conn(
    ep: &Endpoint,
) -> (
    tokio::io::BufReader<crate::transport::ReadHalf>,
    tokio::io::BufWriter<crate::transport::WriteHalf>,
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
    s.status().last_error.unwrap_or_default()
}

fn hello_of(size: u64, generation: u64) -> Message {
    Message::Hello {
        size,
        generation,
        history: vec![],
        tracked: 0,
        committed: 0,
        session: 7,
        ack: AckMode::Durable,
        heartbeat_ms: 50,
    }
}

fn hello() -> Message {
    hello_of(SIZE, 42)
}

/// Say HELLO (ack mode `durable`: forwarded writes are answered once applied), expect
/// WELCOME, RESUME in epoch 1: forwarded writes are taken from now on.
async fn raw_session(
    rd: &mut tokio::io::BufReader<crate::transport::ReadHalf>,
    wr: &mut tokio::io::BufWriter<crate::transport::WriteHalf>,
) -> SyncKind {
    raw_session_acking(rd, wr, AckMode::Durable).await
}

/// [`raw_session`] in ack mode `ack`.
async fn raw_session_acking(
    rd: &mut tokio::io::BufReader<crate::transport::ReadHalf>,
    wr: &mut tokio::io::BufWriter<crate::transport::WriteHalf>,
    ack: AckMode,
) -> SyncKind {
    let mut hello = hello();
    if let Message::Hello { ack: a, .. } = &mut hello {
        *a = ack;
    }
    write_message(wr, &hello).await.unwrap();
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

/// The block layer's summary of an epoch: `items` modifications of `bytes` bytes.
fn block_summary(items: u64, bytes: u64) -> Vec<EpochSummary> {
    vec![EpochSummary {
        participant: PARTICIPANT_BLOCK,
        items,
        bytes,
        digest: 0,
    }]
}

/// On a raw control session: CHECKPOINT(`epoch`) with `summaries`.
async fn send_checkpoint(
    wr: &mut tokio::io::BufWriter<crate::transport::WriteHalf>,
    epoch: u64,
    summaries: Vec<EpochSummary>,
) {
    write_message(wr, &Message::Checkpoint { epoch, summaries })
        .await
        .unwrap();
}

async fn fill_blocks(p: &Primary, blocks: impl Iterator<Item = u64>, fill: u8) {
    for b in blocks {
        let data = pattern(b * 4096, 4096, fill ^ b as u8);
        p.write_at(b * 4096, IoBuf::from_slice(&data), false)
            .await
            .unwrap();
    }
}

/// Client options for export `name`.
fn export(name: &str) -> ClientOptions {
    ClientOptions {
        export: name.into(),
        ..ClientOptions::default()
    }
}

/// A pair whose link runs through a cutting proxy, replicating (with reconnection), with
/// blocks 0..8 written and committed.
async fn pair_behind_proxy() -> (SecondarySide, CutProxy, PrimarySide) {
    let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
    let (proxy, via) = cut_proxy(&s.ep);
    let p = start_primary(&via, AckMode::Received).await;
    tokio::spawn(p.repl.clone().run());
    fill_blocks(&p.primary, 0..8, 1).await;
    p.coord.checkpoint().await.unwrap();
    (s, proxy, p)
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

fn pattern(off: u64, len: u64, fill: u8) -> Vec<u8> {
    (0..len)
        .map(|i| fill ^ ((off + i) as u8).wrapping_mul(31))
        .collect()
}

async fn read_all(b: &dyn Backend) -> Vec<u8> {
    b.read_at(0, SIZE as usize).await.unwrap().to_vec()
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
