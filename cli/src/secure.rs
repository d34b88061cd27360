//! Certificate flags shared by `export`, `primary` and `secondary`.

use std::path::PathBuf;

use blkrep::tls::TlsFiles;
use clap::Args;

/// TLS certificates (PEM files).
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// This node's certificate (chain), PEM. Turns TLS on.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert, PEM (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA that peers' certificates must chain to, PEM.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The files, if TLS was asked for.
    pub fn files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            ca: self.tls_ca.clone(),
        })
    }

    /// The files for the replication link, where both nodes verify each other: the CA is
    /// required.
    pub fn link_files(&self) -> anyhow::Result<Option<TlsFiles>> {
        match self.files() {
            Some(f) if f.ca.is_none() => anyhow::bail!(
                "--tls-cert on the replication link needs --tls-ca: both nodes verify each other's certificate"
            ),
            f => Ok(f),
        }
    }
}
