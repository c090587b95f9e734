//! Borrowed refs end to end (Ray's ownership protocol): refs inside values passed to tasks,
//! returned from them and kept in workers; objects live until the last holder anywhere drops
//! them, then every node's store is back to its baseline; a borrower that dies ends its
//! borrows; a borrower whose owner died gets `OwnerDied`.

use std::time::Duration;

use anyhow::{Context, Result};
use chaos_tests::driver::Driver;
use chaos_tests::{Cluster, ClusterOptions, wait_for};

fn driver_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sdk_driver")
}

/// A head (with its node) and one worker node, one CPU each.
fn cluster() -> Result<Cluster> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    c.wait_alive(2)?;
    Ok(c)
}

/// Objects in each node's store, the head's node first.
fn store_objects(c: &Cluster) -> Option<Vec<f64>> {
    std::iter::once(c.heads[0].ready["node"]["metrics_export_port"].as_u64())
        .chain(
            c.nodes
                .iter()
                .map(|n| n.ready["metrics_export_port"].as_u64()),
        )
        .map(|p| c.metric(p?, "ray_object_store_num_local_objects"))
        .collect()
}

fn wait_stores(c: &Cluster, what: &str, ok: impl Fn(&[f64]) -> bool) -> Result<Vec<f64>> {
    wait_for(what, Duration::from_secs(60), || {
        store_objects(c).filter(|s| ok(s))
    })
    .with_context(|| format!("stores: {:?}", store_objects(c)))
}

fn pid_from(path: &std::path::Path) -> Result<i32> {
    wait_for("the worker's pid", Duration::from_secs(60), || {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    })
}

fn kill9(pid: i32) -> Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    Ok(())
}

#[test]
fn refs_passed_returned_and_nested_live_until_the_last_holder_drops_them() -> Result<()> {
    let c = cluster()?;
    let base = wait_stores(&c, "the stores' baseline", |_| true)?;
    let mut d = Driver::start(driver_bin(), &c, &["borrow"], &[])?;
    // The driver put 100 objects and passed them all to `split` in one Vec, keeping no ref;
    // split passed 50 to a nested task and returned a ref to its result (owned by the
    // worker) and the other 50.
    let r = d.result(Duration::from_secs(180))?;
    assert_eq!(r["sum_ok"], true, "the nested task read the first 50: {r}");
    assert_eq!(r["rest_ok"], true, "the other 50 came back readable: {r}");
    assert_eq!(r["rest"], 50, "{r}");
    // The driver holds one borrowed ref: the nested task's result, which the worker owns.
    assert_eq!(r["borrowed"], 1, "{r}");
    // The first 50 were read on the other node (copies pulled there) and are released once
    // the nested task answered (its result is inline, so its lineage goes): only the 50 the
    // driver holds are left, on its node, and no copy elsewhere.
    let held = wait_stores(&c, "only the 50 held objects left", |s| {
        s[0] - base[0] == 50.0 && s[1] == base[1]
    })?;
    eprintln!("held: {held:?} (baseline {base:?})");
    d.next_step()?;
    let r = d.result(Duration::from_secs(60))?;
    assert_eq!(r["rest_ok"], true, "{r}");
    assert_eq!(r["borrowed"], 0, "{r}");
    d.next_step()?;
    let r = d.result(Duration::from_secs(60))?;
    assert_eq!(r["owned"], 0, "{r}");
    assert_eq!(r["borrowed"], 0, "{r}");
    wait_stores(&c, "every store back to its baseline", |s| {
        s == base.as_slice()
    })?;
    d.finish(Duration::from_secs(60))
}

#[test]
fn a_borrower_that_dies_ends_its_borrows() -> Result<()> {
    let c = cluster()?;
    let base = wait_stores(&c, "the stores' baseline", |_| true)?;
    let pid_file = c.path().join("keeper.pid");
    let mut d = Driver::start(
        driver_bin(),
        &c,
        &["borrower-dies", pid_file.to_str().context("path")?],
        &[],
    )?;
    let r = d.result(Duration::from_secs(120))?;
    assert_eq!(r["kept"], 10, "{r}");
    let pid = pid_from(&pid_file)?;
    // The driver dropped its refs; the worker's borrows keep the 10 objects (and their
    // entries at the owner).
    assert_eq!(r["owned"], 10, "{r}");
    std::thread::sleep(Duration::from_secs(2));
    let s = store_objects(&c).context("stores")?;
    assert_eq!(
        s.iter().sum::<f64>() - base.iter().sum::<f64>(),
        10.0,
        "kept by the borrower: {s:?} (baseline {base:?})"
    );
    kill9(pid)?;
    wait_stores(&c, "the objects freed once the borrower died", |s| {
        s == base.as_slice()
    })?;
    d.next_step()?;
    let r = d.result(Duration::from_secs(60))?;
    assert_eq!(r["owned"], 0, "{r}");
    d.finish(Duration::from_secs(60))
}

#[test]
fn a_borrower_whose_owner_died_gets_owner_died() -> Result<()> {
    let c = cluster()?;
    let pid_file = c.path().join("owner.pid");
    let mut d = Driver::start(
        driver_bin(),
        &c,
        &["owner-dies", pid_file.to_str().context("path")?],
        &[],
    )?;
    let r = d.result(Duration::from_secs(120))?;
    assert_eq!(r["read"], true, "read while the owner lives: {r}");
    kill9(pid_from(&pid_file)?)?;
    d.next_step()?;
    let r = d.result(Duration::from_secs(120))?;
    let after = r["after"].as_str().unwrap_or_default();
    assert!(
        after.starts_with("OwnerDied: ") && after.contains("is gone"),
        "{r}"
    );
    d.finish(Duration::from_secs(60))
}
