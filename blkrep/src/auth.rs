//! Peer authentication for the replication port: a key both nodes share (`--psk-file`),
//! proven in both directions before a single NBD byte is read.
//!
//! ```text
//!  secondary (accepts)                                  primary (connects)
//!    CHALLENGE  "LSAUTH" 0x00 0x01, nonce Ns (32)   ──────▶
//!               ◀──────  RESPONSE  purpose u8, nonce Nc (32), proof_c (32)
//!    VERDICT    status u8 (0 ok, 1 refused), proof_s (32)  ──────▶
//!    ... NBD negotiation (control option, or the replica export) ...
//!
//!  proof_c = HMAC-SHA256(k, "lockstep-auth client" | purpose | Ns | Nc)
//!  proof_s = HMAC-SHA256(k, "lockstep-auth server" | purpose | Ns | Nc)
//!  purpose 1, the control channel:  k = the peer key
//!  purpose 2, a data connection:    k = the session key of the control channel it serves,
//!                                   HMAC-SHA256(peer key, "lockstep-auth session" | Ns | Nc)
//!                                   of that channel's own exchange
//! ```
//!
//! Both nonces are fresh random numbers, so a recorded exchange cannot be replayed, and a
//! data connection can only be opened by whoever ran the control session it joins: the
//! secondary binds it to that session ([`SessionKeys`]), and a data connection of an ended
//! session is refused. The server reads exactly one RESPONSE (65 bytes) from an
//! unauthenticated peer and nothing else; the verdict comes after the proof is checked in
//! constant time.
//!
//! What this does not do: encrypt, or protect a connection from someone who can alter
//! packets on the path after the exchange. It is DRBD's `cram-hmac-alg` guarantee: only a
//! node that holds the key can become the peer.

use std::io;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// First bytes the secondary sends on an authenticated port: "LSAUTH", version 1.
pub const MAGIC: [u8; 8] = *b"LSAUTH\x00\x01";
const NONCE: usize = 32;
const PROOF: usize = 32;
/// The challenge, the response and the verdict, in bytes.
const CHALLENGE_LEN: usize = MAGIC.len() + NONCE;
const RESPONSE_LEN: usize = 1 + NONCE + PROOF;
const VERDICT_LEN: usize = 1 + PROOF;
/// A key file larger than this is not a key.
const MAX_KEY_FILE: u64 = 4096;
/// Fewer secret bytes than this are too easy to guess.
const MIN_SECRET: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// Why a peer was not authenticated, or a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The key file is unusable.
    #[error("peer key {path}: {reason}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The connection failed during the exchange.
    #[error("authentication: {0}")]
    Io(#[from] io::Error),
    /// The server speaks NBD at once: it does not ask for a key.
    #[error("the secondary does not ask for authentication (it runs without --psk-file, or is not a lockstep secondary); give both nodes the same --psk-file")]
    ServerWithoutAuth,
    /// The server sent something else than a challenge.
    #[error("the peer did not send a lockstep authentication challenge (got {0:02x?})")]
    NotAChallenge([u8; 8]),
    /// The server refused our proof.
    #[error("the secondary refused our key: the --psk-file contents differ between the nodes")]
    RefusedByServer,
    /// The server refused a data connection: its session is not the current one.
    #[error("the secondary refused the data connection: its session has ended")]
    SessionRefusedByServer,
    /// The server's proof is wrong: it does not hold our key.
    #[error("the secondary could not prove that it holds our key (a different --psk-file, or not our secondary)")]
    BadServerProof,
    /// The client's proof is wrong.
    #[error("wrong key (the peer's proof does not match our --psk-file)")]
    BadClientProof,
    /// A data connection for a session that is not the current one.
    #[error("a data connection for no current session (or for an ended one)")]
    NoSession,
    /// A purpose this version does not know.
    #[error("unknown connection purpose {0}")]
    UnknownPurpose(u8),
}

/// The key both nodes share, derived from the secret in the key file.
#[derive(Clone)]
pub struct PeerKey([u8; 32]);

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerKey(..)")
    }
}

impl PeerKey {
    /// The key of `secret` (any bytes, at least 16).
    pub fn from_secret(secret: &[u8]) -> Option<Self> {
        if secret.len() < MIN_SECRET {
            return None;
        }
        let mut h = Sha256::new();
        h.update(b"lockstep peer key v1");
        h.update(secret);
        Some(Self(h.finalize().into()))
    }

    /// Read the secret from `path`: a file only its owner may read, holding at least 16
    /// bytes (trailing whitespace, such as a newline, is not part of the secret). Generate
    /// one with `head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE`.
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        use std::os::unix::fs::PermissionsExt;
        let bad = |reason: String| AuthError::KeyFile {
            path: path.to_path_buf(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(bad(format!(
                "readable by others (mode {:o}); `chmod 600 {}`",
                meta.permissions().mode() & 0o777,
                path.display()
            )));
        }
        if meta.len() > MAX_KEY_FILE {
            return Err(bad(format!(
                "{} bytes; a key file holds at most {MAX_KEY_FILE}",
                meta.len()
            )));
        }
        let data = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let end = data
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        Self::from_secret(&data[..end]).ok_or_else(|| {
            bad(format!(
                "the secret is {end} bytes; use at least {MIN_SECRET} (e.g. `head -c 32 /dev/urandom | base64`)"
            ))
        })
    }
}

/// The key of one authenticated control session; data connections prove it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionKey([u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

/// What a connection is for, and the key that proves it.
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    /// The control channel: proven with the peer key.
    Control(&'a PeerKey),
    /// A data connection of the control session that holds this key.
    Data(&'a SessionKey),
}

impl Credential<'_> {
    fn purpose(&self) -> u8 {
        match self {
            Credential::Control(_) => PURPOSE_CONTROL,
            Credential::Data(_) => PURPOSE_DATA,
        }
    }
    fn key(&self) -> &[u8; 32] {
        match self {
            Credential::Control(k) => &k.0,
            Credential::Data(k) => &k.0,
        }
    }
}

const PURPOSE_CONTROL: u8 = 1;
const PURPOSE_DATA: u8 = 2;
const OK: u8 = 0;
const REFUSED: u8 = 1;
const REFUSED_SESSION: u8 = 2;

/// An authenticated connection, as the server sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// The control channel, and the key its data connections will prove.
    Control(SessionKey),
    /// A data connection of the session `session` ([`SessionKeys::current`]'s id).
    Data {
        /// The session it belongs to.
        session: u64,
    },
}

/// Where the server finds the session that data connections may join.
pub trait SessionKeys: Send + Sync + std::fmt::Debug {
    /// The current session's id and key, if a session is running.
    fn current(&self) -> Option<(u64, SessionKey)>;
}

fn mac(key: &[u8; 32], label: &[u8], purpose: u8, ns: &[u8], nc: &[u8]) -> HmacSha256 {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(label);
    m.update(&[purpose]);
    m.update(ns);
    m.update(nc);
    m
}

fn proof(key: &[u8; 32], label: &[u8], purpose: u8, ns: &[u8], nc: &[u8]) -> [u8; PROOF] {
    mac(key, label, purpose, ns, nc)
        .finalize()
        .into_bytes()
        .into()
}

fn session_key(peer: &PeerKey, ns: &[u8], nc: &[u8]) -> SessionKey {
    SessionKey(proof(&peer.0, b"lockstep-auth session", 0, ns, nc))
}

fn nonce() -> io::Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    getrandom::fill(&mut n).map_err(|e| io::Error::other(format!("no random numbers: {e}")))?;
    Ok(n)
}

/// The server's side of the exchange: challenge, check the response, give the verdict.
/// Reads exactly [`RESPONSE_LEN`] bytes. The caller bounds it in time.
pub async fn accept<R, W>(
    rd: &mut R,
    wr: &mut W,
    key: &PeerKey,
    sessions: &dyn SessionKeys,
) -> Result<Accepted, AuthError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let ns = nonce()?;
    let mut challenge = [0u8; CHALLENGE_LEN];
    challenge[..MAGIC.len()].copy_from_slice(&MAGIC);
    challenge[MAGIC.len()..].copy_from_slice(&ns);
    wr.write_all(&challenge).await?;
    wr.flush().await?;
    let mut r = [0u8; RESPONSE_LEN];
    rd.read_exact(&mut r).await?;
    let (purpose, nc, theirs) = (r[0], &r[1..1 + NONCE], &r[1 + NONCE..]);
    let (k, accepted) = match purpose {
        PURPOSE_CONTROL => (key.0, Accepted::Control(session_key(key, &ns, nc))),
        PURPOSE_DATA => match sessions.current() {
            Some((session, sk)) => (sk.0, Accepted::Data { session }),
            None => {
                refuse(wr, REFUSED_SESSION).await;
                return Err(AuthError::NoSession);
            }
        },
        other => {
            refuse(wr, REFUSED).await;
            return Err(AuthError::UnknownPurpose(other));
        }
    };
    if mac(&k, b"lockstep-auth client", purpose, &ns, nc)
        .verify_slice(theirs)
        .is_err()
    {
        let (code, e) = match purpose {
            PURPOSE_DATA => (REFUSED_SESSION, AuthError::NoSession),
            _ => (REFUSED, AuthError::BadClientProof),
        };
        refuse(wr, code).await;
        return Err(e);
    }
    let mut v = [0u8; VERDICT_LEN];
    v[0] = OK;
    v[1..].copy_from_slice(&proof(&k, b"lockstep-auth server", purpose, &ns, nc));
    wr.write_all(&v).await?;
    wr.flush().await?;
    Ok(accepted)
}

async fn refuse<W: AsyncWrite + Unpin>(wr: &mut W, code: u8) {
    let mut v = [0u8; VERDICT_LEN];
    v[0] = code;
    let _ = wr.write_all(&v).await;
    let _ = wr.flush().await;
}

/// The client's side: answer the challenge with `cred`, check the server's proof. Returns
/// the session key for a control channel (its data connections prove it).
pub async fn connect<R, W>(
    rd: &mut R,
    wr: &mut W,
    cred: Credential<'_>,
) -> Result<Option<SessionKey>, AuthError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut magic = [0u8; MAGIC.len()];
    rd.read_exact(&mut magic).await?;
    if magic != MAGIC {
        return Err(if &magic == b"NBDMAGIC" {
            AuthError::ServerWithoutAuth
        } else {
            AuthError::NotAChallenge(magic)
        });
    }
    let mut ns = [0u8; NONCE];
    rd.read_exact(&mut ns).await?;
    let nc = nonce()?;
    let purpose = cred.purpose();
    let mut r = [0u8; RESPONSE_LEN];
    r[0] = purpose;
    r[1..1 + NONCE].copy_from_slice(&nc);
    r[1 + NONCE..].copy_from_slice(&proof(
        cred.key(),
        b"lockstep-auth client",
        purpose,
        &ns,
        &nc,
    ));
    wr.write_all(&r).await?;
    wr.flush().await?;
    let mut v = [0u8; VERDICT_LEN];
    rd.read_exact(&mut v).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            AuthError::RefusedByServer
        } else {
            AuthError::Io(e)
        }
    })?;
    match v[0] {
        OK => {}
        REFUSED_SESSION => return Err(AuthError::SessionRefusedByServer),
        _ => return Err(AuthError::RefusedByServer),
    }
    mac(cred.key(), b"lockstep-auth server", purpose, &ns, &nc)
        .verify_slice(&v[1..])
        .map_err(|_| AuthError::BadServerProof)?;
    Ok(match cred {
        Credential::Control(k) => Some(session_key(k, &ns, &nc)),
        Credential::Data(_) => None,
    })
}

/// Whether a replication port may listen on `ep` with or without a key: without one it
/// must be loopback-only (or a unix socket), unless the operator opted out by name
/// (`insecure`). Returns a notice to log, or why the port may not open.
pub fn listen_policy(
    ep: &crate::transport::Endpoint,
    has_key: bool,
    insecure: bool,
) -> Result<Option<String>, String> {
    use std::net::ToSocketAddrs;
    let crate::transport::Endpoint::Tcp(addr) = ep else {
        return Ok((!has_key).then(|| {
            format!(
                "{ep}: no --psk-file; the port accepts any local process that may open the socket"
            )
        }));
    };
    if has_key {
        return Ok(None);
    }
    let resolved: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .collect();
    let local = !resolved.is_empty() && resolved.iter().all(|a| a.ip().is_loopback());
    if local {
        return Ok(Some(format!(
            "{ep}: no --psk-file; listening on loopback only, where any local process can reach the port"
        )));
    }
    if insecure {
        return Ok(Some(format!(
            "{ep}: --insecure-no-auth: ANYONE WHO REACHES THIS ADDRESS CAN WRITE THIS DISK, pose as its primary or make it fail over"
        )));
    }
    Err(format!(
        "refusing to listen on {addr} without peer authentication: anyone who reaches it could write this disk or pose as its primary. Give both nodes the same --psk-file (e.g. `head -c 32 /dev/urandom | base64 > /etc/lockstep/peer.key; chmod 600 /etc/lockstep/peer.key`), listen on loopback, or accept the risk with --insecure-no-auth"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    struct OneSession(Mutex<Option<(u64, SessionKey)>>);
    impl SessionKeys for OneSession {
        fn current(&self) -> Option<(u64, SessionKey)> {
            *self.0.lock().unwrap()
        }
    }

    fn key(s: &str) -> PeerKey {
        PeerKey::from_secret(s.as_bytes()).unwrap()
    }

    async fn pair(
        server_key: &PeerKey,
        sessions: &OneSession,
        cred: Credential<'_>,
    ) -> (
        Result<Accepted, AuthError>,
        Result<Option<SessionKey>, AuthError>,
    ) {
        let (a, b) = tokio::io::duplex(1024);
        let (mut ar, mut aw) = tokio::io::split(a);
        let (mut br, mut bw) = tokio::io::split(b);
        tokio::join!(
            accept(&mut ar, &mut aw, server_key, sessions),
            connect(&mut br, &mut bw, cred)
        )
    }

    #[tokio::test]
    async fn same_key_authenticates_both_ways_and_agrees_on_the_session_key() {
        let k = key("correct horse battery staple");
        let s = OneSession::default();
        let (srv, cli) = pair(&k, &s, Credential::Control(&k)).await;
        let Accepted::Control(server_sk) = srv.unwrap() else {
            panic!("not a control channel")
        };
        assert_eq!(Some(server_sk), cli.unwrap());
    }

    #[tokio::test]
    async fn a_wrong_key_is_refused_on_both_sides() {
        let s = OneSession::default();
        let (srv, cli) = pair(
            &key("correct horse battery staple"),
            &s,
            Credential::Control(&key("incorrect horse battery staple")),
        )
        .await;
        assert!(matches!(srv, Err(AuthError::BadClientProof)), "{srv:?}");
        assert!(matches!(cli, Err(AuthError::RefusedByServer)), "{cli:?}");
    }

    #[tokio::test]
    async fn data_connections_need_the_current_session_key() {
        let k = key("correct horse battery staple");
        let s = OneSession::default();
        let (_, cli) = pair(&k, &s, Credential::Control(&k)).await;
        let sk = cli.unwrap().unwrap();
        // No session installed yet: refused.
        let (srv, cli) = pair(&k, &s, Credential::Data(&sk)).await;
        assert!(matches!(srv, Err(AuthError::NoSession)), "{srv:?}");
        assert!(
            matches!(cli, Err(AuthError::SessionRefusedByServer)),
            "{cli:?}"
        );
        *s.0.lock().unwrap() = Some((7, sk));
        let (srv, cli) = pair(&k, &s, Credential::Data(&sk)).await;
        assert_eq!(srv.unwrap(), Accepted::Data { session: 7 });
        assert_eq!(cli.unwrap(), None);
        // The peer key itself is not a session key.
        let (srv, _) = pair(&k, &s, Credential::Data(&SessionKey(k.0))).await;
        assert!(matches!(srv, Err(AuthError::NoSession)), "{srv:?}");
        // A newer session's key replaces the old one.
        let (_, cli) = pair(&k, &s, Credential::Control(&k)).await;
        *s.0.lock().unwrap() = Some((8, cli.unwrap().unwrap()));
        let (srv, _) = pair(&k, &s, Credential::Data(&sk)).await;
        assert!(matches!(srv, Err(AuthError::NoSession)), "{srv:?}");
    }

    #[tokio::test]
    async fn a_server_that_does_not_ask_is_named() {
        let (a, b) = tokio::io::duplex(1024);
        let (_ar, mut aw) = tokio::io::split(a);
        let (mut br, mut bw) = tokio::io::split(b);
        aw.write_all(b"NBDMAGICIHAVEOPT\x00\x03").await.unwrap();
        let k = key("correct horse battery staple");
        let r = connect(&mut br, &mut bw, Credential::Control(&k)).await;
        assert!(matches!(r, Err(AuthError::ServerWithoutAuth)), "{r:?}");
    }

    #[tokio::test]
    async fn the_server_reads_no_more_than_one_response() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (mut ar, mut aw) = tokio::io::split(a);
        let (mut br, mut bw) = tokio::io::split(b);
        let k = key("correct horse battery staple");
        let s = OneSession::default();
        // An attacker streams an NBD request after garbage: the server stops after 65 bytes.
        let attacker = async {
            let mut c = [0u8; CHALLENGE_LEN];
            br.read_exact(&mut c).await.unwrap();
            bw.write_all(&[0x55u8; 4096]).await.unwrap();
            bw.flush().await.unwrap();
        };
        let (srv, ()) = tokio::join!(accept(&mut ar, &mut aw, &k, &s), attacker);
        assert!(srv.is_err());
        let mut rest = Vec::new();
        drop((br, bw));
        ar.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest.len(), 4096 - RESPONSE_LEN);
    }

    #[test]
    fn without_a_key_only_loopback_listens() {
        use crate::transport::Endpoint;
        let tcp = |a: &str| Endpoint::Tcp(a.into());
        assert!(listen_policy(&tcp("127.0.0.1:1"), false, false)
            .unwrap()
            .unwrap()
            .contains("loopback only"));
        assert!(listen_policy(&tcp("[::1]:1"), false, false).is_ok());
        assert!(listen_policy(&tcp("127.0.0.9:1"), false, false).is_ok());
        let e = listen_policy(&tcp("0.0.0.0:1"), false, false).unwrap_err();
        assert!(
            e.contains("--psk-file") && e.contains("--insecure-no-auth"),
            "{e}"
        );
        assert!(listen_policy(&tcp("0.0.0.0:1"), false, true)
            .unwrap()
            .unwrap()
            .contains("ANYONE"));
        assert_eq!(listen_policy(&tcp("0.0.0.0:1"), true, false), Ok(None));
        assert!(listen_policy(&Endpoint::Unix("/tmp/x".into()), false, false).is_ok());
    }

    #[test]
    fn key_files_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::fs::write(&p, "short\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = PeerKey::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("at least 16"), "{e}");
        std::fs::write(&p, "0123456789abcdef0123\n").unwrap();
        let a = PeerKey::from_file(&p).unwrap();
        std::fs::write(&p, "0123456789abcdef0123").unwrap();
        assert_eq!(
            a.0,
            PeerKey::from_file(&p).unwrap().0,
            "a newline is no part"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = PeerKey::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        let e = PeerKey::from_file(&d.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none"), "{e}");
    }
}
