//! netcmp's packet mode between network namespaces: three namespaces (the client, the
//! primary replica, the secondary replica), `lockstep netcmp --packet` joining them through
//! TAP interfaces it creates (or, for the secondary, through QEMU's `-netdev stream`), and the
//! same services in both replicas' namespaces on the same MAC and IP address. Also a peer of
//! a `unix:` port. Used by `tests/netcmp_packet.rs`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::control::{control_status, tail, wait_status};
use crate::netns::{require_root, unique_id, Netns};
use crate::{lockstep_bin, random_file, require, run_ok, Daemon};

/// The replicas' address (both have it).
pub const SERVICE: &str = "10.77.0.1";
/// The replicas' MAC address (both have it).
pub const SERVICE_MAC: &str = "02:00:00:77:00:01";
/// The client's MAC address.
pub const CLIENT_MAC: &str = "02:00:00:77:00:02";
/// The size of the file the replicas serve.
pub const BIG: usize = 6 << 20;
/// Deadline for each step.
pub const T: Duration = Duration::from_secs(30);

/// The number at a dotted `path` of a status (`ports.client.frames_in`).
pub fn num(v: &Value, path: &str) -> u64 {
    let mut x = v;
    for k in path.split('.') {
        x = &x[k];
    }
    x.as_u64().unwrap_or_else(|| panic!("no {path} in {v}"))
}

/// The three namespaces, netcmp between them, the services in the replicas'.
#[derive(Debug)]
pub struct Lab {
    // Dropped in this order: the services, QEMU, netcmp (its TAPs go with it), the namespaces.
    // (Some are only kept for their drop.)
    _services: Vec<Daemon>,
    /// QEMU bridging the secondary's `unix:` port to its TAP, if asked for.
    pub qemu: Option<Daemon>,
    /// netcmp.
    pub netcmp: Daemon,
    /// netcmp's control socket.
    pub sock: PathBuf,
    /// The file the replicas serve.
    pub big: PathBuf,
    /// The client's namespace.
    pub client: Netns,
    _primary: Netns,
    _secondary: Netns,
}

impl Lab {
    /// Everything up and answering. With `qemu`, the secondary's port is `unix:` and QEMU
    /// bridges it to the secondary's TAP.
    pub fn start(dir: &Path, qemu: bool) -> Lab {
        require_root();
        for (tool, pkg) in [
            ("curl", "curl"),
            ("redis-server", "redis-server"),
            ("redis-cli", "redis-tools"),
            ("python3", "python3"),
            ("sha256sum", "coreutils"),
        ] {
            require(tool, pkg);
        }
        let id = unique_id();
        let ns = |r: &str| {
            let ns = Netns::new(&format!("{id}-{r}"));
            ns.no_ipv6();
            ns
        };
        let (client, primary, secondary) = (ns("c"), ns("p"), ns("s"));
        let tap = |r: &str| format!("{id}{r}");
        let sock = dir.join("netcmp.sock");
        let s_sock = dir.join("secondary.sock");
        let s_port = if qemu {
            format!("unix:{}", s_sock.display())
        } else {
            format!("tap:{}", tap("s"))
        };
        let args = [
            "netcmp",
            "--packet",
            "--client-port",
            &format!("tap:{}", tap("c")),
            "--primary-port",
            &format!("tap:{}", tap("p")),
            "--secondary-port",
            &s_port,
            "--socket",
            sock.to_str().unwrap(),
        ]
        .map(String::from);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut netcmp = Daemon::start("netcmp", &lockstep_bin(), &refs, dir);
        wait_status(&mut netcmp, &sock, T, "netcmp", |v| {
            v["frontend"] == "packet"
        });
        let qemu = qemu.then(|| {
            require("qemu-system-x86_64", "qemu-system-x86");
            let d = Daemon::start(
                "qemu",
                Path::new("qemu-system-x86_64"),
                &[
                    "-M",
                    "none",
                    "-nodefaults",
                    "-display",
                    "none",
                    "-netdev",
                    &format!(
                        "stream,id=s0,server=off,addr.type=unix,addr.path={}",
                        s_sock.display()
                    ),
                    "-netdev",
                    &format!("tap,id=t0,ifname={},script=no,downscript=no", tap("s")),
                    "-netdev",
                    "hubport,id=h0,hubid=0,netdev=s0",
                    "-netdev",
                    "hubport,id=h1,hubid=0,netdev=t0",
                ],
                dir,
            );
            wait_status(&mut netcmp, &sock, T, "netcmp (QEMU connected)", |v| {
                v["ports"]["secondary"]["connected"] == true
            });
            d
        });
        for (ns, r, mac, addr) in [
            (&client, "c", CLIENT_MAC, "10.77.0.2/24"),
            (&primary, "p", SERVICE_MAC, "10.77.0.1/24"),
            (&secondary, "s", SERVICE_MAC, "10.77.0.1/24"),
        ] {
            let t = tap(r);
            // netcmp (or QEMU) keeps its descriptor: the interface changes namespace, not owner.
            run_ok("ip", &["link", "set", &t, "netns", &ns.name], T);
            ns.ip(&["link", "set", &t, "address", mac]);
            ns.ip(&["addr", "add", addr, "dev", &t]);
            ns.ip(&["link", "set", &t, "up"]);
        }
        let www = dir.join("www");
        std::fs::create_dir_all(&www).unwrap();
        let big = www.join("big");
        random_file(&big, BIG, 77);
        let mut services = Vec::new();
        for (ns, r) in [(&primary, "p"), (&secondary, "s")] {
            let rdir = dir.join(format!("redis-{r}"));
            std::fs::create_dir_all(&rdir).unwrap();
            let mut http = ns.spawn(
                &format!("http-{r}"),
                "python3",
                &[
                    "-m",
                    "http.server",
                    "8080",
                    "--bind",
                    SERVICE,
                    "--directory",
                    www.to_str().unwrap(),
                ],
                dir,
            );
            let mut redis = ns.spawn(
                &format!("redis-{r}"),
                "redis-server",
                &[
                    "--bind",
                    SERVICE,
                    "--port",
                    "6379",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "no",
                    "--dir",
                    rdir.to_str().unwrap(),
                ],
                dir,
            );
            // Asked inside the replica's namespace: not through netcmp.
            let url = format!("http://{SERVICE}:8080/");
            ns.wait_for(
                &mut http,
                &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &url],
                "200",
                T,
            );
            ns.wait_for(&mut redis, &["redis-cli", "-h", SERVICE, "PING"], "PONG", T);
            services.push(http);
            services.push(redis);
        }
        Lab {
            _services: services,
            qemu,
            netcmp,
            sock,
            big,
            client,
            _primary: primary,
            _secondary: secondary,
        }
    }

    pub fn status(&self) -> Value {
        control_status(&self.sock, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("netcmp status: {e}\n{}", self.logs()))
    }

    pub fn wait(&self, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
        self.wait_for(T, &ready)
            .unwrap_or_else(|st| panic!("netcmp: {what} not within {T:?}: {st}\n{}", self.logs()))
    }

    /// The status once `ready` accepts it, or the last status when `within` passed first.
    pub fn wait_for(
        &self,
        within: Duration,
        ready: impl Fn(&Value) -> bool,
    ) -> Result<Value, Value> {
        let start = Instant::now();
        loop {
            let st = self.status();
            if ready(&st) {
                return Ok(st);
            }
            if start.elapsed() >= within {
                return Err(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The status once divergences and checkpoints stopped changing for `calm`.
    pub fn quiet(&self, calm: Duration) -> Value {
        let key = |s: &Value| {
            (
                num(s, "mismatches"),
                num(s, "timeouts"),
                num(s, "checkpoints_requested"),
                num(s, "held_frames"),
            )
        };
        let mut last = self.status();
        let mut since = Instant::now();
        let start = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let st = self.status();
            if key(&st) != key(&last) {
                since = Instant::now();
            } else if since.elapsed() >= calm {
                return st;
            }
            last = st;
            assert!(start.elapsed() < T, "never quiet: {last}\n{}", self.logs());
        }
    }

    /// `redis-cli -h SERVICE ARGS…` in the client's namespace, through netcmp.
    pub fn redis(&self, args: &[&str]) -> String {
        let mut a = vec!["-h", SERVICE];
        a.extend_from_slice(args);
        self.client.exec_ok("redis-cli", &a, T)
    }

    /// Download the big file into `to` through netcmp; returns (elapsed, headers).
    pub fn download(&self, to: &Path) -> (Duration, String) {
        let hdr = to.with_extension("headers");
        let url = format!("http://{SERVICE}:8080/big");
        let t = Instant::now();
        self.client.exec_ok(
            "curl",
            &[
                "-sS",
                "--max-time",
                "25",
                "-D",
                hdr.to_str().unwrap(),
                "-o",
                to.to_str().unwrap(),
                &url,
            ],
            T,
        );
        let took = t.elapsed();
        (took, std::fs::read_to_string(&hdr).unwrap())
    }

    /// Assert `got` is the big file (its bytes and its sha256).
    pub fn check_big(&self, got: &Path) {
        let sha = |p: &Path| {
            run_ok("sha256sum", &[p.to_str().unwrap()], T)
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(sha(got), sha(&self.big), "{}", self.logs());
        assert!(std::fs::read(got).unwrap() == std::fs::read(&self.big).unwrap());
    }

    pub fn logs(&self) -> String {
        let mut s = format!("--- netcmp log (tail):\n{}", tail(&self.netcmp, 30));
        if let Some(q) = &self.qemu {
            s.push_str(&format!("\n--- qemu log (tail):\n{}", tail(q, 10)));
        }
        s
    }
}

/// A peer of a `unix:` port that counts the frames netcmp sends it.
#[derive(Debug)]
pub struct Peer {
    w: UnixStream,
    frames: Arc<AtomicU64>,
}

impl Peer {
    pub fn connect(path: &Path) -> Peer {
        let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut r = s.try_clone().unwrap();
        let frames = Arc::new(AtomicU64::new(0));
        let f = frames.clone();
        std::thread::spawn(move || {
            let mut len = [0u8; 4];
            let mut buf = vec![0u8; 70_000];
            while r.read_exact(&mut len).is_ok() {
                let n = u32::from_be_bytes(len) as usize;
                if n > buf.len() || r.read_exact(&mut buf[..n]).is_err() {
                    break;
                }
                f.fetch_add(1, Ordering::Relaxed);
            }
        });
        Peer { w: s, frames }
    }

    pub fn send(&mut self, frame: &[u8]) {
        let mut m = (frame.len() as u32).to_be_bytes().to_vec();
        m.extend_from_slice(frame);
        self.w.write_all(&m).expect("send a frame");
    }

    pub fn count(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }
}
