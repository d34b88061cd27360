//! The pre-send: between checkpoints, dirty and unsent pages go to the secondary while the
//! guest runs, several messages in flight.

use super::*;

impl MemoryParticipant {
    /// Between checkpoints: collect and send dirty and unsent pages while the guest runs.
    pub(super) async fn presend(self, session: u64, every: Duration) {
        let mut last_collect = Instant::now() - every;
        // Sends in flight: reading the next batch overlaps sending the last ones.
        let mut flying = tokio::task::JoinSet::new();
        loop {
            // Reap finished sends; a failed one ends this session's pre-send (the sends
            // still in flight finish their own bookkeeping: they are never cancelled).
            while let Some(r) = flying.try_join_next() {
                if !matches!(r, Ok(true)) {
                    flying.detach_all();
                    return;
                }
            }
            if flying.len() >= PRESEND_WINDOW {
                if !matches!(flying.join_next().await, Some(Ok(true))) {
                    flying.detach_all();
                    return;
                }
                continue;
            }
            // Let others (a cut above all) have the state between batches.
            tokio::task::yield_now().await;
            if self.0.cutting.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_micros(200)).await;
                continue;
            }
            let next = {
                let mut st = lock_async(&self.0.st).await;
                if st.session != session {
                    drop(st);
                    flying.detach_all();
                    return;
                }
                // Collect every `every`, but while a backlog is being sent no more often
                // than ten times what a collect costs (a scan hashes the whole region).
                let since = last_collect.elapsed();
                let cost = Duration::from_micros(st.counters.collect_us);
                if since >= every && (st.unsent.len() < PRESEND_BATCH * 4 || since >= cost * 10) {
                    last_collect = Instant::now();
                    // A scan of a large region takes long: status does not wait for it.
                    let _long = Raised::new(&self.0.long_hold);
                    match st.collect(&self.0.region, false) {
                        Ok(n) => {
                            if let Some(t) = self.0.trigger.get() {
                                t.add_bytes(n * PAGE_SIZE as u64);
                            }
                        }
                        Err(e) => {
                            st.counters.last_error = Some(format!("collect: {e}"));
                        }
                    }
                }
                if st.unsent.is_empty() || st.channel.is_none() {
                    None
                } else {
                    let b = st.read_unsent(&self.0.region, Some(PRESEND_BATCH));
                    let epoch = st.epoch;
                    *st.inflight.entry(epoch).or_default() += 1;
                    Some((epoch, b, st.channel.clone().expect("checked")))
                }
            };
            let Some((epoch, batches, channel)) = next else {
                if flying.is_empty() {
                    tokio::time::sleep(every.min(Duration::from_millis(5))).await;
                } else if !matches!(flying.join_next().await, Some(Ok(true))) {
                    flying.detach_all();
                    return;
                }
                continue;
            };
            flying.spawn(self.clone().send_batches(session, epoch, batches, channel));
        }
    }

    /// Send pre-send batches of `epoch`; false if the session ended or the send failed.
    async fn send_batches(
        self,
        session: u64,
        epoch: u64,
        batches: Vec<Batch>,
        channel: Arc<dyn PeerChannel>,
    ) -> bool {
        let mut r = Ok(());
        let mut sent = (0, 0, 0);
        for b in batches {
            let bytes = b.message.len() as u64;
            r = channel.call(b.message).await.map(drop);
            if r.is_err() {
                break;
            }
            sent.0 += b.pages;
            sent.1 += b.pages - b.data_pages;
            sent.2 += bytes;
        }
        {
            let mut st = lock_async(&self.0.st).await;
            if st.session != session {
                // A new session began meanwhile and counts afresh.
                return false;
            }
            if let Some(n) = st.inflight.get_mut(&epoch) {
                *n = n.saturating_sub(1);
            }
            st.counters.presend_pages += sent.0;
            st.counters.zero_pages_sent += sent.1;
            st.counters.bytes_sent += sent.2;
            if let Err(e) = &r {
                st.counters.last_error = Some(format!("pre-send: {e}"));
            }
        }
        self.0.changed.notify_waiters();
        // On failure the session is gone: the next one resends what this one did not commit.
        r.is_ok()
    }
}
