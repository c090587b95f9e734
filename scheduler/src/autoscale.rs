//! The autoscaler's decision (DESIGN §9, Ray's v2 scheduler as the model): given the node
//! types, the worker nodes running and launching, the demand and the `request_resources`
//! floor, which nodes to launch and which idle ones to remove. Pure: no I/O, no clock, no RNG;
//! time comes in as each node's idle duration.
//!
//! Order of a plan: `min_workers` first, then the floor (placed on nodes' *total* capacity,
//! so it counts what is in use), then the demand (placed on the free capacity of running
//! nodes, then on nodes already launching, then on the nodes this plan launches, and only
//! then on new nodes), then removal of idle nodes nothing of the above needs.
//!
//! Invariants (property-tested below): no type goes above its `max_workers` nor the cluster
//! above the global `max_workers` through a launch; no type goes below `min_workers` through
//! a removal; a node that is not idle is never removed; when no limit binds, every shape some
//! type can hold is placed after the planned launches.

use std::collections::BTreeMap;

use crate::resources::ResourceSet;

/// A worker node type of the config.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeType {
    pub name: String,
    pub resources: ResourceSet,
    pub min_workers: u32,
    pub max_workers: u32,
    /// How long a node of this type must be idle before it is removed.
    pub idle_timeout_ms: u64,
    /// No launches of this type now (backing off after failed launches); what it could
    /// hold waits as held back, not infeasible.
    pub paused: bool,
}

/// A worker node the autoscaler launched and that registered (the heads are never one: they
/// are `Input::fixed`).
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub id: String,
    pub node_type: String,
    pub total: ResourceSet,
    pub available: ResourceSet,
    /// How long it has been idle (no leases, actors, bundles, primary copies of referenced
    /// objects, drivers): `None` while busy.
    pub idle_ms: Option<u64>,
}

/// How the bundles of a pending placement group must be spread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupStrategy {
    /// Anywhere (PACK and SPREAD are preferences; the autoscaler packs).
    Any,
    /// Every bundle on one node.
    StrictPack,
    /// Every bundle on a different node.
    StrictSpread,
}

/// Something waiting for resources.
#[derive(Clone, Debug, PartialEq)]
pub enum Demand {
    /// `count` requests of one shape (tasks, actors, job entrypoints).
    Shape { shape: ResourceSet, count: u32 },
    /// A placement group: all its bundles, or none.
    Group {
        bundles: Vec<ResourceSet>,
        strategy: GroupStrategy,
    },
}

#[derive(Clone, Debug, Default)]
pub struct Input {
    pub types: Vec<NodeType>,
    /// Workers in the whole cluster (the head not counted).
    pub max_workers: u32,
    pub upscaling_speed: f64,
    /// Nodes the autoscaler does not manage (the heads, nodes started by hand), as (total,
    /// available): demand may be placed there, but they are never launched or removed.
    pub fixed: Vec<(ResourceSet, ResourceSet)>,
    pub nodes: Vec<Node>,
    /// Nodes requested and not yet registered, by type.
    pub launching: BTreeMap<String, u32>,
    pub demand: Vec<Demand>,
    /// `request_resources`: bundles that must fit the cluster's total capacity.
    pub floor: Vec<ResourceSet>,
}

/// Why a node is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveReason {
    /// Idle for its type's idle timeout.
    Idle,
    /// Idle, and its type (or the cluster) has more workers than its `max_workers`.
    OverMax,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// New nodes to launch, by type.
    pub launch: BTreeMap<String, u32>,
    /// Nodes to drain and remove.
    pub remove: Vec<(String, RemoveReason)>,
    /// Shapes no node type can ever hold (never launched for), with how many wait.
    pub infeasible: Vec<(ResourceSet, u32)>,
    /// Shapes a type could hold but a limit (`max_workers`, `upscaling_speed`) keeps waiting.
    pub held_back: Vec<(ResourceSet, u32)>,
}

/// Resource amounts as dense vectors over the plan's resource names (fixed-point units, as
/// `ResourceSet` keeps them), so the inner loops compare a few integers.
type Units = Vec<i64>;

struct Dims(Vec<String>);

impl Dims {
    fn of(input: &Input) -> Self {
        let mut names = std::collections::BTreeSet::new();
        let mut add = |r: &ResourceSet| names.extend(r.units().map(|(k, _)| k.to_owned()));
        input.types.iter().for_each(|t| add(&t.resources));
        input.fixed.iter().for_each(|(t, a)| {
            add(t);
            add(a)
        });
        input.nodes.iter().for_each(|n| {
            add(&n.total);
            add(&n.available)
        });
        input.floor.iter().for_each(&mut add);
        for d in &input.demand {
            match d {
                Demand::Shape { shape, .. } => add(shape),
                Demand::Group { bundles, .. } => bundles.iter().for_each(&mut add),
            }
        }
        Self(names.into_iter().collect())
    }

    fn dense(&self, r: &ResourceSet) -> Units {
        let mut v = vec![0; self.0.len()];
        for (k, u) in r.units() {
            if let Ok(i) = self.0.binary_search_by(|n| n.as_str().cmp(k)) {
                v[i] = u.max(0);
            }
        }
        v
    }

    fn undense(&self, u: &Units) -> ResourceSet {
        ResourceSet::from_units(
            self.0
                .iter()
                .zip(u)
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| (k.as_str(), *v)),
        )
    }
}

fn fits(free: &Units, need: &Units) -> bool {
    free.iter().zip(need).all(|(f, n)| f >= n)
}

fn sum(u: &Units) -> i64 {
    u.iter().sum()
}

fn plus(a: &Units, b: &Units) -> Units {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// How many copies of `need` fit in `free`.
fn copies(free: &Units, need: &Units) -> u32 {
    free.iter()
        .zip(need)
        .filter(|(_, n)| **n > 0)
        .map(|(f, n)| (f / n).clamp(0, u32::MAX as i64) as u32)
        .min()
        .unwrap_or(u32::MAX)
}

/// A bin: a node's capacity as this plan sees it.
struct Bin {
    /// 0: running (or fixed), 1: launching, 2: launched by this plan. Demand goes to the
    /// lowest tier that holds it, so nothing is counted twice while nodes start.
    tier: u8,
    free: Units,
    room: i64,
    /// Something of this plan was placed here (so it is not removed).
    used: bool,
}

impl Bin {
    fn new(tier: u8, free: Units) -> Self {
        let room = sum(&free);
        Self {
            tier,
            free,
            room,
            used: false,
        }
    }

    fn take(&mut self, need: &Units, n: u32) {
        for (f, x) in self.free.iter_mut().zip(need) {
            *f -= x * i64::from(n);
        }
        self.room = sum(&self.free);
        self.used = true;
    }
}

/// The bin for `need`: lowest tier first, then best fit (the least room left, so big nodes
/// stay free for big shapes), then the earliest; skipping `skip`.
fn best(bins: &[Bin], need: &Units, skip: &[bool]) -> Option<usize> {
    let mut pick: Option<usize> = None;
    for (i, b) in bins.iter().enumerate() {
        if skip.get(i).copied().unwrap_or(false) || !fits(&b.free, need) {
            continue;
        }
        match pick {
            Some(p) if (bins[p].tier, bins[p].room) <= (b.tier, b.room) => {}
            _ => pick = Some(i),
        }
    }
    pick
}

/// Places every bundle of a group, or none (bins are left as they were).
fn place_group(bins: &mut [Bin], bundles: &[Units], strategy: GroupStrategy) -> bool {
    if strategy == GroupStrategy::StrictPack {
        let total = bundles
            .iter()
            .fold(vec![0; bundles[0].len()], |a, b| plus(&a, b));
        return match best(bins, &total, &[]) {
            Some(i) => {
                bins[i].take(&total, 1);
                true
            }
            None => false,
        };
    }
    let mut order: Vec<&Units> = bundles.iter().collect();
    order.sort_by_key(|b| std::cmp::Reverse(sum(b)));
    let mut taken = vec![false; bins.len()];
    let mut done: Vec<(usize, &Units)> = Vec::new();
    for bundle in order {
        let skip: &[bool] = if strategy == GroupStrategy::StrictSpread {
            &taken
        } else {
            &[]
        };
        match best(bins, bundle, skip) {
            Some(i) => {
                let used = bins[i].used;
                bins[i].take(bundle, 1);
                bins[i].used = used;
                taken[i] = true;
                done.push((i, bundle));
            }
            None => {
                for (i, b) in done {
                    for (f, x) in bins[i].free.iter_mut().zip(b) {
                        *f += x;
                    }
                    bins[i].room = sum(&bins[i].free);
                }
                return false;
            }
        }
    }
    for (i, _) in done {
        bins[i].used = true;
    }
    true
}

/// Counts of one plan against the limits.
struct Limits<'a> {
    input: &'a Input,
    /// Per type: running + launching + planned.
    count: Vec<u32>,
    /// Per type: launches in flight (launching + planned), for the upscaling cap.
    in_flight: Vec<u32>,
    running: Vec<u32>,
    total: u32,
}

impl<'a> Limits<'a> {
    fn new(input: &'a Input) -> Self {
        let n = input.types.len();
        let mut l = Self {
            input,
            count: vec![0; n],
            in_flight: vec![0; n],
            running: vec![0; n],
            total: 0,
        };
        for node in &input.nodes {
            if let Some(t) = l.type_index(&node.node_type) {
                l.count[t] += 1;
                l.running[t] += 1;
            }
            l.total += 1;
        }
        for (name, k) in &input.launching {
            if let Some(t) = l.type_index(name) {
                l.count[t] += k;
                l.in_flight[t] += k;
            }
            l.total += k;
        }
        l
    }

    fn type_index(&self, name: &str) -> Option<usize> {
        self.input.types.iter().position(|t| t.name == name)
    }

    /// Whether one more node of type `t` may be launched; `capped` applies `upscaling_speed`.
    fn may_launch(&self, t: usize, capped: bool) -> bool {
        let ty = &self.input.types[t];
        if ty.paused || self.count[t] >= ty.max_workers || self.total >= self.input.max_workers {
            return false;
        }
        if capped {
            let cap = (self.input.upscaling_speed * f64::from(self.running[t]))
                .floor()
                .max(5.0) as u32;
            return self.in_flight[t] < cap;
        }
        true
    }

    fn launched(&mut self, t: usize) {
        self.count[t] += 1;
        self.in_flight[t] += 1;
        self.total += 1;
    }

    fn unlaunched(&mut self, t: usize) {
        self.count[t] -= 1;
        self.in_flight[t] -= 1;
        self.total -= 1;
    }
}

struct Planner<'a> {
    input: &'a Input,
    limits: Limits<'a>,
    /// Per type, in the dense units.
    types: Vec<Units>,
    gpu: Option<usize>,
    launch: Vec<u32>,
}

impl Planner<'_> {
    /// The best type for a new node that must hold `need` (each of `need` if `each`, else
    /// their sum): types that can, not GPU types unless a GPU is asked for, then the smallest.
    fn choose_type(&self, need: &[Units], each: bool, capped: bool) -> Option<usize> {
        let wants_gpu = self.gpu.is_some_and(|g| need.iter().any(|n| n[g] > 0));
        let total = need
            .iter()
            .fold(vec![0; self.types.first().map_or(0, Vec::len)], |a, b| {
                plus(&a, b)
            });
        let holds = |t: &Units| {
            if each {
                need.iter().all(|b| fits(t, b))
            } else {
                fits(t, &total) || need.iter().all(|b| fits(t, b))
            }
        };
        (0..self.types.len())
            .filter(|i| holds(&self.types[*i]) && self.limits.may_launch(*i, capped))
            .min_by_key(|i| {
                let gpu_type = self.gpu.is_some_and(|g| self.types[*i][g] > 0);
                (!wants_gpu && gpu_type, sum(&self.types[*i]), *i)
            })
    }

    /// Whether some type (or a fixed node) could hold `need` at all, whatever the limits.
    fn ever_fits(&self, fixed: &[Units], need: &[Units], strict_pack: bool) -> bool {
        let can = |n: &Units| {
            self.types
                .iter()
                .zip(&self.input.types)
                .any(|(u, t)| t.max_workers > 0 && fits(u, n))
                || fixed.iter().any(|f| fits(f, n))
        };
        if strict_pack {
            let total = need.iter().fold(vec![0; need[0].len()], |a, b| plus(&a, b));
            can(&total)
        } else {
            need.iter().all(can)
        }
    }

    fn new_node(&mut self, t: usize, bins: &mut Vec<Bin>) {
        self.limits.launched(t);
        self.launch[t] += 1;
        bins.push(Bin::new(2, self.types[t].clone()));
    }
}

/// Identical shapes summed, biggest first.
fn shapes_of<'a>(
    dims: &Dims,
    items: impl Iterator<Item = (&'a ResourceSet, u32)>,
) -> Vec<(Units, u32)> {
    let mut by: BTreeMap<Units, u32> = BTreeMap::new();
    for (s, k) in items {
        let u = dims.dense(s);
        if k > 0 && sum(&u) > 0 {
            let e = by.entry(u).or_default();
            *e = e.saturating_add(k);
        }
    }
    let mut v: Vec<(Units, u32)> = by.into_iter().collect();
    v.sort_by(|a, b| sum(&b.0).cmp(&sum(&a.0)).then(a.0.cmp(&b.0)));
    v
}

pub fn plan(input: &Input) -> Plan {
    let dims = Dims::of(input);
    let mut out = Plan::default();
    let gpu = dims.0.iter().position(|n| n == "GPU");
    let mut p = Planner {
        input,
        limits: Limits::new(input),
        types: input
            .types
            .iter()
            .map(|t| dims.dense(&t.resources))
            .collect(),
        gpu,
        launch: vec![0; input.types.len()],
    };
    let fixed_total: Vec<Units> = input.fixed.iter().map(|(t, _)| dims.dense(t)).collect();
    let node_type: Vec<Option<usize>> = input
        .nodes
        .iter()
        .map(|n| p.limits.type_index(&n.node_type))
        .collect();

    // 1. min_workers (not capped by upscaling_speed).
    for (t, ty) in input.types.iter().enumerate() {
        while p.limits.count[t] < ty.min_workers.min(ty.max_workers)
            && p.limits.may_launch(t, false)
        {
            p.limits.launched(t);
            p.launch[t] += 1;
        }
    }

    // The bins of the cluster as it will be: fixed and running nodes, launching ones, and
    // this plan's launches so far. `totals`: for the floor; `frees`: for the demand.
    let head_off = input.fixed.len();
    let bins_with = |p: &Planner<'_>, cap: &dyn Fn(usize) -> Units, fixed: &[Units]| {
        let mut bins: Vec<Bin> = fixed.iter().map(|f| Bin::new(0, f.clone())).collect();
        for i in 0..input.nodes.len() {
            bins.push(Bin::new(0, cap(i)));
        }
        for (name, k) in &input.launching {
            if let Some(t) = p.limits.type_index(name) {
                for _ in 0..*k {
                    bins.push(Bin::new(1, p.types[t].clone()));
                }
            }
        }
        for (t, k) in p.launch.iter().enumerate() {
            for _ in 0..*k {
                bins.push(Bin::new(2, p.types[t].clone()));
            }
        }
        bins
    };

    // 2. The floor, on total capacity (it counts what is in use), not capped.
    let mut floor_bins = bins_with(&p, &|i| dims.dense(&input.nodes[i].total), &fixed_total);
    for (shape, mut k) in shapes_of(&dims, input.floor.iter().map(|s| (s, 1))) {
        while k > 0 {
            let Some(i) = best(&floor_bins, &shape, &[]) else {
                break;
            };
            let n = copies(&floor_bins[i].free, &shape).min(k);
            floor_bins[i].take(&shape, n);
            k -= n;
        }
        while k > 0 {
            match p.choose_type(std::slice::from_ref(&shape), false, false) {
                Some(t) => {
                    p.new_node(t, &mut floor_bins);
                    let last = floor_bins.len() - 1;
                    let n = copies(&floor_bins[last].free, &shape).min(k).max(1);
                    floor_bins[last].take(&shape, n);
                    k -= n.min(k);
                }
                None => {
                    let list = if p.ever_fits(&fixed_total, std::slice::from_ref(&shape), false) {
                        &mut out.held_back
                    } else {
                        &mut out.infeasible
                    };
                    add_count(list, &dims.undense(&shape), k);
                    k = 0;
                }
            }
        }
    }
    let floor_needs: Vec<bool> = (0..input.nodes.len())
        .map(|i| floor_bins[head_off + i].used)
        .collect();

    // 3. The demand, on free capacity: running nodes, launching nodes, then this plan's.
    let fixed_free: Vec<Units> = input.fixed.iter().map(|(_, a)| dims.dense(a)).collect();
    let mut bins = bins_with(&p, &|i| dims.dense(&input.nodes[i].available), &fixed_free);
    // Groups first (all or nothing, not capped), then shapes, biggest first.
    for d in &input.demand {
        let Demand::Group { bundles, strategy } = d else {
            continue;
        };
        let bundles: Vec<Units> = bundles
            .iter()
            .map(|b| dims.dense(b))
            .filter(|b| sum(b) > 0)
            .collect();
        if bundles.is_empty() || place_group(&mut bins, &bundles, *strategy) {
            continue;
        }
        let strict_pack = *strategy == GroupStrategy::StrictPack;
        if !p.ever_fits(&fixed_total, &bundles, strict_pack) {
            for b in &bundles {
                add_count(&mut out.infeasible, &dims.undense(b), 1);
            }
            continue;
        }
        // Fresh nodes for the group until it fits (at most one per bundle), undone if the
        // limits stop it first.
        let need: Vec<Units> = if strict_pack {
            vec![
                bundles
                    .iter()
                    .fold(vec![0; bundles[0].len()], |a, b| plus(&a, b)),
            ]
        } else {
            bundles.clone()
        };
        let mark = bins.len();
        let mut added = Vec::new();
        let mut placed = false;
        for _ in 0..bundles.len() {
            let Some(t) = p.choose_type(&need, *strategy == GroupStrategy::StrictSpread, false)
            else {
                break;
            };
            p.limits.launched(t);
            added.push(t);
            bins.push(Bin::new(2, p.types[t].clone()));
            if place_group(&mut bins, &bundles, *strategy) {
                placed = true;
                break;
            }
        }
        if placed {
            for t in added {
                p.launch[t] += 1;
            }
        } else {
            bins.truncate(mark);
            for t in added {
                p.limits.unlaunched(t);
            }
            for b in &bundles {
                add_count(&mut out.held_back, &dims.undense(b), 1);
            }
        }
    }
    let shapes = shapes_of(
        &dims,
        input.demand.iter().filter_map(|d| match d {
            Demand::Shape { shape, count } => Some((shape, *count)),
            Demand::Group { .. } => None,
        }),
    );
    for (shape, mut k) in shapes {
        while k > 0 {
            let Some(i) = best(&bins, &shape, &[]) else {
                break;
            };
            let n = copies(&bins[i].free, &shape).min(k);
            bins[i].take(&shape, n);
            k -= n;
        }
        if k > 0 && !p.ever_fits(&fixed_total, std::slice::from_ref(&shape), false) {
            add_count(&mut out.infeasible, &dims.undense(&shape), k);
            continue;
        }
        while k > 0 {
            match p.choose_type(std::slice::from_ref(&shape), false, true) {
                Some(t) => {
                    p.new_node(t, &mut bins);
                    let last = bins.len() - 1;
                    let n = copies(&bins[last].free, &shape).min(k).max(1);
                    bins[last].take(&shape, n);
                    k -= n.min(k);
                }
                None => {
                    add_count(&mut out.held_back, &dims.undense(&shape), k);
                    k = 0;
                }
            }
        }
    }

    // 4. Removal: idle nodes nothing above placed anything on, longest idle first, never
    //    below min_workers; idle nodes above a max go without waiting for their timeout.
    let mut keep = p.limits.running.clone();
    let mut total_workers = input.nodes.len() as u32 + input.launching.values().sum::<u32>();
    let mut candidates: Vec<(usize, &Node, u64)> = input
        .nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| n.idle_ms.map(|ms| (i, n, ms)))
        .collect();
    candidates.sort_by(|a, b| b.2.cmp(&a.2).then(a.1.id.cmp(&b.1.id)));
    for (i, n, idle) in candidates {
        if floor_needs[i] || bins[head_off + i].used {
            continue;
        }
        let Some(t) = node_type[i] else {
            // A node of a type the config no longer has: it is over every max.
            out.remove.push((n.id.clone(), RemoveReason::OverMax));
            total_workers -= 1;
            continue;
        };
        let ty = &input.types[t];
        let with_launching = keep[t] + input.launching.get(&ty.name).copied().unwrap_or(0);
        if keep[t] <= ty.min_workers {
            continue;
        }
        let over = with_launching > ty.max_workers || total_workers > input.max_workers;
        if over {
            out.remove.push((n.id.clone(), RemoveReason::OverMax));
        } else if idle >= ty.idle_timeout_ms {
            out.remove.push((n.id.clone(), RemoveReason::Idle));
        } else {
            continue;
        }
        keep[t] -= 1;
        total_workers -= 1;
    }

    out.launch = input
        .types
        .iter()
        .zip(p.launch)
        .filter(|(_, k)| *k > 0)
        .map(|(t, k)| (t.name.clone(), k))
        .collect();
    out
}

fn add_count(list: &mut Vec<(ResourceSet, u32)>, shape: &ResourceSet, n: u32) {
    match list.iter_mut().find(|(s, _)| s == shape) {
        Some((_, k)) => *k += n,
        None => list.push((shape.clone(), n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rs(pairs: &[(&str, f64)]) -> ResourceSet {
        ResourceSet::from_map(pairs.iter().copied()).expect("valid resources")
    }

    fn cpu(n: f64) -> ResourceSet {
        rs(&[("CPU", n)])
    }

    fn ty(name: &str, r: ResourceSet, min: u32, max: u32) -> NodeType {
        NodeType {
            name: name.into(),
            resources: r,
            min_workers: min,
            max_workers: max,
            idle_timeout_ms: 5_000,
            paused: false,
        }
    }

    fn node(id: &str, t: &str, total: ResourceSet, avail: ResourceSet, idle: Option<u64>) -> Node {
        Node {
            id: id.into(),
            node_type: t.into(),
            total,
            available: avail,
            idle_ms: idle,
        }
    }

    fn base() -> Input {
        Input {
            types: vec![ty("cpu2", cpu(2.0), 0, 3)],
            max_workers: 10,
            upscaling_speed: 1.0,
            fixed: vec![(ResourceSet::new(), ResourceSet::new())],
            ..Default::default()
        }
    }

    fn tasks(shape: ResourceSet, count: u32) -> Demand {
        Demand::Shape { shape, count }
    }

    #[test]
    fn six_one_cpu_tasks_on_two_cpu_nodes_launch_three_never_more() {
        let mut i = base();
        i.demand = vec![tasks(cpu(1.0), 6)];
        assert_eq!(plan(&i).launch, BTreeMap::from([("cpu2".into(), 3)]));
        i.demand = vec![tasks(cpu(1.0), 60)];
        let p = plan(&i);
        assert_eq!(p.launch, BTreeMap::from([("cpu2".into(), 3)]));
        assert_eq!(p.held_back, vec![(cpu(1.0), 54)]);
    }

    #[test]
    fn demand_is_placed_on_launching_nodes_before_new_ones() {
        let mut i = base();
        i.demand = vec![tasks(cpu(1.0), 4)];
        i.launching = BTreeMap::from([("cpu2".into(), 2)]);
        assert!(
            plan(&i).launch.is_empty(),
            "two launching nodes hold four CPUs"
        );
        i.demand = vec![tasks(cpu(1.0), 5)];
        assert_eq!(plan(&i).launch, BTreeMap::from([("cpu2".into(), 1)]));
    }

    #[test]
    fn a_shape_no_type_holds_is_infeasible_and_launches_nothing() {
        let mut i = base();
        i.demand = vec![tasks(cpu(4.0), 2), tasks(rs(&[("GPU", 1.0)]), 1)];
        let p = plan(&i);
        assert!(p.launch.is_empty());
        assert_eq!(p.infeasible, vec![(cpu(4.0), 2), (rs(&[("GPU", 1.0)]), 1)]);
    }

    #[test]
    fn strict_spread_needs_a_node_per_bundle() {
        let mut i = base();
        i.demand = vec![Demand::Group {
            bundles: vec![cpu(1.0), cpu(1.0), cpu(1.0)],
            strategy: GroupStrategy::StrictSpread,
        }];
        assert_eq!(plan(&i).launch, BTreeMap::from([("cpu2".into(), 3)]));
        // PACK fits two nodes.
        i.demand = vec![Demand::Group {
            bundles: vec![cpu(1.0), cpu(1.0), cpu(1.0)],
            strategy: GroupStrategy::Any,
        }];
        assert_eq!(plan(&i).launch, BTreeMap::from([("cpu2".into(), 2)]));
        // Four spread bundles cannot fit a max of three: nothing is launched for it.
        i.demand = vec![Demand::Group {
            bundles: vec![cpu(1.0); 4],
            strategy: GroupStrategy::StrictSpread,
        }];
        let p = plan(&i);
        assert!(p.launch.is_empty(), "{p:?}");
        assert_eq!(p.held_back, vec![(cpu(1.0), 4)]);
    }

    #[test]
    fn the_floor_counts_what_is_in_use_and_ignores_upscaling_speed() {
        let mut i = base();
        i.floor = vec![cpu(1.0); 6];
        assert_eq!(plan(&i).launch, BTreeMap::from([("cpu2".into(), 3)]));
        // Two busy nodes already hold four of the six CPUs.
        i.nodes = vec![
            node("a", "cpu2", cpu(2.0), cpu(0.0), None),
            node("b", "cpu2", cpu(2.0), cpu(0.0), None),
        ];
        assert_eq!(plan(&i).launch, BTreeMap::from([("cpu2".into(), 1)]));
        // Idle nodes the floor needs stay.
        i.nodes = (0..3)
            .map(|k| node(&format!("n{k}"), "cpu2", cpu(2.0), cpu(2.0), Some(60_000)))
            .collect();
        let p = plan(&i);
        assert!(p.launch.is_empty() && p.remove.is_empty(), "{p:?}");
        i.floor.clear();
        assert_eq!(plan(&i).remove.len(), 3);
    }

    #[test]
    fn min_workers_are_launched_and_kept() {
        let mut i = base();
        i.types[0].min_workers = 1;
        assert_eq!(plan(&i).launch, BTreeMap::from([("cpu2".into(), 1)]));
        i.nodes = vec![
            node("a", "cpu2", cpu(2.0), cpu(2.0), Some(60_000)),
            node("b", "cpu2", cpu(2.0), cpu(2.0), Some(90_000)),
        ];
        let p = plan(&i);
        assert!(p.launch.is_empty());
        assert_eq!(
            p.remove,
            vec![("b".into(), RemoveReason::Idle)],
            "longest idle goes"
        );
    }

    #[test]
    fn idle_nodes_go_after_their_timeout_busy_ones_never() {
        let mut i = base();
        i.nodes = vec![
            node("busy", "cpu2", cpu(2.0), cpu(1.0), None),
            node("young", "cpu2", cpu(2.0), cpu(2.0), Some(4_999)),
            node("old", "cpu2", cpu(2.0), cpu(2.0), Some(5_000)),
        ];
        assert_eq!(plan(&i).remove, vec![("old".into(), RemoveReason::Idle)]);
        // Queued demand that fits an idle node keeps it.
        i.demand = vec![tasks(cpu(2.0), 1)];
        let p = plan(&i);
        assert_eq!(p.remove.len(), 1, "{p:?}");
        assert!(p.launch.is_empty());
    }

    #[test]
    fn lowering_max_workers_removes_idle_nodes_at_once() {
        let mut i = base();
        i.types[0].max_workers = 1;
        i.nodes = vec![
            node("a", "cpu2", cpu(2.0), cpu(2.0), Some(10)),
            node("b", "cpu2", cpu(2.0), cpu(2.0), Some(20)),
            node("c", "cpu2", cpu(2.0), cpu(0.0), None),
        ];
        let p = plan(&i);
        assert_eq!(
            p.remove,
            vec![
                ("b".into(), RemoveReason::OverMax),
                ("a".into(), RemoveReason::OverMax)
            ]
        );
    }

    #[test]
    fn upscaling_speed_caps_launches_in_flight() {
        let mut i = base();
        i.types[0].max_workers = 100;
        i.max_workers = 100;
        i.demand = vec![tasks(cpu(2.0), 50)];
        assert_eq!(plan(&i).launch["cpu2"], 5, "max(5, 1.0 × 0)");
        i.nodes = (0..10)
            .map(|k| node(&format!("n{k}"), "cpu2", cpu(2.0), cpu(0.0), None))
            .collect();
        assert_eq!(plan(&i).launch["cpu2"], 10);
        i.launching = BTreeMap::from([("cpu2".into(), 4)]);
        assert_eq!(plan(&i).launch["cpu2"], 6, "four already in flight");
    }

    #[test]
    fn gpu_types_are_launched_only_for_gpu_shapes() {
        let mut i = base();
        i.types = vec![
            ty("gpu", rs(&[("CPU", 8.0), ("GPU", 1.0)]), 0, 5),
            ty("cpu8", cpu(8.0), 0, 5),
        ];
        i.demand = vec![tasks(cpu(1.0), 1)];
        assert_eq!(plan(&i).launch, BTreeMap::from([("cpu8".into(), 1)]));
        i.demand = vec![tasks(rs(&[("GPU", 1.0)]), 1)];
        assert_eq!(plan(&i).launch, BTreeMap::from([("gpu".into(), 1)]));
    }

    #[test]
    fn a_paused_type_launches_nothing_and_its_demand_is_held_back() {
        let mut i = base();
        i.types[0].paused = true;
        i.types[0].min_workers = 1;
        i.demand = vec![tasks(cpu(1.0), 2)];
        let p = plan(&i);
        assert!(p.launch.is_empty());
        assert_eq!((p.infeasible.len(), p.held_back), (0, vec![(cpu(1.0), 2)]));
    }

    #[test]
    fn the_global_max_holds_across_types() {
        let mut i = base();
        i.max_workers = 2;
        i.types.push(ty("cpu4", cpu(4.0), 0, 5));
        i.demand = vec![tasks(cpu(4.0), 3), tasks(cpu(1.0), 3)];
        let p = plan(&i);
        assert_eq!(p.launch.values().sum::<u32>(), 2, "{p:?}");
    }

    fn arb_input() -> impl Strategy<Value = Input> {
        let types = prop::collection::vec((1u32..5, 0u32..3, 0u32..6, 0u64..3), 1..4);
        let nodes = prop::collection::vec((0usize..4, 0u32..5, prop::option::of(0u64..4)), 0..8);
        let demand = prop::collection::vec((1u32..9, 1u32..10, 0u8..4, 1usize..4), 0..6);
        let floor = prop::collection::vec(1u32..5, 0..6);
        (types, nodes, demand, floor, 0u32..12, 0u32..4, 1u32..30).prop_map(
            |(types, nodes, demand, floor, max_workers, launching, speed)| {
                let types: Vec<NodeType> = types
                    .into_iter()
                    .enumerate()
                    .map(|(k, (c, min, extra, to))| NodeType {
                        name: format!("t{k}"),
                        resources: cpu(f64::from(c)),
                        min_workers: min,
                        max_workers: min + extra,
                        idle_timeout_ms: to * 1000,
                        paused: false,
                    })
                    .collect();
                let nodes: Vec<Node> = nodes
                    .into_iter()
                    .enumerate()
                    .map(|(k, (t, used, idle))| {
                        let t = &types[t % types.len()];
                        let total = t.resources.clone();
                        let c = total.get("CPU");
                        let used = f64::from(used).min(c);
                        let idle = if used > 0.0 {
                            None
                        } else {
                            idle.map(|s| s * 1000)
                        };
                        node(&format!("n{k}"), &t.name, total, cpu(c - used), idle)
                    })
                    .collect();
                let demand = demand
                    .into_iter()
                    .map(|(c, count, kind, n)| match kind {
                        0 => Demand::Group {
                            bundles: vec![cpu(f64::from(c) / 2.0); n],
                            strategy: GroupStrategy::StrictSpread,
                        },
                        1 => Demand::Group {
                            bundles: vec![cpu(f64::from(c) / 2.0); n],
                            strategy: GroupStrategy::StrictPack,
                        },
                        _ => tasks(cpu(f64::from(c) / 2.0), count),
                    })
                    .collect();
                Input {
                    launching: BTreeMap::from([(types[0].name.clone(), launching)]),
                    types,
                    max_workers,
                    upscaling_speed: f64::from(speed) / 10.0,
                    fixed: vec![(cpu(1.0), cpu(0.0))],
                    nodes,
                    demand,
                    floor: floor.into_iter().map(|c| cpu(f64::from(c))).collect(),
                }
            },
        )
    }

    fn count_of(i: &Input, t: &str) -> u32 {
        i.nodes.iter().filter(|n| n.node_type == t).count() as u32
            + i.launching.get(t).copied().unwrap_or(0)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn launches_never_pass_a_max(i in arb_input()) {
            let p = plan(&i);
            let launched: u32 = p.launch.values().sum();
            let before = i.nodes.len() as u32 + i.launching.values().sum::<u32>();
            prop_assert!(launched == 0 || before + launched <= i.max_workers, "{p:?}");
            for t in &i.types {
                let k = p.launch.get(&t.name).copied().unwrap_or(0);
                prop_assert!(k == 0 || count_of(&i, &t.name) + k <= t.max_workers);
            }
        }

        #[test]
        fn removals_never_pass_a_min_nor_touch_a_busy_node(i in arb_input()) {
            let p = plan(&i);
            for (id, _) in &p.remove {
                let n = i.nodes.iter().find(|n| &n.id == id).expect("a known node");
                prop_assert!(n.idle_ms.is_some(), "removed busy node {id}");
            }
            for t in &i.types {
                let running = i.nodes.iter().filter(|n| n.node_type == t.name).count() as u32;
                let removed = p.remove.iter().filter(|(id, _)| {
                    i.nodes.iter().any(|n| &n.id == id && n.node_type == t.name)
                }).count() as u32;
                prop_assert!(removed == 0 || running - removed >= t.min_workers, "{p:?}");
            }
        }

        #[test]
        fn without_binding_limits_every_feasible_shape_is_placed(mut i in arb_input()) {
            for t in &mut i.types {
                t.max_workers = 1_000;
            }
            i.max_workers = 10_000;
            i.upscaling_speed = 1_000.0;
            let p = plan(&i);
            // Held back only by the upscaling cap (at least 5 in flight for a type).
            prop_assert!(
                p.held_back.is_empty()
                    || p.launch.iter().any(|(t, k)| k + i.launching.get(t).copied().unwrap_or(0) >= 5),
                "{p:?}"
            );
            // A shape reported infeasible fits no type (or is a bundle of a group that
            // cannot fit as a whole).
            let in_group = |s: &ResourceSet| i.demand.iter().any(|d| matches!(d, Demand::Group { bundles, .. } if bundles.contains(s)));
            for (shape, _) in &p.infeasible {
                prop_assert!(
                    in_group(shape) || !i.types.iter().any(|t| t.resources.contains(shape)),
                    "{shape:?} fits a type"
                );
            }
            // The capacity after the launches holds the demand that was not reported
            // infeasible (CPU is the only resource of these inputs).
            let mut room: f64 = i.fixed.iter().map(|(_, a)| a.get("CPU")).sum();
            room += i.nodes.iter().map(|n| n.available.get("CPU")).sum::<f64>();
            for (t, k) in i.launching.iter().chain(p.launch.iter()) {
                let ty = i.types.iter().find(|x| &x.name == t).expect("a type");
                room += ty.resources.get("CPU") * f64::from(*k);
            }
            let mut asked = 0.0;
            for d in &i.demand {
                match d {
                    Demand::Shape { shape, count } => asked += shape.get("CPU") * f64::from(*count),
                    Demand::Group { bundles, .. } => asked += bundles.iter().map(|b| b.get("CPU")).sum::<f64>(),
                }
            }
            let unplaced: f64 = p.infeasible.iter().chain(p.held_back.iter()).map(|(s, k)| s.get("CPU") * f64::from(*k)).sum();
            prop_assert!(asked - unplaced <= room + 1e-6, "{asked} - {unplaced} > {room}: {p:?}");
        }

        /// With one node type, a second round over the same demand (the first round's
        /// launches now launching) launches nothing more: demand is not counted twice.
        #[test]
        fn a_second_round_launches_nothing_more(mut i in arb_input()) {
            i.types.truncate(1);
            let t = i.types[0].name.clone();
            for n in &mut i.nodes {
                n.node_type = t.clone();
                n.total = i.types[0].resources.clone();
                let c = n.total.get("CPU");
                if n.available.get("CPU") > c {
                    n.available = cpu(c);
                }
            }
            i.types[0].max_workers = 1_000;
            i.max_workers = 10_000;
            i.upscaling_speed = 1_000.0;
            let p = plan(&i);
            prop_assume!(p.held_back.is_empty());
            let mut after = i.clone();
            for (t, k) in &p.launch {
                *after.launching.entry(t.clone()).or_default() += k;
            }
            let again = plan(&after);
            prop_assert!(again.launch.is_empty(), "first {p:?}, then {again:?}");
        }
    }
}
