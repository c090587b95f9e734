//! The leader lease: whether this head's leadership has been confirmed by a quorum recently
//! enough to grant anything. openraft 0.9 keeps a leader that lost its quorum in the leader
//! state until it hears a higher term, so "am I leader?" is not enough: heartbeat replies
//! (which renew the actor workers' serving lease), node-health verdicts, actor starts, bundle
//! reservations and job starts all ask [`LeaderLease::holds`] instead.
//!
//! Invariant: the lease is dated from the moment a confirming round *started* (a quorum
//! acknowledged this leader after that moment), on the monotonic clock, and lasts
//! [`LeaderLease::length`] = min(0.15 × node timeout, the election timeout's maximum):
//! - shorter than openraft's follower lease (the election timeout's maximum), so while it
//!   holds no other head can have been elected;
//! - lease + serving lease (0.8 × node timeout) < node timeout, so a cut-off leader's nodes
//!   stop serving actors before a new leader can declare them dead (docs/decisions.md).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::ServerState;

use crate::types::Raft;

pub(crate) struct LeaderLease {
    length: Duration,
    /// (start of the last round a quorum confirmed, the term it confirmed)
    confirmed: Mutex<Option<(Instant, u64)>>,
}

impl LeaderLease {
    pub(crate) fn new(node_timeout: Duration, election_max: Duration) -> Self {
        let length = node_timeout
            .mul_f64(0.15)
            .min(election_max)
            .max(Duration::from_millis(100));
        Self {
            length,
            confirmed: Mutex::new(None),
        }
    }

    pub(crate) fn length(&self) -> Duration {
        self.length
    }

    /// Whether leadership in `term` was confirmed by a quorum within the lease.
    pub(crate) fn holds(&self, term: u64) -> bool {
        self.holds_at(term, Instant::now())
    }

    fn holds_at(&self, term: u64, now: Instant) -> bool {
        self.confirmed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|(at, t)| t == term && now.saturating_duration_since(at) < self.length)
    }

    fn confirm(&self, started: Instant, term: u64) {
        let mut c = self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        if c.is_none_or(|(at, t)| t != term || started > at) {
            *c = Some((started, term));
        }
    }

    fn clear(&self) {
        *self.confirmed.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Renews the lease while this head is leader: a read-index round (a heartbeat to every
/// follower, answered by a quorum) several times per lease.
pub(crate) async fn keep_confirmed(raft: Raft, lease: Arc<LeaderLease>) {
    let every = (lease.length() / 4).max(Duration::from_millis(25));
    let mut was_leading = false;
    loop {
        let (state, term, last_log) = {
            let m = raft.metrics().borrow().clone();
            (m.state, m.current_term, m.last_log_index)
        };
        if state == ServerState::Leader {
            let started = Instant::now();
            let round = tokio::time::timeout(lease.length(), raft.get_read_log_id());
            if let Ok(Ok(_)) = round.await {
                lease.confirm(started, term);
            }
        } else {
            lease.clear();
        }
        let leading = state == ServerState::Leader && lease.holds(term);
        if leading != was_leading {
            if leading {
                tracing::info!(term, "leadership confirmed by a quorum");
            } else if state == ServerState::Leader {
                tracing::warn!(
                    term,
                    lease = ?lease.length(),
                    "no quorum confirmed this leader within its lease: it grants nothing until one does"
                );
            }
            was_leading = leading;
        }
        crate::metrics::record_raft(term, leading, last_log, None);
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_is_shorter_than_a_fifth_of_the_node_timeout_and_the_follower_lease() {
        let l = LeaderLease::new(Duration::from_millis(2500), Duration::from_millis(500));
        assert_eq!(l.length(), Duration::from_millis(375));
        let l = LeaderLease::new(Duration::from_secs(5), Duration::from_millis(500));
        assert_eq!(l.length(), Duration::from_millis(500));
        for t in [1u64, 2, 5, 10, 60] {
            let node_timeout = Duration::from_secs(t);
            let l = LeaderLease::new(node_timeout, Duration::from_millis(500));
            assert!(
                l.length() + node_timeout.mul_f64(0.8) < node_timeout,
                "{t} s"
            );
        }
    }

    #[test]
    fn it_holds_for_its_term_within_its_length_only() {
        let l = LeaderLease::new(Duration::from_secs(2), Duration::from_millis(500));
        let t0 = Instant::now();
        assert!(!l.holds_at(3, t0));
        l.confirm(t0, 3);
        assert!(l.holds_at(3, t0 + Duration::from_millis(299)));
        assert!(!l.holds_at(3, t0 + Duration::from_millis(300)));
        assert!(!l.holds_at(4, t0), "another term");
        // An older round that finishes late never moves the lease back.
        l.confirm(t0 + Duration::from_millis(200), 3);
        l.confirm(t0 + Duration::from_millis(100), 3);
        assert!(l.holds_at(3, t0 + Duration::from_millis(450)));
        l.clear();
        assert!(!l.holds_at(3, t0 + Duration::from_millis(201)));
    }
}
