//! The node's part in the borrowing protocol (worker.proto, "Borrowed refs"): a call for an
//! owner process goes to the owner's node (`NodeManager.OwnerCall`), which hands it down that
//! process's `WorkerChannel` and returns the answer that comes back up. Owners are found by
//! their owner prefix. A call whose owner is not connected here, or whose channel ends before
//! it answers, is answered `owner_found: false` (the owner died).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use protocol::pb;
use tokio::sync::{mpsc, oneshot};

/// Calls handed to owners and not yet answered, by call id, with the channel they went to.
#[derive(Default)]
pub(crate) struct Relay {
    st: Mutex<RelayState>,
}

#[derive(Default)]
struct RelayState {
    next: u64,
    calls: HashMap<u64, (u64, oneshot::Sender<pb::OwnerCallReply>)>,
}

/// The longest a `WatchProcess` waits before answering "not gone" (the watcher asks again).
pub(crate) const MAX_WATCH: Duration = Duration::from_secs(300);

fn gone() -> pb::OwnerCallReply {
    pb::OwnerCallReply {
        owner_found: false,
        status: None,
    }
}

impl Relay {
    fn lock(&self) -> std::sync::MutexGuard<'_, RelayState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `req` to the owner on channel `conn` (sending with `tx`) and waits for its
    /// answer; `None` for either means the owner is not here.
    pub(crate) async fn call(
        &self,
        owner: Option<(u64, mpsc::UnboundedSender<pb::NodeToWorker>)>,
        request: pb::OwnerCallRequest,
    ) -> pb::OwnerCallReply {
        let Some((conn, tx)) = owner else {
            return gone();
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        let call_id = {
            let mut st = self.lock();
            st.next += 1;
            let id = st.next;
            st.calls.insert(id, (conn, reply_tx));
            id
        };
        let sent = tx
            .send(pb::NodeToWorker {
                kind: Some(pb::node_to_worker::Kind::OwnerCall(pb::RelayedOwnerCall {
                    call_id,
                    request: Some(request),
                })),
            })
            .is_ok();
        drop(tx);
        if !sent {
            self.lock().calls.remove(&call_id);
            return gone();
        }
        // The sender is dropped when the channel ends (`channel_ended`): the owner is gone.
        match reply_rx.await {
            Ok(mut r) => {
                r.owner_found = true;
                r
            }
            Err(_) => gone(),
        }
    }

    /// An owner on channel `conn` answered.
    pub(crate) fn answered(&self, conn: u64, r: pb::RelayedOwnerReply) {
        let mut st = self.lock();
        // Only the channel the call went to may answer it.
        if st.calls.get(&r.call_id).is_some_and(|(c, _)| *c == conn)
            && let Some((_, tx)) = st.calls.remove(&r.call_id)
        {
            let _ = tx.send(r.reply.unwrap_or_default());
        }
    }

    /// Channel `conn` ended: its unanswered calls are answered "owner gone".
    pub(crate) fn channel_ended(&self, conn: u64) {
        self.lock().calls.retain(|_, (c, _)| *c != conn);
    }

    #[cfg(test)]
    fn pending(&self) -> usize {
        self.lock().calls.len()
    }
}

/// Waits until `tx`'s channel closes (the process's `WorkerChannel` ended) or `wait` passes;
/// true if it closed.
pub(crate) async fn watch(
    tx: Option<mpsc::UnboundedSender<pb::NodeToWorker>>,
    wait: Duration,
) -> bool {
    let Some(tx) = tx else { return true };
    tokio::time::timeout(wait.min(MAX_WATCH), tx.closed())
        .await
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_call() -> pb::OwnerCallRequest {
        pb::OwnerCallRequest {
            owner_prefix: vec![1; 11],
            kind: Some(pb::owner_call_request::Kind::Status(vec![1; 20])),
        }
    }

    #[tokio::test]
    async fn a_call_is_answered_by_its_owner_or_as_gone_when_the_channel_ends() {
        let relay = std::sync::Arc::new(Relay::default());
        // No owner here.
        assert!(!relay.call(None, status_call()).await.owner_found);

        let (tx, mut rx) = mpsc::unbounded_channel();
        let r2 = relay.clone();
        let t = tokio::spawn(async move { r2.call(Some((7, tx)), status_call()).await });
        let Some(pb::node_to_worker::Kind::OwnerCall(c)) = rx.recv().await.unwrap().kind else {
            panic!("no owner call sent down the channel");
        };
        // Another channel cannot answer it.
        relay.answered(
            8,
            pb::RelayedOwnerReply {
                call_id: c.call_id,
                reply: Some(pb::OwnerCallReply::default()),
            },
        );
        assert_eq!(relay.pending(), 1);
        relay.answered(
            7,
            pb::RelayedOwnerReply {
                call_id: c.call_id,
                reply: Some(pb::OwnerCallReply {
                    owner_found: false,
                    status: Some(pb::ObjectStatus {
                        state: Some(pb::object_status::State::Unknown("freed".into())),
                        type_tag: String::new(),
                    }),
                }),
            },
        );
        let r = t.await.unwrap();
        assert!(r.owner_found, "an answer means the owner is there");
        assert!(r.status.is_some());

        // The channel ends with a call unanswered: gone.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let r2 = relay.clone();
        let t = tokio::spawn(async move { r2.call(Some((9, tx)), status_call()).await });
        rx.recv().await.unwrap();
        relay.channel_ended(9);
        assert!(!t.await.unwrap().owner_found);
        assert_eq!(relay.pending(), 0);
    }

    #[tokio::test]
    async fn a_watch_ends_when_the_channel_closes() {
        assert!(watch(None, Duration::from_secs(1)).await);
        let (tx, rx) = mpsc::unbounded_channel::<pb::NodeToWorker>();
        assert!(!watch(Some(tx.clone()), Duration::from_millis(20)).await);
        let w = tokio::spawn(watch(Some(tx), Duration::from_secs(30)));
        drop(rx);
        assert!(w.await.unwrap());
    }
}
