//! Ray 2.60's own tools against our heads, unchanged: the `ray job` CLI and Python
//! `JobSubmissionClient` (submit, follow over a WebSocket, working dirs, runtime envs, stop,
//! list, delete) and the state CLI (`ray list`, `ray get`, `ray summary`), with token auth
//! (`RAY_AUTH_MODE=token`), on three heads, some commands through a follower. The CLI comes
//! from the venv `scripts/test` installs (`chaos_tests::ray_venv`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chaos_tests::driver::Driver;
use chaos_tests::{Cluster, ClusterOptions, wait_for};
use serde_json::Value;

/// Runs Ray's tools against one cluster, in a home of their own.
struct Ray {
    venv: PathBuf,
    home: tempfile::TempDir,
    token: String,
}

struct Out {
    code: i32,
    /// stdout then stderr.
    text: String,
    stdout: String,
}

impl Ray {
    fn new(c: &Cluster) -> Result<Self> {
        Ok(Self {
            venv: chaos_tests::ray_venv()?,
            home: tempfile::tempdir()?,
            token: c.token.clone().context("the cluster has a token")?,
        })
    }

    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(self.home.path())
            .env("HOME", self.home.path())
            .env("RAY_AUTH_MODE", "token")
            .env("RAY_AUTH_TOKEN", &self.token)
            .env("RAY_USAGE_STATS_ENABLED", "0")
            .env_remove("RAY_ADDRESS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// `ray ARGS…`, killed after `limit`.
    fn ray(&self, args: &[&str], limit: Duration) -> Result<Out> {
        let mut cmd = self.command(&self.venv.join("bin/ray"));
        cmd.args(args);
        run(cmd, limit).with_context(|| format!("ray {}", args.join(" ")))
    }

    fn python(&self, script: &str, args: &[&str], limit: Duration) -> Result<Out> {
        let mut cmd = self.command(&self.venv.join("bin/python"));
        cmd.arg("-c").arg(script).args(args);
        run(cmd, limit)
    }
}

fn run(mut cmd: Command, limit: Duration) -> Result<Out> {
    let mut child = cmd.spawn()?;
    let (mut out, mut err) = (
        child.stdout.take().context("stdout")?,
        child.stderr.take().context("stderr")?,
    );
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "did not finish within {limit:?}; output:\n{}{}",
                o.join().unwrap_or_default(),
                e.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = o.join().unwrap_or_default();
    let stderr = e.join().unwrap_or_default();
    Ok(Out {
        code: status.code().unwrap_or(-1),
        text: format!("{stdout}{stderr}"),
        stdout,
    })
}

const LIMIT: Duration = Duration::from_secs(120);

fn three_heads() -> Result<Cluster> {
    let c = Cluster::start(ClusterOptions {
        heads: 3,
        ..Default::default()
    })?;
    c.wait_leader(Duration::from_secs(60))?;
    Ok(c)
}

/// `http://127.0.0.1:PORT` of head `i`'s dashboard port.
fn url(c: &Cluster, i: usize) -> String {
    format!("http://127.0.0.1:{}", c.heads[i].ready["dashboard_port"])
}

/// A follower's URL (requests there reach the leader through it).
fn follower_url(c: &Cluster) -> Result<String> {
    let leader = c.wait_leader(Duration::from_secs(60))?;
    let i = (0..c.heads.len())
        .find(|i| *i != leader)
        .context("a follower")?;
    Ok(url(c, i))
}

#[test]
fn rays_job_cli_and_client_submit_follow_and_manage_jobs() -> Result<()> {
    let c = three_heads()?;
    let ray = Ray::new(&c)?;
    let (a, f) = (url(&c, 0), follower_url(&c)?);

    // Submit and follow the log over a WebSocket to the end, through a follower.
    let o = ray.ray(
        &[
            "job",
            "submit",
            "--address",
            &f,
            "--submission-id",
            "follow-1",
            "--",
            "sh",
            "-c",
            "echo hello from ray; echo ünïcode ✓",
        ],
        LIMIT,
    )?;
    assert_eq!(o.code, 0, "{}", o.text);
    assert!(
        o.text.contains("hello from ray") && o.text.contains("ünïcode ✓"),
        "{}",
        o.text
    );
    assert!(o.text.contains("succeeded"), "{}", o.text);
    assert!(!o.text.contains("WSServerHandshakeError"), "{}", o.text);

    // A failing entrypoint fails the CLI.
    let o = ray.ray(
        &[
            "job",
            "submit",
            "--address",
            &a,
            "--",
            "sh",
            "-c",
            "echo about to fail; exit 3",
        ],
        LIMIT,
    )?;
    assert_ne!(o.code, 0, "{}", o.text);
    assert!(
        o.text.contains("about to fail") && o.text.contains("failed"),
        "{}",
        o.text
    );

    // A working dir is packaged by Ray's client, uploaded and unpacked on the node.
    let wd = ray.home.path().join("wd");
    std::fs::create_dir_all(&wd)?;
    std::fs::write(wd.join("data.txt"), "payload-42\n")?;
    let o = ray.ray(
        &[
            "job",
            "submit",
            "--address",
            &a,
            "--working-dir",
            wd.to_str().context("path")?,
            "--",
            "cat",
            "data.txt",
        ],
        LIMIT,
    )?;
    assert_eq!(o.code, 0, "{}", o.text);
    assert!(o.text.contains("payload-42"), "{}", o.text);

    // A runtime env's variables and an entrypoint's CPUs.
    let o = ray.ray(
        &[
            "job",
            "submit",
            "--address",
            &a,
            "--runtime-env-json",
            r#"{"env_vars": {"GREETING": "hola"}}"#,
            "--entrypoint-num-cpus",
            "1",
            "--",
            "sh",
            "-c",
            "echo greeting=$GREETING",
        ],
        LIMIT,
    )?;
    assert_eq!(o.code, 0, "{}", o.text);
    assert!(o.text.contains("greeting=hola"), "{}", o.text);

    // --no-wait, then `ray job logs -f` follows it to the end.
    let o = ray.ray(
        &[
            "job",
            "submit",
            "--address",
            &a,
            "--no-wait",
            "--submission-id",
            "tail-1",
            "--",
            "sh",
            "-c",
            "echo first; sleep 2; echo second",
        ],
        LIMIT,
    )?;
    assert_eq!(o.code, 0, "{}", o.text);
    let o = ray.ray(&["job", "logs", "-f", "--address", &f, "tail-1"], LIMIT)?;
    assert_eq!(o.code, 0, "{}", o.text);
    assert!(
        o.stdout.contains("first") && o.stdout.contains("second"),
        "{}",
        o.text
    );

    // Stop, status, list, delete.
    let o = ray.ray(
        &[
            "job",
            "submit",
            "--address",
            &a,
            "--no-wait",
            "--submission-id",
            "long-1",
            "--",
            "sleep",
            "120",
        ],
        LIMIT,
    )?;
    assert_eq!(o.code, 0, "{}", o.text);
    wait_for("long-1 running", Duration::from_secs(60), || {
        let o = ray
            .ray(&["job", "status", "--address", &a, "long-1"], LIMIT)
            .ok()?;
        o.text.contains("RUNNING").then_some(())
    })?;
    let stop = ray.ray(&["job", "stop", "--address", &f, "long-1"], LIMIT)?;
    assert_eq!(stop.code, 0, "{}", stop.text);
    let mut last = String::new();
    wait_for("long-1 stopped", Duration::from_secs(60), || {
        let o = ray
            .ray(&["job", "status", "--address", &a, "long-1"], LIMIT)
            .ok()?;
        last = o.text.clone();
        o.text.contains("was stopped").then_some(())
    })
    .with_context(|| format!("last status: {last}; stop said: {}", stop.text))?;
    let o = ray.ray(&["job", "list", "--address", &f], LIMIT)?;
    assert_eq!(o.code, 0, "{}", o.text);
    for id in ["follow-1", "tail-1", "long-1"] {
        assert!(o.text.contains(id), "{id} listed: {}", o.text);
    }
    let o = ray.ray(&["job", "delete", "--address", &a, "tail-1"], LIMIT)?;
    assert_eq!(o.code, 0, "{}", o.text);
    let o = ray.ray(&["job", "status", "--address", &a, "tail-1"], LIMIT)?;
    assert_ne!(o.code, 0, "a deleted job is gone: {}", o.text);

    // Python's JobSubmissionClient, tail_job_logs included.
    let script = r#"
import asyncio, sys
from ray.job_submission import JobSubmissionClient
c = JobSubmissionClient(sys.argv[1])
sid = c.submit_job(entrypoint="sh -c 'echo py-one; sleep 1; echo py-two'")
async def tail():
    return "".join([chunk async for chunk in c.tail_job_logs(sid)])
print("TAIL", repr(asyncio.run(tail())))
print("STATUS", c.get_job_status(sid))
print("LOGS", repr(c.get_job_logs(sid)))
print("LISTED", sid in [j.submission_id for j in c.list_jobs()])
"#;
    let o = ray.python(script, &[&f], LIMIT)?;
    assert_eq!(o.code, 0, "{}", o.text);
    assert!(o.stdout.contains("TAIL 'py-one\\npy-two\\n'"), "{}", o.text);
    assert!(o.stdout.contains("STATUS SUCCEEDED"), "{}", o.text);
    assert!(o.stdout.contains("LISTED True"), "{}", o.text);
    Ok(())
}

fn list_json(ray: &Ray, what: &[&str], url: &str) -> Result<Vec<Value>> {
    let mut args = vec!["list"];
    args.extend(what);
    args.extend(["--format", "json", "--address", url]);
    let o = ray.ray(&args, LIMIT)?;
    if o.code != 0 {
        bail!("ray {} exited {}: {}", args.join(" "), o.code, o.text);
    }
    serde_json::from_str(&o.stdout).with_context(|| format!("ray {}: {}", args.join(" "), o.text))
}

#[test]
fn rays_state_cli_lists_gets_and_summarizes_while_a_driver_runs() -> Result<()> {
    let c = three_heads()?;
    let ray = Ray::new(&c)?;
    let (a, f) = (url(&c, 0), follower_url(&c)?);
    let o = ray.ray(
        &[
            "job",
            "submit",
            "--address",
            &a,
            "--submission-id",
            "state-1",
            "--",
            "true",
        ],
        LIMIT,
    )?;
    assert_eq!(o.code, 0, "{}", o.text);
    // An actor (and a pending one), calls, one failed, tasks, an object, placement groups.
    let mut d = Driver::start(env!("CARGO_BIN_EXE_actor_driver"), &c, &["introspect"], &[])?;
    let r = d.result(Duration::from_secs(120))?;
    let actor = r["actor"].as_str().context("actor")?.to_owned();
    let object = r["object"].as_str().context("object")?.to_owned();
    let pg = r["pg"].as_str().context("pg")?.to_owned();

    let nodes = list_json(&ray, &["nodes", "--detail"], &f)?;
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    assert!(
        nodes
            .iter()
            .all(|n| n["state"] == "ALIVE" && n["is_head_node"] == true)
    );

    let actors = list_json(&ray, &["actors"], &f)?;
    assert!(
        actors
            .iter()
            .any(|x| x["actor_id"] == actor.as_str() && x["state"] == "ALIVE"),
        "{actors:?}"
    );
    assert!(
        actors.iter().any(|x| x["state"] == "PENDING_CREATION"),
        "{actors:?}"
    );
    let alive = list_json(&ray, &["actors", "--filter", "state=ALIVE"], &a)?;
    assert!(
        !alive.is_empty() && alive.iter().all(|x| x["state"] == "ALIVE"),
        "{alive:?}"
    );
    let o = ray.ray(&["get", "actors", &actor, "--address", &a], LIMIT)?;
    assert_eq!(o.code, 0, "{}", o.text);
    assert!(
        o.text.contains(&actor) && o.text.contains("intro"),
        "{}",
        o.text
    );

    let tasks = list_json(&ray, &["tasks", "--detail", "--limit", "1000"], &a)?;
    let done = tasks
        .iter()
        .filter(|t| {
            t["func_or_class_name"]
                .as_str()
                .is_some_and(|n| n.ends_with("where_am_i"))
                && t["state"] == "FINISHED"
        })
        .count();
    assert_eq!(done, 5, "{tasks:?}");
    assert!(
        tasks.iter().any(|t| t["state"] == "FAILED"
            && t["type"] == "ACTOR_TASK"
            && t["error_type"] == "TASK_EXECUTION_EXCEPTION"),
        "{tasks:?}"
    );

    let pgs = list_json(&ray, &["placement-groups", "--detail"], &a)?;
    assert!(
        pgs.iter()
            .any(|p| p["placement_group_id"] == pg.as_str() && p["state"] == "CREATED"),
        "{pgs:?}"
    );
    assert!(
        pgs.iter()
            .any(|p| p["name"] == "intro-stuck" && p["state"] == "PENDING"),
        "{pgs:?}"
    );
    let objects = list_json(&ray, &["objects"], &a)?;
    assert!(
        objects
            .iter()
            .any(|o| o["object_id"] == object.as_str() && o["type"] == "DRIVER"),
        "{objects:?}"
    );
    let workers = list_json(&ray, &["workers", "--detail"], &a)?;
    assert!(
        workers.iter().any(|w| w["worker_type"] == "WORKER"),
        "{workers:?}"
    );
    let jobs = list_json(&ray, &["jobs"], &f)?;
    assert!(
        jobs.iter()
            .any(|j| j["submission_id"] == "state-1" && j["status"] == "SUCCEEDED"),
        "{jobs:?}"
    );

    let o = ray.ray(&["summary", "tasks", "--address", &f], LIMIT)?;
    assert_eq!(o.code, 0, "{}", o.text);
    assert!(
        o.text.contains("where_am_i") && o.text.contains("FINISHED: 5"),
        "{}",
        o.text
    );
    let o = ray.ray(&["summary", "actors", "--address", &a], LIMIT)?;
    assert_eq!(o.code, 0, "{}", o.text);
    assert!(
        o.text.contains("Counter") && o.text.contains("ALIVE: 1"),
        "{}",
        o.text
    );
    let o = ray.ray(&["summary", "objects", "--address", &a], LIMIT)?;
    assert_eq!(o.code, 0, "{}", o.text);
    assert!(o.text.contains("total_objects: 1"), "{}", o.text);
    // A bad filter is Ray's error, not a crash.
    let o = ray.ray(
        &["list", "nodes", "--filter", "labels=x", "--address", &a],
        LIMIT,
    )?;
    assert_ne!(o.code, 0);
    assert!(o.text.contains("labels is not supported"), "{}", o.text);
    d.send_line("done")?;
    d.finish(Duration::from_secs(30))?;
    Ok(())
}

/// Stops what `rayctl start` started in `dir` when dropped.
struct StopOnDrop(PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Ok(mut c) = chaos_tests::rayctl_in(&self.0) {
            let _ = c.arg("stop").output();
        }
    }
}

/// `ray logs` finds the dashboard through the GCS: it connects to the bootstrap address
/// (our head's gRPC port), asks the GCS's internal KV for the dashboard's address, then reads
/// logs over the State API. Ray replaces 127.0.0.1 with the machine's outward address, so
/// the head here serves 127.0.0.2 (loopback all the same).
#[test]
fn rays_logs_cli_finds_the_dashboard_through_our_gcs_answers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let _stop = StopOnDrop(dir.path().to_path_buf());
    let port = chaos_tests::free_port();
    let out = chaos_tests::rayctl_in(dir.path())?
        .args([
            "start",
            "--head",
            "--port",
            &port.to_string(),
            "--dashboard-port",
            "0",
            "--node-ip-address",
            "127.0.0.2",
            "--bind-host",
            "127.0.0.2",
            "--num-cpus",
            "1",
            "--data-dir",
            dir.path().join("head").to_str().context("path")?,
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "rayctl start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let address = format!("127.0.0.2:{port}");
    let out = chaos_tests::rayctl_in(dir.path())?
        .args([
            "job",
            "submit",
            "--address",
            &address,
            "--submission-id",
            "logs-by-ray",
            "--",
            "echo hello from a job that ray logs reads",
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "rayctl job submit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = std::fs::read_to_string(dir.path().join("auth_token"))?;
    let ray = Ray {
        venv: chaos_tests::ray_venv()?,
        home: tempfile::tempdir()?,
        token: token.trim().to_owned(),
    };
    // The head node's files (Ray takes the node from the bootstrap address).
    let o = ray.ray(&["logs", "cluster", "--address", &address], LIMIT)?;
    assert_eq!(o.code, 0, "{}", o.text);
    assert!(o.stdout.contains("job-driver-logs-by-ray"), "{}", o.text);
    // A job's log by its submission id.
    let o = ray.ray(
        &["logs", "job", "--id", "logs-by-ray", "--address", &address],
        LIMIT,
    )?;
    assert_eq!(o.code, 0, "{}", o.text);
    assert!(
        o.stdout.contains("hello from a job that ray logs reads"),
        "{}",
        o.text
    );
    Ok(())
}
