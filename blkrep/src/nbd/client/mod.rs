//! An asynchronous, pipelined NBD client.
//!
//! Any number of tasks may issue requests at once; each gets a fresh cookie, the request goes
//! out under a short writer lock, and one reader task matches replies (in any order, simple or
//! structured) to their requests. The client implements [`Backend`](crate::storage::Backend), so a remote export can
//! stand wherever a local disk can, and the storage test suite runs against it.
//!
//! ```text
//!  task A ─┐ write(req A) ┌──────────┐          ┌────────────┐
//!  task B ─┼─────────────▶│  socket  │─────────▶│ NBD server │
//!  task C ─┘              └──────────┘◀─────────└────────────┘
//!     ▲  oneshot per cookie     │ replies in any order
//!     └──────── reader task ◀───┘
//! ```
//!
//! One phase per file:
//!
//! ```text
//!   mod           options, NbdClient, connecting (TLS, peer key) and what was negotiated
//!   negotiate     the handshake: greeting, options, NBD_OPT_GO (or EXPORT_NAME), listing
//!   transmission  cookies, sending requests, the reader task matching replies to them
//!   commands      one method per NBD command (read, write, flush, trim, ...)
//!   backend       a remote export as a storage Backend
//!   lockstep      lockstep's extensions: epoch marks, connect_control
//! ```
//!
//! lockstep's own additions (epoch marks, the control connection) are in `lockstep`; what
//! they share with the server's side is in [`crate::nbd::lockstep`].

mod backend;
mod commands;
mod lockstep;
pub(super) mod negotiate;
mod transmission;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{BufReader, BufWriter};

pub use self::lockstep::connect_control;
pub use self::negotiate::list_exports;
use self::negotiate::negotiate;
use self::transmission::Shared;
pub use self::transmission::Ticket;
use super::codec::Request;
pub use super::lockstep::ControlConnection;
use super::proto::*;
use super::NbdError;
use crate::auth::{Credential, SessionKey};
use crate::tls::ClientTls;
use crate::transport::{self, Endpoint, ReadHalf, WriteHalf};

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Export name ("" for the server's default).
    pub export: String,
    /// Ask for structured replies (and base:allocation).
    pub structured: bool,
    /// Give up on negotiation after this long.
    pub connect_timeout: Duration,
    /// Fail a request that gets no reply in this long (None: wait forever).
    pub request_timeout: Option<Duration>,
    /// Prove this session key before NBD: a data connection to an authenticating
    /// secondary ([`crate::auth`]).
    pub session: Option<SessionKey>,
    /// Speak TLS from the first byte (a secondary's replication port with certificates).
    pub tls: Option<ClientTls>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            export: String::new(),
            structured: true,
            connect_timeout: Duration::from_secs(10),
            request_timeout: None,
            session: None,
            tls: None,
        }
    }
}

/// What the server told us about the export.
#[derive(Debug, Clone, Copy)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Minimum block size.
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Largest payload per request.
    pub max_payload: u32,
    /// Structured replies are on.
    pub structured: bool,
    /// The base:allocation context id, when negotiated.
    pub base_allocation: Option<u32>,
}

/// A connected client.
#[derive(Debug, Clone)]
pub struct NbdClient {
    shared: Arc<Shared>,
    info: ExportInfo,
}

/// A command's name, for messages.
fn command_name(c: u16) -> &'static str {
    match c {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write-zeroes",
        CMD_BLOCK_STATUS => "block-status",
        CMD_LOCKSTEP_EPOCH => "epoch-mark",
        CMD_LOCKSTEP_PARTICIPANT => "participant-message",
        _ => "command",
    }
}

impl NbdClient {
    /// Connect to `ep` and negotiate `opts.export`.
    pub async fn connect(ep: &Endpoint, opts: &ClientOptions) -> Result<Self, NbdError> {
        let peer = ep.to_string();
        let fut = async {
            let (rd, wr) = secure_connect(ep, opts.tls.as_ref(), &peer).await?;
            let mut rd = BufReader::with_capacity(256 << 10, rd);
            let mut wr = BufWriter::with_capacity(256 << 10, wr);
            if let Some(k) = &opts.session {
                authenticate(&mut rd, &mut wr, Credential::Data(k), &peer).await?;
            }
            let info = negotiate(&mut rd, &mut wr, &peer, opts).await?;
            Ok::<_, NbdError>((rd, wr, info))
        };
        let (rd, wr, info) = tokio::time::timeout(opts.connect_timeout, fut)
            .await
            .map_err(|_| NbdError::Timeout(format!("connecting to {peer}")))??;
        let shared = Shared::start(rd, wr, peer, opts.request_timeout);
        Ok(Self { shared, info })
    }

    /// What the server said about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    fn has(&self, flag: u16) -> bool {
        self.info.flags & flag != 0
    }

    /// Whether the server accepts FUA.
    pub fn can_fua(&self) -> bool {
        self.has(FLAG_SEND_FUA)
    }

    /// Whether the connection has failed or been closed.
    pub fn is_closed(&self) -> bool {
        self.shared.table().closed.is_some()
    }

    fn need(&self, flag: u16, what: &str) -> Result<(), NbdError> {
        if self.has(flag) {
            Ok(())
        } else {
            Err(NbdError::Invalid(format!(
                "{} does not support {what}",
                self.shared.peer
            )))
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        if offset.checked_add(len).is_none_or(|e| e > self.info.size) {
            return Err(NbdError::Invalid(format!(
                "offset {offset} + length {len} is beyond the export size {}",
                self.info.size
            )));
        }
        Ok(())
    }

    /// A request (its cookie is set when it is submitted).
    pub(in crate::nbd) fn req(command: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 0,
            offset,
            length,
        }
    }
}

/// The peer key exchange on a fresh connection, before NBD.
pub(in crate::nbd) async fn authenticate(
    rd: &mut BufReader<ReadHalf>,
    wr: &mut BufWriter<WriteHalf>,
    cred: Credential<'_>,
    peer: &str,
) -> Result<Option<SessionKey>, NbdError> {
    crate::auth::connect(rd, wr, cred)
        .await
        .map_err(|source| NbdError::Auth {
            peer: peer.to_string(),
            source,
        })
}

/// Connect to `ep`, with TLS from the first byte when `tls` is given.
pub(in crate::nbd) async fn secure_connect(
    ep: &Endpoint,
    tls: Option<&ClientTls>,
    peer: &str,
) -> Result<(ReadHalf, WriteHalf), NbdError> {
    let (rd, wr) = transport::connect(ep).await?;
    match tls {
        Some(t) => crate::tls::connect(t, rd, wr)
            .await
            .map_err(|e| NbdError::Negotiation {
                peer: peer.to_string(),
                reason: format!("TLS: {e}"),
            }),
        None => Ok((rd, wr)),
    }
}

#[cfg(test)]
mod tests;
