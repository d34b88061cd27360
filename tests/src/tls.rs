//! X.509 test credentials made with the `openssl` command-line tool, laid out the way QEMU,
//! nbdkit and libnbd look for them.
//!
//! [`TestPki::generate`] writes into one directory:
//!
//! | file | what |
//! |------|------|
//! | `ca-cert.pem`, `ca-key.pem` | the test CA |
//! | `server-cert.pem`, `server-key.pem` | CN `localhost`, SAN `DNS:localhost, IP:127.0.0.1`, EKU serverAuth + clientAuth |
//! | `client-cert.pem`, `client-key.pem` | CN `lockstep-client`, EKU clientAuth |
//! | `rogue-ca-cert.pem`, `rogue-ca-key.pem` | a second, unrelated CA |
//! | `rogue-cert.pem`, `rogue-key.pem` | CN `lockstep-client`, EKU clientAuth, signed by the rogue CA |
//!
//! So the directory itself is a valid credentials directory for
//! - a TLS server: nbdkit `--tls-certificates=DIR`, QEMU `tls-creds-x509,endpoint=server,dir=DIR`
//!   (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`);
//! - a TLS client: libnbd `nbds://HOST:PORT/?tls-certificates=DIR`, QEMU
//!   `tls-creds-x509,endpoint=client,dir=DIR` (`ca-cert.pem`, `client-cert.pem`,
//!   `client-key.pem`).
//!
//! Keys are EC P-256 in PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, what `openssl genpkey`
//! writes); GnuTLS (nbdkit, libnbd, QEMU) and rustls all take them. Certificates are valid for
//! two days from now.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::run_ok;

const T: Duration = Duration::from_secs(30);

/// Test certificates in a directory; see the module documentation for the layout.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The directory holding every file.
    pub dir: PathBuf,
}

/// Extensions of a CA certificate (`openssl req -x509 -extensions v3_ca`).
const CA_CONF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
";

/// Extensions of the server certificate; clientAuth as well so that one lockstep daemon can
/// use the same kind of certificate to dial its peer.
const SERVER_EXT: &str = "\
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// Extensions of a client certificate.
const CLIENT_EXT: &str = "\
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

impl TestPki {
    /// Generate every credential into `dir` (created if missing), with `openssl`.
    pub fn generate(dir: &Path) -> TestPki {
        std::fs::create_dir_all(dir).expect("create the PKI directory");
        let pki = TestPki {
            dir: dir.to_path_buf(),
        };
        let conf = dir.join(".openssl-req.cnf");
        std::fs::write(&conf, CA_CONF).expect("write openssl config");

        pki.make_ca("ca", "lockstep test CA", &conf, 1);
        pki.make_leaf("server", "localhost", SERVER_EXT, "ca", &conf, 2);
        pki.make_leaf("client", "lockstep-client", CLIENT_EXT, "ca", &conf, 3);
        pki.make_ca("rogue-ca", "rogue test CA", &conf, 4);
        pki.make_leaf("rogue", "lockstep-client", CLIENT_EXT, "rogue-ca", &conf, 5);

        let _ = std::fs::remove_file(&conf);
        pki
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca-cert.pem")
    }

    /// The server certificate (CN/SAN localhost, IP SAN 127.0.0.1).
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server-cert.pem")
    }

    /// The server key (PKCS#8 PEM).
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }

    /// The client certificate (CN lockstep-client).
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client-cert.pem")
    }

    /// The client key (PKCS#8 PEM).
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client-key.pem")
    }

    /// The unrelated CA.
    pub fn rogue_ca(&self) -> PathBuf {
        self.dir.join("rogue-ca-cert.pem")
    }

    /// A client certificate signed by the unrelated CA.
    pub fn rogue_cert(&self) -> PathBuf {
        self.dir.join("rogue-cert.pem")
    }

    /// The key of [`TestPki::rogue_cert`].
    pub fn rogue_key(&self) -> PathBuf {
        self.dir.join("rogue-key.pem")
    }

    /// Make `DIR/name/` a client credentials directory for libnbd and QEMU: `cert` and `key`
    /// copied as `client-cert.pem` and `client-key.pem` (when given), and the certificates in
    /// `cas` concatenated into `ca-cert.pem`. Returns the directory.
    ///
    /// QEMU refuses to load a client certificate that does not chain to its own
    /// `ca-cert.pem`, so a directory presenting the rogue certificate to a server must trust
    /// both CAs; see [`TestPki::rogue_client_dir`].
    pub fn client_dir_with(
        &self,
        name: &str,
        cert: Option<&Path>,
        key: Option<&Path>,
        cas: &[&Path],
    ) -> PathBuf {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d).expect("create client dir");
        let mut bundle = Vec::new();
        for ca in cas {
            bundle.extend(std::fs::read(ca).expect("read CA certificate"));
        }
        std::fs::write(d.join("ca-cert.pem"), bundle).expect("write ca-cert.pem");
        for (src, to) in [(cert, "client-cert.pem"), (key, "client-key.pem")] {
            if let Some(src) = src {
                std::fs::copy(src, d.join(to)).expect("copy client credential");
            }
        }
        d
    }

    /// A client directory that trusts the real server (and the rogue CA) but presents the
    /// rogue certificate: a server verifying peers must refuse it.
    pub fn rogue_client_dir(&self) -> PathBuf {
        self.client_dir_with(
            "rogue-client",
            Some(&self.rogue_cert()),
            Some(&self.rogue_key()),
            &[&self.ca(), &self.rogue_ca()],
        )
    }

    fn path(&self, file: String) -> String {
        self.dir
            .join(file)
            .to_str()
            .expect("utf-8 path")
            .to_string()
    }

    fn genkey(&self, key: &str) {
        run_ok(
            "openssl",
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                key,
            ],
            T,
        );
    }

    /// Self-signed CA `{name}-cert.pem`, `{name}-key.pem`.
    fn make_ca(&self, name: &str, cn: &str, conf: &Path, serial: u32) {
        let key = self.path(format!("{name}-key.pem"));
        self.genkey(&key);
        run_ok(
            "openssl",
            &[
                "req",
                "-new",
                "-x509",
                "-config",
                conf.to_str().expect("utf-8 path"),
                "-extensions",
                "v3_ca",
                "-subj",
                &format!("/CN={cn}"),
                "-key",
                &key,
                "-set_serial",
                &serial.to_string(),
                "-days",
                "2",
                "-out",
                &self.path(format!("{name}-cert.pem")),
            ],
            T,
        );
    }

    /// `{name}-cert.pem`, `{name}-key.pem` signed by the CA `{ca}-cert.pem`.
    fn make_leaf(&self, name: &str, cn: &str, ext: &str, ca: &str, conf: &Path, serial: u32) {
        let key = self.path(format!("{name}-key.pem"));
        let csr = self.path(format!(".{name}.csr"));
        let extfile = self.path(format!(".{name}.ext"));
        self.genkey(&key);
        run_ok(
            "openssl",
            &[
                "req",
                "-new",
                "-config",
                conf.to_str().expect("utf-8 path"),
                "-subj",
                &format!("/CN={cn}"),
                "-key",
                &key,
                "-out",
                &csr,
            ],
            T,
        );
        std::fs::write(&extfile, ext).expect("write extensions file");
        run_ok(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &self.path(format!("{ca}-cert.pem")),
                "-CAkey",
                &self.path(format!("{ca}-key.pem")),
                "-set_serial",
                &serial.to_string(),
                "-days",
                "2",
                "-extfile",
                &extfile,
                "-out",
                &self.path(format!("{name}-cert.pem")),
            ],
            T,
        );
        let _ = std::fs::remove_file(&csr);
        let _ = std::fs::remove_file(&extfile);
    }
}
