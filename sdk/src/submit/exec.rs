//! The executor: one tokio task that feeds the core its events and runs the effects it
//! returns (lease RPCs, `PushTasks` streams, timers, waits for arguments, actor lookups and
//! kills, warnings, task events).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{ActorId, ObjectId, pb};
use tokio::sync::mpsc;

use super::engine::{
    Effect, Engine, Event, Identity, Note, TaskLog, TimerEvent, Waiting, reply_state,
};
use super::{LINGER, user_warning};
use crate::runtime::Runtime;

/// How long calls wait for an actor that is not running before the user is told why.
const ACTOR_WAIT_WARNING: Duration = Duration::from_secs(5);
/// The longest a lease request may take at one node: its queue, a binary fetch and a worker
/// start (each bounded on the node).
const LEASE_RPC_TIMEOUT: Duration = Duration::from_secs(300);
/// Events taken at once before the queues are dispatched (pushes go out in batches).
const BATCH: usize = 4096;

struct Exec {
    rt: Arc<Runtime>,
    events: mpsc::UnboundedSender<Event>,
    /// Open streams' senders; dropping one closes its stream.
    streams: HashMap<u64, mpsc::UnboundedSender<pb::PushTasksRequest>>,
    /// Lease requests under way.
    leases: HashMap<u64, tokio::task::AbortHandle>,
}

pub(crate) async fn run(rt: Arc<Runtime>, mut rx: mpsc::UnboundedReceiver<Event>) {
    let events_rt = rt.clone();
    let log: TaskLog = Arc::new(move |slot, n: Note| events_rt.task_log.record(slot, n));
    let mut engine = Engine::new(
        rt.owner.clone(),
        rt.stats.clone(),
        log,
        rt.node.loc(),
        Identity {
            binary: rt.binary.clone(),
            job_id: rt.job().to_owned(),
            prefix: rt.prefix.to_vec(),
        },
    );
    let mut x = Exec {
        events: rt.submit_tx.clone(),
        rt,
        streams: HashMap::new(),
        leases: HashMap::new(),
    };
    loop {
        let ev = if engine.has_idle() {
            match tokio::time::timeout(LINGER / 2, rx.recv()).await {
                Ok(None) => return,
                Ok(Some(ev)) => Some(ev),
                Err(_) => None,
            }
        } else {
            match rx.recv().await {
                Some(ev) => Some(ev),
                None => return,
            }
        };
        if let Some(ev) = ev {
            engine.handle(ev, Instant::now());
            for _ in 0..BATCH {
                match rx.try_recv() {
                    Ok(ev) => engine.handle(ev, Instant::now()),
                    Err(_) => break,
                }
            }
        }
        for e in engine.flush(Instant::now()) {
            x.run(e);
        }
    }
}

impl Exec {
    fn run(&mut self, e: Effect) {
        match e {
            Effect::RequestLease {
                req,
                key,
                addr,
                request,
            } => {
                let (rt, events) = (self.rt.clone(), self.events.clone());
                self.leases.retain(|_, h| !h.is_finished());
                let h = self.rt.spawn(async move {
                    let reply = match rt.nm(&addr) {
                        Ok(mut c) => {
                            let mut call = tonic::Request::new(request);
                            call.set_timeout(LEASE_RPC_TIMEOUT);
                            c.request_worker_lease(call)
                                .await
                                .map(tonic::Response::into_inner)
                                .map_err(|e| e.message().to_owned())
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    let _ = events.send(Event::LeaseReply {
                        req,
                        key,
                        addr,
                        reply,
                    });
                });
                self.leases.insert(req, h.abort_handle());
            }
            Effect::CancelLease(req) => {
                if let Some(h) = self.leases.remove(&req) {
                    h.abort();
                }
            }
            Effect::Timer { after, event } => {
                let events = self.events.clone();
                self.rt.spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = events.send(match event {
                        TimerEvent::LeaseRetry(req) => Event::LeaseRetry(req),
                    });
                });
            }
            Effect::WaitArgs { ids, then } => {
                let (rt, events) = (self.rt.clone(), self.events.clone());
                self.rt.spawn(async move {
                    for id in ids {
                        rt.owner.ready(id, None).await;
                    }
                    let _ = events.send(match then {
                        Waiting::Task(t) => Event::ArgsReady(t),
                        Waiting::Actor(a) => Event::ActorArgsReady(a),
                    });
                });
            }
            Effect::Open {
                conn,
                address,
                mut first,
                direct,
            } => {
                first.owner_node = self.rt.output_node();
                first.caller_node = self.rt.node.address.clone();
                let (tx, rx) = mpsc::unbounded_channel();
                let _ = tx.send(first);
                self.stream(conn, address, rx, direct);
                self.streams.insert(conn, tx);
            }
            Effect::StreamAck { conn, task, next } => {
                if let Some(tx) = self.streams.get(&conn) {
                    let _ = tx.send(pb::PushTasksRequest {
                        consumed: vec![pb::StreamConsumed {
                            task_id: task.as_bytes().to_vec(),
                            next,
                        }],
                        ..Default::default()
                    });
                }
            }
            Effect::CancelRemote {
                conn,
                task_id,
                force,
                recursive,
            } => {
                if let Some(tx) = self.streams.get(&conn) {
                    let _ = tx.send(pb::PushTasksRequest {
                        cancel: vec![pb::CancelTask {
                            task_id: task_id.as_bytes().to_vec(),
                            force,
                            recursive,
                        }],
                        ..Default::default()
                    });
                }
            }
            Effect::Push { conn, tasks } => {
                if let Some(tx) = self.streams.get(&conn) {
                    let _ = tx.send(pb::PushTasksRequest {
                        tasks,
                        ..Default::default()
                    });
                }
            }
            Effect::Close(conn) => {
                self.streams.remove(&conn);
            }
            Effect::ResolveActor {
                actor,
                min_restarts,
            } => {
                self.rt.spawn(resolve_actor(
                    self.rt.clone(),
                    actor,
                    min_restarts,
                    self.events.clone(),
                ));
            }
            Effect::KillActor(id) => {
                self.rt.spawn(end_actor(self.rt.clone(), id));
            }
            Effect::Warn { key, message } => user_warning(&key, &message),
        }
    }

    /// Runs a PushTasks stream to the worker at `address`: replies and the break come back
    /// as events for connection `id`.
    fn stream(
        &self,
        id: u64,
        address: String,
        rx: mpsc::UnboundedReceiver<pb::PushTasksRequest>,
        direct: bool,
    ) {
        let events = self.events.clone();
        let rt = self.rt.clone();
        let opts = protocol::client::ClientOptions {
            rpc_timeout: Duration::from_secs(24 * 3600),
            ..Default::default()
        };
        let client = protocol::client::channel(&address, &opts).map(|ch| {
            pb::core_worker_client::CoreWorkerClient::with_interceptor(
                ch,
                protocol::auth::ClientAuth(self.rt.token.clone()),
            )
            .max_decoding_message_size(protocol::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(protocol::MAX_MESSAGE_BYTES)
        });
        self.rt.spawn(async move {
            let mut client = match client {
                Ok(c) => c,
                Err(e) => {
                    let _ = events.send(Event::Broken(id, e.to_string()));
                    return;
                }
            };
            let outbound = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|m| (m, rx))
            });
            let why = match client.push_tasks(outbound).await {
                Err(e) => e.message().to_owned(),
                Ok(resp) => {
                    let mut s = resp.into_inner();
                    loop {
                        match s.message().await {
                            Ok(Some(mut r)) => {
                                // Refs inside results: this process borrows them while
                                // the results live (the worker registered it).
                                // A streaming task's items: kept for its generator.
                                r.replies.retain_mut(|reply| match reply.item.take() {
                                    Some(item) => {
                                        if let Ok(t) = ObjectId::from_slice(&reply.task_id) {
                                            rt.streams.item(&rt.owner, t, item);
                                        }
                                        false
                                    }
                                    None => true,
                                });
                                if r.replies.is_empty() {
                                    continue;
                                }
                                for reply in &mut r.replies {
                                    if !reply.contained.is_empty()
                                        && let Ok(oid) = ObjectId::from_slice(&reply.task_id)
                                    {
                                        let refs = std::mem::take(&mut reply.contained);
                                        rt.owner.contain(oid, crate::borrow::adopt(&rt, refs));
                                    }
                                }
                                // An actor's results complete here, a hop sooner for the
                                // caller waiting on them; the core only does the books.
                                if direct {
                                    for reply in &r.replies {
                                        if let Ok(oid) = ObjectId::from_slice(&reply.task_id) {
                                            rt.owner.complete_pending(oid, reply_state(reply));
                                        }
                                    }
                                }
                                if events.send(Event::Replies(id, r.replies)).is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break "the worker closed the stream".to_owned(),
                            Err(e) => break e.message().to_owned(),
                        }
                    }
                }
            };
            let _ = events.send(Event::Broken(id, why));
        });
    }
}

/// Kills an actor for good because no handle to it is left (as Ray does).
async fn end_actor(rt: Arc<Runtime>, id: ActorId) {
    let req = pb::KillActorRequest {
        actor_id: id.to_string(),
        no_restart: true,
        reason: "every handle to it was dropped (it was not named or detached)".into(),
    };
    let r = match rt.head() {
        Ok(h) => h
            .call(|mut c| {
                let req = req.clone();
                async move { c.kill_actor(req).await }
            })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = r {
        tracing::warn!(
            actor = %id,
            "could not end an actor no handle refers to: {e}"
        );
    }
}

/// Waits until the actor is alive at incarnation `min_restarts` or later (or dead). If it
/// stays alive at an older incarnation (the stream broke for another reason) it is used
/// again after a while.
async fn resolve_actor(
    rt: Arc<Runtime>,
    id: ActorId,
    min_restarts: u64,
    events: mpsc::UnboundedSender<Event>,
) {
    let start = Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        match crate::actor::get_info(&rt, &id, 5_000, min_restarts).await {
            Ok(i) if i.state == pb::ActorState::Dead as i32 => {
                let _ = events.send(Event::ActorResolved(id, Box::new(Err(i.message))));
                return;
            }
            Ok(i)
                if i.state == pb::ActorState::Alive as i32
                    && (i.num_restarts >= min_restarts
                        || start.elapsed() > Duration::from_secs(10)) =>
            {
                let _ = events.send(Event::ActorResolved(id, Box::new(Ok(i))));
                return;
            }
            Ok(i) => {
                if start.elapsed() > ACTOR_WAIT_WARNING {
                    user_warning(
                        &format!("actor {id}"),
                        &format!(
                            "actor {} ({id}) has not started after {}s: {}",
                            i.class_name,
                            start.elapsed().as_secs(),
                            if i.message.is_empty() {
                                "waiting for a node"
                            } else {
                                &i.message
                            }
                        ),
                    );
                }
            }
            Err(e) => {
                tracing::warn!(actor = %id, "cannot look the actor up: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
