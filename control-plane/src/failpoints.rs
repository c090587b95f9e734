//! Fail points for the chaos runner (`fail` crate): named places where a process can be made
//! to crash on purpose, configured by the `FAILPOINTS` environment variable at start, e.g.
//! `FAILPOINTS='raft-log-flush-after=20*off->panic'` (the 21st time it is reached).
//!
//! They are compiled in only with the `failpoints` feature (the chaos tests' builds); a
//! `cargo build -p rayctl` has none, and then `FAILPOINTS` is ignored with a warning.
//!
//! The points: `raft-log-flush-before`, `raft-log-flush-after` (around the Raft log's
//! fsync), `raft-apply-before-reply` (entries applied, replies not yet returned),
//! `raft-snapshot-build-mid`, `raft-snapshot-install-mid` (built or received, not yet
//! stored), and the node's `job-agent-start` (a job's driver spawned, not yet reported).

/// Every fail point in the code (a panic whose message is one of these names is a fail point
/// that fired, not a bug).
pub const NAMES: [&str; 6] = [
    "raft-log-flush-before",
    "raft-log-flush-after",
    "raft-apply-before-reply",
    "raft-snapshot-build-mid",
    "raft-snapshot-install-mid",
    "job-agent-start",
];

/// Reads `FAILPOINTS` once, at process start. A panic at a fail point aborts the process, as
/// a crash there would (a panic in a tokio task would otherwise only end that task).
/// Returns whether any fail point was configured.
pub fn from_env() -> bool {
    let Some(spec) = std::env::var_os("FAILPOINTS").filter(|v| !v.is_empty()) else {
        return false;
    };
    if !cfg!(feature = "failpoints") {
        eprintln!(
            "warning: FAILPOINTS={spec:?} is ignored: this rayctl was built without fail points"
        );
        return false;
    }
    // Kept for the life of the process: the scenario holds the configuration.
    std::mem::forget(fail::FailScenario::setup());
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        // fail's panic action says "failpoint <name> panic" (or the message it was given).
        let fired = NAMES
            .iter()
            .find(|n| msg == **n || msg == format!("failpoint {n} panic"));
        match fired {
            Some(n) => eprintln!("fail point {n} reached: aborting the process"),
            None => eprintln!("a panic with fail points configured: aborting the process"),
        }
        std::process::abort();
    }));
    true
}
