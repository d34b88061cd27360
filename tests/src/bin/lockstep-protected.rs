//! A program that protects a memory region of its own with lockstep as a library: it is the
//! primary itself (blkrep's `run_primary_with`), tracks the region through its own mapping
//! with userfaultfd (memrep's `UffdTracker::register_self`, no hand-over), and pauses its own
//! writer thread around every cut (a `GuestHook` of its own).
//!
//! The writer thread runs `lockstep_tests::memwriter`'s counter pattern: each step writes the
//! region and the counter to block 0 of the replicated disk (through the program's own NBD
//! export), then reaches a pause point. Killed with SIGKILL by the tests, which fail the
//! secondary over and find memory and disk at the same counter.
//!
//! ```text
//! lockstep-protected --region PATH --disk PATH --secondary EP --control SOCK --export unix:PATH
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use blkrep::epoch::{BoxFuture, CoordinatorOptions, GuestHook};
use blkrep::nbd::client::{ClientOptions, NbdClient};
use blkrep::nbd::Endpoint;
use blkrep::replica::node::{self, PrimaryConfig};
use blkrep::replica::primary::PrimaryOptions;
use blkrep::storage::DiskOptions;
use lockstep_tests::memwriter::{fill_page, header, step_pages, PAGE};
use memrep::primary::{MemoryOptions, MemoryParticipant};
use memrep::region::Region;
use memrep::track::uffd::UffdTracker;

/// The writer thread's pause, driven by the checkpoint coordinator.
#[derive(Debug, Default)]
struct ThreadPause {
    state: Mutex<(bool, bool)>, // (pause requested, writer paused)
    cv: Condvar,
}

impl ThreadPause {
    /// The writer's pause point.
    fn point(&self) {
        let mut s = self.state.lock().unwrap();
        if !s.0 {
            return;
        }
        s.1 = true;
        self.cv.notify_all();
        while s.0 {
            s = self.cv.wait(s).unwrap();
        }
        s.1 = false;
    }
}

/// The coordinator's hook on the writer thread's pause.
#[derive(Debug)]
struct Hook(Arc<ThreadPause>);

impl GuestHook for Hook {
    fn pause(&self) -> BoxFuture<'_, Result<(), String>> {
        let me = self.0.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut s = me.state.lock().unwrap();
                s.0 = true;
                let end = Instant::now() + Duration::from_secs(2);
                while !s.1 {
                    let left = end.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        s.0 = false;
                        me.cv.notify_all();
                        return Err("the writer thread did not pause within 2 s".to_string());
                    }
                    s = me.cv.wait_timeout(s, left).unwrap().0;
                }
                Ok(())
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }

    fn resume(&self) -> BoxFuture<'_, Result<(), String>> {
        let mut s = self.0.state.lock().unwrap();
        s.0 = false;
        self.0.cv.notify_all();
        Box::pin(async { Ok(()) })
    }
}

fn arg(name: &str) -> String {
    let mut it = std::env::args();
    while let Some(a) = it.next() {
        if a == name {
            return it.next().unwrap_or_else(|| panic!("{name} needs a value"));
        }
    }
    eprintln!("lockstep-protected: {name} is required");
    std::process::exit(2);
}

fn main() {
    let region_path = PathBuf::from(arg("--region"));
    let export: Endpoint = arg("--export").parse().expect("--export");
    let cfg = PrimaryConfig {
        disk: DiskOptions::new(arg("--disk")),
        export: export.clone(),
        export_name: node::DEFAULT_EXPORT_NAME.into(),
        secondary: arg("--secondary").parse().expect("--secondary"),
        control: PathBuf::from(arg("--control")),
        primary: PrimaryOptions::default(),
        checkpoints: CoordinatorOptions {
            interval: Some(Duration::from_millis(100)),
            bytes: 0,
        },
        heartbeat: node::DEFAULT_HEARTBEAT,
        heartbeat_misses: node::DEFAULT_HEARTBEAT_MISSES,
        connect_timeout: Duration::from_secs(10),
        reconnect_timeout: node::DEFAULT_RECONNECT_TIMEOUT,
        ublk: None,
        key: None,
        tls: None,
        metrics: None,
    };
    let region = Arc::new(Region::open(&region_path).expect("--region"));
    // Tracked through this process's own mapping: the writer thread below writes through it.
    let tracker = UffdTracker::register_self(&region).expect("userfaultfd on the region");
    let memory = MemoryParticipant::new(
        region.clone(),
        Box::new(tracker),
        "uffd: the program's own mapping (library)",
        MemoryOptions::for_region(0),
    );
    let pause = Arc::new(ThreadPause::default());
    let writer_pause = pause.clone();
    std::thread::spawn(move || writer(region, export, writer_pause));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let r = rt.block_on(node::run_primary_with(
        cfg,
        vec![Arc::new(memory)],
        Arc::new(Hook(pause)),
        std::future::pending::<()>(),
    ));
    if let Err(e) = r {
        eprintln!("lockstep-protected: {e}");
        std::process::exit(1);
    }
}

/// The counter pattern, in memory and on the disk, a pause point after each step.
fn writer(region: Arc<Region>, export: Endpoint, pause: Arc<ThreadPause>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let disk = rt.block_on(async {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            match NbdClient::connect(&export, &ClientOptions::default()).await {
                Ok(c) => return c,
                Err(e) if Instant::now() > end => panic!("connecting to {export}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    println!("READY");
    let pages = region.pages();
    let mut page = vec![0u8; PAGE];
    for c in 1.. {
        for (j, p) in step_pages(c, pages).enumerate() {
            fill_page(c, p, j as u64, &mut page);
            region.write_at(p * PAGE as u64, &page).expect("region");
        }
        header(c, &mut page);
        region.write_at(0, &page).expect("region");
        rt.block_on(disk.write(0, &page, false))
            .expect("writing the counter to the disk");
        pause.point();
    }
}
