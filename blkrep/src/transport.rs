//! Where connections come from: TCP or unix sockets, behind one type.
//!
//! NBD ([`crate::nbd`]), the peer key exchange ([`crate::auth`]) and TLS ([`crate::tls`])
//! all run over these; none of them is needed here, so each may depend on this module.
//! Failures are a [`TransportError`], which [`crate::nbd::NbdError`] converts from.

use std::fmt;
use std::io;
use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Why a listener could not be bound or a connection not be made.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The address may not be used (a unix socket path that is not a stale socket).
    #[error("{0}")]
    Refused(String),
}

impl TransportError {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> TransportError {
        let context = context.into();
        move |source| TransportError::Io { context, source }
    }
}

/// An address to listen on or connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `host:port`.
    Tcp(String),
    /// A unix socket path.
    Unix(PathBuf),
}

/// Where NBD servers listen by default: loopback, on the port IANA assigned to NBD.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:10809";

/// The forms an endpoint is written in, for messages.
const ENDPOINT_FORMS: &str =
    "ADDR:PORT, e.g. 127.0.0.1:10809 or [::1]:10809, :PORT, unix:PATH, nbd://ADDR[:PORT] or nbd+unix:///?socket=PATH";

/// NBD's port (IANA), which an `nbd://HOST` URI without one means.
const NBD_PORT: u16 = 10809;

impl std::str::FromStr for Endpoint {
    type Err = String;

    /// Parse the one way lockstep names an endpoint everywhere: `ADDR:PORT` (a host name, an
    /// IPv4 address or a bracketed IPv6 address), `:PORT` (every IPv4 address, 0.0.0.0),
    /// `unix:PATH`, or an NBD URI without an export name: `nbd://ADDR[:PORT][/]` (port 10809
    /// when left out), `nbd+unix:///?socket=PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            return unix_uri(s, rest);
        }
        if let Some(rest) = s.strip_prefix("nbd://") {
            let rest = uri_path(s, rest)?;
            // A trailing "/" names the default export: fine.
            let addr = rest.strip_suffix('/').unwrap_or(rest);
            if addr.contains('/') {
                return Err(no_name(s));
            }
            if addr.contains(':') && !addr.ends_with(']') {
                return tcp(s, addr);
            }
            return tcp(s, &format!("{addr}:{NBD_PORT}"));
        }
        if let Some(scheme) = ["nbds://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://"]
            .iter()
            .find(|p| s.starts_with(*p))
        {
            return Err(format!(
                "{s:?}: {scheme} is not supported here (TLS is set with --tls-cert; use {ENDPOINT_FORMS})"
            ));
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{s:?} names no socket path (use unix:PATH)"));
            }
            return Ok(Endpoint::Unix(path.into()));
        }
        if s.starts_with('/') || s.starts_with('.') {
            return Err(format!(
                "{s:?} is not an endpoint: write unix:{s} for a unix socket"
            ));
        }
        if let Some(port) = s.strip_prefix(':') {
            // Every address, as `ss` and many daemons write it.
            return tcp(s, &format!("0.0.0.0:{port}"));
        }
        tcp(s, s)
    }
}

/// `what` (as written: `s`) checked as ADDR:PORT.
fn tcp(s: &str, what: &str) -> Result<Endpoint, String> {
    let Some((host, port)) = what.rsplit_once(':') else {
        return Err(format!(
            "{s:?} is not an endpoint: no port (use {ENDPOINT_FORMS})"
        ));
    };
    if host.is_empty() || host == "[]" || host.contains(char::is_whitespace) {
        return Err(format!(
            "{s:?} is not an endpoint: no address before the port (use {ENDPOINT_FORMS})"
        ));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!(
            "{s:?} is not an endpoint: an IPv6 address goes in brackets, [ADDR]:PORT"
        ));
    }
    if host.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "{s:?} is not an endpoint: {host:?} is not an address (use {ENDPOINT_FORMS})"
        ));
    }
    if port.parse::<u16>().is_err() {
        return Err(format!(
            "{s:?} is not an endpoint: {port:?} is not a port number (0 to 65535)"
        ));
    }
    Ok(Endpoint::Tcp(what.to_string()))
}

/// An NBD URI's part after the scheme, without query: refused if it has one.
fn uri_path<'a>(s: &str, rest: &'a str) -> Result<&'a str, String> {
    if rest.contains('?') {
        return Err(format!(
            "{s:?}: query parameters are not used here (use {ENDPOINT_FORMS})"
        ));
    }
    Ok(rest)
}

fn no_name(s: &str) -> String {
    format!("{s:?}: an export name does not belong in this address (the export's name is a flag of its own, --name; or fixed); write the address only")
}

/// `nbd+unix:///?socket=PATH` (`rest` follows the scheme).
fn unix_uri(s: &str, rest: &str) -> Result<Endpoint, String> {
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if !path.starts_with('/') {
        return Err(format!(
            "{s:?}: an nbd+unix URI has no host: nbd+unix:///?socket=PATH"
        ));
    }
    if path != "/" {
        return Err(no_name(s));
    }
    let mut socket = None;
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some(("socket", p)) if !p.is_empty() => socket = Some(p),
            _ => {
                return Err(format!(
                    "{s:?}: only ?socket=PATH is used in an nbd+unix URI"
                ))
            }
        }
    }
    match socket {
        Some(p) => Ok(Endpoint::Unix(p.into())),
        None => Err(format!("{s:?} names no socket: nbd+unix:///?socket=PATH")),
    }
}

impl Endpoint {
    /// The NBD URI of export `name` here (`nbd://ADDR:PORT/NAME`,
    /// `nbd+unix:///NAME?socket=PATH`), for logs and clients.
    pub fn uri(&self, name: &str) -> String {
        match self {
            Endpoint::Tcp(a) => format!("nbd://{a}/{name}"),
            Endpoint::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
        }
    }
}

impl fmt::Display for Endpoint {
    /// The URI of the default export; it parses back to the same endpoint.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "nbd://{a}"),
            Endpoint::Unix(p) => write!(f, "nbd+unix:///?socket={}", p.display()),
        }
    }
}

/// The read half of a connection.
pub type ReadHalf = Box<dyn AsyncRead + Unpin + Send>;
/// The write half of a connection.
pub type WriteHalf = Box<dyn AsyncWrite + Unpin + Send>;

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix; the path is removed when the listener is dropped.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Bind `ep`. A stale unix socket file is replaced; a path held by a live server is not,
    /// and neither is anything that is not a socket (a typo must not delete a file).
    pub async fn bind(ep: &Endpoint) -> Result<Self, TransportError> {
        match ep {
            Endpoint::Tcp(a) => TcpListener::bind(a)
                .await
                .map(Listener::Tcp)
                .map_err(TransportError::io(format!("cannot listen on {a}"))),
            Endpoint::Unix(p) => {
                // Not followed: a symlink is not ours to replace either.
                if let Ok(m) = std::fs::symlink_metadata(p) {
                    use std::os::unix::fs::FileTypeExt;
                    if !m.file_type().is_socket() {
                        return Err(TransportError::Refused(format!(
                            "{} exists and is not a socket: refusing to replace it",
                            p.display()
                        )));
                    }
                }
                if p.exists() {
                    if UnixStream::connect(p).await.is_ok() {
                        return Err(TransportError::Refused(format!(
                            "{} is in use by a running server",
                            p.display()
                        )));
                    }
                    let _ = std::fs::remove_file(p);
                }
                UnixListener::bind(p)
                    .map(|l| Listener::Unix(l, p.clone()))
                    .map_err(TransportError::io(format!(
                        "cannot listen on {}",
                        p.display()
                    )))
            }
        }
    }

    /// The bound address (TCP port resolved).
    pub fn local_endpoint(&self) -> Endpoint {
        match self {
            Listener::Tcp(l) => {
                Endpoint::Tcp(l.local_addr().map(|a| a.to_string()).unwrap_or_default())
            }
            Listener::Unix(_, p) => Endpoint::Unix(p.clone()),
        }
    }

    /// Accept one connection: (read half, write half, peer description).
    pub async fn accept(&self) -> std::io::Result<(ReadHalf, WriteHalf, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, a) = l.accept().await?;
                s.set_nodelay(true)?;
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w), a.to_string()))
            }
            Listener::Unix(l, p) => {
                let (s, _) = l.accept().await?;
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w), format!("unix:{}", p.display())))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Connect to `ep`: (read half, write half).
pub async fn connect(ep: &Endpoint) -> Result<(ReadHalf, WriteHalf), TransportError> {
    match ep {
        Endpoint::Tcp(a) => {
            let s = TcpStream::connect(a)
                .await
                .map_err(TransportError::io(format!("cannot connect to {a}")))?;
            s.set_nodelay(true)
                .map_err(TransportError::io("setting TCP_NODELAY"))?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        Endpoint::Unix(p) => {
            let s = UnixStream::connect(p)
                .await
                .map_err(TransportError::io(format!(
                    "cannot connect to {}",
                    p.display()
                )))?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Endpoint, String> {
        s.parse()
    }

    #[test]
    fn endpoints_parse() {
        let tcp = |a: &str| Endpoint::Tcp(a.into());
        let unix = |p: &str| Endpoint::Unix(p.into());
        for (s, want) in [
            ("127.0.0.1:10809", tcp("127.0.0.1:10809")),
            ("node-b:10900", tcp("node-b:10900")),
            ("[::1]:0", tcp("[::1]:0")),
            ("unix:/run/l.sock", unix("/run/l.sock")),
            ("unix:rel.sock", unix("rel.sock")),
            (DEFAULT_ENDPOINT, tcp(DEFAULT_ENDPOINT)),
            (":10809", tcp("0.0.0.0:10809")),
            ("nbd://node-b:10900", tcp("node-b:10900")),
            ("nbd://node-b:10900/", tcp("node-b:10900")),
            ("nbd://node-b", tcp("node-b:10809")),
            ("nbd://[::1]", tcp("[::1]:10809")),
            ("nbd://[::1]:7/", tcp("[::1]:7")),
            ("nbd+unix:///?socket=/run/l.sock", unix("/run/l.sock")),
            ("nbd+unix:///?socket=rel.sock", unix("rel.sock")),
        ] {
            assert_eq!(parse(s), Ok(want.clone()), "{s}");
            // What is shown parses back.
            assert_eq!(parse(&want.to_string()), Ok(want), "{s}");
        }
    }

    /// `:PORT` is every address: a secondary's listen there still needs authentication.
    #[test]
    fn every_address_is_not_loopback() {
        let any = parse(":10809").unwrap();
        assert!(crate::auth::listen_policy(&any, false, false).is_err());
        assert!(crate::auth::listen_policy(&any, true, false).is_ok());
    }

    #[test]
    fn uris_name_the_export_in_the_path() {
        let unix = Endpoint::Unix("/run/ro.sock".into());
        assert_eq!(unix.uri("a"), "nbd+unix:///a?socket=/run/ro.sock");
        assert_eq!(Endpoint::Tcp("h:1".into()).uri("a"), "nbd://h:1/a");
    }

    #[test]
    fn bad_endpoints_say_why() {
        for (s, why) in [
            ("", "no port"),
            ("localhost", "no port"),
            (":", "not a port number"),
            (":x", "not a port number"),
            ("nbd://h:1/name", "export name"),
            ("nbd+unix:///name?socket=/s", "export name"),
            ("nbd+unix:///", "names no socket"),
            ("nbd+unix://host/?socket=/s", "no host"),
            ("nbd://h:1?tls=1", "query"),
            ("nbds://h:1", "not supported here"),
            ("nbd://", "no address"),
            ("127.0.0.1:http", "not a port number"),
            ("127.0.0.1:70000", "not a port number"),
            ("::1:10809", "in brackets"),
            ("unix:", "no socket path"),
            ("/run/l.sock", "write unix:/run/l.sock"),
        ] {
            let e = parse(s).expect_err(s);
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }
}
