//! A disk that fails or stalls on demand, for I/O-error tests (in the spirit of nbdkit's
//! error and delay filters).
//!
//! [`Faulty`] wraps any [`Backend`] and checks each request, when it is first polled,
//! against its [`Rule`]s. A rule picks an operation (or any), a byte range and an
//! [`Effect`]: fail with an errno, fail after the request has reached the disk (a torn or
//! misreported write), or wait first. Rules are added and removed while the disk is in use,
//! so a test can break a disk mid-run and heal it; every injected fault is counted.
//!
//! ```text
//!   request ──▶ matching rules ──▶ delays (summed) ──▶ first failing rule? ──▶ error
//!                                                            │ none, or "after"
//!                                                            ▼
//!                                                        inner disk
//! ```

use crate::sync::Locked;
use std::sync::Mutex;
use std::time::Duration;

use super::{Backend, Extent, IoBuf, IoFuture, Op, StorageError};

/// What a matching rule does to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Fail with this errno; the disk is not touched.
    Fail(i32),
    /// Pass the request to the disk, then report this errno anyway (the data may be there:
    /// what a disk that fails mid-request leaves behind).
    FailAfter(i32),
    /// Wait this long, then go on.
    Delay(Duration),
}

/// One fault: which requests it hits and what it does to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    op: Option<Op>,
    range: Option<(u64, u64)>,
    effect: Effect,
    times: Option<u64>,
}

impl Rule {
    /// A rule for requests of kind `op` (`Op::Write`, `Op::Flush`, ...); it fails them with
    /// EIO until told otherwise.
    pub fn on(op: Op) -> Self {
        Self {
            op: Some(op),
            range: None,
            effect: Effect::Fail(libc::EIO),
            times: None,
        }
    }

    /// A rule for requests of every kind.
    pub fn any() -> Self {
        Self {
            op: None,
            ..Self::on(Op::Read)
        }
    }

    /// Only requests that touch bytes `offset .. offset + len` (a flush touches every byte).
    pub fn range(mut self, offset: u64, len: u64) -> Self {
        self.range = Some((offset, offset.saturating_add(len)));
        self
    }

    /// Fail with `errno` (`libc::EIO`, `libc::ENOSPC`, ...).
    pub fn fail(self, errno: i32) -> Self {
        self.effect(Effect::Fail(errno))
    }

    /// Apply the request, then fail it with `errno`.
    pub fn fail_after(self, errno: i32) -> Self {
        self.effect(Effect::FailAfter(errno))
    }

    /// Wait `d` before the request goes on.
    pub fn delay(self, d: Duration) -> Self {
        self.effect(Effect::Delay(d))
    }

    /// Any effect.
    pub fn effect(mut self, effect: Effect) -> Self {
        self.effect = effect;
        self
    }

    /// Hit only the next `n` matching requests; the rule stays (with its count) but is spent.
    pub fn times(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }

    fn matches(&self, op: Op, offset: u64, len: u64) -> bool {
        if self.op.is_some_and(|o| o != op) || self.times == Some(0) {
            return false;
        }
        match self.range {
            None => true,
            Some(_) if op == Op::Flush => true,
            Some((start, end)) => offset < end && start < offset.saturating_add(len.max(1)),
        }
    }
}

/// Identifies a rule of one [`Faulty`] disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleId(u64);

/// How many faults a [`Faulty`] disk has injected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Requests failed (with [`Effect::Fail`] or [`Effect::FailAfter`]).
    pub failed: u64,
    /// Requests delayed.
    pub delayed: u64,
}

#[derive(Debug, Default)]
struct Rules {
    next: u64,
    list: Vec<(RuleId, Rule, u64)>,
    counts: FaultCounts,
}

/// What happens to one request.
#[derive(Debug, Default)]
struct Plan {
    delay: Duration,
    fail: Option<(RuleId, i32)>,
    after: bool,
}

/// A [`Backend`] that injects the faults its rules describe into requests to `inner`.
#[derive(Debug)]
pub struct Faulty<B> {
    inner: B,
    rules: Mutex<Rules>,
}

impl<B: Backend> Faulty<B> {
    /// `inner` with no rules yet: every request passes.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            rules: Mutex::default(),
        }
    }

    /// The wrapped disk.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Start injecting `rule`; requests polled from now on see it.
    pub fn add(&self, rule: Rule) -> RuleId {
        let mut r = self.rules.locked();
        r.next += 1;
        let id = RuleId(r.next);
        r.list.push((id, rule, 0));
        id
    }

    /// Stop injecting rule `id`. Returns how many requests it hit, None if it was not there.
    pub fn remove(&self, id: RuleId) -> Option<u64> {
        let mut r = self.rules.locked();
        let at = r.list.iter().position(|(i, ..)| *i == id)?;
        Some(r.list.remove(at).2)
    }

    /// Remove every rule: the disk is healed.
    pub fn heal(&self) {
        self.rules.locked().list.clear();
    }

    /// How many requests rule `id` has hit so far (0 for a rule that is gone).
    pub fn hits(&self, id: RuleId) -> u64 {
        let r = self.rules.locked();
        r.list
            .iter()
            .find(|(i, ..)| *i == id)
            .map_or(0, |(.., n)| *n)
    }

    /// Faults injected so far, by every rule there has been.
    pub fn injected(&self) -> FaultCounts {
        self.rules.locked().counts
    }

    fn plan(&self, op: Op, offset: u64, len: u64) -> Plan {
        let mut r = self.rules.locked();
        let mut plan = Plan::default();
        let mut delayed = false;
        for (id, rule, hits) in r.list.iter_mut() {
            if !rule.matches(op, offset, len) {
                continue;
            }
            let (errno, after) = match rule.effect {
                Effect::Delay(d) => {
                    plan.delay += d;
                    delayed = true;
                    (None, false)
                }
                Effect::Fail(e) => (Some(e), false),
                Effect::FailAfter(e) => (Some(e), true),
            };
            if let Some(e) = errno {
                if plan.fail.is_some() {
                    continue; // the first failing rule decides; later ones are not hit
                }
                plan.fail = Some((*id, e));
                plan.after = after;
            }
            *hits += 1;
            if let Some(t) = rule.times.as_mut() {
                *t -= 1;
            }
        }
        r.counts.delayed += u64::from(delayed);
        r.counts.failed += u64::from(plan.fail.is_some());
        plan
    }

    /// Run `io` (the request `op` at `offset`, `len` bytes) under the rules.
    fn run<'a, T: Send + 'a>(
        &'a self,
        op: Op,
        offset: u64,
        len: u64,
        io: IoFuture<'a, T>,
    ) -> IoFuture<'a, T> {
        Box::pin(async move {
            let plan = self.plan(op, offset, len);
            if !plan.delay.is_zero() {
                tokio::time::sleep(plan.delay).await;
            }
            let Some((RuleId(id), errno)) = plan.fail else {
                return io.await;
            };
            if plan.after {
                io.await?;
            }
            Err(StorageError::Io {
                op,
                path: format!("fault injection (rule {id})").into(),
                offset,
                len,
                source: std::io::Error::from_raw_os_error(errno),
            })
        })
    }
}

impl<B: Backend> Backend for Faulty<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn alignment(&self) -> u32 {
        self.inner.alignment()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf> {
        self.run(
            Op::Read,
            offset,
            len as u64,
            self.inner.read_at(offset, len),
        )
    }
    fn write_at(&self, offset: u64, data: IoBuf, fua: bool) -> IoFuture<'_, ()> {
        let len = data.len() as u64;
        self.run(
            Op::Write,
            offset,
            len,
            self.inner.write_at(offset, data, fua),
        )
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.run(Op::Flush, 0, self.inner.size(), self.inner.flush())
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.run(Op::Discard, offset, len, self.inner.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        let io = self.inner.write_zeroes(offset, len, may_unmap);
        self.run(Op::WriteZeroes, offset, len, io)
    }
    fn start_writeback(&self) {
        self.inner.start_writeback()
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        let io = self.inner.block_status(offset, len);
        self.run(Op::BlockStatus, offset, len, io)
    }
}

#[cfg(test)]
mod tests {
    use super::super::suite;
    use super::*;
    use crate::storage::MemoryBackend;
    use std::sync::Arc;

    fn disk() -> Faulty<MemoryBackend> {
        Faulty::new(MemoryBackend::new(64 * 1024))
    }

    fn errno<T: std::fmt::Debug>(r: crate::storage::Result<T>) -> i32 {
        r.unwrap_err().errno()
    }

    #[test]
    fn without_rules_it_is_the_disk_it_wraps() {
        suite::run_all(|s| (Arc::new(Faulty::new(MemoryBackend::new(s))), Box::new(())));
    }

    #[test]
    fn a_delay_rule_everywhere_keeps_every_answer() {
        suite::run_all(|s| {
            let d = Faulty::new(MemoryBackend::new(s));
            d.add(Rule::any().delay(Duration::from_micros(50)));
            (Arc::new(d), Box::new(()))
        });
    }

    #[tokio::test]
    async fn a_write_rule_fails_writes_in_its_range_only_and_leaves_them_unapplied() {
        let d = disk();
        let id = d.add(Rule::on(Op::Write).range(8192, 4096));
        let e = d
            .write_at(8000, IoBuf::from_slice(&[1; 200]), false)
            .await
            .unwrap_err();
        assert!(matches!(e, StorageError::Io { op: Op::Write, .. }), "{e}");
        assert_eq!(e.errno(), libc::EIO);
        assert!(e.to_string().contains("fault injection"), "{e}");
        assert!(
            d.inner().snapshot().iter().all(|&b| b == 0),
            "the failed write landed"
        );
        // Next to the range, and other kinds of request inside it, pass.
        for (off, len, fill) in [(0, 8192, 2), (12288, 10, 3)] {
            let data = IoBuf::from_slice(&vec![fill; len]);
            d.write_at(off, data, false).await.unwrap();
        }
        d.write_zeroes(8192, 4096, false).await.unwrap();
        d.read_at(8192, 4096).await.unwrap();
        d.flush().await.unwrap();
        let img = d.inner().snapshot();
        assert_eq!((img[0], img[8191], img[12288]), (2, 2, 3));
        assert_eq!(d.hits(id), 1);
        assert_eq!(
            d.injected(),
            FaultCounts {
                failed: 1,
                delayed: 0
            }
        );
    }

    #[tokio::test]
    async fn errnos_are_the_chosen_ones_and_removing_a_rule_heals() {
        let d = disk();
        let nospc = d.add(Rule::on(Op::Write).fail(libc::ENOSPC));
        let flush = d.add(Rule::on(Op::Flush).range(0, 1));
        let reads = d.add(Rule::on(Op::Read).range(4096, 1).fail(libc::EIO));
        let trims = d.add(Rule::on(Op::Discard).fail(libc::EOPNOTSUPP));
        let zeroes = d.add(Rule::on(Op::WriteZeroes).fail(libc::EROFS));
        assert_eq!(
            errno(d.write_at(0, IoBuf::zeroed(1), true).await),
            libc::ENOSPC
        );
        assert_eq!(
            errno(d.flush().await),
            libc::EIO,
            "a flush touches every range"
        );
        assert_eq!(errno(d.read_at(0, 8192).await), libc::EIO);
        assert_eq!(errno(d.discard(0, 1).await), libc::EOPNOTSUPP);
        assert_eq!(errno(d.write_zeroes(0, 1, true).await), libc::EROFS);
        d.read_at(0, 4096).await.unwrap();
        assert_eq!(d.remove(nospc), Some(1));
        assert_eq!(d.remove(nospc), None);
        d.write_at(0, IoBuf::from_slice(&[7]), false).await.unwrap();
        for id in [flush, reads, trims, zeroes] {
            assert_eq!(d.hits(id), 1);
        }
        d.heal();
        d.flush().await.unwrap();
        d.discard(0, 1).await.unwrap();
        assert_eq!(d.injected().failed, 5);
    }

    #[tokio::test]
    async fn times_limits_a_rule_and_the_first_failing_rule_decides() {
        let d = disk();
        let any = d.add(Rule::any().fail(libc::EIO).times(2));
        let writes = d.add(Rule::on(Op::Write).fail(libc::ENOSPC));
        assert_eq!(
            errno(d.write_at(0, IoBuf::zeroed(1), false).await),
            libc::EIO
        );
        assert_eq!(errno(d.read_at(0, 1).await), libc::EIO);
        // Spent: the write rule answers now, reads pass.
        assert_eq!(
            errno(d.write_at(0, IoBuf::zeroed(1), false).await),
            libc::ENOSPC
        );
        d.read_at(0, 1).await.unwrap();
        assert_eq!((d.hits(any), d.hits(writes)), (2, 1));
    }

    #[tokio::test]
    async fn fail_after_applies_the_request_and_still_reports_the_error() {
        let d = disk();
        d.add(Rule::on(Op::Write).fail_after(libc::EIO));
        let e = d.write_at(100, IoBuf::from_slice(&[9; 4]), true).await;
        assert_eq!(errno(e), libc::EIO);
        assert_eq!(&d.inner().snapshot()[100..104], &[9; 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn delays_add_up_and_are_counted() {
        let d = Arc::new(disk());
        d.add(Rule::on(Op::Write).delay(Duration::from_secs(3)));
        d.add(Rule::any().range(0, 4096).delay(Duration::from_secs(2)));
        let t = tokio::time::Instant::now();
        d.write_at(0, IoBuf::from_slice(&[5; 10]), false)
            .await
            .unwrap();
        assert_eq!(t.elapsed(), Duration::from_secs(5));
        let t = tokio::time::Instant::now();
        d.read_at(0, 10).await.unwrap();
        d.read_at(8192, 10).await.unwrap();
        assert_eq!(t.elapsed(), Duration::from_secs(2));
        // A slow write does not hold other requests back.
        let w = tokio::spawn({
            let d = d.clone();
            async move { d.write_at(9000, IoBuf::from_slice(&[6]), false).await }
        });
        tokio::task::yield_now().await;
        let t = tokio::time::Instant::now();
        d.read_at(9000, 1).await.unwrap();
        assert_eq!(t.elapsed(), Duration::ZERO);
        w.await.unwrap().unwrap();
        assert_eq!(d.read_at(9000, 1).await.unwrap()[0], 6);
        assert_eq!(
            d.injected(),
            FaultCounts {
                failed: 0,
                delayed: 3
            }
        );
    }

    #[tokio::test]
    async fn rules_apply_when_the_request_runs_not_when_it_is_made() {
        let d = disk();
        let w = d.write_at(0, IoBuf::from_slice(&[1]), false);
        let id = d.add(Rule::on(Op::Write));
        assert_eq!(errno(w.await), libc::EIO);
        let w = d.write_at(0, IoBuf::from_slice(&[1]), false);
        d.remove(id);
        w.await.unwrap();
    }
}
