//! Worker output to the driver (Ray's `log_to_driver`): what a task or actor prints reaches
//! the process that called it, on that process's stderr, each line prefixed
//! `(NAME pid=PID, ip=IP)`.
//!
//! In a worker, `capture` puts pipes behind file descriptors 1 and 2. A reader thread per
//! pipe copies every byte to where the descriptor pointed before (the worker's log file, so
//! the log stays whole) and cuts it into lines, each attributed to the call running when it
//! arrived: its name and its caller, known by the owner prefix that starts every task id
//! and by the caller's node (named in the first message of each `PushTasks` stream). Lines
//! wait in a queue bounded in bytes; past the bound they are counted and dropped, so a
//! chatty task can never stall or bloat its worker. Every 100 ms the queue goes to the
//! worker's node as `WorkerOutput` messages, one per caller, which the node hands to the
//! caller's node (`NodeManager.DeliverOutput`) and that node to the caller's channel.
//!
//! A caller that is itself a worker prints the lines it gets, so they go up the chain of
//! callers to the driver, as in Ray. Output of a call whose caller is unknown (an actor's
//! constructor) stays in the log file only.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::pb;
use tokio::sync::mpsc;

/// Bytes of lines waiting to be sent; more are dropped (and counted).
const QUEUE_BYTES: usize = 4 << 20;
/// The longest line forwarded; longer ones are cut (the log file has them whole).
const LINE_BYTES: usize = 16 << 10;
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Who the running call belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Caller {
    prefix: Vec<u8>,
    node: String,
}

#[derive(Default)]
struct Queue {
    /// (caller, name, line) in arrival order.
    lines: VecDeque<(Caller, Arc<str>, String)>,
    bytes: usize,
    dropped: HashMap<Caller, u64>,
}

#[derive(Default)]
struct State {
    /// The call running now: its caller's prefix and name.
    current: Option<(Vec<u8>, Arc<str>)>,
    /// Caller prefix → the caller's node manager, from the streams' first messages.
    nodes: HashMap<Vec<u8>, String>,
    queue: Queue,
    /// Output of calls this worker made, passed on whole to its own caller.
    passed: Vec<pb::WorkerOutput>,
}

/// The worker's output capture; `None` outside workers.
pub(crate) struct Capture {
    st: Mutex<State>,
    pid: u32,
    ip: String,
}

static CAPTURE: std::sync::OnceLock<Arc<Capture>> = std::sync::OnceLock::new();

fn lock(c: &Capture) -> std::sync::MutexGuard<'_, State> {
    c.st.lock().unwrap_or_else(|p| p.into_inner())
}

/// The first bytes of a task id: its owner's prefix (see the runtime's ids).
pub(crate) const PREFIX_LEN: usize = 11;

/// Puts pipes behind stdout and stderr (see the module doc); the lines then wait for
/// `flush_loop`. Called once, when a worker starts.
pub(crate) fn capture(ip: String) -> std::io::Result<Arc<Capture>> {
    let c = Arc::new(Capture {
        st: Mutex::default(),
        pid: std::process::id(),
        ip,
    });
    if CAPTURE.set(c.clone()).is_err() {
        return Err(std::io::Error::other("output is already captured"));
    }
    for stderr in [false, true] {
        let (read, write) = nix::unistd::pipe()?;
        // Where the descriptor pointed (the log file): every byte still goes there.
        let mut original = std::fs::File::from(if stderr {
            nix::unistd::dup(std::io::stderr())?
        } else {
            nix::unistd::dup(std::io::stdout())?
        });
        if stderr {
            nix::unistd::dup2_stderr(&write)?;
        } else {
            nix::unistd::dup2_stdout(&write)?;
        }
        drop(write);
        let c = c.clone();
        std::thread::Builder::new()
            .name(format!(
                "rayctl-output-{}",
                if stderr { "err" } else { "out" }
            ))
            .spawn(move || {
                let mut r = std::io::BufReader::new(std::fs::File::from(read));
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match r.read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let _ = original.write_all(&line);
                    c.push(&line);
                }
            })?;
    }
    Ok(c)
}

/// Sends what waits to the node, every `FLUSH_EVERY`, until the node's channel is gone.
pub(crate) async fn flush_loop(c: Arc<Capture>, node_tx: mpsc::UnboundedSender<pb::WorkerMessage>) {
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        for m in c.take() {
            if node_tx.send(m).is_err() {
                return;
            }
        }
    }
}

impl Capture {
    fn push(&self, raw: &[u8]) {
        let mut st = lock(self);
        let Some((prefix, name)) = st.current.clone() else {
            return;
        };
        let Some(node) = st.nodes.get(&prefix).cloned() else {
            return;
        };
        let caller = Caller { prefix, node };
        let text = String::from_utf8_lossy(raw);
        let mut text = text.trim_end_matches(['\n', '\r']).to_owned();
        if text.len() > LINE_BYTES {
            let mut cut = LINE_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str(" …[cut; the worker's log has the whole line]");
        }
        if st.queue.bytes + text.len() > QUEUE_BYTES {
            *st.queue.dropped.entry(caller).or_default() += 1;
            return;
        }
        st.queue.bytes += text.len();
        st.queue.lines.push_back((caller, name, text));
    }

    /// Everything queued, as one message per (caller, name) run, in order.
    fn take(&self) -> Vec<pb::WorkerMessage> {
        let mut st = lock(self);
        let lines = std::mem::take(&mut st.queue.lines);
        let dropped = std::mem::take(&mut st.queue.dropped);
        st.queue.bytes = 0;
        let mut out: Vec<pb::WorkerOutput> = std::mem::take(&mut st.passed);
        drop(st);
        for (caller, name, line) in lines {
            match out.last_mut() {
                Some(o)
                    if o.owner_prefix == caller.prefix
                        && o.owner_node == caller.node
                        && o.name == *name =>
                {
                    o.lines.push(line)
                }
                _ => out.push(pb::WorkerOutput {
                    owner_prefix: caller.prefix,
                    owner_node: caller.node,
                    name: name.to_string(),
                    pid: self.pid,
                    ip: self.ip.clone(),
                    lines: vec![line],
                    dropped: 0,
                }),
            }
        }
        for (caller, n) in dropped {
            out.push(pb::WorkerOutput {
                owner_prefix: caller.prefix,
                owner_node: caller.node,
                name: String::new(),
                pid: self.pid,
                ip: self.ip.clone(),
                lines: Vec::new(),
                dropped: n,
            });
        }
        out.into_iter()
            .map(|o| pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Output(o)),
            })
            .collect()
    }
}

/// A caller's stream named its node: output of its calls goes there.
pub(crate) fn caller_node(task_id: &[u8], node: &str) {
    if let (Some(c), Some(prefix)) = (CAPTURE.get(), task_id.get(..PREFIX_LEN))
        && !node.is_empty()
    {
        let mut st = lock(c);
        if st.nodes.get(prefix).is_some_and(|n| n == node) {
            return;
        }
        if st.nodes.len() > 100_000 {
            st.nodes.clear();
        }
        st.nodes.insert(prefix.to_vec(), node.to_owned());
    }
}

/// Attributes output from now on to this call (a task id too short: to nobody).
pub(crate) fn running(task_id: &[u8], name: &str) {
    let Some(c) = CAPTURE.get() else {
        return;
    };
    let prefix = task_id.get(..PREFIX_LEN);
    let name = display_name(name);
    // Flush what the last call printed before it is attributed to this one.
    let _ = std::io::stdout().flush();
    let mut st = lock(c);
    // The same caller and name as the last call (the common case: one owner's stream of
    // one function): nothing to allocate.
    let same = match (&st.current, prefix) {
        (Some((p, n)), Some(q)) => p.as_slice() == q && &**n == name,
        (None, None) => true,
        _ => false,
    };
    if !same {
        st.current = prefix.map(|p| (p.to_vec(), Arc::from(name)));
    }
}

/// Ray shows a task by its function's name and an actor's calls by its class.
fn display_name(function: &str) -> &str {
    let mut parts = function.rsplit("::");
    let last = parts.next().unwrap_or(function);
    match parts.next() {
        // `module::Class::method`: the class.
        Some(p) if p.chars().next().is_some_and(char::is_uppercase) => p,
        _ => last,
    }
}

/// Output of calls this process made: in a worker whose running call has a caller, passed
/// on to that caller as it is (so the driver shows the line once, with the prefix of the
/// process that printed it); otherwise printed here.
pub(crate) fn received(mut o: pb::WorkerOutput) {
    if let Some(c) = CAPTURE.get() {
        let mut st = lock(c);
        let caller = st
            .current
            .as_ref()
            .and_then(|(prefix, _)| Some((prefix.clone(), st.nodes.get(prefix)?.clone())));
        if let Some((prefix, node)) = caller {
            let bytes: usize = o.lines.iter().map(String::len).sum();
            if st.queue.bytes + bytes > QUEUE_BYTES {
                // Counted where it is told: with this caller's next message.
                *st.queue.dropped.entry(Caller { prefix, node }).or_default() +=
                    o.lines.len() as u64 + o.dropped;
                return;
            }
            st.queue.bytes += bytes;
            o.owner_prefix = prefix;
            o.owner_node = node;
            st.passed.push(o);
            return;
        }
    }
    print(&o);
}

/// Prints lines that came from this process's calls on its stderr.
pub(crate) fn print(o: &pb::WorkerOutput) {
    let mut err = std::io::stderr().lock();
    for l in &o.lines {
        let _ = writeln!(err, "({} pid={}, ip={}) {l}", o.name, o.pid, o.ip);
    }
    if o.dropped > 0 {
        let _ = writeln!(
            err,
            "(pid={}, ip={}) [{} line(s) of output dropped: more than {} MiB waited to be sent; the worker's log has them]",
            o.pid,
            o.ip,
            o.dropped,
            QUEUE_BYTES >> 20
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap() -> Capture {
        Capture {
            st: Mutex::default(),
            pid: 7,
            ip: "10.0.0.1".into(),
        }
    }

    #[test]
    fn lines_go_to_the_running_calls_caller_in_order_and_overflow_is_counted() {
        let c = cap();
        let a = vec![1u8; PREFIX_LEN];
        let b = vec![2u8; PREFIX_LEN];
        c.push(b"before any call\n");
        {
            let mut st = lock(&c);
            st.nodes.insert(a.clone(), "n1:1".into());
            st.nodes.insert(b.clone(), "n2:1".into());
            st.current = Some((a.clone(), Arc::from("f")));
        }
        c.push(b"one\n");
        c.push(b"two\r\n");
        lock(&c).current = Some((b.clone(), Arc::from("Counter")));
        c.push(b"three\n");
        let out = c.take();
        let outs: Vec<&pb::WorkerOutput> = out
            .iter()
            .filter_map(|m| match &m.kind {
                Some(pb::worker_message::Kind::Output(o)) => Some(o),
                _ => None,
            })
            .collect();
        assert_eq!(outs.len(), 2, "{outs:?}");
        assert_eq!(
            (
                outs[0].owner_node.as_str(),
                outs[0].name.as_str(),
                outs[0].lines.clone()
            ),
            ("n1:1", "f", vec!["one".to_string(), "two".to_string()])
        );
        assert_eq!(
            (
                outs[1].owner_node.as_str(),
                outs[1].name.as_str(),
                outs[1].lines.clone()
            ),
            ("n2:1", "Counter", vec!["three".to_string()])
        );
        assert!(c.take().is_empty());
        // Past the bound lines are counted, not kept.
        let big = vec![b'x'; LINE_BYTES];
        for _ in 0..(QUEUE_BYTES / LINE_BYTES + 10) {
            c.push(&big);
        }
        let out = c.take();
        let dropped: u64 = out
            .iter()
            .filter_map(|m| match &m.kind {
                Some(pb::worker_message::Kind::Output(o)) => Some(o.dropped),
                _ => None,
            })
            .sum();
        assert!(dropped >= 10, "{dropped}");
        let kept: usize = out
            .iter()
            .filter_map(|m| match &m.kind {
                Some(pb::worker_message::Kind::Output(o)) => Some(o.lines.len()),
                _ => None,
            })
            .sum();
        assert!(kept * LINE_BYTES <= QUEUE_BYTES);
    }

    #[test]
    fn calls_are_named_as_ray_names_them() {
        assert_eq!(display_name("my_crate::tasks::square"), "square");
        assert_eq!(display_name("my_crate::Counter::incr"), "Counter");
        assert_eq!(display_name("square"), "square");
    }
}
