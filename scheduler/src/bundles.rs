//! Placement-group bundles (DESIGN §6): where each bundle of a group goes, all at once.
//!
//! - **STRICT_PACK**: every bundle on one node.
//! - **PACK**: as few nodes as possible: a bundle goes to a node the group already uses when
//!   it fits there.
//! - **SPREAD**: as many nodes as possible: a bundle goes to a node the group does not use yet
//!   when one fits.
//! - **STRICT_SPREAD**: every bundle on a different node.
//!
//! The search is exact (depth-first with the strategy's preference order, bounded by
//! `MAX_STEPS`), so a group is placed whenever some assignment satisfies its strategy, not
//! only when a greedy pass happens to find one. A group that no assignment fits with the
//! live nodes' *available* resources waits if one fits their *totals*, else is infeasible.
//!
//! Invariants (property-tested, with a brute-force oracle on small cases): a placement uses
//! only live nodes, never assigns a node more than it has available, keeps STRICT_PACK on one
//! node and STRICT_SPREAD on distinct nodes; `Wait`/`Infeasible` only when no assignment fits.

use std::collections::BTreeMap;

use protocol::NodeId;

use crate::policy::ClusterView;
use crate::resources::ResourceSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleStrategy {
    Pack,
    Spread,
    StrictPack,
    StrictSpread,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundlePlacement {
    /// The node of each bundle, in the order given.
    Placed(Vec<NodeId>),
    /// It fits the live nodes' totals but not what is free now.
    Wait,
    /// No assignment fits even the live nodes' totals.
    Infeasible(String),
}

/// Search steps after which the search gives up (then the group waits and is retried).
const MAX_STEPS: usize = 200_000;

/// Places `bundles` with `strategy` over the live nodes of `view`.
pub fn place_bundles(
    view: &ClusterView,
    bundles: &[ResourceSet],
    strategy: BundleStrategy,
) -> BundlePlacement {
    if bundles.is_empty() {
        return BundlePlacement::Infeasible("a placement group needs at least one bundle".into());
    }
    let live: Vec<(NodeId, &ResourceSet, &ResourceSet)> = view
        .nodes
        .iter()
        .filter(|(_, n)| n.alive)
        .map(|(id, n)| (*id, &n.available, &n.total))
        .collect();
    let now: Vec<(NodeId, ResourceSet)> =
        live.iter().map(|(id, a, _)| (*id, (*a).clone())).collect();
    if let Some(p) = search(&now, bundles, strategy) {
        return BundlePlacement::Placed(p);
    }
    let totals: Vec<(NodeId, ResourceSet)> =
        live.iter().map(|(id, _, t)| (*id, (*t).clone())).collect();
    if search(&totals, bundles, strategy).is_some() {
        return BundlePlacement::Wait;
    }
    let why = match strategy {
        BundleStrategy::StrictSpread if bundles.len() > live.len() => {
            format!(
                "STRICT_SPREAD needs {} nodes, {} are alive",
                bundles.len(),
                live.len()
            )
        }
        BundleStrategy::StrictPack => {
            "no live node has the sum of the bundles in total".to_string()
        }
        _ => "the live nodes' totals cannot hold these bundles".to_string(),
    };
    BundlePlacement::Infeasible(why)
}

fn sum(bundles: &[ResourceSet]) -> ResourceSet {
    let mut s = ResourceSet::new();
    for b in bundles {
        s.add(b);
    }
    s
}

/// One assignment satisfying `strategy` within `nodes`' resources, if the search finds one.
fn search(
    nodes: &[(NodeId, ResourceSet)],
    bundles: &[ResourceSet],
    strategy: BundleStrategy,
) -> Option<Vec<NodeId>> {
    if strategy == BundleStrategy::StrictPack {
        let all = sum(bundles);
        // The fullest node that fits: leaves bigger holes for later groups.
        return nodes
            .iter()
            .filter(|(_, r)| r.contains(&all))
            .min_by(|a, b| size(&a.1).total_cmp(&size(&b.1)))
            .map(|(id, _)| vec![*id; bundles.len()]);
    }
    // Biggest bundles first: they are the hard ones.
    let mut order: Vec<usize> = (0..bundles.len()).collect();
    order.sort_by(|a, b| {
        size(&bundles[*b])
            .total_cmp(&size(&bundles[*a]))
            .then(a.cmp(b))
    });
    let mut free: Vec<ResourceSet> = nodes.iter().map(|(_, r)| r.clone()).collect();
    let mut used = vec![0usize; nodes.len()];
    let mut at = vec![usize::MAX; bundles.len()];
    let mut steps = 0;
    if dfs(
        0, &order, bundles, strategy, &mut free, &mut used, &mut at, &mut steps,
    ) {
        Some(at.iter().map(|i| nodes[*i].0).collect())
    } else {
        None
    }
}

/// A rough magnitude, for ordering only.
fn size(r: &ResourceSet) -> f64 {
    r.iter().map(|(_, v)| v).sum()
}

#[allow(clippy::too_many_arguments)]
fn dfs(
    k: usize,
    order: &[usize],
    bundles: &[ResourceSet],
    strategy: BundleStrategy,
    free: &mut [ResourceSet],
    used: &mut [usize],
    at: &mut [usize],
    steps: &mut usize,
) -> bool {
    if k == order.len() {
        return true;
    }
    *steps += 1;
    if *steps > MAX_STEPS {
        return false;
    }
    let b = &bundles[order[k]];
    let mut candidates: Vec<usize> = (0..free.len()).filter(|i| free[*i].contains(b)).collect();
    match strategy {
        BundleStrategy::StrictSpread => candidates.retain(|i| used[*i] == 0),
        // Nodes in use first, the busiest of them first; then the others, roomiest first.
        BundleStrategy::Pack => candidates.sort_by(|a, c| {
            (used[*c] > 0)
                .cmp(&(used[*a] > 0))
                .then(used[*c].cmp(&used[*a]))
                .then(size(&free[*c]).total_cmp(&size(&free[*a])))
        }),
        // Nodes not in use first, roomiest first.
        BundleStrategy::Spread => candidates.sort_by(|a, c| {
            used[*a]
                .cmp(&used[*c])
                .then(size(&free[*c]).total_cmp(&size(&free[*a])))
        }),
        BundleStrategy::StrictPack => unreachable!("handled by search"),
    }
    if strategy == BundleStrategy::StrictSpread {
        candidates.sort_by(|a, c| size(&free[*c]).total_cmp(&size(&free[*a])));
    }
    // Equal nodes are interchangeable: trying one of each kind is enough.
    let mut tried: Vec<(usize, ResourceSet)> = Vec::new();
    for i in candidates {
        if tried.iter().any(|(u, f)| *u == used[i] && *f == free[i]) {
            continue;
        }
        tried.push((used[i], free[i].clone()));
        free[i].subtract(b).expect("candidates contain the bundle");
        used[i] += 1;
        at[order[k]] = i;
        if dfs(k + 1, order, bundles, strategy, free, used, at, steps) {
            return true;
        }
        used[i] -= 1;
        free[i].add(b);
    }
    false
}

/// Resources each node gives the group, for accounting: node → sum of its bundles.
pub fn per_node(placement: &[NodeId], bundles: &[ResourceSet]) -> BTreeMap<NodeId, ResourceSet> {
    let mut m: BTreeMap<NodeId, ResourceSet> = BTreeMap::new();
    for (n, b) in placement.iter().zip(bundles) {
        m.entry(*n).or_default().add(b);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::NodeView;
    use proptest::prelude::*;

    fn nid(i: u8) -> NodeId {
        NodeId::from_bytes([i; 16])
    }

    fn cpus(n: f64) -> ResourceSet {
        ResourceSet::from_map([("CPU", n)]).unwrap()
    }

    fn view(nodes: &[(u8, f64, f64, bool)]) -> ClusterView {
        ClusterView {
            nodes: nodes
                .iter()
                .map(|(i, avail, total, alive)| {
                    (
                        nid(*i),
                        NodeView {
                            total: cpus(*total),
                            available: cpus(*avail),
                            alive: *alive,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn strategies_on_a_table_of_cases() {
        use BundlePlacement::*;
        use BundleStrategy::*;
        let three = view(&[
            (1, 4.0, 4.0, true),
            (2, 4.0, 4.0, true),
            (3, 4.0, 4.0, true),
        ]);
        let two_cpus = vec![cpus(2.0); 3];
        // STRICT_SPREAD: one bundle per node.
        let Placed(p) = place_bundles(&three, &two_cpus, StrictSpread) else {
            panic!()
        };
        assert_eq!(p.iter().collect::<std::collections::BTreeSet<_>>().len(), 3);
        // PACK: two bundles fill a node, the third goes to a second one.
        let Placed(p) = place_bundles(&three, &two_cpus, Pack) else {
            panic!()
        };
        assert_eq!(p.iter().collect::<std::collections::BTreeSet<_>>().len(), 2);
        // SPREAD: every node once.
        let Placed(p) = place_bundles(&three, &two_cpus, Spread) else {
            panic!()
        };
        assert_eq!(p.iter().collect::<std::collections::BTreeSet<_>>().len(), 3);
        // STRICT_PACK of 6 CPUs: no node has 6 in total.
        assert!(matches!(
            place_bundles(&three, &two_cpus, StrictPack),
            Infeasible(_)
        ));
        // STRICT_SPREAD of four bundles over three nodes: infeasible, and says why.
        let Infeasible(why) = place_bundles(&three, &vec![cpus(1.0); 4], StrictSpread) else {
            panic!()
        };
        assert!(why.contains("needs 4 nodes, 3 are alive"), "{why}");
        // A dead node does not count.
        let one_dead = view(&[
            (1, 4.0, 4.0, true),
            (2, 4.0, 4.0, true),
            (3, 4.0, 4.0, false),
        ]);
        assert!(matches!(
            place_bundles(&one_dead, &two_cpus, StrictSpread),
            Infeasible(_)
        ));
        // Busy now, but it fits the totals: wait.
        let busy = view(&[
            (1, 0.0, 4.0, true),
            (2, 1.0, 4.0, true),
            (3, 4.0, 4.0, true),
        ]);
        assert_eq!(place_bundles(&busy, &two_cpus, StrictSpread), Wait);
        // A greedy pass would put the 3 on the node with 4 and strand the 4: the search
        // finds 4→A, 3→B.
        let tight = view(&[(1, 4.0, 4.0, true), (2, 3.0, 3.0, true)]);
        let Placed(p) = place_bundles(&tight, &[cpus(3.0), cpus(4.0)], StrictSpread) else {
            panic!()
        };
        assert_eq!(p, [nid(2), nid(1)]);
        assert!(matches!(place_bundles(&three, &[], Pack), Infeasible(_)));
    }

    /// Every assignment of bundles to live nodes (small cases only).
    fn brute_force(
        nodes: &[(NodeId, ResourceSet)],
        bundles: &[ResourceSet],
        strategy: BundleStrategy,
    ) -> bool {
        let n = nodes.len();
        if n == 0 {
            return false;
        }
        let total = n.pow(bundles.len() as u32);
        (0..total).any(|mut code| {
            let mut at = Vec::new();
            for _ in bundles {
                at.push(code % n);
                code /= n;
            }
            let distinct = at.iter().collect::<std::collections::BTreeSet<_>>().len();
            let shape_ok = match strategy {
                BundleStrategy::StrictPack => distinct == 1,
                BundleStrategy::StrictSpread => distinct == bundles.len(),
                _ => true,
            };
            let mut free: Vec<ResourceSet> = nodes.iter().map(|(_, r)| r.clone()).collect();
            shape_ok
                && at
                    .iter()
                    .zip(bundles)
                    .all(|(i, b)| free[*i].subtract(b).is_ok())
        })
    }

    fn arb_view() -> impl Strategy<Value = ClusterView> {
        proptest::collection::vec((0u8..5, 0u8..5, 0u8..3, any::<bool>()), 1..5).prop_map(|v| {
            ClusterView {
                nodes: v
                    .iter()
                    .enumerate()
                    .map(|(i, (avail, extra, gpu, alive))| {
                        let total = ResourceSet::from_map([
                            ("CPU", (*avail + *extra) as f64),
                            ("GPU", *gpu as f64),
                        ])
                        .unwrap();
                        let available =
                            ResourceSet::from_map([("CPU", *avail as f64), ("GPU", *gpu as f64)])
                                .unwrap();
                        (
                            nid(i as u8 + 1),
                            NodeView {
                                total,
                                available,
                                alive: *alive || i == 0,
                            },
                        )
                    })
                    .collect(),
            }
        })
    }

    fn arb_bundles() -> impl Strategy<Value = Vec<ResourceSet>> {
        proptest::collection::vec((1u8..4, 0u8..2), 1..5).prop_map(|v| {
            v.into_iter()
                .map(|(c, g)| {
                    ResourceSet::from_map([("CPU", c as f64), ("GPU", g as f64)]).unwrap()
                })
                .collect()
        })
    }

    fn arb_strategy() -> impl Strategy<Value = BundleStrategy> {
        prop_oneof![
            Just(BundleStrategy::Pack),
            Just(BundleStrategy::Spread),
            Just(BundleStrategy::StrictPack),
            Just(BundleStrategy::StrictSpread)
        ]
    }

    proptest! {
        #[test]
        fn placements_respect_resources_liveness_and_strictness(view in arb_view(), bundles in arb_bundles(), strategy in arb_strategy()) {
            let live = |f: fn(&NodeView) -> &ResourceSet| -> Vec<(NodeId, ResourceSet)> {
                view.nodes.iter().filter(|(_, n)| n.alive).map(|(id, n)| (*id, f(n).clone())).collect()
            };
            let fits_now = brute_force(&live(|n| &n.available), &bundles, strategy);
            let fits_ever = brute_force(&live(|n| &n.total), &bundles, strategy);
            match place_bundles(&view, &bundles, strategy) {
                BundlePlacement::Placed(p) => {
                    prop_assert_eq!(p.len(), bundles.len());
                    for (node, need) in per_node(&p, &bundles) {
                        let n = &view.nodes[&node];
                        prop_assert!(n.alive);
                        prop_assert!(n.available.contains(&need), "over-allocated {:?}", node);
                    }
                    let distinct = p.iter().collect::<std::collections::BTreeSet<_>>().len();
                    if strategy == BundleStrategy::StrictPack { prop_assert_eq!(distinct, 1); }
                    if strategy == BundleStrategy::StrictSpread { prop_assert_eq!(distinct, bundles.len()); }
                }
                BundlePlacement::Wait => {
                    prop_assert!(!fits_now, "waits although an assignment fits now");
                    prop_assert!(fits_ever);
                }
                BundlePlacement::Infeasible(_) => prop_assert!(!fits_ever, "infeasible although an assignment fits the totals"),
            }
        }
    }
}
