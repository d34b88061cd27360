//! NBD: the protocol lockstep speaks to its users and between its nodes.
//!
//! ```text
//!   proto      the protocol's constants
//!   codec      pure bytes ⇄ messages (handshake, requests, simple and structured replies)
//!   server     many exports, many connections, many requests in flight per connection
//!   client     async, pipelined; used by the primary to forward writes, and in interop tests
//!   lockstep   lockstep's extensions (epoch marks, the control option): what both sides
//!              share; each side's code is in server::lockstep and client::lockstep
//!   guard      admission of peers on an authenticating port
//! ```
//!
//! Connections come from [`crate::transport`] (TCP and Unix sockets); its [`Endpoint`],
//! [`Listener`] and [`DEFAULT_ENDPOINT`] are re-exported here.
//!
//! The protocol itself is described in `docs/protocol.md`; what lockstep supports of it is
//! listed there too.

pub mod client;
pub mod codec;
mod guard;
pub mod lockstep;
pub mod proto;
pub mod server;

pub use crate::transport::{Endpoint, Listener, DEFAULT_ENDPOINT};
pub use client::connect_control;
pub use client::{ClientOptions, NbdClient};
pub use lockstep::{ControlHandler, EpochSink};
pub use server::{Export, NbdServer, ServerOptions};

use std::io;

use crate::transport::TransportError;

/// Errors of NBD connections (both sides).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer sent something the protocol does not allow.
    #[error("protocol violation by {peer}: {source}")]
    Protocol {
        /// Who.
        peer: String,
        /// What.
        #[source]
        source: codec::CodecError,
    },
    /// Negotiation failed (unknown export, refused option, ...).
    #[error("negotiation with {peer} failed: {reason}")]
    Negotiation {
        /// Who.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The server answered a request with an error.
    #[error(
        "{command} at offset {offset} (+{length}) failed on the server: {message} (errno {errno})"
    )]
    Request {
        /// Command name.
        command: &'static str,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u64,
        /// The NBD error value.
        errno: u32,
        /// Server's message (structured replies) or the errno's name.
        message: String,
    },
    /// The request is not valid for this export (out of range, read-only, not supported).
    #[error("{0}")]
    Invalid(String),
    /// The connection is closed.
    #[error("connection to {peer} is closed{}", reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    Closed {
        /// Who.
        peer: String,
        /// Why, when known.
        reason: Option<String>,
    },
    /// No answer in time.
    #[error("{0} timed out")]
    Timeout(String),
    /// The peer key exchange before NBD failed ([`crate::auth`]).
    #[error("{peer}: {source}")]
    Auth {
        /// Who.
        peer: String,
        /// Why.
        #[source]
        source: crate::auth::AuthError,
    },
}

impl From<TransportError> for NbdError {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Io { context, source } => NbdError::Io { context, source },
            TransportError::Refused(why) => NbdError::Invalid(why),
        }
    }
}

impl NbdError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> NbdError {
        let context = context.into();
        move |source| NbdError::Io { context, source }
    }
}

/// Name of an NBD error value, for messages.
pub fn errno_name(e: u32) -> &'static str {
    match e {
        0 => "success",
        proto::EPERM => "EPERM",
        proto::EIO => "EIO",
        proto::ENOMEM => "ENOMEM",
        proto::EINVAL => "EINVAL",
        proto::ENOSPC => "ENOSPC",
        proto::EOVERFLOW => "EOVERFLOW",
        proto::ENOTSUP => "ENOTSUP",
        proto::ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// Map a local errno to the NBD error value the protocol allows on the wire.
pub fn errno_to_nbd(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => proto::EPERM,
        libc::ENOMEM => proto::ENOMEM,
        libc::EINVAL => proto::EINVAL,
        libc::ENOSPC | libc::EFBIG | libc::EDQUOT => proto::ENOSPC,
        libc::EOVERFLOW => proto::EOVERFLOW,
        libc::EOPNOTSUPP => proto::ENOTSUP,
        libc::ESHUTDOWN => proto::ESHUTDOWN,
        _ => proto::EIO,
    }
}

#[cfg(test)]
mod tests;
