//! What the primary does and says around its secondary: kill -9 of the secondary under fio
//! leaves the primary serving, unprotected, with the lost link named; SIGTERM runs a final
//! checkpoint after which the images are byte-identical; and the `committed_epoch` in the
//! primary's status is never ahead of what the secondary has committed.

use std::time::{Duration, Instant};

use lockstep_tests::control::{control_status, status, strip_ansi, T};
use lockstep_tests::fio::{fio_errors, fio_issued, load_job, start_load, BSSPLIT};
use lockstep_tests::images::first_difference;
use lockstep_tests::pair::{ack_flags, Pair};
use lockstep_tests::trials::{fio_trials, Rng};
use lockstep_tests::{heavy, output_text, require, run, run_ok, scratch, sleep_ms};

// kill -9 the secondary under fio load: the primary goes unprotected, clients see nothing.

fn kill_secondary_trial(rng: &mut Rng, ack: &str) -> String {
    require("qemu-io", "qemu-utils");
    let dir = scratch();
    let kill_ms = rng.range(300, 1200);
    let depth = rng.pick(&[16u32, 32]);
    let fio_seed = rng.next_u64() % 1_000_000_007;
    let params = format!("ack={ack} iodepth={depth} kill the secondary after {kill_ms} ms");
    let mut pair = Pair::start(dir.path(), "64M", &ack_flags(ack, "100ms"));
    let mut fio = start_load(
        dir.path(),
        &load_job(&pair.uri(), Some(fio_seed), depth, "64M", 2),
    );
    sleep_ms(kill_ms);
    pair.secondary.signal(libc::SIGKILL);
    pair.secondary.wait(Duration::from_secs(10));
    let st = fio.wait(Duration::from_secs(60));
    let text = fio.log_text();
    assert!(
        st.success() && fio_errors(&text) == 0 && text.contains("err= 0"),
        "[{params}] fio on the primary must not see the secondary die (exit {st}):\n{text}\n{}",
        pair.logs()
    );
    let v = status(&pair.p_sock).unwrap_or_else(|e| panic!("[{params}] {e}\n{}", pair.logs()));
    let dirty = v["dirty_blocks"].as_u64().unwrap_or(0);
    let reason = v["unprotected_reason"].as_str().unwrap_or("").to_string();
    let last_error = v["last_error"].as_str().unwrap_or("").to_string();
    let peer_state = v["peer_state"].as_str().unwrap_or("").to_string();
    assert!(
        matches!(v["mode"].as_str(), Some("paused" | "unprotected")) && dirty > 0,
        "[{params}] after losing the secondary the primary should be paused (reconnecting) \
         with dirty blocks recorded: {v}\n{}",
        pair.logs()
    );
    assert!(
        reason.contains(&pair.listen) && last_error.contains(&pair.listen),
        "[{params}] unprotected_reason and last_error should name the lost link to {}: \
         unprotected_reason={reason:?} last_error={last_error:?}\n{}",
        pair.listen,
        pair.logs()
    );
    assert!(
        ["lost", "paused", "unprotected"]
            .iter()
            .any(|p| peer_state.starts_with(p)),
        "[{params}] peer_state={peer_state:?}"
    );
    // Still serving, unprotected.
    let io = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 4096 8192",
            "-c",
            "read -P 0x3c 4096 8192",
            &pair.uri(),
        ],
        T,
    );
    assert!(
        !io.contains("Pattern verification failed") && !io.contains("error"),
        "[{params}] qemu-io on the unprotected primary:\n{io}"
    );
    let after = status(&pair.p_sock).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        after["dirty_blocks"].as_u64().unwrap_or(0) >= dirty,
        "[{params}] dirty blocks went down while unprotected: {dirty} then {after}"
    );
    pair.stop_primary_ok(
        Duration::from_secs(30),
        &format!("[{params}] the unprotected primary"),
    );
    let (_, w) = fio_issued(&text).unwrap_or((0, 0));
    format!("{params}: fio issued {w} writes without error; {dirty} dirty blocks; reason: {reason}")
}

#[test]
fn kill9_secondary_under_fio_primary_goes_unprotected() {
    fio_trials(
        "kill9_secondary_under_fio_primary_goes_unprotected",
        3,
        |i, rng| kill_secondary_trial(rng, ["received", "durable", "local"][i % 3]),
    );
}

// Clean shutdown: SIGTERM the primary runs a final checkpoint; the images end identical.

fn clean_shutdown_trial(rng: &mut Rng, ack: &str, interval: &str) -> String {
    let dir = scratch();
    let params = format!("ack={ack} checkpoint-interval={interval}");
    let mut pair = Pair::start(dir.path(), "64M", &ack_flags(ack, interval));
    let fio_seed = rng.next_u64() % 1_000_000_007;
    let out = run(
        "fio",
        &[
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={}", pair.uri()),
            "--rw=randwrite",
            BSSPLIT,
            "--norandommap",
            &format!("--randseed={fio_seed}"),
            "--iodepth=32",
            "--size=64M",
            "--io_size=48M",
        ],
        Duration::from_secs(120),
    );
    let text = output_text(&out);
    assert!(
        out.status.success() && fio_errors(&text) == 0,
        "[{params}] fio:\n{text}\n{}",
        pair.logs()
    );
    let before = status(&pair.p_sock).unwrap_or_else(|e| panic!("{e}"));
    let committed_before = before["committed_epoch"].as_u64().unwrap_or(0);
    pair.stop_primary_ok(
        Duration::from_secs(60),
        &format!("[{params}] after SIGTERM the primary"),
    );
    assert!(
        strip_ansi(&pair.primary.log_text()).contains("final checkpoint committed"),
        "[{params}] the primary did not log a final checkpoint\n{}",
        pair.logs()
    );
    let sec = pair.wait_secondary(Duration::from_secs(15), "waiting");
    let committed = sec["committed_epoch"].as_u64().unwrap_or(0);
    assert!(
        committed > committed_before,
        "[{params}] the secondary's committed epoch {committed} should be past the primary's \
         {committed_before} before shutdown (the final checkpoint): {sec}\n{}",
        pair.logs()
    );
    assert_eq!(
        sec["buffer"]["blocks"].as_u64(),
        Some(0),
        "[{params}] the secondary still buffers originals after the final checkpoint: {sec}"
    );
    pair.stop_secondary_ok(Duration::from_secs(30), &format!("[{params}] secondary"));
    let p = std::fs::read(&pair.p_img).expect("primary image");
    let q = std::fs::read(&pair.s_img).expect("secondary image");
    if let Some(at) = first_difference(&p, &q) {
        panic!(
            "[{params}] after a clean shutdown the images differ at byte {at} (block {})\n{}",
            at / 4096,
            pair.logs()
        );
    }
    assert!(
        p.iter().any(|&b| b != 0),
        "[{params}] the workload wrote nothing"
    );
    format!(
        "{params}: committed {committed_before} before SIGTERM, {committed} after; images identical"
    )
}

#[test]
fn sigterm_primary_runs_final_checkpoint_and_images_match() {
    fio_trials(
        "sigterm_primary_runs_final_checkpoint_and_images_match",
        3,
        |i, rng| {
            let (ack, interval) = [("local", "0"), ("received", "150ms"), ("durable", "1s")][i];
            clean_shutdown_trial(rng, ack, interval)
        },
    );
}

// The primary's status must not claim a checkpoint the secondary has not committed.
//
// The secondary commits epoch n before it answers COMMITTED(n), and only that answer may make
// the primary call n committed. So if the primary says "committed_epoch n" at time t1 and the
// secondary, asked afterwards at t2 > t1, has not committed n, the primary's claim was false
// when it was made. Monitoring (and replication_failover.rs) trust this field to know what survives a crash.

#[test]
fn primary_status_committed_epoch_is_committed_on_the_secondary() {
    require("fio", "fio");
    let _g = heavy();
    let dir = scratch();
    // ack=local and a short period: the forward queue is deep, so draining an epoch (between
    // the cut and COMMITTED) takes a while.
    let pair = Pair::start(dir.path(), "64M", &ack_flags("local", "50ms"));
    let mut fio = start_load(dir.path(), &load_job(&pair.uri(), None, 32, "64M", 3));
    let start = Instant::now();
    let (mut samples, mut top_ahead, mut block_ahead) = (0u64, Vec::new(), Vec::new());
    while start.elapsed() < Duration::from_millis(2500) {
        let (Ok(p), Ok(q)) = (
            control_status(&pair.p_sock, Duration::from_secs(5)),
            control_status(&pair.s_sock, Duration::from_secs(5)),
        ) else {
            continue;
        };
        samples += 1;
        let top = p["committed_epoch"].as_u64().unwrap_or(0);
        let block = p["participants"]["block"]["committed_epoch"]
            .as_u64()
            .unwrap_or(0);
        let sec = q["committed_epoch"].as_u64().unwrap_or(0);
        if top > sec {
            top_ahead.push(format!(
                "primary committed_epoch={top} (epoch={}, block participant={block}), then the secondary committed_epoch={sec}",
                p["epoch"]
            ));
        }
        if block > sec {
            block_ahead.push(format!("block participant={block}, then secondary={sec}"));
        }
        sleep_ms(3);
    }
    let st = fio.wait(Duration::from_secs(60));
    let text = fio.log_text();
    assert!(
        st.success() && fio_errors(&text) == 0,
        "fio under load failed:\n{text}\n{}",
        pair.logs()
    );
    assert!(samples > 50, "only {samples} status pairs sampled");
    assert!(
        block_ahead.is_empty(),
        "the primary's block participant counted a checkpoint the secondary had not committed \
         ({} of {samples} samples), e.g. {:?}\n{}",
        block_ahead.len(),
        &block_ahead[..block_ahead.len().min(5)],
        pair.logs()
    );
    assert!(
        top_ahead.is_empty(),
        "the primary's status reported a committed_epoch the secondary had not committed yet in \
         {} of {samples} samples (status asked of the primary first, then of the secondary); \
         e.g.:\n{}\n(EpochCoordinator::status reports committed_epoch = current - 1, and \
         `current` advances at the cut, before the epoch is drained and COMMITTED)",
        top_ahead.len(),
        top_ahead[..top_ahead.len().min(5)].join("\n")
    );
}
