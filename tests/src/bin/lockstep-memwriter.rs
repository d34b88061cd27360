//! A cooperating memory writer for lockstep's memrep tests and benchmarks.
//!
//! It maps a region file, registers the mapping with userfaultfd write-protect, hands its
//! descriptors to lockstep (`--handover SOCKET`, memrep's hand-over), and then writes:
//!
//! - counter mode (default): step after step of `lockstep_tests::memwriter`'s pattern, each
//!   step's counter also written to block 0 of a disk through NBD (`--nbd ENDPOINT`), with a
//!   pause point between steps, so that memory and disk agree at every pause;
//! - dirty mode (`--dirty PERCENT --period-ms MS`): every period, PERCENT of the region's
//!   pages get new content (for the benchmark).
//!
//! Prints `READY` once registered (and handed over), then runs until killed or `--steps N`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use blkrep::nbd::client::{ClientOptions, NbdClient};
use blkrep::nbd::Endpoint;
use lockstep_tests::memwriter::{fill_page, header, step_pages, PAGE};
use memrep::handoff::WriterRegistration;
use memrep::pause::WriterLink;
use memrep::region::Region;

struct Args {
    region: PathBuf,
    handover: Option<PathBuf>,
    nbd: Option<Endpoint>,
    steps: Option<u64>,
    dirty: Option<f64>,
    period: Duration,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        region: PathBuf::new(),
        handover: None,
        nbd: None,
        steps: None,
        dirty: None,
        period: Duration::from_millis(100),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--region" => a.region = PathBuf::from(v()?),
            "--handover" => a.handover = Some(PathBuf::from(v()?)),
            "--nbd" => a.nbd = Some(v()?.parse()?),
            "--steps" => a.steps = Some(v()?.parse().map_err(|e| format!("--steps: {e}"))?),
            "--dirty" => a.dirty = Some(v()?.parse().map_err(|e| format!("--dirty: {e}"))?),
            "--period-ms" => {
                a.period = Duration::from_millis(v()?.parse().map_err(|e| format!("{e}"))?)
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.region.as_os_str().is_empty() {
        return Err("--region PATH is required".into());
    }
    Ok(a)
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lockstep-memwriter: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(a) {
        eprintln!("lockstep-memwriter: {e}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<(), String> {
    let region = Region::open(&a.region).map_err(|e| e.to_string())?;
    let pages = region.pages();
    // Registered before the hand-over: every write from here on is tracked.
    let reg = WriterRegistration::register(region.as_ptr(), region.len() as usize)
        .map_err(|e| format!("registering the region with userfaultfd: {e}"))?;
    let mut link: Option<WriterLink> = match &a.handover {
        Some(s) => Some(
            reg.hand_over(s, &a.region)
                .map_err(|e| format!("hand-over on {}: {e}", s.display()))?,
        ),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let disk = match &a.nbd {
        Some(ep) => Some(
            rt.block_on(NbdClient::connect(
                ep,
                &ClientOptions {
                    request_timeout: Some(Duration::from_secs(30)),
                    ..ClientOptions::default()
                },
            ))
            .map_err(|e| format!("connecting to {ep}: {e}"))?,
        ),
        None => None,
    };
    println!("READY");
    let pause = |link: &mut Option<WriterLink>| -> Result<(), String> {
        if let Some(l) = link {
            l.pause_point().map_err(|e| format!("pause point: {e}"))?;
        }
        Ok(())
    };
    let mut page = vec![0u8; PAGE];
    if let Some(pct) = a.dirty {
        // Dirty mode: PERCENT of the pages per period, xorshift-chosen.
        let per = ((pages as f64) * pct / 100.0).ceil() as u64;
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
        let mut round = 0u64;
        loop {
            let t = Instant::now();
            round += 1;
            for k in 0..per {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let p = x % pages;
                page.fill((round as u8) ^ (k as u8) | 1);
                page[..8].copy_from_slice(&round.to_le_bytes());
                region
                    .write_at(p * PAGE as u64, &page)
                    .map_err(|e| e.to_string())?;
                if k % 64 == 63 {
                    pause(&mut link)?;
                }
            }
            pause(&mut link)?;
            if let Some(left) = a.period.checked_sub(t.elapsed()) {
                // Sleep in slices so that pauses are answered promptly.
                let end = Instant::now() + left;
                while Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(1).min(end - Instant::now()));
                    pause(&mut link)?;
                }
            }
        }
    }
    let mut c = 0u64;
    loop {
        c += 1;
        if a.steps.is_some_and(|n| c > n) {
            return Ok(());
        }
        for (j, p) in step_pages(c, pages).enumerate() {
            fill_page(c, p, j as u64, &mut page);
            region
                .write_at(p * PAGE as u64, &page)
                .map_err(|e| e.to_string())?;
        }
        header(c, &mut page);
        region.write_at(0, &page).map_err(|e| e.to_string())?;
        if let Some(d) = &disk {
            rt.block_on(d.write(0, &page, false))
                .map_err(|e| format!("writing the counter to the disk: {e}"))?;
        }
        pause(&mut link)?;
    }
}
