//! The one loop every leader-only service runs (`run`): snapshot the state, plan (pure),
//! commit the plan's commands through Raft, then start its side effects, whose results show
//! in a later round. A service is a `LeaderService`; `leader::supervise` starts them.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::head::HeadShared;
use crate::state::{Command, Response};

/// One leader-only service, as the shared loop (`run`) drives it.
pub(crate) trait LeaderService: Send + 'static {
    /// For logs ("job manager").
    const NAME: &'static str;
    /// What a round does after its commands are committed.
    type Effects: Send;

    /// What wakes the service before its period ends, if anything.
    fn kick(shared: &HeadShared) -> Option<&Notify>;

    /// The longest wait between rounds.
    fn period(&self) -> Duration {
        Duration::from_millis(250)
    }

    /// Once, after this head's state has every earlier leader's commits.
    fn started(&mut self, _shared: &Arc<HeadShared>) {}

    /// A round while leadership is not confirmed: nothing may be decided.
    fn unconfirmed(&mut self) {}

    /// Snapshot and plan: the commands to commit, and what to do once they are.
    fn plan(&mut self, shared: &HeadShared) -> (Vec<Command>, Self::Effects);

    /// The plan's commands were committed; `replies` answers them in order.
    fn committed(&mut self, _shared: &HeadShared, _replies: &[Response]) {}

    /// Side effects. Anything slow is spawned: the loop does not wait for it.
    fn act(&mut self, shared: &Arc<HeadShared>, effects: Self::Effects);
}

/// The loop every leader service runs: rebuild from the replicated state, then rounds of
/// snapshot → plan → commit → side effects → wait, granting nothing while leadership is not
/// confirmed by a quorum. A round whose commit fails does nothing else and is retried.
pub(crate) async fn run<S: LeaderService>(shared: Arc<HeadShared>, mut svc: S) {
    shared.settle_leadership(S::NAME).await;
    svc.started(&shared);
    tracing::info!("{} started", S::NAME);
    let mut was_leading = true;
    loop {
        if !shared.leading() {
            // Not confirmed by a quorum: this head grants nothing this round, and (once, as
            // it stops leading) zeroes the leader's gauges.
            svc.unconfirmed();
            if std::mem::replace(&mut was_leading, false) {
                crate::metrics::record_not_leading();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        was_leading = true;
        let (commands, effects) = svc.plan(&shared);
        if !commands.is_empty() {
            let n = commands.len();
            match shared.propose(Command::Batch(commands)).await {
                Ok(Response::Batch(rs)) if rs.len() == n => svc.committed(&shared, &rs),
                Ok(other) => {
                    tracing::error!(?other, "{}: unexpected reply to its batch", S::NAME);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(
                        "{} could not commit its decisions: {}",
                        S::NAME,
                        e.message()
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        svc.act(&shared, effects);
        let period = tokio::time::sleep(svc.period());
        match S::kick(&shared) {
            Some(kick) => tokio::select! {
                _ = kick.notified() => {}
                _ = period => {}
            },
            None => period.await,
        }
    }
}

/// Side effects in flight or done in this term, so each is started once per need: a failed
/// one is forgotten so a later round retries it.
pub(crate) struct InFlight<K>(Arc<Mutex<HashSet<K>>>);

impl<K> Clone for InFlight<K> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<K> Default for InFlight<K> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<K: Eq + Hash> InFlight<K> {
    /// True if `key` was not in flight (it is now).
    pub(crate) fn start(&self, key: K) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(key)
    }

    /// `key` may be started again.
    pub(crate) fn forget(&self, key: &K) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}
