//! Properties of the codec: every encoding decodes back, and no input makes a decoder panic.

use super::*;
use proptest::prelude::*;

proptest! {
    #[test]
    fn request_round_trip(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
        let req = Request { flags, command, cookie, offset, length };
        let mut v = Vec::new();
        req.encode(&mut v);
        prop_assert_eq!(v.len(), REQUEST_LEN);
        prop_assert_eq!(Request::decode(&v).unwrap(), req);
    }

    #[test]
    fn info_request_round_trip(name in "[a-z0-9/._-]{0,64}", requests in proptest::collection::vec(any::<u16>(), 0..8)) {
        let r = InfoRequest { name, requests };
        prop_assert_eq!(InfoRequest::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn meta_round_trip(name in "[a-z]{0,16}", queries in proptest::collection::vec("[a-z:]{0,20}", 0..4)) {
        let r = MetaContextRequest { name, queries };
        prop_assert_eq!(MetaContextRequest::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn reply_headers_round_trip(error: u32, cookie: u64, flags: u16, kind: u16, length: u32) {
        let mut v = Vec::new();
        encode_simple_reply(&mut v, error, cookie);
        prop_assert_eq!(ReplyHeader::decode(&v).unwrap(), ReplyHeader::Simple { error, cookie });
        let mut v = Vec::new();
        encode_chunk_header(&mut v, flags, kind, cookie, length);
        prop_assert_eq!(ReplyHeader::decode(&v).unwrap(), ReplyHeader::Chunk { flags, kind, cookie, length });
    }

    #[test]
    fn block_status_round_trip(id: u32, ext in proptest::collection::vec((any::<u32>(), any::<u32>()), 1..16)) {
        let mut v = Vec::new();
        encode_block_status(&mut v, id, &ext);
        prop_assert_eq!(decode_block_status(&v).unwrap(), (id, ext));
    }

    /// Random bytes never panic any decoder.
    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_greeting(&bytes);
        let _ = decode_option_header(&bytes);
        let _ = decode_option_reply_header(&bytes);
        let _ = InfoRequest::decode(&bytes);
        let _ = MetaContextRequest::decode(&bytes);
        let _ = Info::decode(&bytes);
        let _ = Request::decode(&bytes);
        let _ = ReplyHeader::decode(&bytes);
        let _ = decode_block_status(&bytes);
        let _ = decode_error_chunk(&bytes);
        if bytes.len() >= 4 {
            let _ = ReplyHeader::len_for_magic(bytes[..4].try_into().unwrap());
        }
    }

    /// Valid headers with corrupted bytes never panic and never decode as something else silently.
    #[test]
    fn corrupted_requests_are_rejected_or_decoded(req_bytes in proptest::collection::vec(any::<u8>(), REQUEST_LEN..=REQUEST_LEN), flip in 0usize..4) {
        let mut v = req_bytes.clone();
        v[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        v[flip] ^= 0x40;
        prop_assert!(Request::decode(&v).is_err());
    }
}

#[test]
fn greeting_and_info() {
    assert_eq!(decode_greeting(&encode_greeting(3)).unwrap(), 3);
    assert_eq!(
        Info::decode(&info_export(1 << 30, 0x1ff)).unwrap(),
        Info::Export {
            size: 1 << 30,
            flags: 0x1ff
        }
    );
    assert_eq!(
        Info::decode(&info_block_size(1, 4096, 1 << 25)).unwrap(),
        Info::BlockSize {
            min: 1,
            preferred: 4096,
            max: 1 << 25
        }
    );
    assert_eq!(
        Info::decode(&info_string(INFO_NAME, "disk")).unwrap(),
        Info::Name("disk".into())
    );
    assert_eq!(encode_export_name_reply(5, 1, false).len(), 134);
    assert_eq!(encode_export_name_reply(5, 1, true).len(), 10);
}

#[test]
fn hostile_lengths_are_refused() {
    // A name length larger than the payload.
    let mut v = Vec::new();
    put32(&mut v, 1_000_000);
    assert!(InfoRequest::decode(&v).is_err());
    // Billions of meta queries in a short payload.
    let mut v = Vec::new();
    put32(&mut v, 0);
    put32(&mut v, u32::MAX);
    assert!(MetaContextRequest::decode(&v).is_err());
    // Names with NUL or over 4096 bytes.
    let r = InfoRequest {
        name: "a\0b".into(),
        requests: vec![],
    };
    assert!(InfoRequest::decode(&r.encode()).is_err());
    let r = InfoRequest {
        name: "x".repeat(5000),
        requests: vec![],
    };
    assert!(InfoRequest::decode(&r.encode()).is_err());
}
