//! Lease requests: each one's course from
//! this process's node along spillback replies (the node bounds the hops). An infeasible
//! or timed-out request asks again while tasks wait (the nodes report that demand to the
//! autoscaler); a request whose RPCs keep failing fails the tasks waiting for it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{LeaseId, NodeId, WorkerId, pb};

use super::engine::{Effect, Engine, TimerEvent, task_error};
use super::state::{Key, Lease, LeaseReq};
use super::{LEASE_QUEUE_TIMEOUT, Task};
use crate::TaskErrorKind;

/// Consecutive failed lease RPCs (not refusals) after which waiting tasks fail (~15 s).
pub(super) const MAX_LEASE_FAILURES: u32 = 10;
/// How long an infeasible request waits before asking again.
pub(super) const INFEASIBLE_RETRY: Duration = Duration::from_secs(1);
/// How long a request that timed out in a queue waits before asking again.
pub(super) const BUSY_RETRY: Duration = Duration::from_millis(50);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

impl Engine {
    /// Starts a lease request for `key` at this process's node.
    pub(super) fn request_lease(&mut self, key: &Arc<Key>) {
        let req = self.next_id();
        self.leases.insert(
            req,
            LeaseReq {
                key: key.clone(),
                addr: self.home.nm.clone(),
                hops: 0,
                failures: 0,
                backoff: FIRST_BACKOFF,
            },
        );
        self.keys.entry(key.clone()).or_default().requests.push(req);
        self.send_lease(req);
    }

    /// Abandons every lease request of `key` (nothing waits for them).
    pub(super) fn cancel_leases(&mut self, key: &Arc<Key>) {
        let Some(ks) = self.keys.get_mut(key) else {
            return;
        };
        for req in std::mem::take(&mut ks.requests) {
            self.leases.remove(&req);
            self.out.push(Effect::CancelLease(req));
        }
    }

    /// Sends request `req` to the node it is at, telling it how many tasks wait (the
    /// autoscaler's demand: every waiting task wants a worker, however few leases are
    /// asked for).
    fn send_lease(&mut self, req: u64) {
        let Some(l) = self.leases.get(&req) else {
            return;
        };
        let backlog = self.keys.get(&l.key).map_or(0, |k| k.queue.len());
        let request = pb::LeaseRequest {
            resources: l.key.shape.iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            strategy: l.key.strategy,
            affinity_node_id: l.key.affinity.clone(),
            affinity_soft: l.key.soft,
            spillback_count: l.hops,
            queue_timeout_ms: LEASE_QUEUE_TIMEOUT.as_millis() as u64,
            binary_sha256: self.identity.binary.0.clone(),
            binary_source: self.identity.binary.1.clone(),
            job_id: self.identity.job_id.clone(),
            backlog: backlog.min(u32::MAX as usize) as u32,
            owner_prefix: self.identity.prefix.clone(),
        };
        self.out.push(Effect::RequestLease {
            req,
            key: l.key.clone(),
            addr: l.addr.clone(),
            request,
        });
    }

    /// Asks again from this process's node after `after`.
    fn retry_later(&mut self, req: u64, after: Duration) {
        self.out.push(Effect::Timer {
            after,
            event: TimerEvent::LeaseRetry(req),
        });
    }

    pub(super) fn lease_retry(&mut self, req: u64) {
        let home = self.home.nm.clone();
        let Some(l) = self.leases.get_mut(&req) else {
            return;
        };
        l.addr = home;
        l.hops = 0;
        self.send_lease(req);
    }

    fn lease_done(&mut self, req: u64) -> Option<LeaseReq> {
        let l = self.leases.remove(&req)?;
        if let Some(ks) = self.keys.get_mut(&l.key) {
            ks.requests.retain(|r| *r != req);
        }
        self.dirty.push(l.key.clone());
        Some(l)
    }

    pub(super) fn lease_reply(
        &mut self,
        req: u64,
        key: Arc<Key>,
        addr: String,
        reply: Result<pb::LeaseReply, String>,
        now: Instant,
    ) {
        let known = self.leases.contains_key(&req);
        let r = match reply {
            Ok(r) => r,
            Err(e) => {
                let Some(l) = self.leases.get_mut(&req) else {
                    return;
                };
                tracing::warn!("lease request to {addr} failed: {e}");
                l.failures += 1;
                // A node that cannot start a worker (a missing binary, a worker that crashes
                // at start) will not start to: give up after a while.
                if l.failures >= MAX_LEASE_FAILURES {
                    let why = format!(
                        "{} lease requests failed, the last at {addr}: {e}",
                        l.failures
                    );
                    self.lease_done(req);
                    self.lease_failed(&key, &why);
                    return;
                }
                let after = l.backoff;
                l.backoff = (l.backoff * 2).min(MAX_BACKOFF);
                self.retry_later(req, after);
                return;
            }
        };
        if let Some(l) = self.leases.get_mut(&req) {
            l.failures = 0;
        }
        match pb::LeaseOutcome::try_from(r.outcome) {
            Ok(pb::LeaseOutcome::Granted) => {
                let ids = (
                    r.lease_id.parse::<LeaseId>(),
                    r.node_id.parse::<NodeId>(),
                    r.worker_id.parse::<WorkerId>(),
                );
                let (Ok(lease_id), Ok(node_id), Ok(worker_id)) = ids else {
                    // Not a lease this process can use or return: the node takes an
                    // unclaimed lease back after a while.
                    let (a, b, c) = ids;
                    let why = [a.err(), b.err(), c.err()].into_iter().flatten();
                    let why: Vec<String> = why.map(|e| e.to_string()).collect();
                    tracing::warn!(
                        "node {addr} granted a lease with bad ids: {}",
                        why.join("; ")
                    );
                    if let Some(l) = self.leases.get_mut(&req) {
                        l.failures += 1;
                        let after = l.backoff;
                        l.backoff = (l.backoff * 2).min(MAX_BACKOFF);
                        self.retry_later(req, after);
                    }
                    return;
                };
                // Granted after the request was abandoned: used all the same (or, with
                // nothing to run, closed after `LINGER`, which returns it).
                if known {
                    self.lease_done(req);
                }
                let lease = Lease {
                    lease_id,
                    node_id,
                    node_address: addr.into(),
                    worker_id,
                    worker_address: r.worker_address,
                };
                let id = self.open(key.clone(), lease, now);
                self.keys.entry(key.clone()).or_default().conns.push(id);
                self.dirty.push(key);
            }
            _ if !known => {}
            Ok(pb::LeaseOutcome::Spillback) if !r.address.is_empty() => {
                let l = self.leases.get_mut(&req).expect("known");
                l.addr = r.address;
                l.hops += 1;
                self.send_lease(req);
            }
            Ok(pb::LeaseOutcome::Infeasible) => {
                self.out.push(Effect::Warn {
                    key: format!("infeasible {}", key.describe()),
                    message: format!(
                        "tasks needing {} cannot be scheduled: {}. They wait until a node that can run them joins the cluster (the autoscaler adds one if a node type fits).",
                        key.describe(),
                        r.message
                    ),
                });
                self.retry_later(req, INFEASIBLE_RETRY);
            }
            Ok(pb::LeaseOutcome::TimedOut)
                if self.keys.get(&key).is_none_or(|k| k.conns.is_empty()) =>
            {
                // None of these tasks runs anywhere: say why they wait. (With some running
                // it is an ordinary backlog.)
                self.out.push(Effect::Warn {
                    key: format!("busy {}", key.describe()),
                    message: format!(
                        "tasks needing {} have waited {}s for a worker: every node that can run them is busy{}. They run as resources free up.",
                        key.describe(),
                        LEASE_QUEUE_TIMEOUT.as_secs(),
                        if r.message.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", r.message)
                        }
                    ),
                });
                self.retry_later(req, BUSY_RETRY);
            }
            // Timed out while others of this shape run (a backlog), or a spillback without
            // an address: ask again.
            _ => self.retry_later(req, BUSY_RETRY),
        }
    }

    /// Lease requests for `key` keep failing: its waiting tasks fail.
    fn lease_failed(&mut self, key: &Arc<Key>, why: &str) {
        let Some(ks) = self.keys.get_mut(key) else {
            return;
        };
        let tasks: Vec<Task> = ks.queue.drain(..).collect();
        for t in tasks {
            self.stats
                .pending_node
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            let e = task_error(
                &t,
                TaskErrorKind::Scheduling,
                format!("no worker could be leased: {why}"),
                "",
                "",
            );
            self.finish_failed(&t, e);
        }
    }
}
