//! Worker output to the driver (Ray's `log_to_driver`): what a task or actor prints reaches
//! the process that called it, on that process's stderr, each line prefixed
//! `(NAME pid=PID, ip=IP)`.
//!
//! In a worker, `capture` puts pipes behind file descriptors 1 and 2. A reader thread per
//! pipe copies every byte to where the descriptor pointed before (the worker's log file, so
//! the log stays whole) and cuts it into lines, each attributed to the call that wrote it:
//! its name and its caller, known by the owner prefix that starts every task id and by the
//! caller's node (named in the first message of each `PushTasks` stream). A call's start
//! writes a marker line (`SWITCH`) into both pipes, and the reader takes the next call's
//! attribution when it reads the marker, so bytes still in a pipe when the next call starts
//! are not given to it; the marker never reaches the log file or the caller. Lines
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
/// Written by `running` into both pipes where the next call's output begins (see the
/// module doc). NUL bytes: no text a program prints as lines contains it by chance.
const SWITCH: &[u8] = b"\0rayctl: the next call starts here\0\n";

/// A call's caller prefix and display name; `None`: output goes to nobody.
type Attribution = Option<(Vec<u8>, Arc<str>)>;

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
    /// The call running now (the last one `running` named): its caller's prefix and name.
    current: Attribution,
    /// Per stream (stdout, stderr): the attributions of the markers written and not yet
    /// read, in order.
    pending: [VecDeque<Attribution>; 2],
    /// Caller prefix → the caller's node manager, from the streams' first messages.
    nodes: HashMap<Vec<u8>, String>,
    queue: Queue,
    /// Output of calls this worker made, passed on whole to its own caller.
    passed: Vec<pb::WorkerOutput>,
}

/// The worker's output capture; `None` outside workers.
pub(crate) struct Capture {
    st: Mutex<State>,
    /// Held while a call's markers are written, so the pending queues match the pipes.
    switching: Mutex<()>,
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
        switching: Mutex::default(),
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
                c.read_stream(
                    usize::from(stderr),
                    std::fs::File::from(read),
                    &mut original,
                )
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
    /// Copies one pipe (`stream` 0 stdout, 1 stderr) to `original` and queues its lines,
    /// attributed as the markers in it say, until the pipe closes.
    fn read_stream(&self, stream: usize, read: impl std::io::Read, original: &mut impl Write) {
        let mut r = std::io::BufReader::new(read);
        let mut line = Vec::new();
        let mut current: Attribution = None;
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if let Some(rest) = line.strip_suffix(SWITCH) {
                // What came before the marker without a newline is the last call's.
                if !rest.is_empty() {
                    let _ = original.write_all(rest);
                    self.push(&current, rest);
                }
                current = lock(self).pending[stream].pop_front().flatten();
                continue;
            }
            let _ = original.write_all(&line);
            self.push(&current, &line);
        }
    }

    /// Marks where `want`'s output begins in both streams, unless it is already the
    /// running call's; `write` puts bytes into a stream.
    fn switch(
        &self,
        want: Attribution,
        mut write: impl FnMut(usize, &[u8]) -> std::io::Result<()>,
    ) {
        let _order = self.switching.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut st = lock(self);
            if st.current == want {
                return;
            }
            st.current = want.clone();
            for q in &mut st.pending {
                q.push_back(want.clone());
            }
        }
        for stream in 0..2 {
            if write(stream, SWITCH).is_err() {
                // No marker in the pipe: nothing will take this one (ours is the last, as
                // `switching` is held).
                lock(self).pending[stream].pop_back();
            }
        }
    }

    fn push(&self, attribution: &Attribution, raw: &[u8]) {
        let Some((prefix, name)) = attribution.clone() else {
            return;
        };
        let mut st = lock(self);
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
    // The same caller and name as the last call (the common case: one owner's stream of
    // one function): no marker, nothing to allocate.
    let same = match (&lock(c).current, prefix) {
        (Some((p, n)), Some(q)) => p.as_slice() == q && &**n == name,
        (None, None) => true,
        _ => false,
    };
    if same {
        return;
    }
    let want = prefix.map(|p| (p.to_vec(), Arc::from(name)));
    c.switch(want, |stream, bytes| {
        if stream == 0 {
            let mut out = std::io::stdout().lock();
            out.write_all(bytes)?;
            out.flush()
        } else {
            std::io::stderr().lock().write_all(bytes)
        }
    });
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
            switching: Mutex::default(),
            pid: 7,
            ip: "10.0.0.1".into(),
        }
    }

    #[test]
    fn lines_go_to_the_running_calls_caller_in_order_and_overflow_is_counted() {
        let c = cap();
        let a = vec![1u8; PREFIX_LEN];
        let b = vec![2u8; PREFIX_LEN];
        c.push(&None, b"before any call\n");
        {
            let mut st = lock(&c);
            st.nodes.insert(a.clone(), "n1:1".into());
            st.nodes.insert(b.clone(), "n2:1".into());
        }
        let f = Some((a.clone(), Arc::from("f")));
        c.push(&f, b"one\n");
        c.push(&f, b"two\r\n");
        c.push(&Some((b.clone(), Arc::from("Counter"))), b"three\n");
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
            c.push(&f, &big);
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

    /// The lines of every `Output` message: (name, lines).
    fn named_lines(out: &[pb::WorkerMessage]) -> Vec<(String, Vec<String>)> {
        out.iter()
            .filter_map(|m| match &m.kind {
                Some(pb::worker_message::Kind::Output(o)) => {
                    Some((o.name.clone(), o.lines.clone()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn bytes_still_in_the_pipe_when_the_next_call_starts_stay_the_last_calls() {
        let c = Arc::new(cap());
        let a = vec![1u8; PREFIX_LEN];
        lock(&c).nodes.insert(a.clone(), "n1:1".into());
        // Real pipes, read by threads that start only after everything is written: the
        // worst case of a reader behind the calls.
        let pipes: Vec<_> = (0..2).map(|_| nix::unistd::pipe().unwrap()).collect();
        let mut writers: Vec<std::fs::File> = pipes
            .iter()
            .map(|(_, w)| std::fs::File::from(w.try_clone().unwrap()))
            .collect();
        let mut write = |stream: usize, b: &[u8]| writers[stream].write_all(b);
        c.switch(Some((a.clone(), Arc::from("first"))), &mut write);
        write(0, b"one\n").unwrap();
        write(1, b"err one\n").unwrap();
        write(0, b"no newline").unwrap();
        c.switch(Some((a.clone(), Arc::from("second"))), &mut write);
        write(0, b"two\n").unwrap();
        // The same call again writes no marker.
        c.switch(Some((a.clone(), Arc::from("second"))), &mut write);
        write(1, b"err two\n").unwrap();
        c.switch(None, &mut write);
        write(0, b"nobody's\n").unwrap();
        drop(writers);
        let logs: Vec<Vec<u8>> = pipes
            .into_iter()
            .enumerate()
            .map(|(stream, (r, w))| {
                drop(w);
                let c = c.clone();
                std::thread::spawn(move || {
                    let mut log = Vec::new();
                    c.read_stream(stream, std::fs::File::from(r), &mut log);
                    log
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        // The log files get every byte but no marker.
        assert_eq!(
            String::from_utf8_lossy(&logs[0]),
            "one\nno newlinetwo\nnobody's\n"
        );
        assert_eq!(String::from_utf8_lossy(&logs[1]), "err one\nerr two\n");
        let mut got = named_lines(&c.take());
        got.sort();
        assert_eq!(
            got,
            vec![
                ("first".to_string(), vec!["err one".to_string()]),
                (
                    "first".to_string(),
                    vec!["one".to_string(), "no newline".to_string()]
                ),
                ("second".to_string(), vec!["err two".to_string()]),
                ("second".to_string(), vec!["two".to_string()]),
            ]
        );
        assert!(lock(&c).pending.iter().all(VecDeque::is_empty));
    }

    #[test]
    fn calls_are_named_as_ray_names_them() {
        assert_eq!(display_name("my_crate::tasks::square"), "square");
        assert_eq!(display_name("my_crate::Counter::incr"), "Counter");
        assert_eq!(display_name("square"), "square");
    }
}
