//! Server and client against each other, and the server against hostile clients.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::codec::{self, InfoRequest, Request};
use super::proto::*;
use super::server::MAX_PAYLOAD;
use super::*;
use crate::storage::suite::{self, Guard};
use crate::storage::{Backend, IoBuf, MemoryBackend};

/// A server on a loopback port in its own runtime thread; dropped guard stops it.
struct ServerThread {
    ep: Endpoint,
    stop: Option<watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start_server(exports: Vec<Export>) -> ServerThread {
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop, stop_rx) = watch::channel(false);
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".into()))
                .await
                .unwrap();
            tx.send(l.local_endpoint()).unwrap();
            let srv = Arc::new(NbdServer::new(exports, ServerOptions::default()).unwrap());
            srv.serve(l, stop_rx).await;
        });
    });
    let ep = rx.recv().unwrap();
    ServerThread {
        ep,
        stop: Some(stop),
        thread: Some(thread),
    }
}

fn export(name: &str, b: Arc<dyn Backend>, read_only: bool) -> Export {
    Export {
        name: name.into(),
        description: format!("test disk {name}").into(),
        backend: b,
        read_only,
        epochs: None,
    }
}

/// Runs the storage suite through our client and our server. The client is connected on a
/// runtime of its own thread (its reader task lives there), and used from the suite's runtime.
fn remote(
    size: u64,
    structured: bool,
    backend: Arc<dyn Backend>,
    guard: Guard,
) -> (Arc<dyn Backend>, Guard) {
    let _ = size;
    let server = start_server(vec![export("disk", backend, false)]);
    let ep = server.ep.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let (hold_tx, hold_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let opts = ClientOptions {
                export: "disk".into(),
                structured,
                ..Default::default()
            };
            tx.send(NbdClient::connect(&ep, &opts).await.unwrap())
                .unwrap();
            let _ = hold_rx.await;
        });
    });
    let client = rx.recv().unwrap();
    (Arc::new(client), Box::new((server, hold_tx, guard)))
}

#[test]
fn suite_through_nbd_structured() {
    suite::run_all(|s| remote(s, true, Arc::new(MemoryBackend::new(s)), Box::new(())));
}

#[test]
fn suite_through_nbd_simple_replies() {
    suite::run_all(|s| remote(s, false, Arc::new(MemoryBackend::new(s)), Box::new(())));
}

#[test]
fn suite_through_nbd_over_direct_io() {
    suite::run_all(|s| {
        let (b, g) = suite::file_with(s, true);
        remote(s, true, b, g)
    });
}

fn rt() -> tokio::runtime::Runtime {
    crate::test_runtime()
}

/// A raw client that has finished negotiation with NBD_OPT_GO.
async fn raw_go(ep: &Endpoint, structured: bool) -> (TcpStream, u16) {
    let Endpoint::Tcp(a) = ep else { unreachable!() };
    let mut s = TcpStream::connect(a).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .await
        .unwrap();
    if structured {
        s.write_all(&codec::encode_option(OPT_STRUCTURED_REPLY, &[]))
            .await
            .unwrap();
        let (_, kind, _) = read_opt_reply(&mut s).await;
        assert_eq!(kind, REP_ACK);
    }
    let go = InfoRequest {
        name: "disk".into(),
        requests: vec![],
    };
    s.write_all(&codec::encode_option(OPT_GO, &go.encode()))
        .await
        .unwrap();
    let mut flags = 0;
    loop {
        let (data, kind, _) = read_opt_reply(&mut s).await;
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_INFO);
        if let codec::Info::Export { flags: f, .. } = codec::Info::decode(&data).unwrap() {
            flags = f;
        }
    }
    (s, flags)
}

async fn read_opt_reply(s: &mut TcpStream) -> (Vec<u8>, u32, u32) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.unwrap();
    let (opt, kind, len) = codec::decode_option_reply_header(&h).unwrap();
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).await.unwrap();
    (d, kind, opt)
}

async fn send_req(
    s: &mut TcpStream,
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    payload: &[u8],
) {
    let mut v = Vec::new();
    Request {
        flags,
        command,
        cookie,
        offset,
        length,
    }
    .encode(&mut v);
    v.extend_from_slice(payload);
    s.write_all(&v).await.unwrap();
}

async fn simple_reply(s: &mut TcpStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).await.unwrap();
    match codec::ReplyHeader::decode(&h).unwrap() {
        codec::ReplyHeader::Simple { error, cookie } => (error, cookie),
        other => panic!("expected a simple reply, got {other:?}"),
    }
}

async fn assert_closed(s: &mut TcpStream) {
    let mut b = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return 0,
                Ok(_) => continue,
            }
        }
    })
    .await
    .expect("server should close the connection");
    assert_eq!(n, 0);
}

/// After each hostile client, a well-behaved one still gets served with intact data.
async fn still_serves(ep: &Endpoint, mem: &MemoryBackend) {
    let c = NbdClient::connect(
        ep,
        &ClientOptions {
            export: "disk".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(&*c.read(0, 4).await.unwrap(), &[7, 7, 7, 7]);
    assert_eq!(mem.snapshot()[..4], [7, 7, 7, 7]);
    c.disconnect().await.unwrap();
}

#[test]
fn wrong_requests_get_errors_and_the_connection_goes_on() {
    let mem = MemoryBackend::new(1 << 20);
    let ro = MemoryBackend::new(4096);
    let server = start_server(vec![
        export("disk", Arc::new(mem.clone()), false),
        export("ro", Arc::new(ro), true),
    ]);
    rt().block_on(async {
        mem.write_at(0, IoBuf::from_slice(&[7; 4]), false)
            .await
            .unwrap();
        let (mut s, flags) = raw_go(&server.ep, false).await;
        assert!(flags & FLAG_CAN_MULTI_CONN != 0 && flags & FLAG_SEND_FUA != 0);
        // Read past the end.
        send_req(&mut s, CMD_READ, 0, 1, (1 << 20) - 2, 4, &[]).await;
        assert_eq!(simple_reply(&mut s).await, (EINVAL, 1));
        // Write past the end: payload is consumed, ENOSPC.
        send_req(&mut s, CMD_WRITE, 0, 2, (1 << 20) - 2, 4, &[1, 2, 3, 4]).await;
        assert_eq!(simple_reply(&mut s).await, (ENOSPC, 2));
        // Offset overflow.
        send_req(&mut s, CMD_TRIM, 0, 3, u64::MAX - 1, 4, &[]).await;
        assert_eq!(simple_reply(&mut s).await, (EINVAL, 3));
        // Unknown command.
        send_req(&mut s, 42, 0, 4, 0, 0, &[]).await;
        assert_eq!(simple_reply(&mut s).await, (EINVAL, 4));
        // Absurd read length.
        send_req(&mut s, CMD_READ, 0, 5, 0, u32::MAX, &[]).await;
        assert_eq!(simple_reply(&mut s).await, (EINVAL, 5));
        // Bad flag.
        send_req(&mut s, CMD_FLUSH, CMD_FLAG_FUA, 6, 0, 0, &[]).await;
        assert_eq!(simple_reply(&mut s).await, (EINVAL, 6));
        // Block status without the context negotiated.
        send_req(&mut s, CMD_BLOCK_STATUS, 0, 7, 0, 512, &[]).await;
        assert_eq!(simple_reply(&mut s).await, (EINVAL, 7));
        // Still usable: a valid write and read back.
        send_req(&mut s, CMD_WRITE, CMD_FLAG_FUA, 8, 100, 3, &[9, 8, 7]).await;
        assert_eq!(simple_reply(&mut s).await, (0, 8));
        send_req(&mut s, CMD_READ, 0, 9, 100, 3, &[]).await;
        assert_eq!(simple_reply(&mut s).await, (0, 9));
        let mut d = [0u8; 3];
        s.read_exact(&mut d).await.unwrap();
        assert_eq!(d, [9, 8, 7]);
        // Nothing else changed: the refused write left the end of the disk alone.
        assert_eq!(mem.snapshot()[(1 << 20) - 2..], [0, 0]);
        // A write bigger than the maximum payload: consumed and refused, connection lives.
        let big = vec![0xEEu8; (MAX_PAYLOAD as usize) + 1];
        send_req(&mut s, CMD_WRITE, 0, 10, 0, big.len() as u32, &big).await;
        assert_eq!(simple_reply(&mut s).await, (EINVAL, 10));
        assert_eq!(mem.snapshot()[..4], [7, 7, 7, 7]);
        // Disconnect politely.
        send_req(&mut s, CMD_DISC, 0, 11, 0, 0, &[]).await;
        assert_closed(&mut s).await;

        // Read-only export refuses writes with EPERM.
        let c = NbdClient::connect(
            &server.ep,
            &ClientOptions {
                export: "ro".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert!(c.read_only());
        match c.write(0, &[1], false).await {
            Err(NbdError::Request { errno, .. }) => assert_eq!(errno, EPERM),
            other => panic!("expected EPERM, got {other:?}"),
        }
        still_serves(&server.ep, &mem).await;
    });
}

#[test]
fn protocol_violations_close_only_that_connection() {
    let mem = MemoryBackend::new(1 << 20);
    let server = start_server(vec![export("disk", Arc::new(mem.clone()), false)]);
    let Endpoint::Tcp(addr) = server.ep.clone() else {
        unreachable!()
    };
    rt().block_on(async {
        mem.write_at(0, IoBuf::from_slice(&[7; 4]), false)
            .await
            .unwrap();
        // 1. Garbage instead of client flags and options.
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(&[0xFF; 64]).await.unwrap();
        assert_closed(&mut s).await;
        still_serves(&server.ep, &mem).await;
        // 2. Bad option magic.
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(&1u32.to_be_bytes()).await.unwrap();
        s.write_all(&[0xAB; 16]).await.unwrap();
        assert_closed(&mut s).await;
        // 3. An option claiming 4 GiB of payload.
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(&1u32.to_be_bytes()).await.unwrap();
        let mut h = IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&OPT_GO.to_be_bytes());
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        s.write_all(&h).await.unwrap();
        assert_closed(&mut s).await;
        // 4. Unknown options, malformed GO, then a proper GO on the same connection.
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).await.unwrap();
        s.write_all(&1u32.to_be_bytes()).await.unwrap();
        s.write_all(&codec::encode_option(999, b"junk"))
            .await
            .unwrap();
        assert_eq!(read_opt_reply(&mut s).await.1, REP_ERR_UNSUP);
        s.write_all(&codec::encode_option(OPT_STARTTLS, &[]))
            .await
            .unwrap();
        assert_eq!(read_opt_reply(&mut s).await.1, REP_ERR_UNSUP);
        s.write_all(&codec::encode_option(OPT_GO, &[0, 0, 0, 50, 1]))
            .await
            .unwrap();
        assert_eq!(read_opt_reply(&mut s).await.1, REP_ERR_INVALID);
        let go = InfoRequest {
            name: "nope".into(),
            requests: vec![],
        };
        s.write_all(&codec::encode_option(OPT_GO, &go.encode()))
            .await
            .unwrap();
        assert_eq!(read_opt_reply(&mut s).await.1, REP_ERR_UNKNOWN);
        s.write_all(&codec::encode_option(OPT_SET_META_CONTEXT, &[]))
            .await
            .unwrap();
        assert_eq!(read_opt_reply(&mut s).await.1, REP_ERR_INVALID);
        let go = InfoRequest {
            name: "disk".into(),
            requests: vec![INFO_NAME],
        };
        s.write_all(&codec::encode_option(OPT_GO, &go.encode()))
            .await
            .unwrap();
        let mut kinds = Vec::new();
        loop {
            let (_, k, _) = read_opt_reply(&mut s).await;
            kinds.push(k);
            if k == REP_ACK {
                break;
            }
        }
        assert!(
            kinds.iter().filter(|&&k| k == REP_INFO).count() >= 3,
            "{kinds:?}"
        );
        // 5. In transmission: a bad request magic closes the connection.
        s.write_all(&[0x55; 28]).await.unwrap();
        assert_closed(&mut s).await;
        // 6. EXPORT_NAME for an unknown export hangs up (the protocol has no error reply).
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.read_exact(&mut g).await.unwrap();
        s.write_all(&1u32.to_be_bytes()).await.unwrap();
        s.write_all(&codec::encode_option(OPT_EXPORT_NAME, b"nope"))
            .await
            .unwrap();
        assert_closed(&mut s).await;
        // 7. A client that connects and says nothing does not block anyone else.
        let _silent = TcpStream::connect(&addr).await.unwrap();
        // 8. A client that vanishes with requests in flight.
        let (mut s, _) = raw_go(&server.ep, true).await;
        for i in 0..16 {
            send_req(&mut s, CMD_READ, 0, i, 0, 65536, &[]).await;
        }
        drop(s);
        still_serves(&server.ep, &mem).await;
    });
}

#[test]
fn a_unix_listener_replaces_only_stale_sockets() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        // A regular file (a typo for the disk, say) survives, with a clear error.
        let file = dir.path().join("disk.img");
        std::fs::write(&file, b"precious").unwrap();
        let e = Listener::bind(&Endpoint::Unix(file.clone()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
        // So do a directory and a symlink (even one to a socket).
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(Listener::bind(&Endpoint::Unix(sub.clone())).await.is_err());
        assert!(sub.is_dir());
        // A stale socket is replaced; a live one is not.
        let sock = dir.path().join("nbd.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        assert!(Listener::bind(&Endpoint::Unix(link.clone())).await.is_err());
        let live = Listener::bind(&Endpoint::Unix(sock.clone())).await.unwrap();
        let e = Listener::bind(&Endpoint::Unix(sock.clone()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        drop(live);
    });
}

#[test]
fn structured_replies_block_status_and_listing() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let mut o = crate::storage::DiskOptions::new(dir.path().join("sparse.img"));
    o.size = Some(8 << 20);
    let disk = crate::storage::open_disk(&o).unwrap();
    let server = start_server(vec![
        export("disk", disk.clone(), false),
        export("other", Arc::new(MemoryBackend::new(512)), false),
    ]);
    rt().block_on(async {
        let names = client::list_exports(&server.ep).await.unwrap();
        assert_eq!(names, vec!["disk".to_string(), "other".to_string()]);
        let c = NbdClient::connect(
            &server.ep,
            &ClientOptions {
                export: "disk".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert!(c.info().structured && c.info().base_allocation.is_some());
        assert_eq!(c.info().max_payload, MAX_PAYLOAD);
        c.write(1 << 20, &vec![5u8; 1 << 20], true).await.unwrap();
        let st = c.block_status(0, 4 << 20).await.unwrap();
        // A hole, then the data we wrote, then a hole again.
        assert_eq!(st[0], (1 << 20, STATE_HOLE | STATE_ZERO), "{st:?}");
        assert_eq!(st[1], (1 << 20, 0), "{st:?}");
        assert_eq!(st.iter().map(|&(l, _)| u64::from(l)).sum::<u64>(), 4 << 20);
        // Many reads in flight on one connection, answered in whatever order.
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                (i, c.read(i * 65536, 65536).await.unwrap())
            }));
        }
        for t in tasks {
            let (i, b) = t.await.unwrap();
            let want = if (16..32).contains(&i) { 5 } else { 0 };
            assert!(b.iter().all(|&x| x == want), "chunk {i}");
        }
        c.write_zeroes(1 << 20, 4096, true, false).await.unwrap();
        c.trim((1 << 20) + 4096, 4096, true).await.unwrap();
        assert!(c.read(1 << 20, 8192).await.unwrap().iter().all(|&x| x == 0));
        // A structured error reply reaches the caller with the server's message.
        match c.read(8 << 20, 1).await {
            Err(NbdError::Invalid(_)) => {}
            other => panic!("client-side range check expected, got {other:?}"),
        }
        c.disconnect().await.unwrap();
        // An unknown export is a clear negotiation error.
        let e = NbdClient::connect(
            &server.ep,
            &ClientOptions {
                export: "nope".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("unknown export"), "{e}");
    });
}
