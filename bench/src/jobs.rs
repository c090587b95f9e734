//! Job figures on a one-head cluster of real processes, through the Jobs REST API as a Ray
//! job client uses it: submit → SUCCEEDED latency of `echo hi`, and how many submissions per
//! second one client gets accepted.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chaos_tests::{Cluster, ClusterOptions};
use serde_json::{Value, json};

use crate::{emit, percentile};

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn bearer(c: &Cluster) -> String {
    format!("Bearer {}", c.token.as_deref().unwrap_or_default())
}

fn submit(a: &ureq::Agent, auth: &str, base: &str, entrypoint: &str) -> Result<String> {
    let mut r = a
        .post(format!("{base}/api/jobs/"))
        .header("authorization", auth)
        .send_json(json!({ "entrypoint": entrypoint }))?;
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string()?)?;
    if r.status() != 200 {
        bail!("submit: {} {v}", r.status());
    }
    v["submission_id"]
        .as_str()
        .map(str::to_owned)
        .context("no submission_id")
}

fn status(a: &ureq::Agent, auth: &str, base: &str, id: &str) -> Result<String> {
    let mut r = a
        .get(format!("{base}/api/jobs/{id}"))
        .header("authorization", auth)
        .call()?;
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string()?)?;
    Ok(v["status"].as_str().unwrap_or("").to_owned())
}

pub(crate) fn run(smoke: bool) -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 0,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(30))?;
    let base = format!("http://127.0.0.1:{}", c.heads[0].ready["dashboard_port"]);
    let a = agent();
    let auth = bearer(&c);

    let n = if smoke { 5 } else { 50 };
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let id = submit(&a, &auth, &base, "echo hi")?;
        loop {
            match status(&a, &auth, &base, &id)?.as_str() {
                "SUCCEEDED" => break,
                "FAILED" | "STOPPED" => bail!("job {id} did not succeed"),
                _ if start.elapsed() > Duration::from_secs(60) => bail!("job {id} took over 60 s"),
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    emit("job_submit_to_succeeded_ms", percentile(&ms, 0.5), "ms");
    emit("job_submit_to_succeeded_ms_p90", percentile(&ms, 0.9), "ms");

    let m = if smoke { 50 } else { 1000 };
    let start = Instant::now();
    for _ in 0..m {
        submit(&a, &auth, &base, "true")?;
    }
    emit(
        "jobs_accepted_per_s",
        m as f64 / start.elapsed().as_secs_f64(),
        "1/s",
    );
    Ok(())
}
