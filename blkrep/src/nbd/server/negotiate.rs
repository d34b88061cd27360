//! The handshake phase (fixed newstyle): the greeting, then options until the client picks
//! an export (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`), starts TLS (`NBD_OPT_STARTTLS`), asks
//! for lockstep's control protocol, or gives up (`NBD_OPT_ABORT`).
//!
//! Each option has a handler of its own on [`Negotiation`]; handlers only compute the option
//! replies ([`Answer`]), and [`NbdServer::negotiate`] does all the reading and writing.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

use super::{Export, NbdServer, BASE_ALLOCATION_ID, MAX_PAYLOAD, PREFERRED_BLOCK};
use crate::nbd::codec::{self, CodecError, InfoRequest, MetaContextRequest};
use crate::nbd::proto::*;
use crate::nbd::NbdError;
use crate::tls;
use crate::transport::{ReadHalf, WriteHalf};

/// Option payloads above this are refused with NBD_REP_ERR_TOO_BIG.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// Option payloads above this are not even read: the connection is closed.
const MAX_OPTION_DISCARD: u32 = 16 << 20;
/// A client may try this many options before it has to pick an export.
const MAX_OPTIONS: usize = 1024;

/// How negotiation ended.
pub(in crate::nbd) enum Negotiated {
    Transmission(Session),
    Control,
    /// STARTTLS was acknowledged: the TLS handshake comes next, then more options.
    StartTls {
        no_zeroes: bool,
    },
}

/// What negotiation settled for the transmission phase.
#[derive(Debug)]
pub(in crate::nbd) struct Session {
    pub(super) export: Export,
    pub(super) structured: bool,
    pub(super) base_allocation: bool,
    pub(super) flags: u16,
}

/// What an option handler answers.
pub(in crate::nbd) enum Answer {
    /// Send these option replies; more options follow.
    Continue(Vec<u8>),
    /// Send these option replies; negotiation ends (`None`: the client gave up).
    End(Vec<u8>, Option<Negotiated>),
}

/// An error reply to `opt`; more options follow.
pub(in crate::nbd) fn refuse(opt: u32, kind: u32, why: &str) -> Answer {
    Answer::Continue(codec::encode_option_reply(opt, kind, why.as_bytes()))
}

/// The plain acknowledgement of `opt`.
pub(in crate::nbd) fn ack(opt: u32) -> Vec<u8> {
    codec::encode_option_reply(opt, REP_ACK, &[])
}

/// Option haggling on one connection: what was agreed so far, and one handler per option.
pub(in crate::nbd) struct Negotiation<'a> {
    server: &'a NbdServer,
    peer: &'a str,
    /// The client asked to leave out the zeroes after the NBD_OPT_EXPORT_NAME reply.
    no_zeroes: bool,
    /// TLS is on (STARTTLS happened).
    tls_on: bool,
    structured: bool,
    base_allocation: bool,
}

impl NbdServer {
    /// Negotiation to its end, through STARTTLS: after the TLS handshake the options go on
    /// over TLS (the NBD protocol's STARTTLS, as qemu and libnbd clients speak it).
    pub(super) async fn negotiate_all(
        &self,
        rd: ReadHalf,
        wr: WriteHalf,
        peer: &str,
    ) -> Result<
        (
            BufReader<ReadHalf>,
            BufWriter<WriteHalf>,
            Option<Negotiated>,
        ),
        NbdError,
    > {
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        let mut wr = BufWriter::with_capacity(256 << 10, wr);
        let mut tls_on = None;
        loop {
            match self.negotiate(&mut rd, &mut wr, peer, tls_on).await? {
                Some(Negotiated::StartTls { no_zeroes }) => {
                    let acceptor = self
                        .starttls
                        .as_ref()
                        .expect("STARTTLS is acknowledged only when configured");
                    // The client sends its first TLS record only after our ACK; whatever
                    // the buffer holds already belongs to the handshake.
                    let early = rd.buffer().to_vec();
                    let (r, w) = tls::accept(acceptor, early, rd.into_inner(), wr.into_inner())
                        .await
                        .map_err(NbdError::io(format!("TLS handshake with {peer}")))?;
                    rd = BufReader::with_capacity(256 << 10, r);
                    wr = BufWriter::with_capacity(256 << 10, w);
                    tls_on = Some(no_zeroes);
                }
                n => return Ok((rd, wr, n)),
            }
        }
    }

    /// The greeting (unless TLS was just started: `tls_on` holds the client's NO_ZEROES
    /// choice then) and options until one ends negotiation.
    async fn negotiate<R, W>(
        &self,
        rd: &mut R,
        wr: &mut W,
        peer: &str,
        tls_on: Option<bool>,
    ) -> Result<Option<Negotiated>, NbdError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let io = |what: &str| NbdError::io(format!("negotiation with {peer}: {what}"));
        let no_zeroes = match tls_on {
            Some(nz) => nz,
            None => greet(rd, wr, peer).await?,
        };
        let mut n = Negotiation {
            server: self,
            peer,
            no_zeroes,
            tls_on: tls_on.is_some(),
            structured: false,
            base_allocation: false,
        };
        for _ in 0..MAX_OPTIONS {
            let answer = match read_option(rd, peer).await? {
                (opt, None) => refuse(opt, REP_ERR_TOO_BIG, "option payload too large"),
                (opt, Some(data)) => n.option(opt, &data)?,
            };
            let (out, end) = match answer {
                Answer::Continue(out) => (out, None),
                Answer::End(out, end) => (out, Some(end)),
            };
            let sent = async {
                wr.write_all(&out).await?;
                wr.flush().await
            }
            .await;
            match end {
                // The client gave up: it need not wait for our acknowledgement.
                Some(None) => return Ok(None),
                Some(end) => return sent.map(|()| end).map_err(io("reply")),
                None => sent.map_err(io("reply"))?,
            }
        }
        Err(NbdError::Negotiation {
            peer: peer.into(),
            reason: format!("more than {MAX_OPTIONS} options"),
        })
    }
}

/// Send the greeting and take the client's flags; returns whether the client asked for
/// NO_ZEROES.
async fn greet<R, W>(rd: &mut R, wr: &mut W, peer: &str) -> Result<bool, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let io = |what: &str| NbdError::io(format!("negotiation with {peer}: {what}"));
    let refused = |reason: String| NbdError::Negotiation {
        peer: peer.into(),
        reason,
    };
    wr.write_all(&codec::encode_greeting(
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    ))
    .await
    .map_err(io("greeting"))?;
    wr.flush().await.map_err(io("greeting"))?;
    let client_flags = rd.read_u32().await.map_err(io("client flags"))?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(refused(format!("unknown client flags {client_flags:#x}")));
    }
    if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(refused("client does not speak fixed newstyle".into()));
    }
    Ok(client_flags & FLAG_C_NO_ZEROES != 0)
}

/// Read one option: its code and its data, or no data when there was too much to take (it
/// was skipped then; with far too much, the connection ends instead).
async fn read_option<R>(rd: &mut R, peer: &str) -> Result<(u32, Option<Vec<u8>>), NbdError>
where
    R: AsyncRead + Unpin,
{
    let io = |what: &str| NbdError::io(format!("negotiation with {peer}: {what}"));
    let mut hdr = [0u8; codec::OPTION_HEADER_LEN];
    rd.read_exact(&mut hdr).await.map_err(io("option header"))?;
    let (opt, len) = codec::decode_option_header(&hdr).map_err(|source| NbdError::Protocol {
        peer: peer.to_string(),
        source,
    })?;
    if len > MAX_OPTION_LEN {
        if len > MAX_OPTION_DISCARD {
            return Err(NbdError::Negotiation {
                peer: peer.into(),
                reason: format!("option {opt} with a {len}-byte payload"),
            });
        }
        tokio::io::copy(&mut rd.take(u64::from(len)), &mut tokio::io::sink())
            .await
            .map_err(io("option payload"))?;
        return Ok((opt, None));
    }
    let mut data = vec![0u8; len as usize];
    rd.read_exact(&mut data)
        .await
        .map_err(io("option payload"))?;
    Ok((opt, Some(data)))
}

impl Negotiation<'_> {
    /// Answer one option.
    fn option(&mut self, opt: u32, data: &[u8]) -> Result<Answer, NbdError> {
        if self.server.starttls.is_some() && !self.tls_on {
            // TLS first: nothing about the exports is told, nothing is served.
            match opt {
                OPT_STARTTLS | OPT_ABORT => {}
                OPT_EXPORT_NAME => {
                    return Err(
                        self.failed("NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server")
                    )
                }
                _ => {
                    return Ok(refuse(
                        opt,
                        REP_ERR_TLS_REQD,
                        "this server requires TLS: use NBD_OPT_STARTTLS first",
                    ))
                }
            }
        }
        Ok(match opt {
            OPT_STARTTLS if self.server.starttls.is_some() => self.starttls(data),
            OPT_EXPORT_NAME => return self.export_name(data),
            OPT_ABORT => Answer::End(ack(opt), None),
            OPT_LIST => self.list(data),
            OPT_INFO | OPT_GO => self.info(opt, data),
            OPT_STRUCTURED_REPLY => self.structured_reply(data),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(opt, data),
            OPT_LOCKSTEP_CONTROL if self.server.control.is_some() => self.lockstep_control(data),
            OPT_STARTTLS => refuse(opt, REP_ERR_UNSUP, "TLS is not supported"),
            OPT_EXTENDED_HEADERS => {
                refuse(opt, REP_ERR_UNSUP, "extended headers are not supported")
            }
            _ => refuse(opt, REP_ERR_UNSUP, "unknown option"),
        })
    }

    /// Negotiation cannot go on.
    fn failed(&self, reason: impl Into<String>) -> NbdError {
        NbdError::Negotiation {
            peer: self.peer.into(),
            reason: reason.into(),
        }
    }

    /// Transmission with `export` and its `flags`, as negotiated so far.
    fn transmission(&self, export: Export, flags: u16) -> Negotiated {
        Negotiated::Transmission(Session {
            export,
            structured: self.structured,
            base_allocation: self.base_allocation,
            flags,
        })
    }

    /// `NBD_OPT_STARTTLS`: acknowledge; the TLS handshake follows.
    fn starttls(&self, data: &[u8]) -> Answer {
        if self.tls_on {
            return refuse(OPT_STARTTLS, REP_ERR_INVALID, "TLS is already on");
        }
        if !data.is_empty() {
            return refuse(
                OPT_STARTTLS,
                REP_ERR_INVALID,
                "NBD_OPT_STARTTLS takes no data",
            );
        }
        let tls = Negotiated::StartTls {
            no_zeroes: self.no_zeroes,
        };
        Answer::End(ack(OPT_STARTTLS), Some(tls))
    }

    /// `NBD_OPT_EXPORT_NAME`, the old way into transmission.
    fn export_name(&self, data: &[u8]) -> Result<Answer, NbdError> {
        let name = codec::Reader::new(data, "NBD_OPT_EXPORT_NAME")
            .string(data.len())
            .map_err(|source: CodecError| NbdError::Protocol {
                peer: self.peer.to_string(),
                source,
            })?;
        let Some(export) = self.server.find(&name).cloned() else {
            // The protocol has no way to refuse EXPORT_NAME but to hang up.
            return Err(self.failed(format!("unknown export {name:?}")));
        };
        let flags = transmission_flags(&export, self.structured);
        let reply = codec::encode_export_name_reply(export.backend.size(), flags, self.no_zeroes);
        Ok(Answer::End(reply, Some(self.transmission(export, flags))))
    }

    /// `NBD_OPT_LIST`: every export's name and description (none on an internal port).
    fn list(&self, data: &[u8]) -> Answer {
        if !data.is_empty() {
            return refuse(OPT_LIST, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
        }
        let mut out = Vec::new();
        let listed = if self.server.opts.list_exports {
            &self.server.exports[..]
        } else {
            &[]
        };
        for e in listed {
            let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(e.name.as_bytes());
            d.extend_from_slice(e.description.text().as_bytes());
            out.extend(codec::encode_option_reply(OPT_LIST, REP_SERVER, &d));
        }
        out.extend(ack(OPT_LIST));
        Answer::Continue(out)
    }

    /// `NBD_OPT_INFO` (describe an export) and `NBD_OPT_GO` (describe it and enter
    /// transmission with it).
    fn info(&self, opt: u32, data: &[u8]) -> Answer {
        let req = match InfoRequest::decode(data) {
            Ok(r) => r,
            Err(e) => return refuse(opt, REP_ERR_INVALID, &e.to_string()),
        };
        let Some(export) = self.server.find(&req.name).cloned() else {
            let why = format!("no export named {:?}", req.name);
            return refuse(opt, REP_ERR_UNKNOWN, &why);
        };
        let info = |d: &[u8]| codec::encode_option_reply(opt, REP_INFO, d);
        let flags = transmission_flags(&export, self.structured);
        let mut out = info(&codec::info_export(export.backend.size(), flags));
        out.extend(info(&codec::info_block_size(
            1,
            PREFERRED_BLOCK,
            MAX_PAYLOAD,
        )));
        if req.requests.contains(&INFO_NAME) {
            out.extend(info(&codec::info_string(INFO_NAME, &export.name)));
        }
        let description = export.description.text();
        if req.requests.contains(&INFO_DESCRIPTION) && !description.is_empty() {
            out.extend(info(&codec::info_string(INFO_DESCRIPTION, &description)));
        }
        out.extend(ack(opt));
        if opt == OPT_GO {
            return Answer::End(out, Some(self.transmission(export, flags)));
        }
        Answer::Continue(out)
    }

    /// `NBD_OPT_STRUCTURED_REPLY`.
    fn structured_reply(&mut self, data: &[u8]) -> Answer {
        if !data.is_empty() {
            let why = "NBD_OPT_STRUCTURED_REPLY takes no data";
            return refuse(OPT_STRUCTURED_REPLY, REP_ERR_INVALID, why);
        }
        self.structured = true;
        Answer::Continue(ack(OPT_STRUCTURED_REPLY))
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: the one context there is,
    /// base:allocation.
    fn meta_context(&mut self, opt: u32, data: &[u8]) -> Answer {
        let set = opt == OPT_SET_META_CONTEXT;
        if set && !self.structured {
            return refuse(opt, REP_ERR_INVALID, "negotiate structured replies first");
        }
        let req = match MetaContextRequest::decode(data) {
            Ok(r) => r,
            Err(e) => return refuse(opt, REP_ERR_INVALID, &e.to_string()),
        };
        if self.server.find(&req.name).is_none() {
            let why = format!("no export named {:?}", req.name);
            return refuse(opt, REP_ERR_UNKNOWN, &why);
        }
        let wanted = req
            .queries
            .iter()
            .any(|q| q == BASE_ALLOCATION || (!set && q == "base:"))
            || (!set && req.queries.is_empty());
        if set {
            self.base_allocation = wanted;
        }
        let mut out = Vec::new();
        if wanted {
            let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            out.extend(codec::encode_option_reply(opt, REP_META_CONTEXT, &d));
        }
        out.extend(ack(opt));
        Answer::Continue(out)
    }
}

/// The transmission flags `e` gets.
fn transmission_flags(e: &Export, structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_CACHE;
    if e.read_only || e.backend.read_only() {
        f |= FLAG_READ_ONLY;
    } else {
        // Every connection shares one backend whose flush covers every completed write, so a
        // flush on any connection is a flush for all: multi-conn is honest.
        f |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_CAN_MULTI_CONN;
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    f
}
