//! Randomised trials reproducible from one seed: [`Rng`] and [`trials`], which runs every trial
//! even after a failure and fails at the end with all of them and the seed that replays them.
//!
//! The seed comes from `LOCKSTEP_TEST_SEED`, else the clock; it is printed at the start of
//! each test (run with `--nocapture` to see it) and in every failure message.

use std::time::Instant;

/// xorshift64*, seeded once per test and once per trial.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// The test's generator and its seed (printed, so that the run can be replayed).
    pub fn from_env(test: &str) -> (Rng, u64) {
        let seed = std::env::var("LOCKSTEP_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{test}: seed {seed} (LOCKSTEP_TEST_SEED={seed} replays this run)");
        (Rng(seed ^ 0x9e37_79b9_7f4a_7c15), seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0 | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// One of `v`.
    pub fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[(self.next_u64() % v.len() as u64) as usize]
    }
}

/// Run `n` trials of `f`, each with its own random stream; every trial runs even when an
/// earlier one failed, and the test fails at the end with every failure.
pub fn trials(test: &str, n: usize, mut f: impl FnMut(usize, &mut Rng) -> String) {
    let (mut rng, seed) = Rng::from_env(test);
    let start = Instant::now();
    let mut failures = Vec::new();
    for i in 0..n {
        let mut r = Rng(rng.next_u64());
        let t = Instant::now();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i, &mut r))) {
            Ok(summary) => eprintln!(
                "{test}: trial {i} ok in {:.1} s: {summary}",
                t.elapsed().as_secs_f64()
            ),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "(panic without a message)".into());
                eprintln!("{test}: trial {i} FAILED");
                failures.push(format!("--- trial {i}:\n{msg}"));
            }
        }
    }
    eprintln!(
        "{test}: {n} trials in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{test}: {} of {n} trials failed (LOCKSTEP_TEST_SEED={seed} replays them):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// [`trials`] of a heavy test under fio load: fio is required and the [`heavy`](crate::heavy)
/// lock is held for the whole test.
pub fn fio_trials(test: &str, n: usize, f: impl FnMut(usize, &mut Rng) -> String) {
    crate::require("fio", "fio");
    let _g = crate::heavy();
    trials(test, n, f);
}
