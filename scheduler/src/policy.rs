//! Placement policies, as pure functions over a [`ClusterView`]: what a node does with a
//! lease request (DESIGN §3, §6).
//!
//! - **Hybrid** (the default, Ray's): stay on the local node while its utilisation after
//!   placing stays below `spread_threshold` (0.5); otherwise choose among the top `top_k`
//!   fraction (20 %, at least one) of nodes with room, least utilised first, by the caller's
//!   random pick.
//! - **SPREAD**: round-robin over the nodes with room, by the caller's cursor.
//! - **Node affinity**: the named node; hard affinity fails as infeasible when that node is
//!   dead or can never fit the demand, soft affinity falls back to hybrid.
//!
//! A request that fits no live node's *total* is infeasible. One that fits some total but no
//! node's *available* resources right now is queued: here if this node could ever run it,
//! else spilled to a node that could.
//!
//! Invariants (property-tested): never a dead node; `Local`/`Spillback` for immediate
//! placement only onto a node whose available resources contain the demand; `Queue` only on a
//! node whose total contains it; `Infeasible` only when no live node's total does (or, for
//! hard affinity, the named one's).

use std::collections::BTreeMap;

use protocol::NodeId;

use crate::resources::ResourceSet;

#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub total: ResourceSet,
    pub available: ResourceSet,
    pub alive: bool,
}

/// What this node knows of the cluster (soft state from the leader; may be slightly stale).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    pub nodes: BTreeMap<NodeId, NodeView>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchedulingStrategy {
    Hybrid,
    Spread,
    NodeAffinity { node: NodeId, soft: bool },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyConfig {
    pub spread_threshold: f64,
    /// Fraction of the live nodes the hybrid policy picks from.
    pub top_k_fraction: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            spread_threshold: 0.5,
            top_k_fraction: 0.2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run it here now.
    Local,
    /// Ask this node instead (it has room now, or it is the only kind that ever could).
    Spillback(NodeId),
    /// It fits this node's total but not what is free now: wait here.
    Queue,
    /// No live node can ever run it.
    Infeasible,
}

/// Decides where a request with `demand` goes, as node `local` sees the cluster. `pick(n)`
/// returns an index below `n` (the caller's RNG, or a cursor for SPREAD); it is called at
/// most once.
pub fn decide(
    view: &ClusterView,
    local: NodeId,
    demand: &ResourceSet,
    strategy: &SchedulingStrategy,
    cfg: PolicyConfig,
    pick: &mut dyn FnMut(usize) -> usize,
) -> Decision {
    let alive: Vec<(&NodeId, &NodeView)> = view.nodes.iter().filter(|(_, n)| n.alive).collect();
    let fits_total = |n: &NodeView| n.total.contains(demand);
    let has_room = |n: &NodeView| n.available.contains(demand);
    let place = |id: NodeId| {
        if id == local {
            Decision::Local
        } else {
            Decision::Spillback(id)
        }
    };

    if let SchedulingStrategy::NodeAffinity { node, soft } = strategy {
        match view.nodes.get(node).filter(|n| n.alive && fits_total(n)) {
            Some(n) if has_room(n) => return place(*node),
            Some(_) => {
                return if *node == local {
                    Decision::Queue
                } else {
                    Decision::Spillback(*node)
                };
            }
            None if !soft => return Decision::Infeasible,
            None => {}
        }
    }

    let feasible: Vec<(&NodeId, &NodeView)> = alive
        .iter()
        .copied()
        .filter(|(_, n)| fits_total(n))
        .collect();
    if feasible.is_empty() {
        return Decision::Infeasible;
    }
    let mut ready: Vec<(&NodeId, &NodeView)> = feasible
        .iter()
        .copied()
        .filter(|(_, n)| has_room(n))
        .collect();
    if ready.is_empty() {
        if feasible.iter().any(|(id, _)| **id == local) {
            return Decision::Queue;
        }
        // Queue where it can run one day: the least utilised such node.
        let best = feasible
            .iter()
            .min_by(|a, b| {
                score(a.1, demand)
                    .total_cmp(&score(b.1, demand))
                    .then(a.0.cmp(b.0))
            })
            .expect("not empty");
        return Decision::Spillback(*best.0);
    }

    match strategy {
        SchedulingStrategy::Spread => {
            let i = pick(ready.len()) % ready.len();
            place(*ready[i].0)
        }
        _ => {
            let local_view = ready.iter().find(|(id, _)| **id == local).map(|(_, n)| *n);
            if let Some(n) = local_view
                && score(n, demand) < cfg.spread_threshold
            {
                return Decision::Local;
            }
            // Below the threshold every node counts as empty; among equals, local first.
            let key = |id: &NodeId, n: &NodeView| {
                let s = score(n, demand);
                (
                    if s < cfg.spread_threshold { 0.0 } else { s },
                    *id != local,
                    *id,
                )
            };
            ready.sort_by(|a, b| {
                let (ka, kb) = (key(a.0, a.1), key(b.0, b.1));
                ka.0.total_cmp(&kb.0)
                    .then(ka.1.cmp(&kb.1))
                    .then(ka.2.cmp(&kb.2))
            });
            let k =
                ((alive.len() as f64 * cfg.top_k_fraction).ceil() as usize).clamp(1, ready.len());
            let i = pick(k) % k;
            place(*ready[i].0)
        }
    }
}

fn score(n: &NodeView, demand: &ResourceSet) -> f64 {
    n.total.utilization(&n.available, demand)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn nid(b: u8) -> NodeId {
        NodeId::from_bytes([b; 16])
    }

    fn rs(cpu: f64, gpu: f64) -> ResourceSet {
        ResourceSet::from_map([("CPU", cpu), ("GPU", gpu)]).unwrap()
    }

    /// (total CPU, available CPU, total GPU, alive) per node 1, 2, …
    fn view(nodes: &[(f64, f64, f64, bool)]) -> ClusterView {
        ClusterView {
            nodes: nodes
                .iter()
                .enumerate()
                .map(|(i, (t, a, g, alive))| {
                    (
                        nid(i as u8 + 1),
                        NodeView {
                            total: rs(*t, *g),
                            available: rs(*a, *g),
                            alive: *alive,
                        },
                    )
                })
                .collect(),
        }
    }

    fn check(
        nodes: &[(f64, f64, f64, bool)],
        demand: ResourceSet,
        strategy: SchedulingStrategy,
        pick: usize,
        want: Decision,
    ) {
        let got = decide(
            &view(nodes),
            nid(1),
            &demand,
            &strategy,
            PolicyConfig::default(),
            &mut |n| pick.min(n - 1),
        );
        assert_eq!(
            got, want,
            "nodes {nodes:?}, demand {demand:?}, {strategy:?}"
        );
    }

    #[test]
    fn hybrid_packs_locally_then_spreads() {
        use Decision::*;
        let h = SchedulingStrategy::Hybrid;
        // Local has room and stays under half used: here.
        check(
            &[(4.0, 4.0, 0.0, true), (4.0, 4.0, 0.0, true)],
            rs(1.0, 0.0),
            h.clone(),
            0,
            Local,
        );
        // Local would pass 0.5: the least utilised node with room.
        check(
            &[(4.0, 2.0, 0.0, true), (4.0, 4.0, 0.0, true)],
            rs(1.0, 0.0),
            h.clone(),
            0,
            Spillback(nid(2)),
        );
        // Only node 2 has a GPU.
        check(
            &[(4.0, 4.0, 0.0, true), (4.0, 4.0, 1.0, true)],
            rs(1.0, 1.0),
            h.clone(),
            0,
            Spillback(nid(2)),
        );
        // Nobody has room, local could: queue here.
        check(
            &[(4.0, 0.0, 0.0, true), (4.0, 0.0, 0.0, true)],
            rs(1.0, 0.0),
            h.clone(),
            0,
            Queue,
        );
        // No node has two GPUs.
        check(
            &[(4.0, 4.0, 0.0, true), (4.0, 4.0, 1.0, true)],
            rs(1.0, 2.0),
            h.clone(),
            0,
            Infeasible,
        );
        // Nobody has room and only node 2 ever could: queue there.
        check(
            &[(1.0, 1.0, 0.0, true), (8.0, 0.0, 0.0, true)],
            rs(4.0, 0.0),
            h.clone(),
            0,
            Spillback(nid(2)),
        );
        // The only capable node is dead: infeasible.
        check(
            &[(1.0, 1.0, 0.0, true), (8.0, 8.0, 0.0, false)],
            rs(4.0, 0.0),
            h,
            0,
            Infeasible,
        );
    }

    #[test]
    fn spread_and_affinity() {
        use Decision::*;
        let nodes = [
            (4.0, 4.0, 0.0, true),
            (4.0, 4.0, 0.0, true),
            (4.0, 4.0, 0.0, true),
        ];
        for (cursor, want) in [(0, Local), (1, Spillback(nid(2))), (2, Spillback(nid(3)))] {
            check(
                &nodes,
                rs(1.0, 0.0),
                SchedulingStrategy::Spread,
                cursor,
                want,
            );
        }
        let hard = |b| SchedulingStrategy::NodeAffinity {
            node: nid(b),
            soft: false,
        };
        let soft = |b| SchedulingStrategy::NodeAffinity {
            node: nid(b),
            soft: true,
        };
        check(&nodes, rs(1.0, 0.0), hard(3), 0, Spillback(nid(3)));
        check(
            &[(4.0, 4.0, 0.0, true), (4.0, 0.0, 0.0, true)],
            rs(1.0, 0.0),
            hard(2),
            0,
            Spillback(nid(2)),
        );
        check(
            &[(4.0, 0.0, 0.0, true), (4.0, 4.0, 0.0, true)],
            rs(1.0, 0.0),
            hard(1),
            0,
            Queue,
        );
        check(
            &[(4.0, 4.0, 0.0, true), (4.0, 4.0, 0.0, false)],
            rs(1.0, 0.0),
            hard(2),
            0,
            Infeasible,
        );
        check(
            &[(4.0, 4.0, 0.0, true), (4.0, 4.0, 0.0, false)],
            rs(1.0, 0.0),
            soft(2),
            0,
            Local,
        );
        check(&nodes, rs(1.0, 0.0), hard(9), 0, Infeasible);
    }

    fn arb_view() -> impl Strategy<Value = ClusterView> {
        proptest::collection::vec((0u8..5, 0u8..5, 0u8..2, any::<bool>()), 1..8).prop_map(|v| {
            ClusterView {
                nodes: v
                    .into_iter()
                    .enumerate()
                    .map(|(i, (t, a, g, alive))| {
                        let (t, a) = (f64::from(t), f64::from(a.min(t)));
                        (
                            nid(i as u8 + 1),
                            NodeView {
                                total: rs(t, f64::from(g)),
                                available: rs(a, f64::from(g)),
                                alive,
                            },
                        )
                    })
                    .collect(),
            }
        })
    }

    proptest! {
        /// Never a dead node, never over-allocation, infeasible only when truly so.
        #[test]
        fn decisions_respect_liveness_and_capacity(
            v in arb_view(), cpu in 0u8..6, gpu in 0u8..2, strat in 0u8..4, target in 1u8..9, pick in any::<usize>(),
        ) {
            let demand = rs(f64::from(cpu), f64::from(gpu));
            let strategy = match strat {
                0 => SchedulingStrategy::Hybrid,
                1 => SchedulingStrategy::Spread,
                2 => SchedulingStrategy::NodeAffinity { node: nid(target), soft: false },
                _ => SchedulingStrategy::NodeAffinity { node: nid(target), soft: true },
            };
            let local = nid(1);
            let mut calls = 0;
            let d = decide(&v, local, &demand, &strategy, PolicyConfig::default(), &mut |n| { calls += 1; pick % n });
            prop_assert!(calls <= 1);
            let n = |id: &NodeId| v.nodes.get(id).cloned();
            match &d {
                Decision::Local => {
                    let l = n(&local).unwrap();
                    prop_assert!(l.alive && l.available.contains(&demand));
                }
                Decision::Spillback(id) => {
                    let t = n(id).unwrap();
                    prop_assert!(*id != local && t.alive && t.total.contains(&demand));
                }
                Decision::Queue => {
                    let l = n(&local).unwrap();
                    prop_assert!(l.alive && l.total.contains(&demand));
                }
                Decision::Infeasible => {
                    let any = v.nodes.values().any(|x| x.alive && x.total.contains(&demand));
                    match strategy {
                        SchedulingStrategy::NodeAffinity { node, soft: false } => {
                            prop_assert!(n(&node).is_none_or(|x| !x.alive || !x.total.contains(&demand)));
                        }
                        _ => prop_assert!(!any),
                    }
                }
            }
            // Placing now only onto room: a spillback to a node without room happens only when
            // no live node has room (or affinity names it).
            if let Decision::Spillback(id) = &d {
                let room_somewhere = v.nodes.values().any(|x| x.alive && x.available.contains(&demand));
                let named = matches!(strategy, SchedulingStrategy::NodeAffinity { node, .. } if node == *id);
                prop_assert!(n(id).unwrap().available.contains(&demand) || !room_somewhere || named);
            }
        }
    }
}
