//! The `Raft` gRPC service: the receiving end of `network::GrpcRaftNetwork`. It decodes
//! openraft's messages, checks them, and hands them to the local Raft.
//!
//! Only the heads' peer secret reaches this service (`protocol::server::PEER_PATHS`); these
//! checks are the second wall, against a head that is no longer a member or a message no
//! honest head sends.
//!
//! Invariants:
//! - A message whose sender (the vote's node id) is not in this head's membership is refused,
//!   unless this head has no membership yet (a head that joins learns it from the leader).
//! - No term or log index at or above [`MAX_TERM`] reaches openraft: openraft computes
//!   `term + 1` at its next election and panics on the wrap, and the vote is durable, so one
//!   such message would wedge the head on every restart.
//! - Decoding is bounded: the message is at most `MAX_MESSAGE_BYTES` (the gRPC limit), and
//!   command batches nest at most `state::MAX_BATCH_DEPTH` deep.

use openraft::{LogId, Vote};
use protocol::RpcError;
use protocol::pb::{self, raft_server};
use tonic::{Request, Response, Status};

use std::sync::Arc;

use crate::head::HeadShared;
use crate::prevote::{PreVoteRequest, answer};

/// Terms and indexes at or above this are refused: far beyond any real cluster (a term a
/// millisecond for 8,900 years), far below an overflow.
pub const MAX_TERM: u64 = 1 << 48;

#[derive(Clone)]
pub(crate) struct RaftTransportService(pub(crate) Arc<HeadShared>);

fn refuse(msg: String) -> Status {
    tracing::warn!("refused a raft message: {msg}");
    RpcError::InvalidArgument(msg).into()
}

fn decode<T: serde::de::DeserializeOwned>(req: Request<pb::RaftMessage>) -> Result<T, Status> {
    postcard::from_bytes(&req.into_inner().data)
        .map_err(|e| refuse(format!("malformed raft message: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Response<pb::RaftMessage>, Status> {
    postcard::to_allocvec(v)
        .map(|data| Response::new(pb::RaftMessage { data }))
        .map_err(|e| RpcError::Internal(format!("encoding raft reply: {e}")).into())
}

fn check_log_id(what: &str, id: Option<&LogId<u64>>) -> Result<(), Status> {
    match id {
        Some(l) if l.index >= MAX_TERM || l.leader_id.term >= MAX_TERM => Err(refuse(format!(
            "{what} has term {} and index {}; both must be below {MAX_TERM}",
            l.leader_id.term, l.index
        ))),
        _ => Ok(()),
    }
}

impl RaftTransportService {
    /// The sender is a member and its term is sane.
    fn check_sender(&self, kind: &str, vote: &Vote<u64>) -> Result<(), Status> {
        let term = vote.leader_id.term;
        let from = vote.leader_id.node_id;
        if term >= MAX_TERM {
            return Err(refuse(format!(
                "{kind} from {from} has term {term}; terms must be below {MAX_TERM}"
            )));
        }
        let m = self.0.raft.metrics().borrow().membership_config.clone();
        let members: Vec<u64> = m.membership().nodes().map(|(id, _)| *id).collect();
        if !members.is_empty() && !members.contains(&from) {
            return Err(refuse(format!(
                "{kind} from raft id {from}, which is not a member of this group (members: {members:?})"
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl raft_server::Raft for RaftTransportService {
    async fn append_entries(
        &self,
        req: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        let rpc: openraft::raft::AppendEntriesRequest<crate::types::TypeConfig> = decode(req)?;
        self.check_sender("append-entries", &rpc.vote)?;
        check_log_id("append-entries prev_log_id", rpc.prev_log_id.as_ref())?;
        check_log_id("append-entries leader_commit", rpc.leader_commit.as_ref())?;
        for e in &rpc.entries {
            check_log_id("an appended entry", Some(&e.log_id))?;
        }
        let r = self.0.raft.append_entries(rpc).await;
        if matches!(&r, Ok(resp) if !matches!(resp, openraft::raft::AppendEntriesResponse::HigherVote(_)))
        {
            self.0.leader_contact.heard();
        }
        encode(&r)
    }

    async fn vote(
        &self,
        req: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        let rpc: openraft::raft::VoteRequest<u64> = decode(req)?;
        self.check_sender("vote", &rpc.vote)?;
        check_log_id("vote last_log_id", rpc.last_log_id.as_ref())?;
        encode(&self.0.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        let rpc: openraft::raft::InstallSnapshotRequest<crate::types::TypeConfig> = decode(req)?;
        self.check_sender("install-snapshot", &rpc.vote)?;
        check_log_id("snapshot last_log_id", rpc.meta.last_log_id.as_ref())?;
        let r = self.0.raft.install_snapshot(rpc).await;
        if r.is_ok() {
            self.0.leader_contact.heard();
        }
        encode(&r)
    }

    async fn pre_vote(
        &self,
        req: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        let rpc: PreVoteRequest = decode(req)?;
        self.check_sender("pre-vote", &Vote::new(rpc.term, rpc.candidate))?;
        let last = self.0.raft.metrics().borrow().last_log_index.unwrap_or(0);
        let a = answer(
            &rpc,
            self.0.leading(),
            self.0.leader_contact.since(),
            self.0.election_max,
            last,
        );
        encode(&a)
    }
}
