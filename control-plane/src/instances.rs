//! The autoscaler's replicated state (DESIGN §2): its config, the `request_resources` floor,
//! and one record per launched node in Ray v2's instance states, so that a new leader resumes
//! from the records and never launches twice. Applied by `state::ClusterState::apply`.
//!
//! Invariants:
//! - A record is created in REQUESTED (its history starts QUEUED → REQUESTED) before the
//!   provider is called; the provider call is idempotent per request id.
//! - States move only along Ray's instance graph (`InstanceState::may_become`); TERMINATED
//!   and ALLOCATION_FAILED are final.
//! - At most `MAX_FINISHED` final records are kept (the oldest go first), so the table stays
//!   small however long the cluster runs.

use std::collections::BTreeMap;

use protocol::NodeId;
use serde::{Deserialize, Serialize};

use crate::rejection::Rejection;

/// Resource amounts by name.
type Resources = BTreeMap<String, f64>;

/// Final records kept for "Recent failures" and for the record.
pub const MAX_FINISHED: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum InstanceState {
    Queued,
    Requested,
    Allocated,
    RayRunning,
    RayStopRequested,
    RayStopping,
    Terminating,
    Terminated,
    AllocationFailed,
    AllocationTimeout,
    TerminationFailed,
}

impl InstanceState {
    /// Ray's name of the state.
    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::Requested => "REQUESTED",
            Self::Allocated => "ALLOCATED",
            Self::RayRunning => "RAY_RUNNING",
            Self::RayStopRequested => "RAY_STOP_REQUESTED",
            Self::RayStopping => "RAY_STOPPING",
            Self::Terminating => "TERMINATING",
            Self::Terminated => "TERMINATED",
            Self::AllocationFailed => "ALLOCATION_FAILED",
            Self::AllocationTimeout => "ALLOCATION_TIMEOUT",
            Self::TerminationFailed => "TERMINATION_FAILED",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Terminated | Self::AllocationFailed)
    }

    /// Requested from the provider and not yet a node of the cluster.
    pub fn is_pending(self) -> bool {
        matches!(self, Self::Queued | Self::Requested | Self::Allocated)
    }

    /// Ray v2's instance graph (providers start the daemon themselves, so ALLOCATED goes
    /// straight to RAY_RUNNING). A drain refused because the node became busy goes back from
    /// RAY_STOP_REQUESTED to RAY_RUNNING. A node that dies on its own goes to TERMINATING
    /// from any RAY_* state.
    pub fn may_become(self, to: Self) -> bool {
        use InstanceState::*;
        matches!(
            (self, to),
            (Queued, Requested)
                | (
                    Requested,
                    Allocated | AllocationFailed | AllocationTimeout | Terminating
                )
                | (
                    Allocated,
                    RayRunning | AllocationFailed | AllocationTimeout | Terminating
                )
                | (RayRunning, RayStopRequested | Terminating)
                | (RayStopRequested, RayRunning | RayStopping | Terminating)
                | (RayStopping, Terminating)
                | (AllocationTimeout, Terminating)
                | (Terminating, Terminated | TerminationFailed)
                | (TerminationFailed, Terminating | Terminated)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub instance_id: String,
    pub request_id: String,
    pub node_type: String,
    pub state: InstanceState,
    pub cloud_instance_id: String,
    pub node_id: Option<NodeId>,
    /// Why it failed, or why it is being removed.
    pub message: String,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Every state it was in, with when it got there.
    pub history: Vec<(InstanceState, u64)>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AutoscalerState {
    /// The config as canonical JSON (`autoscaler::config::Config`); `None`: autoscaler off.
    pub config_json: Option<String>,
    /// `request_resources` bundles.
    pub floor: Vec<Resources>,
    pub instances: BTreeMap<String, InstanceRecord>,
}

/// A change of one record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceUpdate {
    pub instance_id: String,
    pub state: InstanceState,
    /// Set when not empty.
    pub cloud_instance_id: String,
    pub node_id: Option<NodeId>,
    pub message: String,
}

fn rejected(msg: String) -> Rejection {
    Rejection::Invalid(msg)
}

impl AutoscalerState {
    pub(crate) fn set_config(&mut self, json: Option<String>) {
        self.config_json = json;
    }

    pub(crate) fn set_floor(&mut self, bundles: Vec<Resources>) -> Result<(), Rejection> {
        if let Some(bad) = bundles
            .iter()
            .flat_map(|b| b.iter())
            .find(|(_, v)| !v.is_finite() || **v < 0.0)
        {
            return Err(rejected(format!(
                "request_resources: {} = {} must be finite and non-negative",
                bad.0, bad.1
            )));
        }
        self.floor = bundles;
        Ok(())
    }

    pub(crate) fn create(
        &mut self,
        instance_id: String,
        request_id: String,
        node_type: String,
        time_ms: u64,
    ) -> Result<(), Rejection> {
        if self.instances.contains_key(&instance_id) {
            return Err(Rejection::AlreadyExists {
                kind: "instance".into(),
                id: instance_id,
            });
        }
        self.instances.insert(
            instance_id.clone(),
            InstanceRecord {
                instance_id,
                request_id,
                node_type,
                state: InstanceState::Requested,
                cloud_instance_id: String::new(),
                node_id: None,
                message: String::new(),
                created_ms: time_ms,
                updated_ms: time_ms,
                history: vec![
                    (InstanceState::Queued, time_ms),
                    (InstanceState::Requested, time_ms),
                ],
            },
        );
        Ok(())
    }

    pub(crate) fn update(&mut self, u: InstanceUpdate, time_ms: u64) -> Result<(), Rejection> {
        let Some(r) = self.instances.get_mut(&u.instance_id) else {
            return Err(Rejection::NotFound {
                kind: "instance".into(),
                id: u.instance_id,
            });
        };
        if r.state != u.state && !r.state.may_become(u.state) {
            return Err(Rejection::InvalidTransition {
                kind: "instance".into(),
                id: u.instance_id,
                from: r.state.name().into(),
                to: u.state.name().into(),
            });
        }
        if r.state != u.state {
            r.history.push((u.state, time_ms));
        }
        r.state = u.state;
        r.updated_ms = time_ms;
        if !u.cloud_instance_id.is_empty() {
            r.cloud_instance_id = u.cloud_instance_id;
        }
        if u.node_id.is_some() {
            r.node_id = u.node_id;
        }
        if !u.message.is_empty() {
            r.message = u.message;
        }
        self.prune();
        Ok(())
    }

    /// A rejection if the node is being removed (its record is RAY_STOP_REQUESTED or
    /// RAY_STOPPING): nothing new may be assigned to it. With the autoscaler checking the
    /// assignments after its stop request commits, this closes the race between an idle
    /// check and new work (Ray's #46492).
    pub(crate) fn leaving(&self, node: NodeId) -> Result<(), Rejection> {
        let leaving = self.instances.values().any(|r| {
            r.node_id == Some(node)
                && matches!(
                    r.state,
                    InstanceState::RayStopRequested | InstanceState::RayStopping
                )
        });
        if leaving {
            return Err(rejected(format!(
                "node {node} is being removed by the autoscaler"
            )));
        }
        Ok(())
    }

    /// A node tied to a record died (or left): the record goes to TERMINATING, so the
    /// provider's machine is cleaned up.
    pub(crate) fn node_gone(&mut self, node: NodeId, reason: &str, time_ms: u64) {
        for r in self.instances.values_mut() {
            if r.node_id == Some(node)
                && matches!(
                    r.state,
                    InstanceState::RayRunning
                        | InstanceState::RayStopRequested
                        | InstanceState::RayStopping
                )
            {
                r.state = InstanceState::Terminating;
                r.history.push((r.state, time_ms));
                r.updated_ms = time_ms;
                r.message = reason.to_owned();
            }
        }
    }

    fn prune(&mut self) {
        let finished = self
            .instances
            .values()
            .filter(|r| r.state.is_final())
            .count();
        if finished <= MAX_FINISHED {
            return;
        }
        let mut old: Vec<(u64, String)> = self
            .instances
            .values()
            .filter(|r| r.state.is_final())
            .map(|r| (r.updated_ms, r.instance_id.clone()))
            .collect();
        old.sort();
        for (_, id) in old.into_iter().take(finished - MAX_FINISHED) {
            self.instances.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(id: &str, state: InstanceState) -> InstanceUpdate {
        InstanceUpdate {
            instance_id: id.into(),
            state,
            cloud_instance_id: String::new(),
            node_id: None,
            message: String::new(),
        }
    }

    #[test]
    fn records_follow_rays_instance_graph() {
        use InstanceState::*;
        let mut s = AutoscalerState::default();
        assert_eq!(s.create("i1".into(), "r1".into(), "cpu2".into(), 1), Ok(()));
        assert!(matches!(
            s.create("i1".into(), "r1".into(), "cpu2".into(), 2),
            Err(Rejection::AlreadyExists { .. })
        ));
        for st in [
            Allocated,
            RayRunning,
            RayStopRequested,
            RayRunning,
            RayStopRequested,
            RayStopping,
            Terminating,
            Terminated,
        ] {
            assert_eq!(s.update(up("i1", st), 3), Ok(()), "{st:?}");
        }
        assert!(matches!(
            s.update(up("i1", Requested), 4),
            Err(Rejection::InvalidTransition { .. })
        ));
        let names: Vec<&str> = s.instances["i1"]
            .history
            .iter()
            .map(|(s, _)| s.name())
            .collect();
        assert_eq!(
            names,
            [
                "QUEUED",
                "REQUESTED",
                "ALLOCATED",
                "RAY_RUNNING",
                "RAY_STOP_REQUESTED",
                "RAY_RUNNING",
                "RAY_STOP_REQUESTED",
                "RAY_STOPPING",
                "TERMINATING",
                "TERMINATED"
            ]
        );
        assert!(matches!(
            s.update(up("nope", Allocated), 1),
            Err(Rejection::NotFound { .. })
        ));
    }

    #[test]
    fn a_dead_node_moves_its_record_to_terminating() {
        let mut s = AutoscalerState::default();
        s.create("i1".into(), "r1".into(), "cpu2".into(), 1)
            .expect("created");
        let node = NodeId::from_bytes([7; 16]);
        let mut u = up("i1", InstanceState::Allocated);
        u.node_id = Some(node);
        s.update(u, 2).expect("allocated");
        s.update(up("i1", InstanceState::RayRunning), 3)
            .expect("running");
        s.node_gone(node, "removed by autoscaler: idle", 4);
        assert_eq!(s.instances["i1"].state, InstanceState::Terminating);
        assert_eq!(s.instances["i1"].message, "removed by autoscaler: idle");
    }

    #[test]
    fn final_records_are_bounded() {
        let mut s = AutoscalerState::default();
        for k in 0..(MAX_FINISHED + 20) {
            let id = format!("i{k:04}");
            s.create(id.clone(), id.clone(), "t".into(), k as u64)
                .expect("created");
            s.update(up(&id, InstanceState::AllocationFailed), k as u64)
                .expect("failed");
        }
        assert_eq!(s.instances.len(), MAX_FINISHED);
        assert!(!s.instances.contains_key("i0000"), "the oldest went first");
    }
}
