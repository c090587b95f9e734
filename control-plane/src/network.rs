//! `GrpcRaftNetwork`: openraft's transport between heads over our `Raft` gRPC service.
//! openraft's request and reply types travel postcard-encoded in `RaftMessage.data`; a
//! remote Raft error travels back as the `Err` of the encoded `Result`.
//!
//! Every RPC carries openraft's deadline (`RPCOption::hard_ttl`), so a stopped or partitioned
//! peer costs one timeout, never a hang.

use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use protocol::auth::{AuthToken, ClientAuth};
use protocol::client::{ClientOptions, channel};
use protocol::pb::RaftMessage;
use protocol::pb::raft_client::RaftClient;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::types::TypeConfig;

type Client = RaftClient<InterceptedService<Channel, ClientAuth>>;

#[derive(Clone)]
pub struct GrpcRaftNetworkFactory {
    token: Option<AuthToken>,
}

impl GrpcRaftNetworkFactory {
    pub fn new(token: Option<AuthToken>) -> Self {
        Self { token }
    }
}

pub struct GrpcRaftNetwork {
    target: u64,
    node: BasicNode,
    token: Option<AuthToken>,
    client: Result<Client, String>,
}

fn connect(addr: &str, token: Option<AuthToken>) -> Result<Client, String> {
    let opts = ClientOptions {
        rpc_timeout: std::time::Duration::from_secs(10),
        ..Default::default()
    };
    channel(addr, &opts)
        .map(|ch| {
            RaftClient::with_interceptor(ch, ClientAuth(token))
                .max_decoding_message_size(protocol::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(protocol::MAX_MESSAGE_BYTES)
        })
        .map_err(|e| e.to_string())
}

impl RaftNetworkFactory<TypeConfig> for GrpcRaftNetworkFactory {
    type Network = GrpcRaftNetwork;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> GrpcRaftNetwork {
        let client = connect(&node.addr, self.token.clone());
        GrpcRaftNetwork {
            target,
            node: node.clone(),
            token: self.token.clone(),
            client,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

/// AppendEntries above this are split (openraft retries with fewer entries on
/// `PayloadTooLarge`), so large KV values never make a message gRPC refuses.
const MAX_APPEND_BYTES: usize = protocol::MAX_MESSAGE_BYTES / 2;

/// How many entries to send next time so the message fits: proportionally fewer, at least 1.
fn entries_hint(bytes: usize, entries: usize) -> u64 {
    ((entries * MAX_APPEND_BYTES / bytes.max(1)).max(1) as u64).min(entries.max(1) as u64)
}

impl GrpcRaftNetwork {
    async fn call<Req, Resp, E>(
        &mut self,
        kind: &'static str,
        req: &Req,
        entries: usize,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &self.client {
            Ok(c) => c.clone(),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&Msg(e.clone())))),
        };
        let data =
            postcard::to_allocvec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if kind == "append" && entries > 1 && data.len() > MAX_APPEND_BYTES {
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(entries_hint(data.len(), entries)),
            ));
        }
        let mut request = tonic::Request::new(RaftMessage { data });
        request.set_timeout(option.hard_ttl());
        let mut client = client;
        let reply = match kind {
            "append" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => r,
            Err(s) => {
                let e = Msg(format!(
                    "{kind} to {} ({}): {}",
                    self.target,
                    self.node.addr,
                    s.message()
                ));
                return Err(match s.code() {
                    tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Unknown => {
                        // Dial afresh next time: a channel that saw its peer die (or go
                        // silent behind a partition) may sit in reconnect backoff and stall
                        // the next vote, which is exactly when the peer is back. An answer
                        // from the peer (a refusal) keeps the channel.
                        self.client = connect(&self.node.addr, self.token.clone());
                        RPCError::Unreachable(Unreachable::new(&e))
                    }
                    _ => RPCError::Network(NetworkError::new(&e)),
                });
            }
        };
        let result: Result<Resp, RaftError<u64, E>> =
            postcard::from_bytes(&reply.into_inner().data)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

impl RaftNetwork<TypeConfig> for GrpcRaftNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let n = rpc.entries.len();
        self.call("append", &rpc, n, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call("snapshot", &rpc, 0, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call("vote", &rpc, 0, &option).await
    }
}
