//! lockstep's NBD client against other servers: qemu-nbd and nbdkit.
//! (The other direction, their clients against our server, is `nbd_clients.rs`.)

use std::path::Path;
use std::time::Duration;

use blkrep::nbd::client::list_exports;
use blkrep::nbd::{ClientOptions, Endpoint, NbdClient};
use blkrep::storage::{Backend, IoBuf};
use lockstep_tests::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The same checks against any server exporting an 8 MiB zeroed disk named `name`.
async fn exercise(ep: &Endpoint, name: &str, expect_structured: bool) -> Vec<u8> {
    let opts = ClientOptions {
        export: name.into(),
        ..Default::default()
    };
    let c = NbdClient::connect(ep, &opts)
        .await
        .unwrap_or_else(|e| panic!("connect to {ep}: {e}"));
    assert_eq!(c.size(), 8 << 20);
    assert_eq!(c.info().structured, expect_structured);
    // Pipelined writes at odd offsets and lengths, many in flight.
    let mut tasks = Vec::new();
    for i in 0..128u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let len = 1000 + (i as usize * 37) % 5000;
            let data: Vec<u8> = (0..len).map(|j| (i as usize + j) as u8).collect();
            c.write(i * 65536 + 3, &data, i % 8 == 0).await.unwrap();
            (i, data)
        }));
    }
    let mut written = Vec::new();
    for t in tasks {
        written.push(t.await.unwrap());
    }
    for (i, data) in &written {
        let got = c.read(i * 65536 + 3, data.len() as u32).await.unwrap();
        assert_eq!(&*got, &data[..], "read back {i}");
    }
    c.write_zeroes(0, 4096, false, false).await.unwrap();
    c.trim(65536, 65536, false).await.unwrap();
    c.flush().await.unwrap();
    // A large request through the Backend interface (split by the server's maximum payload).
    let big = IoBuf::from_slice(&vec![0x77u8; 6 << 20]);
    c.write_at(2 << 20, big, false).await.unwrap();
    assert!(c
        .read_at(2 << 20, 6 << 20)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0x77));
    if c.info().base_allocation.is_some() {
        let st = c.block_status(0, 1 << 20).await.unwrap();
        assert!(!st.is_empty());
    }
    // Errors from the far side come back as errors, and the connection survives them.
    assert!(c.read(8 << 20, 1).await.is_err());
    let all = c.read_at(0, 8 << 20).await.unwrap().to_vec();
    c.disconnect().await.unwrap();
    all
}

fn check_file(path: &Path, seen: &[u8]) {
    let f = std::fs::read(path).unwrap();
    assert_eq!(f.len(), 8 << 20);
    assert!(
        f == seen,
        "the file on the server's disk differs from what our client read"
    );
    assert!(f[..4096].iter().all(|&b| b == 0));
    assert!(
        f[65536..131072].iter().all(|&b| b == 0),
        "trim leaves zeroes on a file"
    );
}

#[test]
fn our_client_against_qemu_nbd() {
    require("qemu-nbd", "qemu-utils");
    let _g = heavy();
    let dir = scratch();
    let disk = dir.path().join("q.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut d = Daemon::start(
        "qemu-nbd",
        Path::new("qemu-nbd"),
        &[
            "-f",
            "raw",
            "-t",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-x",
            "qdisk",
            "--discard=unmap",
            "-e",
            "4",
            disk.to_str().unwrap(),
        ],
        dir.path(),
    );
    wait_port(&addr, Duration::from_secs(15), &mut d.child);
    let seen = rt().block_on(async {
        let ep = Endpoint::Tcp(addr.clone());
        assert_eq!(list_exports(&ep).await.unwrap(), vec!["qdisk".to_string()]);
        exercise(&ep, "qdisk", true).await
    });
    drop(d);
    check_file(&disk, &seen);
}

#[test]
fn our_client_against_nbdkit() {
    require("nbdkit", "nbdkit");
    let _g = heavy();
    let dir = scratch();
    let disk = dir.path().join("k.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut d = Daemon::start(
        "nbdkit",
        Path::new("nbdkit"),
        &[
            "-f",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "file",
            disk.to_str().unwrap(),
        ],
        dir.path(),
    );
    wait_port(&addr, Duration::from_secs(15), &mut d.child);
    let seen = rt().block_on(exercise(&Endpoint::Tcp(addr.clone()), "", true));
    drop(d);
    check_file(&disk, &seen);
    // nbdkit without structured replies (an old-style server): simple replies work too.
    let mut d = Daemon::start(
        "nbdkit-simple",
        Path::new("nbdkit"),
        &[
            "-f",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--no-sr",
            "file",
            disk.to_str().unwrap(),
        ],
        dir.path(),
    );
    wait_port(&addr, Duration::from_secs(15), &mut d.child);
    rt().block_on(exercise(&Endpoint::Tcp(addr), "", false));
}
