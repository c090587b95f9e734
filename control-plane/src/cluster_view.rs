//! The cluster as the dashboard port's handlers (State API, logs, Prometheus discovery) see
//! it: the status through the cluster API (so a follower's is the leader's), and the host
//! part of the addresses in it.

use protocol::client::HeadClient;
use protocol::pb;

/// The cluster's status from whichever head leads.
pub(crate) async fn status(c: &HeadClient) -> Result<pb::ClusterStatus, String> {
    c.call(|mut c| async move { c.get_cluster_status(pb::GetClusterStatusRequest {}).await })
        .await
        .map_err(|e| format!("cannot get the cluster status: {e}"))
}

/// The host of a `host:port` address.
pub(crate) fn host(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}
