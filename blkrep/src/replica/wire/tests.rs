use super::decode::treemap_cardinality;
use super::*;
use proptest::prelude::*;

fn summary() -> impl Strategy<Value = EpochSummary> {
    (any::<u16>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(p, i, b, d)| EpochSummary {
        participant: p,
        items: i,
        bytes: b,
        digest: d,
    })
}

/// Any message, with any field values (the fuzz tests of the secondary use it too).
pub(crate) fn message() -> impl Strategy<Value = Message> {
    let ack = prop_oneof![
        Just(AckMode::Local),
        Just(AckMode::Received),
        Just(AckMode::Durable)
    ];
    prop_oneof![
        (
            (
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(any::<u64>(), 0..5)
            ),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            ack,
            any::<u32>()
        )
            .prop_map(
                |((size, generation, history), tracked, committed, session, ack, heartbeat_ms)| {
                    Message::Hello {
                        size,
                        generation,
                        history,
                        tracked,
                        committed,
                        session,
                        ack,
                        heartbeat_ms,
                    }
                }
            ),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            1u8..=3,
            any::<bool>()
        )
            .prop_map(|(size, generation, committed, sync, consistent)| {
                Message::Welcome {
                    size,
                    generation,
                    committed,
                    sync: SyncKind::from_u8(sync).unwrap(),
                    consistent,
                }
            }),
        (
            any::<u64>(),
            1u32..64,
            proptest::collection::vec(0u64..1 << 40, 0..50)
        )
            .prop_map(|(id, unit_blocks, v)| Message::SumsRequest {
                id,
                unit_blocks,
                units: v.into_iter().collect(),
            }),
        (any::<u64>(), proptest::collection::vec(any::<u64>(), 0..50))
            .prop_map(|(id, sums)| Message::Sums { id, sums }),
        any::<u64>().prop_map(|epoch| Message::Resume { epoch }),
        any::<u64>().prop_map(|epoch| Message::ResumeAck { epoch }),
        (any::<u16>(), ".{0,40}").prop_map(|(code, reason)| Message::Refused {
            code: RefusalCode::from_u16(code),
            reason
        }),
        ".{0,40}".prop_map(|reason| Message::Goodbye { reason }),
        (any::<u64>(), proptest::collection::vec(summary(), 0..4))
            .prop_map(|(epoch, summaries)| Message::Checkpoint { epoch, summaries }),
        any::<u64>().prop_map(|epoch| Message::Committed { epoch }),
        (any::<u64>(), ".{0,40}").prop_map(|(epoch, reason)| Message::Aborted { epoch, reason }),
        any::<u64>().prop_map(|seq| Message::Heartbeat { seq }),
        any::<u64>().prop_map(|seq| Message::HeartbeatAck { seq }),
    ]
}

proptest! {
    #[test]
    fn round_trip(m in message()) {
        let b = m.encode();
        let (d, n) = decode_frame(&b).unwrap().unwrap();
        prop_assert_eq!(n, b.len());
        prop_assert_eq!(d, m);
        // Every strict prefix asks for more bytes.
        for cut in 0..b.len() {
            prop_assert_eq!(decode_frame(&b[..cut]).unwrap(), None);
        }
    }

    #[test]
    fn any_flipped_bit_is_caught(m in message(), bit in any::<usize>()) {
        let mut b = m.encode();
        let bit = bit % (b.len() * 8);
        b[bit / 8] ^= 1 << (bit % 8);
        // Either an error, a request for more bytes (the length grew), but never a
        // different message accepted as valid.
        if let Ok(Some((d, _))) = decode_frame(&b) {
            prop_assert_eq!(d, m);
            prop_assert!(false, "a damaged frame was accepted");
        }
    }

    #[test]
    fn the_cardinality_walk_never_panics(b in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = treemap_cardinality(&b, MAX_SUM_UNITS);
    }

    #[test]
    fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_frame(&b);
    }
}

/// A SUMS_REQUEST frame whose unit bitmap is `bitmap` (raw serialized bytes).
fn sums_request_frame(bitmap: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&1u64.to_be_bytes());
    p.extend_from_slice(&16u32.to_be_bytes());
    p.extend_from_slice(bitmap);
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&kind::SUMS_REQUEST.to_be_bytes());
    out.extend_from_slice(&(p.len() as u32).to_be_bytes());
    out.extend_from_slice(&p);
    let crc = crc64(&[&out]);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

#[test]
fn hostile_run_containers_are_refused_before_decoding() {
    // One treemap bitmap with as many containers as fit in 64 KiB, each a single run of
    // 65536 values whose header claims a cardinality of 1: 4500 containers of 14 bytes
    // would decode to ~295 million units.
    let n: usize = 4500;
    let mut b = Vec::new();
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&((((n - 1) as u32) << 16) | 12347).to_le_bytes());
    b.extend(std::iter::repeat_n(0xffu8, n.div_ceil(8)));
    for i in 0..n {
        b.extend_from_slice(&(i as u16).to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
    }
    for i in 0..n {
        b.extend_from_slice(&(i as u32).to_le_bytes());
    }
    for _ in 0..n {
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&0xffffu16.to_le_bytes());
    }
    assert!(b.len() <= MAX_PAYLOAD as usize - 12, "{} bytes", b.len());
    let f = sums_request_frame(&b);
    let t = std::time::Instant::now();
    let e = decode_frame(&f).unwrap_err();
    assert!(e.to_string().contains("more than 4096 units"), "{e}");
    assert!(
        t.elapsed() < std::time::Duration::from_millis(50),
        "{:?}",
        t.elapsed()
    );
    // The walk counts runs, not the header's claim, and so does the decoder: proof that
    // the hostile payload is real.
    assert_eq!(treemap_cardinality(&b, u64::MAX).unwrap(), n as u64 * 65536);
}

/// A treemap of one bitmap whose containers are runs `(key, [(start, length - 1)])`.
fn run_treemap(containers: &[(u16, &[(u16, u16)])]) -> Vec<u8> {
    let n = containers.len();
    let mut b = Vec::new();
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&7u32.to_le_bytes());
    b.extend_from_slice(&((((n - 1) as u32) << 16) | 12347).to_le_bytes());
    b.extend(std::iter::repeat_n(0xffu8, n.div_ceil(8)));
    for (key, _) in containers {
        b.extend_from_slice(&key.to_le_bytes());
        // A header cardinality that lies: the decoder does not use it for runs.
        b.extend_from_slice(&0u16.to_le_bytes());
    }
    if n >= 4 {
        b.extend(std::iter::repeat_n(0u8, n * 4));
    }
    for (_, runs) in containers {
        b.extend_from_slice(&(runs.len() as u16).to_le_bytes());
        for (start, len) in *runs {
            b.extend_from_slice(&start.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
        }
    }
    b
}

#[test]
fn run_containers_are_counted_as_roaring_decodes_them() {
    for containers in [
        &[(0u16, &[(0u16, 9u16), (100, 0)][..])][..],
        &[(1, &[(5, 1999)][..]), (3, &[(0, 2000), (4000, 94)][..])][..],
        &[
            (1, &[(0, 0)][..]),
            (2, &[(0, 0)][..]),
            (3, &[(0, 0)][..]),
            (9, &[][..]),
        ][..],
    ] {
        let b = run_treemap(containers);
        let t = roaring::RoaringTreemap::deserialize_from(&b[..]).unwrap();
        assert_eq!(treemap_cardinality(&b, u64::MAX).unwrap(), t.len());
        let Message::SumsRequest { units, .. } =
            decode_frame(&sums_request_frame(&b)).unwrap().unwrap().0
        else {
            panic!("not a SUMS_REQUEST")
        };
        assert_eq!(units, t);
    }
    let over = run_treemap(&[(0, &[(0, 4095)]), (1, &[(0, 0)])]);
    assert!(decode_frame(&sums_request_frame(&over)).is_err());
    let limit = run_treemap(&[(0, &[(0, 4095)])]);
    assert!(decode_frame(&sums_request_frame(&limit)).is_ok());
}

#[test]
fn the_cardinality_walk_agrees_with_roaring() {
    let cases: Vec<roaring::RoaringTreemap> = vec![
        roaring::RoaringTreemap::new(),
        (0..4096u64).collect(),
        (0..4096u64).map(|u| u * 3).collect(),
        (0..4096u64).map(|u| u << 20).collect(),
        (0..2000u64).map(|u| u << 33).collect(),
        [1u64, 2, 3, 70000, 1 << 40, u64::MAX].into_iter().collect(),
        (0..6000u64).filter(|u| u % 2 == 0).chain(0..1).collect(),
    ];
    for t in cases {
        let mut b = Vec::new();
        t.serialize_into(&mut b).unwrap();
        assert_eq!(treemap_cardinality(&b, u64::MAX).unwrap(), t.len());
        let within = t.len() <= MAX_SUM_UNITS;
        let decoded = decode_frame(&sums_request_frame(&b));
        assert_eq!(decoded.is_ok(), within, "{} units: {decoded:?}", t.len());
    }
}

#[test]
fn clear_errors() {
    let mut b = Message::Heartbeat { seq: 1 }.encode();
    b[5] = 9;
    assert_eq!(
        decode_frame(&b).unwrap_err().to_string(),
        "control protocol version 9 is not supported (this build speaks 3)"
    );
    assert!(matches!(
        decode_frame(b"GET / HTTP/1.1\r\n\r\n"),
        Err(WireError::BadMagic(_))
    ));
    let mut big = Message::Heartbeat { seq: 1 }.encode();
    big[8..12].copy_from_slice(&(1u32 << 30).to_be_bytes());
    assert_eq!(decode_frame(&big), Err(WireError::TooLarge(1 << 30)));
}
