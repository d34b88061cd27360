//! fio's own crash-consistency machinery as the judge of failover: kill -9 the primary under a
//! writer with `--verify_state_save`, fail over, and have a second fio with `--verify_only
//! --verify_state_load` (same job, same seed) check every write on the new primary. With
//! `--ack durable`, failover to the latest state keeps every acknowledged write; failover to
//! the last checkpoint loses some, and the check must notice (its control).
//!
//! Every random choice comes from one seed printed at the start of each test; set
//! `LOCKSTEP_TEST_SEED` to replay a run.

use std::time::Duration;

use lockstep_tests::control::{failover, parse_json};
use lockstep_tests::fio::{
    fio_bad_blocks, fio_completed_writes, fio_errors, fio_issued, start_fio, BSSPLIT,
};
use lockstep_tests::pair::{ack_flags, Pair};
use lockstep_tests::trials::{fio_trials, Rng};
use lockstep_tests::{output_text, owned, refs, run, scratch, sleep_ms};

// --ack durable, kill -9 the primary, fail over to latest: fio's crash verification.
//
// The writer runs with `--verify_state_save`: when it loses its server it saves how many
// writes it issued and which of the last `iodepth` completed. The verifier replays the same
// job (same seed, so the same offsets, sizes and contents) with `--verify_only
// --verify_state_load` against the new primary and reads back every write up to the window
// of writes that were in flight at the crash.
//
// Two caveats of fio 3.33 shape this check:
// * its window test counts *completed* verify reads, so a verifier with iodepth > 1 already
//   issues reads of the in-flight window before the test kicks in and reports writes that never
//   completed as bad (seen: every such offset was missing from the writer's completion log).
//   The verifier therefore runs at iodepth 1 (the depth does not change the replayed offsets).
// * a write that stalled while `iodepth` later ones completed would still count as completed.
//   So each bad block fio reports is looked up in the writer's own completion log (clat log
//   with offsets, only successful completions are logged): only a write fio saw acknowledged
//   and that is wrong on the secondary fails the test; the others are listed in the summary.

/// Big enough that the writer is far from done with its one pass when the primary dies
/// (about 100 MB/s with ack=durable here); sparse, so it costs only what is written.
const CRASH_DISK: &str = "384M";

struct CrashVerify {
    summary: String,
    /// Everything needed to understand a failure: both fio outputs and the daemon logs.
    context: String,
    /// Bad blocks fio had seen acknowledged.
    acknowledged_bad: Vec<u64>,
    /// Bad blocks that were never acknowledged (in flight at the crash).
    unacknowledged_bad: Vec<u64>,
}

fn crash_verify_trial(rng: &mut Rng, target: &str, interval: &str) -> CrashVerify {
    let dir = scratch();
    let depth = rng.pick(&[16u32, 32]);
    let kill_ms = rng.range(350, 1000);
    let fio_seed = rng.next_u64() % 1_000_000_007;
    let params = format!(
        "ack=durable interval={interval} iodepth={depth} kill after {kill_ms} ms, failover --to {target}"
    );
    let mut pair = Pair::start(dir.path(), CRASH_DISK, &ack_flags("durable", interval));
    // One job for the writer and the verifier; only the target, the depth and the verify
    // phase differ. Not time_based (verify_only does not support it), and one pass over a disk
    // much larger than what the writer gets through before the kill: fio's random map keeps its
    // writes from overlapping, so each block has exactly one expected content.
    let job = |uri: &str| -> Vec<String> {
        vec![
            "--name=crash".into(),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--rw=randwrite".into(),
            BSSPLIT.into(),
            format!("--size={CRASH_DISK}"),
            "--verify=crc32c".into(),
            format!("--randseed={fio_seed}"),
            format!("--aux-path={}", dir.path().display()),
        ]
    };
    let state = dir.path().join("local-crash-0-verify.state");
    let mut wargs = job(&pair.uri());
    wargs.extend([
        format!("--iodepth={depth}"),
        "--do_verify=0".into(),
        "--verify_state_save=1".into(),
        format!("--write_lat_log={}", dir.path().join("writer").display()),
        "--log_offset=1".into(),
    ]);
    let mut writer = start_fio(dir.path(), "fio-writer", &wargs);
    sleep_ms(kill_ms);
    if let Ok(Some(st)) = writer.child.try_wait() {
        panic!(
            "[{params}] the fio writer ended ({st}) before the primary was killed (the crash test \
             needs it mid-run):\n{}\n{}",
            writer.log_text(),
            pair.logs()
        );
    }
    pair.primary.signal(libc::SIGKILL);
    pair.primary.wait(Duration::from_secs(10));
    writer.wait(Duration::from_secs(30));
    let wtext = writer.log_text();
    let (_, written) = fio_issued(&wtext)
        .unwrap_or_else(|| panic!("[{params}] no summary from the fio writer:\n{wtext}"));
    assert!(
        state.exists(),
        "[{params}] fio saved no verify state at {} when it lost the primary:\n{wtext}",
        state.display()
    );
    let completed = fio_completed_writes(&dir.path().join("writer_clat.1.log"));
    assert!(
        completed.len() > 64,
        "[{params}] the writer completed only {} writes before the kill:\n{wtext}\n{}",
        completed.len(),
        pair.logs()
    );

    let (ok, out, err) = failover(&pair.s_sock, target, &["--json"]);
    assert!(
        ok,
        "[{params}] failover --to {target} failed:\n{out}\n{err}\n{}",
        pair.logs()
    );
    let v = parse_json(&out).unwrap_or_else(|e| panic!("[{params}] {e}: {out}"));

    let mut vargs = job(&pair.s_uri());
    vargs.extend(owned(&[
        "--iodepth=1",
        "--do_verify=1",
        "--verify_only",
        "--verify_state_load=1",
        "--verify_fatal=0",
        "--continue_on_error=verify",
    ]));
    let vout = run("fio", &refs(&vargs), Duration::from_secs(120));
    let vtext = output_text(&vout);
    let bad = fio_bad_blocks(&vtext);
    let (acknowledged_bad, unacknowledged_bad): (Vec<u64>, Vec<u64>) =
        bad.iter().partition(|o| completed.contains(o));
    let (checked, _) = fio_issued(&vtext).unwrap_or((0, 0));
    let summary = format!(
        "{params}: writer issued {written} writes, {} acknowledged; verifier checked {checked}: \
         {} bad of which {} acknowledged; failover: committed epoch {}, {} blocks restored",
        completed.len(),
        bad.len(),
        acknowledged_bad.len(),
        v["committed_epoch"],
        v["restored_blocks"]
    );
    let context = format!(
        "{summary}\nacknowledged writes bad on the new primary (first 20): {:?}\n\
         --- writer:\n{}\n--- verifier:\n{}\n{}",
        &acknowledged_bad[..acknowledged_bad.len().min(20)],
        wtext.lines().take(40).collect::<Vec<_>>().join("\n"),
        vtext.lines().take(60).collect::<Vec<_>>().join("\n"),
        pair.logs()
    );
    // The verifier itself must have worked: either a clean pass, or failures it explained.
    assert!(
        (vout.status.success() && fio_errors(&vtext) == 0) || !bad.is_empty(),
        "[{params}] fio's verifier failed without reporting bad blocks:\n{context}"
    );
    // fio verifies everything up to the window of writes in flight at the crash: make sure
    // the check was not vacuous.
    assert!(
        checked > 0 && checked + 2 * u64::from(depth) >= written,
        "[{params}] fio's verifier checked only {checked} of {written} writes:\n{context}"
    );
    CrashVerify {
        summary,
        context,
        acknowledged_bad,
        unacknowledged_bad,
    }
}

#[test]
fn ack_durable_failover_to_latest_keeps_every_acknowledged_write() {
    fio_trials(
        "ack_durable_failover_to_latest_keeps_every_acknowledged_write",
        4,
        |_, rng| {
            let interval = rng.pick(&["50ms", "100ms"]);
            let r = crash_verify_trial(rng, "latest", interval);
            assert!(
                r.acknowledged_bad.is_empty(),
                "writes fio saw acknowledged (ack=durable) are missing or wrong on the secondary \
                 after failover --to latest:\n{}",
                r.context
            );
            if r.unacknowledged_bad.is_empty() {
                r.summary
            } else {
                format!(
                    "{} (fio also verified {} writes that were in flight at the crash: {:?})",
                    r.summary,
                    r.unacknowledged_bad.len(),
                    r.unacknowledged_bad
                )
            }
        },
    );
}

/// The control for the test above: the same crash, but failing over to the last checkpoint drops the
/// acknowledged writes of the open epoch, and the check must notice. This proves the
/// verify-state machinery and the completion-log cross-check have teeth with the nbd engine.
#[test]
fn fio_crash_verification_catches_writes_lost_by_failover_to_checkpoint() {
    fio_trials(
        "fio_crash_verification_catches_writes_lost_by_failover_to_checkpoint",
        1,
        |_, rng| {
            let r = crash_verify_trial(rng, "checkpoint", "300ms");
            assert!(
                !r.acknowledged_bad.is_empty(),
                "after failover --to checkpoint the writes acknowledged since the last checkpoint \
                 are gone, yet the crash check found nothing: it is vacuous:\n{}",
                r.context
            );
            r.summary
        },
    );
}
