//! TLS with rustls (ring): certificates from PEM files, and the upgrade of a connection's two
//! halves to TLS and back into two halves, for the two places lockstep uses it:
//!
//! * the replication port, TLS from the first byte, both nodes presenting a certificate of
//!   the same CA (`--tls-cert/--tls-key/--tls-ca` on `primary` and `secondary`);
//! * NBD exports, `NBD_OPT_STARTTLS` during negotiation (`lockstep export --tls-cert …`),
//!   as qemu, nbdkit and libnbd clients do it.
//!
//! rustls has no TLS-PSK, so a key shared without certificates (`--psk-file`) is
//! `crate::auth`'s challenge-response instead; the two combine (TLS first, then the key).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::AsyncReadExt;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::transport::{ReadHalf, WriteHalf};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file is unusable.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the combination.
    #[error("TLS setup: {0}")]
    Config(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::File {
        path: path.to_path_buf(),
        reason,
    };
    let v = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if v.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(v)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        reason: format!("no usable private key (PEM, PKCS#8, PKCS#1 or SEC1): {e}"),
    })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut r = RootCertStore::empty();
    for c in certs(path)? {
        r.add(c).map_err(|e| TlsError::File {
            path: path.to_path_buf(),
            reason: format!("not a CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(r))
}

/// Certificate files: this node's certificate chain and key, and the CA that peers'
/// certificates must chain to (required for the replication port, optional for exports).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This node's certificate (chain), PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// The CA, PEM.
    pub ca: Option<PathBuf>,
}

/// A TLS server configuration, ready to accept connections.
#[derive(Clone)]
pub struct ServerTls(TlsAcceptor);

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls(..)")
    }
}

/// The server side: present `files.cert`; with `verify_peer`, demand a client certificate
/// that chains to `files.ca`.
pub fn acceptor(files: &TlsFiles, verify_peer: bool) -> Result<ServerTls, TlsError> {
    let b = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let b = if verify_peer {
        let ca = files.ca.as_deref().ok_or_else(|| {
            TlsError::Config("verifying peers needs a CA certificate (--tls-ca)".into())
        })?;
        let v = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        b.with_client_cert_verifier(v)
    } else {
        b.with_no_client_auth()
    };
    let cfg = b
        .with_single_cert(certs(&files.cert)?, key(&files.key)?)
        .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
    Ok(ServerTls(TlsAcceptor::from(Arc::new(cfg))))
}

/// The client side: trust servers whose certificate chains to `files.ca`, and present
/// `files.cert`.
pub fn connector(files: &TlsFiles) -> Result<TlsConnector, TlsError> {
    let ca = files
        .ca
        .as_deref()
        .ok_or_else(|| TlsError::Config("a TLS client needs a CA certificate (--tls-ca)".into()))?;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(certs(&files.cert)?, key(&files.key)?)
        .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
    Ok(TlsConnector::from(Arc::new(cfg)))
}

/// A TLS client for one server address: the connector and the name its certificate must
/// carry (the host part of `host:port`, an IP address or a DNS name).
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// TLS to `addr` ("host:port"; "[v6]:port").
    pub fn new(files: &TlsFiles, addr: &str) -> Result<Self, TlsError> {
        let host = match addr.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
            None => addr,
        };
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| TlsError::Config(format!("{host:?} is no server name: {e}")))?;
        Ok(Self {
            connector: connector(files)?,
            name,
        })
    }
}

/// What a failed read or write on a TLS connection means for the operator, when it was the
/// peer refusing the handshake (a TLS 1.3 client learns of it at its first read).
pub fn refusal(e: &io::Error) -> Option<String> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(match inner {
        rustls::Error::AlertReceived(alert) => {
            format!("TLS: the peer refused our certificate or handshake ({alert:?}): do both nodes use certificates of the same CA?")
        }
        other => format!("TLS: {other}"),
    })
}

/// Put two halves back together, with bytes already read from `rd` in front.
fn joined(
    buffered: Vec<u8>,
    rd: ReadHalf,
    wr: WriteHalf,
) -> tokio::io::Join<tokio::io::Chain<io::Cursor<Vec<u8>>, ReadHalf>, WriteHalf> {
    tokio::io::join(io::Cursor::new(buffered).chain(rd), wr)
}

fn halves<T>(s: T) -> (ReadHalf, WriteHalf)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(s);
    (Box::new(r), Box::new(w))
}

/// The server's handshake on a connection; `buffered` are bytes of it already read.
pub async fn accept(
    acceptor: &ServerTls,
    buffered: Vec<u8>,
    rd: ReadHalf,
    wr: WriteHalf,
) -> io::Result<(ReadHalf, WriteHalf)> {
    let s = acceptor.0.accept(joined(buffered, rd, wr)).await?;
    Ok(halves(s))
}

/// The client's handshake on a connection.
pub async fn connect(
    tls: &ClientTls,
    rd: ReadHalf,
    wr: WriteHalf,
) -> io::Result<(ReadHalf, WriteHalf)> {
    let s = tls
        .connector
        .connect(tls.name.clone(), joined(Vec::new(), rd, wr))
        .await?;
    Ok(halves(s))
}
