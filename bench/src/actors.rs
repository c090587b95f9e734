//! Actors through the SDK, in the tasks suite's cluster (a head and a worker node; this
//! process is the driver and the nodes run it again as the actors' workers).
//!
//! Figures (issue 6), against Ray 2.60 measured on this 2-core machine (817 sync and 1,830
//! async calls/s, 1.2 actors/s): `actor_calls_sync_per_s` (call, then get, 5,000 times),
//! `actor_calls_async_per_s` (5,000 calls, then get all), `actor_create_per_s` (200 actors
//! until every one is alive, each in a process of its own), `pg_create_remove_per_s` (a
//! one-bundle placement group created, waited for and removed, 200 times in a row).

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::emit;

pub(crate) struct Echo {
    calls: u64,
}

#[sdk::actor]
impl Echo {
    fn new() -> Self {
        Echo { calls: 0 }
    }

    fn ping(&mut self, x: u64) -> u64 {
        self.calls += 1;
        x
    }
}

pub(crate) fn run(smoke: bool) -> Result<()> {
    let a = Echo::remote()?;
    a.handle().ready(Duration::from_secs(120))?;
    // Warm up the stream.
    sdk::get(&a.ping(0u64))?;

    let n = if smoke { 500 } else { 5_000 };
    let t = Instant::now();
    for i in 0..n {
        anyhow::ensure!(sdk::get(&a.ping(i))? == i, "wrong echo");
    }
    let sync = n as f64 / t.elapsed().as_secs_f64();
    emit("actor_calls_sync_per_s", sync, "calls/s");
    emit("actor_calls_sync_vs_ray_2_60", sync / 817.0, "x");

    let mut best = 0f64;
    for _ in 0..if smoke { 1 } else { 3 } {
        let t = Instant::now();
        let refs: Vec<_> = (0..n).map(|i| a.ping(i)).collect();
        let got = sdk::get_all(&refs)?;
        best = best.max(n as f64 / t.elapsed().as_secs_f64());
        anyhow::ensure!(
            got.iter().enumerate().all(|(i, v)| *v == i as u64),
            "calls came back out of order"
        );
    }
    emit("actor_calls_async_per_s", best, "calls/s");
    emit("actor_calls_async_vs_ray_2_60", best / 1830.0, "x");
    a.handle().kill(true)?;

    let m = if smoke { 20 } else { 200 };
    let t = Instant::now();
    let actors: Vec<EchoHandle> = (0..m).map(|_| Echo::remote()).collect::<Result<_, _>>()?;
    for h in &actors {
        h.handle().ready(Duration::from_secs(600))?;
    }
    let rate = m as f64 / t.elapsed().as_secs_f64();
    emit("actor_create_per_s", rate, "actors/s");
    emit("actor_create_vs_ray_2_60", rate / 1.2, "x");
    for h in &actors {
        h.handle().kill(true)?;
    }

    // Placement groups: create (two-phase reservation on the node) until CREATED, then
    // remove, one after another.
    let k = if smoke { 20 } else { 200 };
    let bundle: std::collections::BTreeMap<String, f64> =
        [("CPU".to_string(), 0.01)].into_iter().collect();
    let opts = sdk::PlacementGroupOptions::new(sdk::PlacementStrategy::Pack);
    let t = Instant::now();
    for _ in 0..k {
        let pg = sdk::placement_group(vec![bundle.clone()], &opts)?;
        pg.ready(Duration::from_secs(60))?;
        pg.remove()?;
    }
    emit(
        "pg_create_remove_per_s",
        k as f64 / t.elapsed().as_secs_f64(),
        "groups/s",
    );
    Ok(())
}
