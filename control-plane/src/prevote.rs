//! Pre-vote, built around openraft 0.9 (which has none): a head campaigns only after a
//! majority of the voters agree that they, too, have lost their leader.
//!
//! openraft's elections are switched off (`enable_elect = false` at start) and [`gate`] turns
//! them on only while a pre-vote round succeeds: this head has heard from no leader for the
//! election timeout's maximum, and a majority of the voters (itself included) answer the
//! `PreVote` RPC with "granted", meaning they are not a leader confirmed by a quorum, have heard
//! from no leader for that long either, and do not have a longer log. A head cut off from
//! the majority therefore never raises its term, so when it comes back it cannot depose a
//! healthy leader (term inflation: 29 terms in 14 s before this).
//!
//! Invariant: a pre-vote changes nothing anywhere: no term, no vote is stored. It only gates
//! the real election, whose rules (openraft's) are unchanged.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::ServerState;
use protocol::auth::{AuthToken, ClientAuth};
use protocol::pb;
use serde::{Deserialize, Serialize};

use crate::types::Raft;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreVoteRequest {
    pub candidate: u64,
    /// The term the candidate would campaign at.
    pub term: u64,
    pub last_log_index: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PreVoteResponse {
    pub granted: bool,
    pub reason: String,
}

/// When this head last heard from a leader it accepted (AppendEntries or InstallSnapshot that
/// was not refused for a stale term).
#[derive(Default)]
pub(crate) struct LeaderContact(Mutex<Option<Instant>>);

impl LeaderContact {
    pub(crate) fn heard(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    pub(crate) fn since(&self) -> Option<Duration> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed())
    }
}

/// What this head answers a pre-vote, from what it sees (pure, so it is table-tested).
pub(crate) fn answer(
    req: &PreVoteRequest,
    leading: bool,
    since_leader: Option<Duration>,
    fresh: Duration,
    last_log_index: u64,
) -> PreVoteResponse {
    let deny = |reason: String| PreVoteResponse {
        granted: false,
        reason,
    };
    if leading {
        return deny("this head leads, confirmed by a quorum".into());
    }
    if let Some(s) = since_leader.filter(|s| *s < fresh) {
        return deny(format!(
            "this head heard from its leader {} ms ago",
            s.as_millis()
        ));
    }
    if req.last_log_index < last_log_index {
        return deny(format!(
            "the candidate's log ends at {}, this head's at {last_log_index}",
            req.last_log_index
        ));
    }
    PreVoteResponse {
        granted: true,
        reason: String::new(),
    }
}

/// Whether a majority of `voters` (this head counted once, as granted) granted.
fn majority(voters: usize, granted_by_others: usize) -> bool {
    (granted_by_others + 1) * 2 > voters
}

/// Keeps openraft's elections off unless a pre-vote round would win (see the module doc).
pub(crate) async fn gate(
    raft: Raft,
    raft_id: u64,
    contact: Arc<LeaderContact>,
    peer: AuthToken,
    fresh: Duration,
) {
    let mut enabled: Option<bool> = None;
    loop {
        let m = raft.metrics().borrow().clone();
        let want = if m.state == ServerState::Leader {
            enabled.unwrap_or(false)
        } else if contact.since().is_some_and(|s| s < fresh) {
            false
        } else {
            round(raft_id, &peer, &m).await
        };
        if enabled != Some(want) {
            raft.runtime_config().elect(want);
            if want {
                tracing::info!(term = m.current_term, "pre-vote won: elections enabled");
            } else if enabled.is_some() {
                tracing::debug!(
                    term = m.current_term,
                    "elections disabled (a leader is alive, or the pre-vote lost)"
                );
            }
            enabled = Some(want);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Metrics = openraft::RaftMetrics<u64, openraft::BasicNode>;

/// One pre-vote round to every other voter; whether a majority granted.
async fn round(raft_id: u64, peer: &AuthToken, m: &Metrics) -> bool {
    let voters: Vec<(u64, String)> = m
        .membership_config
        .membership()
        .voter_ids()
        .filter_map(|id| {
            let n = m.membership_config.membership().get_node(&id)?;
            Some((id, n.addr.clone()))
        })
        .collect();
    if voters.is_empty() {
        return false;
    }
    let req = PreVoteRequest {
        candidate: raft_id,
        term: m.current_term + 1,
        last_log_index: m.last_log_index.unwrap_or(0),
    };
    let Ok(data) = postcard::to_allocvec(&req) else {
        return false;
    };
    let asks = voters
        .iter()
        .filter(|(id, _)| *id != raft_id)
        .map(|(_, addr)| ask(addr.clone(), peer.clone(), data.clone()));
    let answers = futures_util::future::join_all(asks).await;
    let granted = answers.iter().filter(|g| **g).count();
    majority(voters.len(), granted)
}

async fn ask(addr: String, peer: AuthToken, data: Vec<u8>) -> bool {
    let opts = protocol::client::ClientOptions {
        rpc_timeout: Duration::from_millis(200),
        connect_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let Ok(ch) = protocol::client::channel(&addr, &opts) else {
        return false;
    };
    let mut c = pb::raft_client::RaftClient::with_interceptor(ch, ClientAuth(Some(peer)));
    let reply = tokio::time::timeout(
        Duration::from_millis(250),
        c.pre_vote(pb::RaftMessage { data }),
    )
    .await;
    match reply {
        Ok(Ok(r)) => {
            postcard::from_bytes::<PreVoteResponse>(&r.into_inner().data).is_ok_and(|a| a.granted)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(index: u64) -> PreVoteRequest {
        PreVoteRequest {
            candidate: 1,
            term: 5,
            last_log_index: index,
        }
    }

    #[test]
    fn answers() {
        let fresh = Duration::from_millis(500);
        let ms = Duration::from_millis;
        let check = |r: &PreVoteRequest, leading, since, last, granted| {
            let a = answer(r, leading, since, fresh, last);
            assert_eq!(a.granted, granted, "{a:?}");
            assert_eq!(a.reason.is_empty(), granted);
        };
        check(&req(10), false, None, 10, true);
        check(&req(10), false, Some(ms(600)), 10, true);
        check(&req(11), false, Some(ms(900)), 10, true);
        // A leader confirmed by a quorum, or a follower that heard from one: no.
        check(&req(10), true, None, 10, false);
        check(&req(10), false, Some(ms(100)), 10, false);
        // A shorter log: no.
        check(&req(9), false, None, 10, false);
    }

    #[test]
    fn majorities() {
        assert!(majority(1, 0));
        assert!(!majority(3, 0));
        assert!(majority(3, 1));
        assert!(!majority(5, 1));
        assert!(majority(5, 2));
    }
}
