//! A linearizability checker for one register (a KV key): Wing & Gong's search with Lowe's
//! memoization of (linearized set, state), as in Jepsen's Knossos and Porcupine.
//!
//! Model: the register starts absent; a write sets it; a read returns the current value (or
//! absent). An OK op took effect exactly once between its invocation and its completion. An
//! indeterminate write (timeout, or an error that does not rule out that it was applied) took
//! effect at most once, at any time after its invocation. Failed reads say nothing and are
//! left out. Every written value is unique, which makes a read name its write.

use std::collections::{HashMap, HashSet};

/// One operation on the register, as the checker sees it.
#[derive(Debug, Clone)]
pub struct RegOp {
    pub invoke: f64,
    /// `f64::INFINITY` for an indeterminate write.
    pub complete: f64,
    pub kind: RegKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegKind {
    Write(String),
    Read(Option<String>),
}

/// Why a history is not linearizable, or why the search gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order fits: the ops that could not be placed after the longest prefix found.
    Violation(String),
    /// The search ran past its step budget.
    Unknown,
}

/// Checks one key's history. `budget` bounds the search steps (each a state visited).
pub fn check(ops: &[RegOp], budget: u64) -> Verdict {
    // An indeterminate write that no read returned may as well never have happened: leaving
    // it out removes only constraints, so it cannot hide a violation, and it keeps the search
    // small when many writes timed out during an outage.
    let read_values: HashSet<&str> = ops
        .iter()
        .filter_map(|o| match &o.kind {
            RegKind::Read(Some(v)) => Some(v.as_str()),
            _ => None,
        })
        .collect();
    let ops: Vec<&RegOp> = ops
        .iter()
        .filter(|o| match &o.kind {
            RegKind::Write(v) => o.complete.is_finite() || read_values.contains(v.as_str()),
            RegKind::Read(_) => true,
        })
        .collect();
    let n = ops.len();
    if n == 0 {
        return Verdict::Linearizable;
    }
    // States are interned: 0 is "absent", i + 1 the i-th distinct value.
    let mut ids: HashMap<&str, usize> = HashMap::new();
    for o in &ops {
        if let RegKind::Write(v) | RegKind::Read(Some(v)) = &o.kind {
            let next = ids.len() + 1;
            ids.entry(v.as_str()).or_insert(next);
        }
    }
    let id = |v: &Option<String>| v.as_deref().map_or(0, |v| ids[v]);
    // Ops in invocation order; an OK op must be placed before any op invoked after it
    // completed.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|a, b| ops[*a].invoke.total_cmp(&ops[*b].invoke));
    let required: Vec<bool> = order.iter().map(|i| ops[*i].complete.is_finite()).collect();
    let must = required.iter().filter(|r| **r).count();
    let words = n.div_ceil(64);
    let mut seen: HashSet<(Vec<u64>, usize)> = HashSet::new();
    let mut steps = 0u64;
    let mut best = 0usize;

    // Depth-first search with an explicit stack: (placed set, state, placed required count,
    // next candidate index to try).
    struct Frame {
        placed: Vec<u64>,
        state: usize,
        done: usize,
        next: usize,
    }
    let mut stack = vec![Frame {
        placed: vec![0; words],
        state: 0,
        done: 0,
        next: 0,
    }];
    let is_placed = |p: &[u64], i: usize| p[i / 64] & (1 << (i % 64)) != 0;
    while let Some(top) = stack.last_mut() {
        if top.done == must {
            return Verdict::Linearizable;
        }
        steps += 1;
        if steps > budget {
            return Verdict::Unknown;
        }
        best = best.max(top.done);
        // The earliest completion among unplaced ops bounds which ops may go next.
        let horizon = order
            .iter()
            .enumerate()
            .filter(|(k, _)| !is_placed(&top.placed, *k))
            .map(|(_, i)| ops[*i].complete)
            .fold(f64::INFINITY, f64::min);
        let mut pushed = None;
        while top.next < n {
            let k = top.next;
            top.next += 1;
            if is_placed(&top.placed, k) {
                continue;
            }
            let o = ops[order[k]];
            if o.invoke > horizon {
                // Sorted by invocation: nothing later can go next either.
                top.next = n;
                break;
            }
            let next_state = match &o.kind {
                RegKind::Write(v) => ids[v.as_str()],
                RegKind::Read(v) => {
                    if id(v) != top.state {
                        continue;
                    }
                    top.state
                }
            };
            let mut placed = top.placed.clone();
            placed[k / 64] |= 1 << (k % 64);
            if seen.insert((placed.clone(), next_state)) {
                pushed = Some(Frame {
                    placed,
                    state: next_state,
                    done: top.done + usize::from(required[k]),
                    next: 0,
                });
                break;
            }
        }
        match pushed {
            Some(f) => stack.push(f),
            None => {
                stack.pop();
            }
        }
    }
    let stuck: Vec<String> = order
        .iter()
        .take(40)
        .map(|i| {
            format!(
                "{:?}@[{:.3},{:.3}]",
                ops[*i].kind, ops[*i].invoke, ops[*i].complete
            )
        })
        .collect();
    Verdict::Violation(format!(
        "no linearization: at most {best} of {must} acknowledged ops fit; the first ops: {}",
        stuck.join(" ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(v: &str, a: f64, b: f64) -> RegOp {
        RegOp {
            invoke: a,
            complete: b,
            kind: RegKind::Write(v.into()),
        }
    }
    fn r(v: Option<&str>, a: f64, b: f64) -> RegOp {
        RegOp {
            invoke: a,
            complete: b,
            kind: RegKind::Read(v.map(str::to_string)),
        }
    }
    const B: u64 = 1_000_000;

    #[test]
    fn sequential_and_overlapping_histories_pass() {
        assert_eq!(check(&[], B), Verdict::Linearizable);
        let h = [r(None, 0.0, 1.0), w("a", 2.0, 3.0), r(Some("a"), 4.0, 5.0)];
        assert_eq!(check(&h, B), Verdict::Linearizable);
        // A read overlapping a write may see either value.
        let h = [w("a", 0.0, 1.0), w("b", 2.0, 5.0), r(Some("a"), 3.0, 4.0)];
        assert_eq!(check(&h, B), Verdict::Linearizable);
        let h = [w("a", 0.0, 1.0), w("b", 2.0, 5.0), r(Some("b"), 3.0, 4.0)];
        assert_eq!(check(&h, B), Verdict::Linearizable);
        // Two concurrent writes, reads that order them one way.
        let h = [
            w("a", 0.0, 3.0),
            w("b", 0.5, 3.5),
            r(Some("b"), 4.0, 5.0),
            r(Some("b"), 6.0, 7.0),
        ];
        assert_eq!(check(&h, B), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_is_a_violation() {
        // b was written after a completed; a later read still sees a.
        let h = [w("a", 0.0, 1.0), w("b", 2.0, 3.0), r(Some("a"), 4.0, 5.0)];
        assert!(matches!(check(&h, B), Verdict::Violation(_)));
        // A read that flips back: b then a, with no write of a in between.
        let h = [
            w("a", 0.0, 1.0),
            w("b", 1.5, 10.0),
            r(Some("b"), 2.0, 3.0),
            r(Some("a"), 4.0, 5.0),
        ];
        assert!(matches!(check(&h, B), Verdict::Violation(_)));
    }

    #[test]
    fn a_lost_acknowledged_write_is_a_violation() {
        // The write of a was acknowledged, the final read finds nothing.
        let h = [w("a", 0.0, 1.0), r(None, 2.0, 3.0)];
        assert!(matches!(check(&h, B), Verdict::Violation(_)));
    }

    #[test]
    fn a_value_nobody_wrote_is_a_violation() {
        let h = [w("a", 0.0, 1.0), r(Some("z"), 2.0, 3.0)];
        assert!(matches!(check(&h, B), Verdict::Violation(_)));
    }

    #[test]
    fn indeterminate_writes_may_apply_late_or_never() {
        // A timed-out write seen long after it was sent: fine (it was applied late).
        let h = [
            w("a", 0.0, 1.0),
            w("b", 2.0, f64::INFINITY),
            r(Some("a"), 3.0, 4.0),
            r(Some("b"), 10.0, 11.0),
        ];
        assert_eq!(check(&h, B), Verdict::Linearizable);
        // ... or never seen: fine too.
        let h = [
            w("a", 0.0, 1.0),
            w("b", 2.0, f64::INFINITY),
            r(Some("a"), 10.0, 11.0),
        ];
        assert_eq!(check(&h, B), Verdict::Linearizable);
        // But it applies at most once: b, then a (acked later), then b again is not possible.
        let h = [
            w("b", 0.0, f64::INFINITY),
            r(Some("b"), 1.0, 2.0),
            w("a", 3.0, 4.0),
            r(Some("b"), 5.0, 6.0),
        ];
        assert!(matches!(check(&h, B), Verdict::Violation(_)));
        // And not before it was sent.
        let h = [r(Some("b"), 0.0, 1.0), w("b", 2.0, f64::INFINITY)];
        assert!(matches!(check(&h, B), Verdict::Violation(_)));
    }

    #[test]
    fn a_long_concurrent_history_is_decided_within_the_budget() {
        // Four clients, 400 ops, writes overlapping in pairs, reads of the latest value.
        let mut h = Vec::new();
        let mut t = 0.0;
        for i in 0..100 {
            h.push(w(&format!("v{i}"), t, t + 1.5));
            h.push(w(&format!("u{i}"), t + 0.1, t + 1.0));
            h.push(r(Some(&format!("v{i}")), t + 2.0, t + 2.5));
            h.push(r(Some(&format!("v{i}")), t + 2.1, t + 2.6));
            t += 3.0;
        }
        assert_eq!(check(&h, B), Verdict::Linearizable);
        // Break it once near the end: the check finds it.
        h.push(r(Some("v3"), t + 1.0, t + 2.0));
        assert!(matches!(check(&h, B), Verdict::Violation(_)));
    }
}
