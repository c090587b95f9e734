//! Draining a node: it stops taking work, moves the primary copies of its objects to other
//! nodes, tells their owners where they went, then leaves the cluster.
//!
//! A primary copy is one somebody may still `get` (owners free theirs when the last
//! reference goes), so a node must not leave with it. A drain therefore:
//! 1. stops grants (under the lease lock) and refuses if leases, bundles, job drivers or
//!    drivers are here: those cannot move;
//! 2. asks other live nodes to pull the primary copies (`TakeObjects`: heads first, since
//!    they are never scaled down), each object to one node, the next node if one fails;
//! 3. tells every live node which objects moved (`ObjectsMoved`): the node hands the news to
//!    the owner connected to it, which swaps the old location for the new one;
//! 4. makes its own copies secondary and accepts; the daemon then leaves.
//!
//! Invariant: an object's copy here stays primary until its owner was told of the new one,
//! or until every live node answered that no owner of it is connected (the owner is gone, so
//! the object is garbage and its new copy is freed). If a node could not be asked, the
//! drain is refused and the copy stays: a later drain asks again, and every step is
//! idempotent (a node that already holds an object just makes it primary).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use protocol::ObjectId;
use protocol::client::ClientOptions;
use protocol::pb;

use crate::NodeShared;

/// How long one drain may spend moving objects; what is not moved by then keeps the node
/// (the drain is refused and the next one goes on). Below the 10 s a head gives the call.
const MOVE_BUDGET: Duration = Duration::from_secs(8);

/// A node that may take objects.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Target {
    pub(crate) node_id: String,
    /// Node manager (`TakeObjects`, `FreeObjects`).
    pub(crate) nm: String,
    /// Object manager (where owners then pull from).
    pub(crate) om: String,
}

/// The nodes objects may move to, best first: live, not draining, not this node; heads
/// before worker nodes (a head's node is never scaled down, so a copy there never has to
/// move again), then by node id so every drain orders them the same way.
pub(crate) fn targets(view: &[pb::NodeResources], me: &str) -> Vec<Target> {
    let mut v: Vec<&pb::NodeResources> = view
        .iter()
        .filter(|n| !n.draining && n.node_id != me && n.object_manager_port != 0)
        .collect();
    v.sort_by(|a, b| (!a.is_head, &a.node_id).cmp(&(!b.is_head, &b.node_id)));
    v.into_iter()
        .map(|n| Target {
            node_id: n.node_id.clone(),
            nm: n.address.clone(),
            om: crate::om_address(&n.address, n.object_manager_port),
        })
        .collect()
}

/// Spreads objects over targets: the object at index `i` of the drain's list goes first to
/// target `i mod n`, then in each later round (after a failure) to the next target. Returns,
/// for one round, target index → objects.
pub(crate) fn assign(
    objects: &[(usize, ObjectId)],
    targets: usize,
    round: usize,
) -> BTreeMap<usize, Vec<(usize, ObjectId)>> {
    let mut out: BTreeMap<usize, Vec<(usize, ObjectId)>> = BTreeMap::new();
    if targets == 0 {
        return out;
    }
    for &(i, id) in objects {
        out.entry((i + round) % targets).or_default().push((i, id));
    }
    out
}

impl NodeShared {
    /// Accepts a drain unless the node is busy or holds primary copies it cannot move; once
    /// accepted, nothing new is granted here and the node leaves (its daemon waits on
    /// `RunningNode::drained`).
    pub(crate) async fn drain(self: &Arc<Self>, reason: String) -> Result<(), String> {
        if self.is_head {
            return Err("this is a head's node: stop the head instead".into());
        }
        self.leases.begin_drain()?;
        // Checked after grants stopped, so nothing can start between the check and the drain.
        let why = self.busy_reasons();
        if !why.is_empty() {
            self.leases.cancel_drain();
            return Err(format!("busy: {}", why.join(", ")));
        }
        if let Err(e) = self.move_primaries().await {
            self.leases.cancel_drain();
            // Idle again from now: the next try comes an idle timeout later, not at once.
            *self.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Err(e);
        }
        *self.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.drained.send_replace(Some(reason));
        Ok(())
    }

    fn node_client(
        &self,
        addr: &str,
        timeout: Duration,
    ) -> Result<protocol::client::NmClient, String> {
        let opts = ClientOptions {
            rpc_timeout: timeout,
            ..Default::default()
        };
        protocol::client::node_manager(addr, self.token.clone(), &opts)
            .map_err(|e| format!("node {addr}: {e}"))
    }

    /// Moves every primary copy here to another node and tells its owner; an error names
    /// what could not be moved (the copies stay here, primary).
    async fn move_primaries(self: &Arc<Self>) -> Result<(), String> {
        let ids = self.store.primary_ids();
        if ids.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + MOVE_BUDGET;
        let view = self
            .cluster_view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let targets = targets(&view, &self.node_id.to_string());
        if targets.is_empty() {
            return Err(format!(
                "{} primary object copy(ies) here and no other live node to move them to",
                ids.len()
            ));
        }
        tracing::info!(objects = ids.len(), "draining: moving primary copies");
        // 1. Copies on other nodes.
        let mut left: Vec<(usize, ObjectId)> = ids.into_iter().enumerate().collect();
        let mut moved: Vec<(ObjectId, usize)> = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        for round in 0..targets.len() {
            if left.is_empty() {
                break;
            }
            let calls = assign(&left, targets.len(), round)
                .into_iter()
                .map(|(t, ids)| {
                    let target = targets[t].clone();
                    let me = self.clone();
                    async move {
                        let remaining =
                            deadline.saturating_duration_since(tokio::time::Instant::now());
                        let only: Vec<ObjectId> = ids.iter().map(|(_, id)| *id).collect();
                        let r = me.take_on(&target, &only, remaining).await;
                        (t, ids, r)
                    }
                });
            let mut next = Vec::new();
            for (t, ids, r) in futures_util::future::join_all(calls).await {
                match r {
                    Ok((taken, errs)) => {
                        errors.extend(errs);
                        for (i, id) in ids {
                            if taken.contains(&id) {
                                moved.push((id, t));
                            } else {
                                next.push((i, id));
                            }
                        }
                    }
                    Err(e) => {
                        errors.push(e);
                        next.extend(ids);
                    }
                }
            }
            left = next;
        }
        // 2. Their owners told; copies nobody owns any more freed at their new place.
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (told, unowned, not_asked) = self.announce(&moved, &targets, &peers, deadline).await;
        for id in &told {
            self.store.set_primary(*id, false);
        }
        let mut frees: BTreeMap<usize, Vec<ObjectId>> = BTreeMap::new();
        for (id, t) in &moved {
            if unowned.contains(id) {
                frees.entry(*t).or_default().push(*id);
            }
        }
        for (t, ids) in frees {
            if let Ok(mut c) = self.node_client(&targets[t].nm, Duration::from_secs(2)) {
                let _ = c
                    .free_objects(pb::FreeObjectsRequest {
                        object_ids: ids.iter().map(|i| i.as_bytes().to_vec()).collect(),
                    })
                    .await;
            }
            for id in ids {
                self.store.set_primary(id, false);
            }
        }
        let stuck = left.len() + moved.len() - told.len() - unowned.len();
        if stuck == 0 {
            tracing::info!(
                moved = told.len(),
                unowned = unowned.len(),
                "draining: every primary copy moved"
            );
            return Ok(());
        }
        errors.extend(not_asked);
        errors.truncate(5);
        Err(format!(
            "{stuck} primary object copy(ies) could not be moved off this node (kept here): {}",
            errors.join("; ")
        ))
    }

    /// Asks `target` to take `ids`; returns the ones it took and its errors.
    async fn take_on(
        &self,
        target: &Target,
        ids: &[ObjectId],
        timeout: Duration,
    ) -> Result<(HashSet<ObjectId>, Vec<String>), String> {
        if timeout.is_zero() {
            return Err(format!("node {}: out of time", target.node_id));
        }
        let mut c = self.node_client(&target.nm, timeout)?;
        let r = c
            .take_objects(pb::TakeObjectsRequest {
                source: self.my_om(),
                object_ids: ids.iter().map(|i| i.as_bytes().to_vec()).collect(),
            })
            .await
            .map_err(|e| format!("node {}: {}", target.node_id, e.message()))?
            .into_inner();
        let taken = r
            .taken
            .iter()
            .filter_map(|b| ObjectId::from_slice(b).ok())
            .collect();
        let errs = r
            .errors
            .into_iter()
            .map(|e| format!("node {}: {e}", target.node_id))
            .collect();
        Ok((taken, errs))
    }

    /// Tells every live node (this one and draining ones too) where `moved` went. Returns the objects whose
    /// owner got the news, those no node has an owner for (only when every node answered),
    /// and why a node could not be asked.
    async fn announce(
        &self,
        moved: &[(ObjectId, usize)],
        targets: &[Target],
        view: &[pb::NodeResources],
        deadline: tokio::time::Instant,
    ) -> (HashSet<ObjectId>, HashSet<ObjectId>, Vec<String>) {
        if moved.is_empty() {
            return Default::default();
        }
        let me = self.node_id.to_string();
        let req = pb::ObjectsMovedRequest {
            moves: moved
                .iter()
                .map(|(id, t)| pb::ObjectMove {
                    object_id: id.as_bytes().to_vec(),
                    from_node_id: me.clone(),
                    to: Some(pb::ObjectLocation {
                        node_id: targets[*t].node_id.clone(),
                        object_manager_address: targets[*t].om.clone(),
                        node_address: targets[*t].nm.clone(),
                    }),
                })
                .collect(),
        };
        let mut told: HashSet<ObjectId> = self.workers.objects_moved(&req).into_iter().collect();
        let calls = view.iter().filter(|n| n.node_id != me).map(|n| {
            let req = req.clone();
            async move {
                let remaining = deadline
                    .saturating_duration_since(tokio::time::Instant::now())
                    .max(Duration::from_secs(1));
                let mut c = self.node_client(&n.address, remaining)?;
                c.objects_moved(req)
                    .await
                    .map(|r| r.into_inner().delivered)
                    .map_err(|e| format!("node {}: {}", n.node_id, e.message()))
            }
        });
        let mut failed = Vec::new();
        for r in futures_util::future::join_all(calls).await {
            match r {
                Ok(ids) => told.extend(ids.iter().filter_map(|b| ObjectId::from_slice(b).ok())),
                Err(e) => failed.push(format!("cannot tell its owners: {e}")),
            }
        }
        // A node can only vouch for what was asked.
        told.retain(|id| moved.iter().any(|(m, _)| m == id));
        let unowned = if failed.is_empty() {
            moved
                .iter()
                .map(|(id, _)| *id)
                .filter(|id| !told.contains(id))
                .collect()
        } else {
            HashSet::new()
        };
        (told, unowned, failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, head: bool, draining: bool, om: u32) -> pb::NodeResources {
        pb::NodeResources {
            node_id: id.into(),
            address: format!("10.0.0.{}:7000", id.len()),
            object_manager_port: om,
            draining,
            is_head: head,
            ..Default::default()
        }
    }

    #[test]
    fn targets_are_live_other_nodes_heads_first() {
        let view = [
            node("b", false, false, 9),
            node("me", false, false, 9),
            node("a", false, false, 9),
            node("h", true, false, 9),
            node("d", false, true, 9),
            node("z", false, false, 0),
        ];
        let t = targets(&view, "me");
        let ids: Vec<&str> = t.iter().map(|t| t.node_id.as_str()).collect();
        assert_eq!(ids, ["h", "a", "b"]);
        assert_eq!(t[0].om, "10.0.0.1:9");
        assert_eq!(t[0].nm, "10.0.0.1:7000");
        assert!(targets(&[node("me", false, false, 9)], "me").is_empty());
    }

    #[test]
    fn objects_are_spread_and_a_failed_object_tries_the_next_target() {
        let ids: Vec<(usize, ObjectId)> = (0..5u8)
            .map(|i| (usize::from(i), ObjectId::from_bytes([i; 20])))
            .collect();
        let r0 = assign(&ids, 2, 0);
        assert_eq!(r0[&0], [ids[0], ids[2], ids[4]]);
        assert_eq!(r0[&1], [ids[1], ids[3]]);
        // Object 1 failed on target 1: round 1 sends it to target 0, whatever its place in
        // the shorter list of what is left.
        let r1 = assign(&ids[1..2], 2, 1);
        assert_eq!(r1.keys().collect::<Vec<_>>(), [&0]);
        // With three targets, each round tries another one until all were tried.
        let tried: Vec<usize> = (0..3)
            .map(|round| *assign(&ids[1..2], 3, round).keys().next().unwrap())
            .collect();
        assert_eq!(tried, [1, 2, 0]);
        assert!(assign(&ids, 0, 0).is_empty());
    }
}
