//! netcmp fixtures: two `redis-server` instances (the service's primary and secondary), a
//! lockstep primary/secondary pair whose epochs netcmp joins, `lockstep netcmp` between the
//! clients and the instances, and a small RESP client that reads exactly one reply.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::control::{control_status, tail};
use crate::pair::{ack_flags, Pair};
use crate::{free_port, lockstep_bin, owned, refs, require, wait_port, Daemon};

/// A `redis-server` on loopback, without persistence, in `dir`.
pub fn redis(dir: &Path, name: &str) -> (Daemon, String) {
    require("redis-server", "redis-server");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let p = port.to_string();
    let d_dir = dir.join(name);
    std::fs::create_dir_all(&d_dir).expect("redis dir");
    let args = [
        "--port",
        &p,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        d_dir.to_str().unwrap(),
    ];
    let mut d = Daemon::start(name, Path::new("/usr/bin/redis-server"), &args, dir);
    wait_port(&addr, Duration::from_secs(15), &mut d.child);
    (d, addr)
}

/// netcmp in front of one or two redis instances, joined to a lockstep pair's epochs.
#[derive(Debug)]
pub struct NetPair {
    /// Where clients connect.
    pub addr: String,
    /// netcmp's own control socket.
    pub sock: PathBuf,
    /// The primary redis instance's address (direct, bypassing netcmp).
    pub p_redis: String,
    /// The secondary redis instance's address, if any.
    pub s_redis: Option<String>,
    // Dropped in this order: netcmp first, then the instances, then the lockstep pair.
    /// netcmp.
    pub netcmp: Daemon,
    /// The primary instance.
    pub p_daemon: Daemon,
    /// The secondary instance.
    pub s_daemon: Option<Daemon>,
    /// The lockstep pair (checkpoints only when requested).
    pub pair: Pair,
    base_checkpoints: u64,
}

impl NetPair {
    /// Start everything in `dir`: a secondary instance unless `buffer`, netcmp with `extra`
    /// flags.
    pub fn start(dir: &Path, buffer: bool, extra: &[&str]) -> NetPair {
        let mut pair = Pair::start(dir, "16M", &ack_flags("received", "0"));
        // The first resync ends in a checkpoint of its own: count from after it.
        let st = pair.wait_primary(Duration::from_secs(30), |v| {
            v["checkpoints"].as_u64().is_some_and(|n| n >= 1)
        });
        let base_checkpoints = st["checkpoints"].as_u64().unwrap();
        let (p_daemon, p_redis) = redis(dir, "redis-primary");
        let (s_daemon, s_redis) = if buffer {
            (None, None)
        } else {
            let (d, a) = redis(dir, "redis-secondary");
            (Some(d), Some(a))
        };
        let addr = format!("127.0.0.1:{}", free_port());
        let sock = dir.join("netcmp.sock");
        let mut args = owned(&[
            "netcmp",
            "--listen",
            &addr,
            "--primary",
            &p_redis,
            "--control",
            pair.p_sock.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
        ]);
        if let Some(s) = &s_redis {
            args.extend(owned(&["--secondary", s]));
        }
        args.extend(owned(extra));
        let mut netcmp = Daemon::start("netcmp", &lockstep_bin(), &refs(&args), dir);
        wait_port(&addr, Duration::from_secs(15), &mut netcmp.child);
        NetPair {
            addr,
            sock,
            p_redis,
            s_redis,
            netcmp,
            p_daemon,
            s_daemon,
            pair,
            base_checkpoints,
        }
    }

    /// netcmp's status (`lockstep status --json` answers the same).
    pub fn status(&self) -> Value {
        control_status(&self.sock, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("netcmp status: {e}\n{}", self.logs()))
    }

    /// The lockstep primary's checkpoints committed since the start (the first resync's
    /// not counted).
    pub fn checkpoints(&self) -> u64 {
        control_status(&self.pair.p_sock, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("primary status: {e}\n{}", self.logs()))["checkpoints"]
            .as_u64()
            .expect("checkpoints count")
            - self.base_checkpoints
    }

    /// Wait until netcmp's status satisfies `ready`; panics with it and the logs after
    /// `deadline`.
    pub fn wait(&self, deadline: Duration, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let st = self.status();
            if ready(&st) {
                return st;
            }
            if start.elapsed() > deadline {
                panic!(
                    "netcmp: {what} not within {deadline:?}: {st}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The tails of the logs.
    pub fn logs(&self) -> String {
        format!(
            "--- netcmp log (tail):\n{}\n{}",
            tail(&self.netcmp, 30),
            self.pair.logs()
        )
    }
}

/// A RESP (redis protocol) connection that sends one command and reads one whole reply.
#[derive(Debug)]
pub struct Resp {
    rd: BufReader<TcpStream>,
    wr: TcpStream,
}

/// One RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`.
    Simple(String),
    /// `-ERR …`.
    Error(String),
    /// `:5`.
    Int(i64),
    /// `$3 foo` (None: `$-1`).
    Bulk(Option<Vec<u8>>),
    /// `*2 …`.
    Array(Vec<Reply>),
}

impl Resp {
    /// Connect to `addr`, reads timing out after `timeout`.
    pub fn connect(addr: &str, timeout: Duration) -> Resp {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(timeout)).expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        Resp {
            rd: BufReader::new(s.try_clone().expect("clone")),
            wr: s,
        }
    }

    /// Send a command without reading.
    pub fn send(&mut self, args: &[&str]) {
        let mut m = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            m.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        self.wr.write_all(&m).expect("send");
    }

    /// Read one reply: an error on timeout, EOF or a connection reset.
    pub fn read(&mut self) -> std::io::Result<Reply> {
        let mut line = String::new();
        if self.rd.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end_matches("\r\n");
        let (kind, rest) = line.split_at(1);
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, line.to_string());
        Ok(match kind {
            "+" => Reply::Simple(rest.into()),
            "-" => Reply::Error(rest.into()),
            ":" => Reply::Int(rest.parse().map_err(|_| bad())?),
            "$" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut b = vec![0u8; n as usize + 2];
                    self.rd.read_exact(&mut b)?;
                    b.truncate(n as usize);
                    Reply::Bulk(Some(b))
                }
            }
            "*" => {
                let n: usize = rest.parse().map_err(|_| bad())?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.read()?);
                }
                Reply::Array(v)
            }
            _ => return Err(bad()),
        })
    }

    /// Send a command and read its reply, which must come.
    pub fn call(&mut self, args: &[&str]) -> Reply {
        self.send(args);
        self.read()
            .unwrap_or_else(|e| panic!("{args:?}: no reply: {e}"))
    }
}

/// A bulk reply's text.
pub fn text(r: &Reply) -> String {
    match r {
        Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
        Reply::Simple(s) => s.clone(),
        other => panic!("expected a string reply, got {other:?}"),
    }
}
