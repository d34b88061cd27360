//! The handshake phase (fixed newstyle), client side: the greeting, structured replies and
//! base:allocation when wanted, then `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME` with a server
//! that lacks it); and `NBD_OPT_LIST` for listing a server's exports.

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};

use super::{ClientOptions, ExportInfo};
use crate::nbd::codec::{self, Info, InfoRequest, MetaContextRequest};
use crate::nbd::proto::*;
use crate::nbd::NbdError;
use crate::transport::{self, Endpoint, ReadHalf, WriteHalf};

/// List the exports of a server (NBD_OPT_LIST).
pub async fn list_exports(ep: &Endpoint) -> Result<Vec<String>, NbdError> {
    let peer = ep.to_string();
    let (rd, wr) = transport::connect(ep).await?;
    let mut rd = BufReader::new(rd);
    let mut wr = BufWriter::new(wr);
    let no_zeroes = greet(&mut rd, &mut wr, &peer).await?;
    let _ = no_zeroes;
    send_option(&mut wr, OPT_LIST, &[]).await?;
    let mut names = Vec::new();
    loop {
        let (kind, data) = read_option_reply(&mut rd, OPT_LIST, &peer).await?;
        match kind {
            REP_ACK => break,
            REP_SERVER => {
                let mut r = codec::Reader::new(&data, "NBD_REP_SERVER");
                names.push(r.lstring().map_err(|source| NbdError::Protocol {
                    peer: peer.clone(),
                    source,
                })?);
            }
            k if is_rep_err(k) => return Err(negotiation_refused(&peer, "NBD_OPT_LIST", k, &data)),
            _ => {}
        }
    }
    send_option(&mut wr, OPT_ABORT, &[]).await?;
    Ok(names)
}

/// Read the server's greeting and answer it; returns whether the server leaves out the
/// zeroes after the NBD_OPT_EXPORT_NAME reply.
pub(in crate::nbd) async fn greet(
    rd: &mut BufReader<ReadHalf>,
    wr: &mut BufWriter<WriteHalf>,
    peer: &str,
) -> Result<bool, NbdError> {
    let mut g = [0u8; codec::GREETING_LEN];
    rd.read_exact(&mut g).await.map_err(|e| {
        if let Some(reason) = crate::tls::refusal(&e) {
            return NbdError::Negotiation {
                peer: peer.into(),
                reason,
            };
        }
        let hint = if e.kind() == std::io::ErrorKind::UnexpectedEof {
            " (the server closed the connection before greeting us: does it require TLS, --tls-cert/--tls-key/--tls-ca?)"
        } else {
            ""
        };
        NbdError::Io {
            context: format!("reading the greeting of {peer}{hint}"),
            source: e,
        }
    })?;
    if g.starts_with(&crate::auth::MAGIC) {
        return Err(NbdError::Negotiation {
            peer: peer.into(),
            reason: "the server asks for a lockstep peer key first (a secondary run with --psk-file): give this node the same --psk-file".into(),
        });
    }
    let flags = codec::decode_greeting(&g).map_err(|source| NbdError::Protocol {
        peer: peer.into(),
        source,
    })?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Negotiation {
            peer: peer.into(),
            reason: "server does not speak fixed newstyle".into(),
        });
    }
    let no_zeroes = flags & FLAG_NO_ZEROES != 0;
    let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    wr.write_all(&cflags.to_be_bytes())
        .await
        .map_err(NbdError::io("sending client flags"))?;
    Ok(no_zeroes)
}

/// Send one option.
pub(in crate::nbd) async fn send_option(
    wr: &mut BufWriter<WriteHalf>,
    opt: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    wr.write_all(&codec::encode_option(opt, data))
        .await
        .map_err(NbdError::io("sending an option"))?;
    wr.flush().await.map_err(NbdError::io("sending an option"))
}

/// Read one reply to `opt`: its type and data.
pub(in crate::nbd) async fn read_option_reply(
    rd: &mut BufReader<ReadHalf>,
    opt: u32,
    peer: &str,
) -> Result<(u32, Vec<u8>), NbdError> {
    let proto = |source| NbdError::Protocol {
        peer: peer.into(),
        source,
    };
    let mut h = [0u8; codec::OPTION_REPLY_HEADER_LEN];
    rd.read_exact(&mut h)
        .await
        .map_err(NbdError::io(format!("reading an option reply from {peer}")))?;
    let (o, kind, len) = codec::decode_option_reply_header(&h).map_err(proto)?;
    if o != opt {
        return Err(proto(codec::CodecError::Invalid(format!(
            "reply for option {o}, expected {opt}"
        ))));
    }
    if len > 1 << 20 {
        return Err(proto(codec::CodecError::Invalid(format!(
            "option reply of {len} bytes"
        ))));
    }
    let mut data = vec![0u8; len as usize];
    rd.read_exact(&mut data)
        .await
        .map_err(NbdError::io(format!("reading an option reply from {peer}")))?;
    Ok((kind, data))
}

/// The error for an option the server refused with `kind`.
pub(in crate::nbd) fn negotiation_refused(
    peer: &str,
    what: &str,
    kind: u32,
    data: &[u8],
) -> NbdError {
    let name = match kind {
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "refused by policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_UNKNOWN => "unknown export",
        REP_ERR_TLS_REQD => "TLS required",
        REP_ERR_BLOCK_SIZE_REQD => "block size required",
        REP_ERR_SHUTDOWN => "server shutting down",
        _ => "error",
    };
    let msg = String::from_utf8_lossy(data);
    NbdError::Negotiation {
        peer: peer.into(),
        reason: format!(
            "{what}: {name}{}",
            if msg.is_empty() {
                String::new()
            } else {
                format!(" ({msg})")
            }
        ),
    }
}

/// Negotiate `opts.export` on a fresh connection.
pub(super) async fn negotiate(
    rd: &mut BufReader<ReadHalf>,
    wr: &mut BufWriter<WriteHalf>,
    peer: &str,
    opts: &ClientOptions,
) -> Result<ExportInfo, NbdError> {
    let proto = |source| NbdError::Protocol {
        peer: peer.into(),
        source,
    };
    let no_zeroes = greet(rd, wr, peer).await?;
    let mut info = ExportInfo {
        size: 0,
        flags: 0,
        min_block: 1,
        preferred_block: 4096,
        max_payload: 32 << 20,
        structured: false,
        base_allocation: None,
    };
    if opts.structured {
        send_option(wr, OPT_STRUCTURED_REPLY, &[]).await?;
        let (kind, _) = read_option_reply(rd, OPT_STRUCTURED_REPLY, peer).await?;
        info.structured = kind == REP_ACK;
        if info.structured {
            let q = MetaContextRequest {
                name: opts.export.clone(),
                queries: vec![BASE_ALLOCATION.into()],
            };
            send_option(wr, OPT_SET_META_CONTEXT, &q.encode()).await?;
            loop {
                let (kind, data) = read_option_reply(rd, OPT_SET_META_CONTEXT, peer).await?;
                match kind {
                    REP_META_CONTEXT
                        if data.len() >= 4 && &data[4..] == BASE_ALLOCATION.as_bytes() =>
                    {
                        info.base_allocation =
                            Some(u32::from_be_bytes(data[..4].try_into().expect("4 bytes")));
                    }
                    REP_ACK => break,
                    k if is_rep_err(k) => break,
                    _ => {}
                }
            }
        }
    }
    let go = InfoRequest {
        name: opts.export.clone(),
        requests: vec![INFO_BLOCK_SIZE],
    };
    send_option(wr, OPT_GO, &go.encode()).await?;
    let mut got_export = false;
    loop {
        let (kind, data) = read_option_reply(rd, OPT_GO, peer).await?;
        match kind {
            REP_ACK => break,
            REP_INFO => match Info::decode(&data).map_err(proto)? {
                Info::Export { size, flags } => {
                    (info.size, info.flags) = (size, flags);
                    got_export = true;
                }
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => {
                    (info.min_block, info.preferred_block, info.max_payload) =
                        (min.max(1), preferred.max(1), max.max(1));
                }
                _ => {}
            },
            REP_ERR_UNSUP => {
                // A server without NBD_OPT_GO: fall back to NBD_OPT_EXPORT_NAME.
                send_option(wr, OPT_EXPORT_NAME, opts.export.as_bytes()).await?;
                let mut b = vec![0u8; if no_zeroes { 10 } else { 134 }];
                rd.read_exact(&mut b)
                    .await
                    .map_err(NbdError::io(format!("reading export info from {peer}")))?;
                info.size = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
                info.flags = u16::from_be_bytes(b[8..10].try_into().expect("2 bytes"));
                got_export = true;
                break;
            }
            k if is_rep_err(k) => {
                return Err(negotiation_refused(
                    peer,
                    &format!("export {:?}", opts.export),
                    k,
                    &data,
                ))
            }
            _ => {}
        }
    }
    if !got_export {
        return Err(NbdError::Negotiation {
            peer: peer.into(),
            reason: "server finished NBD_OPT_GO without export information".into(),
        });
    }
    Ok(info)
}
