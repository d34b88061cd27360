//! The one cutting proxy of the end-to-end tests: a TCP forwarder on loopback whose link can
//! be cut and healed, to lose the replication link without killing either daemon.

use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

/// A TCP proxy on loopback that can cut every connection through it (like the socat bridge
/// in QEMU's postcopy recovery tests): `cut` closes what is open and refuses new
/// connections until `heal`.
#[derive(Debug)]
pub struct CutProxy {
    /// Where to connect instead of the target.
    pub addr: String,
    state: std::sync::Arc<ProxyState>,
    accept: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct ProxyState {
    down: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    open: Mutex<Vec<TcpStream>>,
    cuts: std::sync::atomic::AtomicU64,
}

impl CutProxy {
    /// Forward a free loopback port to `target` (ADDR:PORT).
    pub fn start(target: &str) -> CutProxy {
        use std::sync::atomic::Ordering;
        let l = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let addr = l.local_addr().expect("addr").to_string();
        let state = std::sync::Arc::new(ProxyState::default());
        let st = state.clone();
        let target = target.to_string();
        let accept = std::thread::spawn(move || {
            for c in l.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(c) = c else { continue };
                if st.down.load(Ordering::SeqCst) {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(s) = TcpStream::connect_timeout(
                    &target.parse().expect("target addr"),
                    Duration::from_secs(2),
                ) else {
                    continue;
                };
                let _ = c.set_nodelay(true);
                let _ = s.set_nodelay(true);
                {
                    let mut open = st.open.lock().unwrap_or_else(|e| e.into_inner());
                    open.retain(|x| x.peer_addr().is_ok());
                    open.push(c.try_clone().expect("clone"));
                    open.push(s.try_clone().expect("clone"));
                }
                for (mut from, mut to) in [
                    (c.try_clone().expect("clone"), s.try_clone().expect("clone")),
                    (s, c),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        CutProxy {
            addr,
            state,
            accept: Some(accept),
        }
    }

    /// Close every connection and refuse new ones.
    pub fn cut(&self) {
        use std::sync::atomic::Ordering;
        self.state.down.store(true, Ordering::SeqCst);
        self.state.cuts.fetch_add(1, Ordering::SeqCst);
        for s in self
            .state
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Accept connections again.
    pub fn heal(&self) {
        self.state
            .down
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many times the link was cut.
    pub fn cuts(&self) -> u64 {
        self.state.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.cut();
        self.state
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}
