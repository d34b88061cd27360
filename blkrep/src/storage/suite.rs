//! One test suite for every backend (in the manner of vm-memory's bitmap suite).
//!
//! Each backend's tests build a fresh byte-addressable disk (alignment 1, wrapping aligned
//! backends in `Unaligned`) and run every check here against it.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;

/// Builds a fresh zero-filled disk of the given size.
pub(crate) type Factory = fn(u64) -> (Arc<dyn Backend>, Guard);

/// Whatever must outlive the disk (a temporary directory, a server thread).
pub(crate) type Guard = Box<dyn std::any::Any>;

fn rt() -> tokio::runtime::Runtime {
    crate::test_runtime()
}

fn pattern(seed: u8, len: usize) -> IoBuf {
    let v: Vec<u8> = (0..len)
        .map(|i| seed.wrapping_add((i * 31 % 251) as u8))
        .collect();
    IoBuf::from_slice(&v)
}

pub(crate) fn run_all(make: Factory) {
    size_and_zero_fill(make);
    round_trips_at_odd_offsets(make);
    zeroing_and_discard(make);
    out_of_range_is_refused(make);
    concurrent_writes_to_shared_blocks(make);
    model_check(make);
}

fn size_and_zero_fill(make: Factory) {
    let (d, _t) = make(1 << 20);
    rt().block_on(async {
        assert_eq!(d.size(), 1 << 20);
        let b = d.read_at(0, 1 << 20).await.unwrap();
        assert!(b.iter().all(|&x| x == 0));
        let b = d.read_at(12345, 0).await.unwrap();
        assert!(b.is_empty());
    });
}

fn round_trips_at_odd_offsets(make: Factory) {
    let (d, _t) = make(1 << 20);
    rt().block_on(async {
        for (off, len, seed) in [
            (0u64, 4096usize, 1u8),
            (1, 1, 2),
            (4095, 2, 3),
            (5000, 10000, 4),
            (8192, 65536, 5),
            ((1 << 20) - 7, 7, 6),
        ] {
            let p = pattern(seed, len);
            d.write_at(off, p.clone(), seed % 2 == 0).await.unwrap();
            let got = d.read_at(off, len).await.unwrap();
            assert_eq!(&*got, &*p, "round trip at {off}+{len}");
        }
        // Neighbours of an odd write are untouched.
        d.write_at(100_000, IoBuf::from_slice(&[0xAA; 3]), false)
            .await
            .unwrap();
        let got = d.read_at(99_998, 7).await.unwrap();
        assert_eq!(&*got, &[0, 0, 0xAA, 0xAA, 0xAA, 0, 0]);
        d.flush().await.unwrap();
    });
}

fn zeroing_and_discard(make: Factory) {
    let (d, _t) = make(1 << 20);
    rt().block_on(async {
        d.write_at(0, pattern(9, 1 << 20), false).await.unwrap();
        d.write_zeroes(1000, 9000, false).await.unwrap();
        d.write_zeroes(65536, 65536, true).await.unwrap();
        d.discard(200_000, 70_001).await.unwrap();
        let all = d.read_at(0, 1 << 20).await.unwrap();
        let orig = pattern(9, 1 << 20);
        for (i, (&a, &o)) in all.iter().zip(orig.iter()).enumerate() {
            let zeroed = (1000..10_000).contains(&i)
                || (65536..131_072).contains(&i)
                || (200_000..270_001).contains(&i);
            assert_eq!(a, if zeroed { 0 } else { o }, "byte {i}");
        }
        let ext = d.block_status(0, 1 << 20).await.unwrap();
        assert!(!ext.is_empty());
        assert!(ext.iter().map(|e| e.len).sum::<u64>() <= 1 << 20);
    });
}

fn out_of_range_is_refused(make: Factory) {
    let (d, _t) = make(65536);
    rt().block_on(async {
        assert!(matches!(
            d.read_at(65536, 1).await,
            Err(StorageError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.read_at(u64::MAX, 1).await,
            Err(StorageError::OutOfRange { .. })
        ));
        let e = d
            .write_at(65000, IoBuf::zeroed(1000), false)
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC);
        assert!(d.write_zeroes(u64::MAX - 1, 10, false).await.is_err());
        assert!(d.discard(0, 65537).await.is_err());
        // Nothing was written by the refused requests.
        assert!(d.read_at(0, 65536).await.unwrap().iter().all(|&x| x == 0));
    });
}

fn concurrent_writes_to_shared_blocks(make: Factory) {
    let (d, _t) = make(1 << 16);
    rt().block_on(async {
        // 64 single-byte writes into the same blocks at once: read-modify-write must not lose any.
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let d = d.clone();
            tasks.push(tokio::spawn(async move {
                d.write_at(i * 67, IoBuf::from_slice(&[i as u8 + 1]), false)
                    .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        for i in 0..64u64 {
            assert_eq!(d.read_at(i * 67, 1).await.unwrap()[0], i as u8 + 1);
        }
    });
}

#[derive(Debug, Clone)]
enum ModelOp {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Discard(u64, u64),
}

fn op_strategy(size: u64) -> impl Strategy<Value = ModelOp> {
    let range = (0..size).prop_flat_map(move |o| (Just(o), 0..=(size - o).min(20_000)));
    prop_oneof![
        4 => range.clone().prop_flat_map(|(o, l)| proptest::collection::vec(any::<u8>(), l as usize).prop_map(move |v| ModelOp::Write(o, v))),
        1 => range.clone().prop_map(|(o, l)| ModelOp::Zero(o, l)),
        1 => range.prop_map(|(o, l)| ModelOp::Discard(o, l)),
    ]
}

fn model_check(make: Factory) {
    const SIZE: u64 = 64 * 1024;
    let cfg = ProptestConfig {
        cases: 24,
        ..ProptestConfig::default()
    };
    let rt = rt();
    proptest!(cfg, |(ops in proptest::collection::vec(op_strategy(SIZE), 1..24))| {
        let (d, _t) = make(SIZE);
        let mut model = vec![0u8; SIZE as usize];
        rt.block_on(async {
            for op in &ops {
                match op {
                    ModelOp::Write(o, v) => {
                        d.write_at(*o, IoBuf::from_slice(v), false).await.unwrap();
                        model[*o as usize..*o as usize + v.len()].copy_from_slice(v);
                    }
                    ModelOp::Zero(o, l) => {
                        d.write_zeroes(*o, *l, false).await.unwrap();
                        model[*o as usize..(*o + *l) as usize].fill(0);
                    }
                    ModelOp::Discard(o, l) => {
                        d.discard(*o, *l).await.unwrap();
                        model[*o as usize..(*o + *l) as usize].fill(0);
                    }
                }
            }
            let got = d.read_at(0, SIZE as usize).await.unwrap();
            assert!(*got == model[..], "disk differs from model after {ops:?}");
        });
    });
}

fn memory(size: u64) -> (Arc<dyn Backend>, Guard) {
    (Arc::new(MemoryBackend::new(size)), Box::new(()))
}

fn memory_aligned(size: u64) -> (Arc<dyn Backend>, Guard) {
    (
        Arc::new(Unaligned::new(MemoryBackend::with_alignment(size, 4096))),
        Box::new(()),
    )
}

pub(crate) fn file_with(size: u64, direct: bool) -> (Arc<dyn Backend>, Guard) {
    // /var/tmp is disk-backed on the usual setups, so O_DIRECT and hole punching work there.
    let dir = tempfile::Builder::new()
        .prefix("lockstep-suite")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut o = DiskOptions::new(dir.path().join("disk.img"));
    o.size = Some(size);
    o.direct = direct;
    (open_disk(&o).unwrap(), Box::new(dir))
}

#[test]
fn memory_backend() {
    run_all(memory);
}

#[test]
fn memory_backend_behind_read_modify_write() {
    run_all(memory_aligned);
}

#[test]
fn uring_file_buffered() {
    run_all(|s| file_with(s, false));
}

#[test]
fn uring_file_direct() {
    run_all(|s| file_with(s, true));
}

#[test]
fn open_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let missing = DiskOptions::new(dir.path().join("nope.img"));
    let e = UringFile::open(&missing).unwrap_err().to_string();
    assert!(e.contains("does not exist") && e.contains("--size"), "{e}");
    let mut o = DiskOptions::new(dir.path().join("d.img"));
    o.size = Some(8192);
    drop(UringFile::open(&o).unwrap());
    o.size = Some(4096);
    let e = UringFile::open(&o).unwrap_err().to_string();
    assert!(e.contains("never shrinks"), "{e}");
    o.size = None;
    o.read_only = true;
    let ro = UringFile::open(&o).unwrap();
    let r = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(ro.write_at(0, IoBuf::zeroed(1), false));
    assert!(matches!(r, Err(StorageError::ReadOnly)));
}
