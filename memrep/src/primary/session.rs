//! A session's start and `lockstep verify`: the secondary's digests against the table.

use super::*;

impl MemoryParticipant {
    pub(super) async fn handshake(
        &self,
        channel: Arc<dyn PeerChannel>,
        epoch: Epoch,
    ) -> Result<(), EpochError> {
        let pages = self.0.region.pages();
        let lost = |reason: String| EpochError::PeerLost { epoch, reason };
        let a = channel.call(wire::hello(pages)).await.map_err(lost)?;
        let (theirs, _) = wire::decode_hello_answer(&a).map_err(lost)?;
        if theirs != pages {
            return Err(EpochError::Refused {
                epoch,
                reason: format!(
                    "the secondary's memory region has {} bytes, this one ({}) {}",
                    theirs * PAGE_SIZE as u64,
                    self.0.region.path().display(),
                    self.0.region.len()
                ),
            });
        }
        // What the secondary lacks: pages whose committed digest differs from ours.
        let differ = self
            .differing(&*channel, wire::digests)
            .await
            .map_err(lost)?;
        let mut st = lock(&self.0.st);
        st.requeue_uncommitted();
        // Pages the secondary holds alike need not be sent, unless written since they were
        // last read (the table does not describe those).
        let keep = &st.stale | &differ;
        st.unsent &= keep;
        st.unsent |= &differ;
        st.resync = differ;
        st.counters.resync_pages += st.unsent.len();
        st.counters.sessions += 1;
        st.epoch = epoch.0;
        st.committed = epoch.0.saturating_sub(1);
        st.session += 1;
        st.channel = Some(channel);
        tracing::info!(
            region = %self.0.region.path().display(),
            to_send = st.unsent.len(),
            "memory session started"
        );
        Ok(())
    }

    /// `lockstep verify`: compare every page's digest with the secondary's committed one.
    /// Pages that differ because they changed since the last commit are expected; any other
    /// difference is a divergence, and such pages are sent again before the next commit.
    pub(super) async fn compare(&self) -> Result<serde_json::Value, String> {
        let t = Instant::now();
        let channel = lock(&self.0.st)
            .channel
            .clone()
            .ok_or("no session with the secondary")?;
        {
            let mut st = lock(&self.0.st);
            st.collect(&self.0.region, false)
                .map_err(|e| e.to_string())?;
        }
        let pages = self.0.region.pages();
        let differ = self.differing(&*channel, wire::verify).await?;
        let mut diverged = Vec::new();
        {
            let mut st = lock(&self.0.st);
            for p in &differ {
                let pending = st.unsent.contains(p) || st.sent_in.values().any(|s| s.contains(p));
                if !pending {
                    diverged.push(p);
                    st.unsent.insert(p);
                }
            }
        }
        let differ = differ.len();
        if !diverged.is_empty() {
            tracing::error!(region = %self.0.region.path().display(), pages = diverged.len(), "memory verify: the secondary's region diverged; those pages are sent again");
        }
        Ok(json!({
            "region": self.0.region.path(),
            "pages": pages,
            "differing_pages": differ,
            "pending_pages": differ - diverged.len() as u64,
            "diverged_pages": diverged.len(),
            "diverged_first": diverged.iter().take(16).collect::<Vec<_>>(),
            "duration_s": t.elapsed().as_secs_f64(),
        }))
    }

    /// The pages whose digest on the secondary (asked with `ask(first, count)`: the
    /// committed table, or the region hashed as it is) differs from this side's table.
    async fn differing(
        &self,
        channel: &dyn PeerChannel,
        ask: fn(u64, u32) -> Vec<u8>,
    ) -> Result<RoaringTreemap, String> {
        let pages = self.0.region.pages();
        let mut differ = RoaringTreemap::new();
        let mut first = 0u64;
        while first < pages {
            let count = (pages - first).min(u64::from(MAX_DIGESTS)) as u32;
            let a = channel.call(ask(first, count)).await?;
            let theirs = wire::decode_digests_answer(&a, count)?;
            let st = lock(&self.0.st);
            for (k, d) in theirs.into_iter().enumerate() {
                let p = first + k as u64;
                if st.table.get(p) != d {
                    differ.insert(p);
                }
            }
            first += u64::from(count);
        }
        Ok(differ)
    }
}
