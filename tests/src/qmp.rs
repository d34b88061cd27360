//! A QEMU with no guest (`-machine none`) and two QMP sockets: one for lockstep, one for the
//! test to watch and steer the VM's run state, and a small synchronous QMP client.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{require, Daemon};

/// `qemu-system-x86_64 -machine none` with QMP sockets `lockstep.qmp` and `test.qmp` in `dir`.
#[derive(Debug)]
pub struct Vm {
    /// lockstep's QMP socket.
    pub qmp: PathBuf,
    /// The test's.
    pub test_qmp: PathBuf,
    /// QEMU.
    pub daemon: Daemon,
}

impl Vm {
    /// Start it, with lockstep's socket at `qmp`, and wait until the test's socket answers.
    pub fn start(dir: &Path, qmp: &Path) -> Vm {
        require(
            "qemu-system-x86_64",
            "qemu-system-x86 (tests/guest/prepare installs it)",
        );
        let test_qmp = dir.join("test.qmp");
        let a = format!("unix:{},server=on,wait=off", qmp.display());
        let b = format!("unix:{},server=on,wait=off", test_qmp.display());
        let args = [
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            &a,
            "-qmp",
            &b,
        ];
        let daemon = Daemon::start("qemu", Path::new("qemu-system-x86_64"), &args, dir);
        let start = Instant::now();
        while !test_qmp.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "QEMU did not create its QMP socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Vm {
            qmp: qmp.to_path_buf(),
            test_qmp,
            daemon,
        }
    }

    /// A QMP connection on the test's socket.
    pub fn connect(&self) -> Qmp {
        Qmp::connect(&self.test_qmp)
    }
}

/// A synchronous QMP client.
#[derive(Debug)]
pub struct Qmp {
    rd: BufReader<UnixStream>,
    wr: UnixStream,
}

impl Qmp {
    /// Connect, read the greeting and negotiate capabilities.
    pub fn connect(path: &Path) -> Qmp {
        let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("QMP {}: {e}", path.display()));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut q = Qmp {
            rd: BufReader::new(s.try_clone().unwrap()),
            wr: s,
        };
        let greeting = q.line();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        q.execute("qmp_capabilities");
        q
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.rd.read_line(&mut l).expect("QMP read");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP: {e} in {l:?}"))
    }

    /// Run a command; its `return` (events are skipped).
    pub fn execute(&mut self, cmd: &str) -> Value {
        writeln!(self.wr, "{}", json!({ "execute": cmd })).expect("QMP write");
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            assert!(v.get("error").is_none(), "{cmd}: {v}");
        }
    }

    /// Count the `name` events (QEMU sends them to every monitor, e.g. `STOP` and `RESUME`
    /// when another client stops and continues the VM) seen during `dur`.
    pub fn count_events(&mut self, name: &str, dur: Duration) -> usize {
        let end = std::time::Instant::now() + dur;
        let mut n = 0;
        self.wr
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        while std::time::Instant::now() < end {
            let mut l = String::new();
            match self.rd.read_line(&mut l) {
                Ok(0) => panic!("QMP closed"),
                Ok(_) => {
                    let v: Value = serde_json::from_str(&l).unwrap_or(Value::Null);
                    if v["event"] == name {
                        n += 1;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("QMP read: {e}"),
            }
        }
        self.wr
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        n
    }

    /// Whether the VM runs.
    pub fn running(&mut self) -> bool {
        self.execute("query-status")["running"] == true
    }
}
