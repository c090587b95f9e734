//! The GCS calls Ray's own tools make before they talk HTTP, on every head's gRPC port
//! (Ray's tools take it as the cluster's bootstrap address). `ray logs` connects a GCS
//! client (`GetClusterId`), reads the dashboard's address from the GCS's internal KV
//! (`InternalKVGet`, namespace and key `dashboard`) and then uses the State API over HTTP,
//! which every head serves. Nothing else of the GCS is offered: other methods answer
//! UNIMPLEMENTED. These calls sit behind the same token check as ours.

use protocol::ray_rpc as rpc;
use tonic::{Request, Response, Status};

/// Ray's version these answers stand in for.
const RAY_VERSION: &str = "2.60.0";
/// Ray's `StatusCode::NotFound`.
const NOT_FOUND: i32 = 17;

#[derive(Clone)]
pub(crate) struct RayGcs {
    /// This head's dashboard port as `host:port` (what Ray's KV holds under `dashboard`).
    pub(crate) dashboard: String,
    /// A stable id of the cluster (Ray's 28-byte ClusterID): the same on every head.
    pub(crate) cluster_id: Vec<u8>,
}

impl RayGcs {
    /// `cluster_key` names the cluster the same way on every head (its sorted peers).
    pub(crate) fn new(dashboard: String, cluster_key: &str) -> Self {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(format!("rayctl cluster {cluster_key}").as_bytes());
        Self {
            dashboard,
            cluster_id: digest[..28].to_vec(),
        }
    }
}

fn ok() -> Option<rpc::GcsStatus> {
    Some(rpc::GcsStatus {
        code: 0,
        message: String::new(),
    })
}

#[tonic::async_trait]
impl rpc::node_info_gcs_service_server::NodeInfoGcsService for RayGcs {
    async fn get_cluster_id(
        &self,
        _req: Request<rpc::GetClusterIdRequest>,
    ) -> Result<Response<rpc::GetClusterIdReply>, Status> {
        Ok(Response::new(rpc::GetClusterIdReply {
            status: ok(),
            cluster_id: self.cluster_id.clone(),
        }))
    }

    async fn check_alive(
        &self,
        req: Request<rpc::CheckAliveRequest>,
    ) -> Result<Response<rpc::CheckAliveReply>, Status> {
        let n = req.into_inner().node_ids.len();
        Ok(Response::new(rpc::CheckAliveReply {
            status: ok(),
            ray_version: RAY_VERSION.into(),
            // Ray's node ids are not ours: none of them is a live raylet here.
            raylet_alive: vec![false; n],
            is_leader: true,
        }))
    }
}

#[tonic::async_trait]
impl rpc::internal_kv_gcs_service_server::InternalKvGcsService for RayGcs {
    async fn internal_kv_get(
        &self,
        req: Request<rpc::InternalKvGetRequest>,
    ) -> Result<Response<rpc::InternalKvGetReply>, Status> {
        let r = req.into_inner();
        if r.namespace == b"dashboard" && r.key == b"dashboard" {
            return Ok(Response::new(rpc::InternalKvGetReply {
                status: ok(),
                value: self.dashboard.clone().into_bytes(),
            }));
        }
        Ok(Response::new(rpc::InternalKvGetReply {
            status: Some(rpc::GcsStatus {
                code: NOT_FOUND,
                message: format!(
                    "key {:?} in namespace {:?} is not kept here (only the dashboard's address is)",
                    String::from_utf8_lossy(&r.key),
                    String::from_utf8_lossy(&r.namespace)
                ),
            }),
            value: Vec::new(),
        }))
    }
}
