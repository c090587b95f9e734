//! Placement groups (DESIGN §4): bundles of resources reserved together across nodes, by a
//! strategy (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD). Tasks and actors run in a bundle with
//! `Strategy::PlacementGroup` / `ActorOptions::placement_group`: their resources are asked
//! for under the bundle's group names, which only the bundle's node has.
//!
//! ```ignore
//! let pg = sdk::placement_group(vec![cpus(1.0); 3], &PlacementGroupOptions::new(PlacementStrategy::StrictSpread))?;
//! let nodes = pg.ready(Duration::from_secs(60))?; // one node per bundle
//! let opts = TaskOptions::default().strategy(Strategy::PlacementGroup { pg: pg.clone(), bundle: Some(0) });
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use protocol::{NodeId, pb};

use crate::Error;
use crate::runtime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlacementStrategy {
    /// As few nodes as possible, spilling over when needed (Ray's default).
    #[default]
    Pack,
    /// As many nodes as possible, sharing when needed.
    Spread,
    /// All bundles on one node.
    StrictPack,
    /// Every bundle on a different node.
    StrictSpread,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct PlacementGroupOptions {
    pub strategy: PlacementStrategy,
    pub name: Option<String>,
    /// Outlives the process that created it (else removed when it exits).
    pub detached: bool,
}

impl PlacementGroupOptions {
    pub fn new(strategy: PlacementStrategy) -> Self {
        Self {
            strategy,
            ..Default::default()
        }
    }
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }
    pub fn detached(mut self, yes: bool) -> Self {
        self.detached = yes;
        self
    }
}

/// A placement group (cheap to clone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementGroup {
    id: String,
}

/// What the control plane knows about a placement group.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementGroupInfo {
    pub id: String,
    /// PENDING, CREATED, RESCHEDULING or REMOVED.
    pub state: String,
    /// Per bundle, its node once placed.
    pub bundle_nodes: Vec<Option<NodeId>>,
    /// Why it waits (no room now, or infeasible).
    pub message: String,
}

impl From<&pb::PlacementGroupInfo> for PlacementGroupInfo {
    fn from(i: &pb::PlacementGroupInfo) -> Self {
        let state = pb::PlacementGroupState::try_from(i.state)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("PLACEMENT_GROUP_STATE_")
                    .to_owned()
            })
            .unwrap_or_default();
        Self {
            id: i.pg_id.clone(),
            state,
            bundle_nodes: i.bundle_node_ids.iter().map(|n| n.parse().ok()).collect(),
            message: i.message.clone(),
        }
    }
}

/// Creates a placement group; it is reserved in the background (see [`PlacementGroup::ready`]).
pub fn placement_group(
    bundles: Vec<BTreeMap<String, f64>>,
    opts: &PlacementGroupOptions,
) -> Result<PlacementGroup, Error> {
    let rt = runtime::current()?;
    let strategy = match opts.strategy {
        PlacementStrategy::Pack => pb::PlacementStrategy::Pack,
        PlacementStrategy::Spread => pb::PlacementStrategy::Spread,
        PlacementStrategy::StrictPack => pb::PlacementStrategy::StrictPack,
        PlacementStrategy::StrictSpread => pb::PlacementStrategy::StrictSpread,
    };
    let req = pb::CreatePlacementGroupRequest {
        pg_id: rt.new_actor_id().to_string(),
        job_id: rt.job().to_owned(),
        name: opts.name.clone().unwrap_or_default(),
        strategy: strategy as i32,
        bundles: bundles
            .into_iter()
            .map(|b| pb::Bundle {
                resources: b.into_iter().collect(),
            })
            .collect(),
        detached: opts.detached,
        owner_prefix: rt.prefix.to_vec(),
    };
    let i = rt
        .block_on(rt.head()?.call(|mut c| {
            let req = req.clone();
            async move { c.create_placement_group(req).await }
        }))
        .map_err(|e| match e.rpc() {
            Some(protocol::RpcError::InvalidArgument(m)) => {
                Error::Actor(format!("placement group: {m}"))
            }
            _ => Error::Rpc(e),
        })?;
    Ok(PlacementGroup { id: i.pg_id })
}

/// Ray's `ray.autoscaler.sdk.request_resources`: asks the autoscaler to keep room for
/// `num_cpus` one-CPU bundles plus `bundles`, counting what is already in use (100 CPUs
/// asked with 45 busy target 100, not 145), right away (it ignores `upscaling_speed`). It
/// stays until the next call, which replaces it; a call with nothing clears it.
pub fn request_resources(
    num_cpus: Option<u32>,
    bundles: Vec<BTreeMap<String, f64>>,
) -> Result<(), Error> {
    let mut all: Vec<pb::Bundle> = (0..num_cpus.unwrap_or(0))
        .map(|_| pb::Bundle {
            resources: [("CPU".to_owned(), 1.0)].into_iter().collect(),
        })
        .collect();
    for (i, b) in bundles.into_iter().enumerate() {
        if let Some((k, v)) = b.iter().find(|(_, v)| !v.is_finite() || **v < 0.0) {
            return Err(Error::Actor(format!(
                "request_resources: bundle {i}: {k} = {v} must be a non-negative number"
            )));
        }
        all.push(pb::Bundle {
            resources: b.into_iter().collect(),
        });
    }
    let rt = runtime::current()?;
    let req = pb::RequestResourcesRequest { bundles: all };
    rt.block_on(rt.head()?.call(|mut c| {
        let req = req.clone();
        async move { c.request_resources(req).await }
    }))
    .map(|_| ())
    .map_err(|e| match e.rpc() {
        Some(protocol::RpcError::InvalidArgument(m)) => Error::Actor(m.clone()),
        _ => Error::Rpc(e),
    })
}

impl PlacementGroup {
    pub fn id(&self) -> &str {
        &self.id
    }

    fn get(&self, wait: Duration) -> Result<pb::PlacementGroupInfo, Error> {
        let rt = runtime::current()?;
        let req = pb::GetPlacementGroupRequest {
            pg_id: self.id.clone(),
            wait_ms: wait.as_millis() as u64,
        };
        rt.block_on(rt.head()?.call(|mut c| {
            let req = req.clone();
            async move { c.get_placement_group(req).await }
        }))
        .map_err(Error::Rpc)
    }

    pub fn info(&self) -> Result<PlacementGroupInfo, Error> {
        self.get(Duration::ZERO)
            .map(|i| PlacementGroupInfo::from(&i))
    }

    /// Waits until every bundle is reserved; returns each bundle's node. A group that cannot
    /// be placed in time gives `Timeout` with the reason it waits.
    pub fn ready(&self, timeout: Duration) -> Result<Vec<NodeId>, Error> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let i = PlacementGroupInfo::from(&self.get(left.min(Duration::from_secs(5)))?);
            match i.state.as_str() {
                "CREATED" => return Ok(i.bundle_nodes.into_iter().flatten().collect()),
                "REMOVED" => {
                    return Err(Error::Actor(format!(
                        "placement group {} was removed",
                        self.id
                    )));
                }
                _ if left.is_zero() => {
                    return Err(Error::Timeout(
                        timeout,
                        format!("placement group {} ({}: {})", self.id, i.state, i.message),
                    ));
                }
                _ => {}
            }
        }
    }

    /// Releases the bundles (tasks and actors in them lose their reservation).
    pub fn remove(&self) -> Result<(), Error> {
        let rt = runtime::current()?;
        let req = pb::RemovePlacementGroupRequest {
            pg_id: self.id.clone(),
        };
        rt.block_on(rt.head()?.call(|mut c| {
            let req = req.clone();
            async move { c.remove_placement_group(req).await }
        }))
        .map_err(Error::Rpc)?;
        Ok(())
    }
}

/// The resource names of a shape inside a bundle (as nodes name a committed bundle's
/// resources), plus a sliver of the bundle's `bundle` resource so even an empty shape is
/// placed on the bundle's node.
pub(crate) fn in_bundle(
    shape: BTreeMap<String, f64>,
    pg: &PlacementGroup,
    bundle: Option<usize>,
) -> BTreeMap<String, f64> {
    let name = |k: &str| match bundle {
        Some(i) => format!("{k}_group_{i}_{}", pg.id),
        None => format!("{k}_group_{}", pg.id),
    };
    let mut out: BTreeMap<String, f64> = shape.iter().map(|(k, v)| (name(k), *v)).collect();
    out.insert(name("bundle"), 0.001);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_in_a_bundle_use_the_group_names_nodes_provide() {
        let pg = PlacementGroup { id: "ab".into() };
        let shape: BTreeMap<String, f64> = [("CPU".to_string(), 1.0)].into_iter().collect();
        let one = in_bundle(shape.clone(), &pg, Some(2));
        assert_eq!(one.get("CPU_group_2_ab"), Some(&1.0));
        assert_eq!(one.get("bundle_group_2_ab"), Some(&0.001));
        let any = in_bundle(shape, &pg, None);
        assert_eq!(any.get("CPU_group_ab"), Some(&1.0));
        assert!(!any.contains_key("CPU"));
    }
}
