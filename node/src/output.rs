//! Worker output on its way to the process that made the calls (Ray's `log_to_driver`):
//! what this node's workers print goes to the caller's node (`NodeManager.DeliverOutput`),
//! one queue and one sender per destination so lines arrive in order.
//!
//! Bounded everywhere: a queue holds at most `QUEUE_MESSAGES` messages (each is at most a
//! worker's 100 ms batch); past that, messages are dropped and the next delivered one says
//! how many lines were lost. A destination that fails is not retried (output is best
//! effort; the worker's log file has everything). A sender idle for a minute ends.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use protocol::auth::AuthToken;
use protocol::client::ClientOptions;
use protocol::pb;
use tokio::sync::mpsc;

const QUEUE_MESSAGES: usize = 256;
const IDLE: Duration = Duration::from_secs(60);

pub(crate) struct Forwarder {
    token: Option<AuthToken>,
    queues: Mutex<HashMap<String, mpsc::Sender<pb::WorkerOutput>>>,
    /// Lines dropped per destination while its queue was full, told with the next message.
    dropped: Mutex<HashMap<String, u64>>,
}

impl Forwarder {
    pub(crate) fn new(token: Option<AuthToken>) -> Self {
        Self {
            token,
            queues: Mutex::default(),
            dropped: Mutex::default(),
        }
    }

    /// Queues `o` for its caller's node (never blocks).
    pub(crate) fn send(&self, mut o: pb::WorkerOutput) {
        let dest = o.owner_node.clone();
        if let Some(n) = self
            .dropped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&dest)
        {
            o.dropped += n;
        }
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let tx = queues
            .entry(dest.clone())
            .or_insert_with(|| self.sender(dest.clone()));
        let lost = match tx.try_send(o) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(o)) => o.lines.len() as u64 + o.dropped,
            Err(mpsc::error::TrySendError::Closed(o)) => {
                // Its sender ended (idle): start another.
                let tx = self.sender(dest.clone());
                let r = tx.try_send(o);
                queues.insert(dest.clone(), tx);
                match r {
                    Ok(()) => return,
                    Err(e) => {
                        let o = e.into_inner();
                        o.lines.len() as u64 + o.dropped
                    }
                }
            }
        };
        drop(queues);
        *self
            .dropped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(dest)
            .or_default() += lost;
    }

    fn sender(&self, dest: String) -> mpsc::Sender<pb::WorkerOutput> {
        let (tx, mut rx) = mpsc::channel::<pb::WorkerOutput>(QUEUE_MESSAGES);
        let opts = ClientOptions {
            rpc_timeout: Duration::from_secs(5),
            ..Default::default()
        };
        let client = protocol::client::node_manager(&dest, self.token.clone(), &opts);
        tokio::spawn(async move {
            let mut c = match client {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(dest, "worker output has nowhere to go: {e}");
                    return;
                }
            };
            while let Ok(Some(o)) = tokio::time::timeout(IDLE, rx.recv()).await {
                if let Err(e) = c.deliver_output(o).await {
                    tracing::debug!(dest, "worker output lost: {}", e.message());
                }
            }
        });
        tx
    }
}
