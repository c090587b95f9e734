//! The heads' gRPC services: `Raft` (transport between heads) and `ControlPlane` (the
//! cluster API). Wire types are converted here and nowhere else; every request is validated
//! before anything is proposed.
//!
//! API Boundary: writes and linearizable reads are served by the leader only; a follower
//! answers `RpcError::NotLeader` with the leader's address. `HeadInfo` is answered by any head
//! about itself.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use protocol::client::{self, ClientOptions};
use protocol::ids::validate_address;
use protocol::pb::{self, control_plane_server::ControlPlane};
use protocol::{NodeId, RaftId, RpcError};
use tonic::{Request, Response, Status};

use crate::head::{HeadShared, check_resources, invalid, now_ms, rejection};
use crate::state::{self, Command, NodeRecord, Rejection, Response as SmResponse};

/// Limits of the small KV.
const MAX_KV_NAMESPACE: usize = 256;
const MAX_KV_KEY: usize = 4096;
const MAX_KV_VALUE: usize = 1024 * 1024;

/// Most bundles one `request_resources` may ask for.
const MAX_FLOOR_BUNDLES: usize = 10_000;

/// How long the leader passes a dead owner on (every node heartbeats many times meanwhile).
const DEAD_OWNER_MEMORY: Duration = Duration::from_secs(60);
/// Most worker binaries one node's heartbeat advertises (the rest are fetched on demand).
const MAX_ADVERTISED_BINARIES: usize = 16;

/// A node's record with the leader's soft state about it (`soft` locked by the caller).
fn node_info(soft: &crate::head::SoftState, n: &NodeRecord) -> pb::NodeInfo {
    let idle = soft.idle.get(&n.node_id).copied();
    let total = match soft.totals.get(&n.node_id) {
        Some((inc, t)) if *inc == n.incarnation && n.state == state::NodeState::Alive => t.clone(),
        _ => n.resources_total.clone(),
    };
    let available = match soft.heartbeats.get(&n.node_id) {
        Some((inc, _, avail)) if *inc == n.incarnation && n.state == state::NodeState::Alive => {
            avail.clone()
        }
        _ if n.state == state::NodeState::Alive => n.resources_total.clone(),
        _ => BTreeMap::new(),
    };
    pb::NodeInfo {
        node_id: n.node_id.to_string(),
        address: n.address.clone(),
        state: match n.state {
            state::NodeState::Alive => pb::NodeState::Alive,
            state::NodeState::Dead => pb::NodeState::Dead,
        } as i32,
        incarnation: n.incarnation,
        ports: Some(pb::NodePorts {
            node_manager_port: n.ports.node_manager.into(),
            object_manager_port: n.ports.object_manager.into(),
            metrics_export_port: n.ports.metrics_export.into(),
        }),
        resources_total: total.into_iter().collect(),
        resources_available: available.into_iter().collect(),
        labels: n.labels.clone().into_iter().collect(),
        is_head: n.is_head,
        registered_at_ms: n.registered_at_ms,
        dead_at_ms: n.dead_at_ms,
        death_reason: n.death_reason.clone(),
        idle_ms: idle
            .filter(|i| i.0 == n.incarnation && n.state == state::NodeState::Alive)
            .and_then(|i| i.1.map(|ms| ms + i.2.elapsed().as_millis() as u64)),
        draining: idle.is_some_and(|i| i.0 == n.incarnation && i.3),
    }
}

impl HeadShared {
    fn node_info(&self, n: &NodeRecord) -> pb::NodeInfo {
        node_info(&self.soft.lock().unwrap_or_else(|p| p.into_inner()), n)
    }

    fn peers(&self) -> pb::RaftPeers {
        let m = self.raft.metrics().borrow().clone();
        let mem = m.membership_config.membership();
        let voters: BTreeSet<u64> = mem.voter_ids().collect();
        let peers = mem
            .nodes()
            .map(|(id, node)| pb::RaftPeer {
                raft_id: *id,
                address: node.addr.clone(),
                voter: voters.contains(id),
                leader: m.current_leader == Some(*id),
                matched_index: m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned())
                    .map(|l| l.map_or(0, |l| l.index)),
            })
            .collect();
        pb::RaftPeers {
            peers,
            term: m.current_term,
            leader: self.leader_address(m.current_leader).unwrap_or_default(),
        }
    }
}

fn parse_node_id(s: &str) -> Result<NodeId, Status> {
    s.parse::<NodeId>().map_err(|e| invalid(e.to_string()))
}

fn check_kv(namespace: &str, key: &[u8]) -> Result<(), Status> {
    if namespace.len() > MAX_KV_NAMESPACE {
        return Err(invalid(format!(
            "kv namespace of {} bytes is over the {MAX_KV_NAMESPACE}-byte limit",
            namespace.len()
        )));
    }
    if key.is_empty() || key.len() > MAX_KV_KEY {
        return Err(invalid(format!(
            "kv key must be 1..={MAX_KV_KEY} bytes, got {}",
            key.len()
        )));
    }
    Ok(())
}

/// The `ControlPlane` gRPC service.
#[derive(Clone)]
pub(crate) struct ControlPlaneService(pub(crate) Arc<HeadShared>);

#[tonic::async_trait]
impl ControlPlane for ControlPlaneService {
    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeReply>, Status> {
        let r = req.into_inner();
        let node_id = parse_node_id(&r.node_id)?;
        validate_address(&r.address).map_err(|e| invalid(e.to_string()))?;
        let resources = check_resources(&r.resources_total)?;
        let p = r.ports.unwrap_or_default();
        let port = |v: u32, name: &str| {
            u16::try_from(v).map_err(|_| invalid(format!("{name} {v} is not a port")))
        };
        let ports = state::NodePorts {
            node_manager: port(p.node_manager_port, "node_manager_port")?,
            object_manager: port(p.object_manager_port, "object_manager_port")?,
            metrics_export: port(p.metrics_export_port, "metrics_export_port")?,
        };
        if r.registration_id.len() > 64 {
            return Err(invalid("a registration id is at most 64 bytes"));
        }
        let (address, labels, time_ms) = (r.address, r.labels.into_iter().collect(), now_ms());
        let cmd = if r.registration_id.is_empty() {
            Command::RegisterNode {
                node_id,
                address,
                ports,
                resources: resources.clone(),
                labels,
                is_head: r.is_head,
                time_ms,
            }
        } else {
            Command::RegisterNodeOnce {
                node_id,
                address,
                ports,
                resources: resources.clone(),
                labels,
                is_head: r.is_head,
                time_ms,
                registration_id: r.registration_id,
            }
        };
        match self.0.propose(cmd).await? {
            SmResponse::NodeRegistered { incarnation } => {
                let mut soft = self.0.soft.lock().unwrap_or_else(|p| p.into_inner());
                soft.heartbeats
                    .insert(node_id, (incarnation, Instant::now(), resources));
                // New capacity: the managers and the autoscaler (which ties the node to its
                // launch record) look at once.
                self.0.job_kick.notify_one();
                self.0.actor_kick.notify_one();
                self.0.pg_kick.notify_one();
                self.0.autoscaler_kick.notify_one();
                Ok(Response::new(pb::RegisterNodeReply {
                    incarnation,
                    heartbeat_period_ms: self.0.heartbeat_period.as_millis() as u64,
                    node_timeout_ms: self.0.node_timeout.as_millis() as u64,
                }))
            }
            SmResponse::Rejected(r) => Err(rejection(r)),
            other => Err(RpcError::Internal(format!("unexpected apply result {other:?}")).into()),
        }
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        self.0.require_confirmed_leader()?;
        let mut r = req.into_inner();
        let node_id = parse_node_id(&r.node_id)?;
        let available = check_resources(&r.resources_available)?;
        let total = check_resources(&r.resources_total)?;
        let actors_report = pb::HeartbeatRequest {
            running_actors: std::mem::take(&mut r.running_actors),
            dead_actors: std::mem::take(&mut r.dead_actors),
            ..Default::default()
        };
        {
            let st = self.0.state.read();
            let Some(n) = st.state.nodes.get(&node_id) else {
                return Err(RpcError::NotFound(format!("node {node_id} is not registered")).into());
            };
            if n.incarnation != r.incarnation || n.state != state::NodeState::Alive {
                return Err(rejection(Rejection::Fenced {
                    node_id: node_id.to_string(),
                    given: r.incarnation,
                    current: n.incarnation,
                    state: format!("{:?}", n.state).to_uppercase(),
                }));
            }
        }
        {
            let mut soft = self.0.soft.lock().unwrap_or_else(|p| p.into_inner());
            soft.heartbeats
                .insert(node_id, (r.incarnation, Instant::now(), available));
            if !total.is_empty() {
                soft.totals.insert(node_id, (r.incarnation, total));
            }
            let demand_now = !r.pending_demand.is_empty();
            soft.demand.insert(node_id, r.pending_demand);
            soft.idle.insert(
                node_id,
                (r.incarnation, r.idle_ms, Instant::now(), r.draining),
            );
            // Passed on to every node (a new one prefetches them); bounded, and only what
            // looks like a binary's hash.
            let binaries: Vec<String> = r
                .binaries
                .into_iter()
                .filter(|b| protocol::is_sha256_hex(b))
                .take(MAX_ADVERTISED_BINARIES)
                .collect();
            soft.binaries.insert(node_id, (r.incarnation, binaries));
            if demand_now {
                self.0.autoscaler_kick.notify_one();
            }
            let now = Instant::now();
            for p in r
                .dead_owners
                .into_iter()
                .filter(|p| !p.is_empty() && p.len() <= 32)
                .take(10_000)
            {
                soft.dead_owners.insert(p, now);
            }
            soft.dead_owners
                .retain(|_, at| now.duration_since(*at) < DEAD_OWNER_MEMORY);
        }
        let dead_owners: Vec<Vec<u8>> = self
            .0
            .soft
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dead_owners
            .keys()
            .cloned()
            .collect();
        let kill_actors = crate::actors::heartbeat_actors(&self.0, node_id, &actors_report).await?;
        let cancel_placement_groups =
            crate::pgs::heartbeat_bundles(&self.0, node_id, &r.placement_groups);
        let cluster_view = {
            let st = self.0.state.read();
            let soft = self.0.soft.lock().unwrap_or_else(|p| p.into_inner());
            st.state
                .alive_nodes()
                .map(|n| {
                    let binaries = match soft.binaries.get(&n.node_id) {
                        Some((inc, b)) if *inc == n.incarnation => b.clone(),
                        _ => Vec::new(),
                    };
                    (node_info(&soft, n), binaries)
                })
                // Draining nodes stay in the view, flagged: nodes schedule nothing there,
                // but still pull from them (a drain moves its objects away by pulls).
                .map(|(info, binaries)| pb::NodeResources {
                    object_manager_port: info.ports.map_or(0, |p| p.object_manager_port),
                    node_id: info.node_id,
                    address: info.address,
                    total: info.resources_total,
                    available: info.resources_available,
                    draining: info.draining,
                    is_head: info.is_head,
                    binaries,
                })
                .collect()
        };
        Ok(Response::new(pb::HeartbeatReply {
            cluster_view,
            dead_owners,
            kill_actors,
            cancel_placement_groups,
        }))
    }

    async fn unregister_node(
        &self,
        req: Request<pb::UnregisterNodeRequest>,
    ) -> Result<Response<pb::UnregisterNodeReply>, Status> {
        let r = req.into_inner();
        let node_id = parse_node_id(&r.node_id)?;
        let reason = if r.reason.is_empty() {
            "unregistered".to_string()
        } else {
            r.reason.chars().take(1024).collect()
        };
        let cmd = Command::MarkNodeDead {
            node_id,
            incarnation: r.incarnation,
            reason,
            time_ms: now_ms(),
        };
        match self.0.propose(cmd).await? {
            SmResponse::Ok => Ok(Response::new(pb::UnregisterNodeReply {})),
            SmResponse::Rejected(r) => Err(rejection(r)),
            other => Err(RpcError::Internal(format!("unexpected apply result {other:?}")).into()),
        }
    }

    async fn get_cluster_status(
        &self,
        _: Request<pb::GetClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        self.0.linearizable().await?;
        let (nodes, autoscaler): (Vec<pb::NodeInfo>, _) = {
            let st = self.0.state.read();
            let nodes = {
                let soft = self.0.soft.lock().unwrap_or_else(|p| p.into_inner());
                st.state
                    .nodes
                    .values()
                    .map(|n| node_info(&soft, n))
                    .collect()
            };
            (nodes, crate::autoscaler::status(&self.0, &st.state))
        };
        let m = self.0.raft.metrics().borrow().clone();
        let members: Vec<(u64, String)> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        // Ask every other head about itself, in parallel, with a short deadline.
        let opts = ClientOptions {
            rpc_timeout: Duration::from_millis(800),
            ..Default::default()
        };
        let mut asks = Vec::new();
        for (id, addr) in members {
            if id == self.0.raft_id {
                continue;
            }
            let token = self.0.token.clone();
            let opts = opts.clone();
            asks.push(tokio::spawn(async move {
                let reply = async {
                    let ch = client::channel(&addr, &opts).ok()?;
                    let mut c = pb::control_plane_client::ControlPlaneClient::with_interceptor(
                        ch,
                        protocol::auth::ClientAuth(token),
                    );
                    c.head_info(pb::HeadInfoRequest {})
                        .await
                        .ok()
                        .map(|r| r.into_inner())
                };
                reply.await.unwrap_or(pb::HeadInfoReply {
                    raft_id: id,
                    address: addr,
                    role: "unreachable".into(),
                    ..Default::default()
                })
            }));
        }
        let mut heads = vec![self.0.head_info()];
        for a in asks {
            if let Ok(h) = a.await {
                heads.push(h);
            }
        }
        heads.sort_by(|a, b| a.address.cmp(&b.address));
        let pending_demand = self.0.pending_demand();
        Ok(Response::new(pb::ClusterStatus {
            pending_demand,
            leader: self.0.address.clone(),
            term: m.current_term,
            commit_index: m.last_applied.map_or(0, |l| l.index),
            heads,
            nodes,
            autoscaler: Some(autoscaler),
        }))
    }

    async fn set_autoscaling_config(
        &self,
        req: Request<pb::SetAutoscalingConfigRequest>,
    ) -> Result<Response<pb::AutoscalingConfigReply>, Status> {
        let yaml = req.into_inner().yaml;
        let config_json = if yaml.trim().is_empty() {
            None
        } else {
            let c = crate::autoscaler::config::Config::from_yaml(&yaml)
                .map_err(|e| invalid(e.to_string()))?;
            Some(c.to_json())
        };
        self.0.require_confirmed_leader()?;
        match self
            .0
            .propose(Command::SetAutoscalerConfig {
                config_json: config_json.clone(),
            })
            .await?
        {
            SmResponse::Ok => {}
            SmResponse::Rejected(e) => return Err(rejection(e)),
            other => return Err(RpcError::Internal(format!("unexpected {other:?}")).into()),
        }
        self.0.autoscaler_kick.notify_one();
        Ok(Response::new(pb::AutoscalingConfigReply {
            config_json: config_json.unwrap_or_default(),
        }))
    }

    async fn get_autoscaling_config(
        &self,
        _: Request<pb::GetAutoscalingConfigRequest>,
    ) -> Result<Response<pb::AutoscalingConfigReply>, Status> {
        self.0.linearizable().await?;
        let st = self.0.state.read();
        Ok(Response::new(pb::AutoscalingConfigReply {
            config_json: st.state.autoscaler.config_json.clone().unwrap_or_default(),
        }))
    }

    async fn request_resources(
        &self,
        req: Request<pb::RequestResourcesRequest>,
    ) -> Result<Response<pb::RequestResourcesReply>, Status> {
        let r = req.into_inner();
        if r.bundles.len() > MAX_FLOOR_BUNDLES {
            return Err(invalid(format!(
                "request_resources: {} bundles is over the limit of {MAX_FLOOR_BUNDLES}",
                r.bundles.len()
            )));
        }
        let mut bundles = Vec::with_capacity(r.bundles.len());
        for (i, b) in r.bundles.iter().enumerate() {
            let set = check_resources(&b.resources)
                .map_err(|e| invalid(format!("request_resources: bundle {i}: {}", e.message())))?;
            if !set.is_empty() {
                bundles.push(set);
            }
        }
        self.0.require_confirmed_leader()?;
        match self
            .0
            .propose(Command::SetResourceRequest { bundles })
            .await?
        {
            SmResponse::Ok => {}
            SmResponse::Rejected(e) => return Err(rejection(e)),
            other => return Err(RpcError::Internal(format!("unexpected {other:?}")).into()),
        }
        self.0.autoscaler_kick.notify_one();
        Ok(Response::new(pb::RequestResourcesReply {}))
    }

    async fn drain_node(
        &self,
        req: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeReply>, Status> {
        let r = req.into_inner();
        let node_id = parse_node_id(&r.node_id)?;
        if r.reason.len() > 200 {
            return Err(invalid("a drain reason is at most 200 bytes"));
        }
        self.0.linearizable().await?;
        let addr = {
            let st = self.0.state.read();
            let Some(n) = st.state.nodes.get(&node_id) else {
                return Err(RpcError::NotFound(format!("node {node_id} is not registered")).into());
            };
            if n.state != state::NodeState::Alive {
                return Err(RpcError::FailedPrecondition(format!(
                    "node {node_id} is already dead ({})",
                    n.death_reason
                ))
                .into());
            }
            if n.is_head {
                return Err(RpcError::FailedPrecondition(format!(
                    "node {node_id} is a head's node: stop that head instead (rayctl stop on its machine, then `rayctl operator raft remove-peer`)"
                ))
                .into());
            }
            n.address.clone()
        };
        let reason = if r.reason.is_empty() {
            "drained by operator".to_owned()
        } else {
            format!("drained by operator: {}", r.reason)
        };
        let mut nm = self.0.node_manager(&addr)?;
        let reply = nm
            .drain_node(pb::DrainNodeRequest {
                node_id: String::new(),
                reason,
            })
            .await?
            .into_inner();
        Ok(Response::new(reply))
    }

    async fn get_node(
        &self,
        req: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let node_id = parse_node_id(&req.into_inner().node_id)?;
        self.0.linearizable().await?;
        let st = self.0.state.read();
        match st.state.nodes.get(&node_id) {
            Some(n) => Ok(Response::new(self.0.node_info(n))),
            None => Err(RpcError::NotFound(format!("node {node_id} not found")).into()),
        }
    }

    async fn head_info(
        &self,
        _: Request<pb::HeadInfoRequest>,
    ) -> Result<Response<pb::HeadInfoReply>, Status> {
        Ok(Response::new(self.0.head_info()))
    }

    async fn kv_put(
        &self,
        req: Request<pb::KvPutRequest>,
    ) -> Result<Response<pb::KvPutReply>, Status> {
        let r = req.into_inner();
        check_kv(&r.namespace, &r.key)?;
        if r.value.len() > MAX_KV_VALUE {
            return Err(RpcError::ResourceExhausted(format!(
                "kv value of {} bytes is over the {MAX_KV_VALUE}-byte limit",
                r.value.len()
            ))
            .into());
        }
        let cmd = Command::KvPut {
            namespace: r.namespace,
            key: r.key,
            value: r.value,
            overwrite: r.overwrite,
        };
        match self.0.propose(cmd).await? {
            SmResponse::Kv(written) => Ok(Response::new(pb::KvPutReply { written })),
            other => Err(RpcError::Internal(format!("unexpected apply result {other:?}")).into()),
        }
    }

    async fn kv_get(
        &self,
        req: Request<pb::KvGetRequest>,
    ) -> Result<Response<pb::KvGetReply>, Status> {
        let r = req.into_inner();
        check_kv(&r.namespace, &r.key)?;
        self.0.linearizable().await?;
        let st = self.0.state.read();
        match st.state.kv.get(&(r.namespace, r.key)) {
            Some(v) => Ok(Response::new(pb::KvGetReply { value: v.clone() })),
            None => Err(RpcError::NotFound("kv key not found".into()).into()),
        }
    }

    async fn kv_delete(
        &self,
        req: Request<pb::KvDeleteRequest>,
    ) -> Result<Response<pb::KvDeleteReply>, Status> {
        let r = req.into_inner();
        check_kv(&r.namespace, &r.key)?;
        match self
            .0
            .propose(Command::KvDelete {
                namespace: r.namespace,
                key: r.key,
            })
            .await?
        {
            SmResponse::Kv(deleted) => Ok(Response::new(pb::KvDeleteReply { deleted })),
            other => Err(RpcError::Internal(format!("unexpected apply result {other:?}")).into()),
        }
    }

    async fn create_actor(
        &self,
        req: Request<pb::CreateActorRequest>,
    ) -> Result<Response<pb::ActorInfo>, Status> {
        crate::actors::create(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_actor(
        &self,
        req: Request<pb::GetActorRequest>,
    ) -> Result<Response<pb::ActorInfo>, Status> {
        crate::actors::get(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_actors(
        &self,
        _: Request<pb::ListActorsRequest>,
    ) -> Result<Response<pb::ListActorsReply>, Status> {
        Ok(Response::new(pb::ListActorsReply {
            actors: crate::actors::list(&self.0).await?,
        }))
    }

    async fn kill_actor(
        &self,
        req: Request<pb::KillActorRequest>,
    ) -> Result<Response<pb::ActorInfo>, Status> {
        crate::actors::kill(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn create_placement_group(
        &self,
        req: Request<pb::CreatePlacementGroupRequest>,
    ) -> Result<Response<pb::PlacementGroupInfo>, Status> {
        crate::pgs::create(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_placement_group(
        &self,
        req: Request<pb::GetPlacementGroupRequest>,
    ) -> Result<Response<pb::PlacementGroupInfo>, Status> {
        crate::pgs::get(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn remove_placement_group(
        &self,
        req: Request<pb::RemovePlacementGroupRequest>,
    ) -> Result<Response<pb::PlacementGroupInfo>, Status> {
        crate::pgs::remove(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_placement_groups(
        &self,
        _: Request<pb::ListPlacementGroupsRequest>,
    ) -> Result<Response<pb::ListPlacementGroupsReply>, Status> {
        Ok(Response::new(pb::ListPlacementGroupsReply {
            placement_groups: crate::pgs::list(&self.0).await?,
        }))
    }

    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        crate::jobs::submit(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let j = crate::jobs::get(&self.0, &req.into_inner().job_id).await?;
        Ok(Response::new(crate::jobs::job_info(&self.0, &j)))
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsReply>, Status> {
        Ok(Response::new(pb::ListJobsReply {
            jobs: crate::jobs::list(&self.0).await?,
        }))
    }

    async fn stop_job(
        &self,
        req: Request<pb::StopJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        crate::jobs::stop(&self.0, &req.into_inner().job_id)
            .await
            .map(Response::new)
    }

    async fn delete_job(
        &self,
        req: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobReply>, Status> {
        let deleted = crate::jobs::delete(&self.0, &req.into_inner().job_id).await?;
        Ok(Response::new(pb::DeleteJobReply { deleted }))
    }

    async fn get_job_logs(
        &self,
        req: Request<pb::GetJobLogsRequest>,
    ) -> Result<Response<pb::JobLogs>, Status> {
        crate::jobs::logs(&self.0, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn report_job_attempt(
        &self,
        req: Request<pb::ReportJobAttemptRequest>,
    ) -> Result<Response<pb::ReportJobAttemptReply>, Status> {
        crate::jobs::report(&self.0, req.into_inner()).await?;
        Ok(Response::new(pb::ReportJobAttemptReply {}))
    }

    async fn raft_list_peers(
        &self,
        _: Request<pb::RaftListPeersRequest>,
    ) -> Result<Response<pb::RaftPeers>, Status> {
        self.0.linearizable().await?;
        Ok(Response::new(self.0.peers()))
    }

    async fn raft_add_peer(
        &self,
        req: Request<pb::RaftAddPeerRequest>,
    ) -> Result<Response<pb::RaftPeers>, Status> {
        let r = req.into_inner();
        validate_address(&r.address).map_err(|e| invalid(e.to_string()))?;
        self.0.require_local_leader()?;
        let id = RaftId::from_address(&r.address).0;
        let node = BasicNode {
            addr: r.address.clone(),
        };
        // Blocks until the new head has caught up with the log, so promoting it to voter
        // cannot stall commits.
        self.0
            .raft
            .add_learner(id, node, true)
            .await
            .map_err(|e| match e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                    self.0.not_leader(f.leader_id)
                }
                other => {
                    RpcError::FailedPrecondition(format!("adding {} failed: {other}", r.address))
                        .into()
                }
            })?;
        if !r.learner_only {
            self.0
                .raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
                .map_err(|e| {
                    Status::from(RpcError::FailedPrecondition(format!(
                        "promoting {} failed: {e}",
                        r.address
                    )))
                })?;
        }
        Ok(Response::new(self.0.peers()))
    }

    async fn raft_remove_peer(
        &self,
        req: Request<pb::RaftRemovePeerRequest>,
    ) -> Result<Response<pb::RaftPeers>, Status> {
        let r = req.into_inner();
        validate_address(&r.address).map_err(|e| invalid(e.to_string()))?;
        self.0.require_local_leader()?;
        let id = RaftId::from_address(&r.address).0;
        let (is_voter, known) = {
            let m = self.0.raft.metrics().borrow().membership_config.clone();
            (
                m.membership().voter_ids().any(|v| v == id),
                m.membership().get_node(&id).is_some(),
            )
        };
        if !known {
            return Err(RpcError::NotFound(format!(
                "{} is not a member of the raft group",
                r.address
            ))
            .into());
        }
        let change = if is_voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.0
            .raft
            .change_membership(change, false)
            .await
            .map_err(|e| {
                Status::from(RpcError::FailedPrecondition(format!(
                    "removing {} failed: {e}",
                    r.address
                )))
            })?;
        Ok(Response::new(self.0.peers()))
    }
}
