//! Jobs over real processes: the REST API with a plain HTTP client, `rayctl job`, leader
//! failover while jobs run and are being submitted, and the death of the node that runs a
//! driver.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chaos_tests::{Cluster, ClusterOptions, wait_for};
use serde_json::{Value, json};

const TOKEN: &str = "jobs-test-token";

/// A plain HTTP client for the Jobs API; never treats a status code as a transport error.
struct Http {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Http {
    fn new(port: &Value, token: Option<&str>) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Self {
            agent,
            base: format!("http://127.0.0.1:{port}"),
            token: token.map(str::to_owned),
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut resp = match (method, body) {
            ("GET", _) => {
                let mut r = self.agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("authorization", a);
                }
                r.call()?
            }
            ("DELETE", _) => {
                let mut r = self.agent.delete(&url);
                if let Some(a) = &auth {
                    r = r.header("authorization", a);
                }
                r.call()?
            }
            (_, b) => {
                let mut r = self
                    .agent
                    .post(&url)
                    .header("content-type", "application/json");
                if let Some(a) = &auth {
                    r = r.header("authorization", a);
                }
                r.send(b.unwrap_or(""))?
            }
        };
        Ok((resp.status().as_u16(), resp.body_mut().read_to_string()?))
    }

    fn json(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
        let b = body.map(|v| v.to_string());
        let (code, text) = self.call(method, path, b.as_deref())?;
        Ok((
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    fn wait_status(&self, id: &str, want: &[&str], timeout: Duration) -> Result<Value> {
        wait_for(&format!("job {id} to reach {want:?}"), timeout, || {
            let (code, j) = self.json("GET", &format!("/api/jobs/{id}"), None).ok()?;
            (code == 200 && want.contains(&j["status"].as_str()?)).then_some(j)
        })
    }
}

#[test]
fn the_rest_api_and_rayctl_run_stop_list_and_delete_jobs() -> Result<()> {
    let c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        token: Some(TOKEN.into()),
        ..Default::default()
    })?;
    let api = Http::new(&c.heads[0].ready["dashboard_port"], Some(TOKEN));
    let (code, v) = api.json("GET", "/api/version", None)?;
    assert_eq!((code, v["version"].as_str()), (200, Some("4")));
    let (code, _) =
        Http::new(&c.heads[0].ready["dashboard_port"], None).json("GET", "/api/jobs/", None)?;
    assert_eq!(code, 401, "the token is required");

    // Submit, follow to the end, read the log.
    let body = json!({"entrypoint": "echo out-$GREETING; echo err >&2", "runtime_env": {"env_vars": {"GREETING": "hello"}},
                      "metadata": {"owner": "test"}, "submission_id": "rest-1"});
    let (code, v) = api.json("POST", "/api/jobs/", Some(body.clone()))?;
    assert_eq!(
        (code, v["submission_id"].as_str()),
        (200, Some("rest-1")),
        "{v}"
    );
    let j = api.wait_status("rest-1", &["SUCCEEDED"], Duration::from_secs(60))?;
    assert_eq!(j["driver_exit_code"], 0);
    assert_eq!(j["metadata"]["owner"], "test");
    let (_, logs) = api.json("GET", "/api/jobs/rest-1/logs", None)?;
    assert_eq!(logs["logs"], "out-hello\nerr\n");
    let (code, tail) = api.call("GET", "/api/jobs/rest-1/logs/tail", None)?;
    assert_eq!((code, tail.as_str()), (200, "out-hello\nerr\n"));

    // Bad input: clear 4xx errors.
    let (code, v) = api.json("POST", "/api/jobs/", Some(body))?;
    assert_eq!(code, 409, "duplicate submission_id: {v}");
    let (code, v) = api.json("POST", "/api/jobs/", Some(json!({"entrypoint": "  "})))?;
    assert!(
        code == 400
            && v["error"]
                .as_str()
                .unwrap_or("")
                .contains("entrypoint is empty"),
        "{code} {v}"
    );
    let (code, v) = api.call("POST", "/api/jobs/", Some("{not json"))?;
    assert!(
        code == 400 && v.contains("invalid job submission JSON"),
        "{code} {v}"
    );
    let (code, v) = api.json(
        "POST",
        "/api/jobs/",
        Some(json!({"entrypoint": "true", "runtime_env": {"pip": ["x"]}})),
    )?;
    assert!(
        code == 400 && v["error"].as_str().unwrap_or("").contains("pip"),
        "{code} {v}"
    );
    let (code, _) = api.json("GET", "/api/jobs/no-such-job", None)?;
    assert_eq!(code, 404);
    let (code, _) = api.json("POST", "/api/jobs/no-such-job/stop", None)?;
    assert_eq!(code, 404);

    // Stop a running job; delete it once it ended; a running one cannot be deleted.
    let (code, _) = api.json(
        "POST",
        "/api/jobs/",
        Some(json!({"entrypoint": "sleep 300", "submission_id": "rest-long"})),
    )?;
    assert_eq!(code, 200);
    api.wait_status("rest-long", &["RUNNING"], Duration::from_secs(60))?;
    let (code, _) = api.json("DELETE", "/api/jobs/rest-long", None)?;
    assert_eq!(code, 400, "a running job cannot be deleted");
    let (code, v) = api.json("POST", "/api/jobs/rest-long/stop", None)?;
    assert_eq!((code, &v["stopped"]), (200, &json!(true)));
    api.wait_status("rest-long", &["STOPPED"], Duration::from_secs(60))?;
    let (code, v) = api.json("DELETE", "/api/jobs/rest-long", None)?;
    assert_eq!((code, &v["deleted"]), (200, &json!(true)));
    let (code, _) = api.json("GET", "/api/jobs/rest-long", None)?;
    assert_eq!(code, 404);
    let (_, list) = api.json("GET", "/api/jobs/", None)?;
    let ids: Vec<&str> = list
        .as_array()
        .context("a list")?
        .iter()
        .filter_map(|j| j["submission_id"].as_str())
        .collect();
    assert_eq!(ids, vec!["rest-1"]);
    let (code, doc) = api.json("GET", "/api/openapi.json", None)?;
    assert!(code == 200 && doc["paths"]["/api/jobs/"].is_object());

    // rayctl: exit codes follow the job's outcome.
    let (code, out, err) = c.rayctl(&[
        "job",
        "submit",
        "--submission-id",
        "cli-ok",
        "--",
        "echo",
        "cli-hello",
    ])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cli-hello"), "the log is followed: {out}");
    let (code, _, _) = c.rayctl(&["job", "submit", "--", "exit", "3"])?;
    assert_eq!(code, 1, "a failed job exits 1");
    let (code, _, err) = c.rayctl(&[
        "job",
        "submit",
        "--no-wait",
        "--submission-id",
        "cli-long",
        "--",
        "sleep",
        "300",
    ])?;
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = c.rayctl(&["job", "stop", "cli-long", "-o", "json"])?;
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&out)?["status"], "STOPPED");
    let (code, _, _) = c.rayctl(&["job", "wait", "cli-long"])?;
    assert_eq!(code, 5, "a stopped job exits 5");
    let (code, out, _) = c.rayctl(&["job", "logs", "cli-ok"])?;
    assert_eq!((code, out.as_str()), (0, "cli-hello\n"));
    let (code, out, _) = c.rayctl(&["job", "status", "cli-ok", "-o", "json"])?;
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&out)?["status"], "SUCCEEDED");
    let (code, _, _) = c.rayctl(&["job", "delete", "cli-ok"])?;
    assert_eq!(code, 0);
    let (code, _, _) = c.rayctl(&["job", "status", "cli-ok"])?;
    assert_eq!(code, 4, "not found exits 4");
    let (code, out, _) = c.rayctl(&["job", "list", "-o", "json"])?;
    assert_eq!(code, 0);
    assert!(
        serde_json::from_str::<Value>(&out)?
            .as_array()
            .is_some_and(|a| a.len() == 3)
    );

    // working_dir: packaged (without .gitignored files), uploaded once, unpacked on the node.
    let wd = c.path().join("wd");
    std::fs::create_dir_all(wd.join("sub"))?;
    std::fs::write(wd.join("run.sh"), "cat sub/data; ls")?;
    std::fs::write(wd.join("sub/data"), "packaged-data\n")?;
    std::fs::write(wd.join(".gitignore"), "*.tmp\n")?;
    std::fs::write(wd.join("junk.tmp"), "ignored")?;
    let wd_s = wd.display().to_string();
    let (code, out, err) = c.rayctl(&[
        "job",
        "submit",
        "--working-dir",
        &wd_s,
        "--",
        "sh",
        "run.sh",
    ])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("packaged-data") && out.contains("run.sh") && !out.contains("junk.tmp"),
        "{out}"
    );
    let (code, _, err) = c.rayctl(&["job", "submit", "--working-dir", &wd_s, "--", "true"])?;
    assert_eq!(code, 0);
    assert!(
        err.contains("already in the cluster"),
        "uploaded once: {err}"
    );

    // Ray's package endpoints: bad archives are refused with 400 and nothing is stored.
    let put = |name: &str, body: Vec<u8>| -> Result<(u16, String)> {
        let url = format!("{}/api/packages/gcs/{name}", api.base);
        let mut r = api
            .agent
            .put(&url)
            .header("authorization", format!("Bearer {TOKEN}"))
            .send(&body[..])?;
        Ok((r.status().as_u16(), r.body_mut().read_to_string()?))
    };
    let name = "_ray_pkg_00112233445566778899aabbccddeeff.zip";
    for (i, (bytes, want)) in [
        (
            chaos_tests::probe::zip_archive(&[("../escape", &b"x"[..])], &[]),
            "outside",
        ),
        (
            chaos_tests::probe::zip_archive(&[("/abs", &b"x"[..])], &[]),
            "outside",
        ),
        (
            chaos_tests::probe::zip_archive(&[], &[("l", "../../etc")]),
            "points outside",
        ),
        (chaos_tests::probe::zip_bomb(), "zip bomb"),
        (b"not a zip".to_vec(), "not a zip"),
    ]
    .into_iter()
    .enumerate()
    {
        let (code, text) = put(name, bytes)?;
        assert!(
            code == 400 && text.contains(want),
            "case {i}: {code} {text}"
        );
    }
    let (code, _) = api.json("GET", &format!("/api/packages/gcs/{name}"), None)?;
    assert_eq!(code, 404, "nothing stored");
    let (code, _) = put(
        "../../x.zip",
        chaos_tests::probe::zip_archive(&[("a", &b"x"[..])], &[]),
    )?;
    assert!(code == 400 || code == 404, "{code}");
    let (code, text) = put(
        name,
        chaos_tests::probe::zip_archive(&[("hello.txt", &b"from a ray client\n"[..])], &[]),
    )?;
    assert_eq!(code, 200, "{text}");
    let (code, _) = api.json("GET", &format!("/api/packages/gcs/{name}"), None)?;
    assert_eq!(code, 200);
    let body = json!({"entrypoint": "cat hello.txt", "runtime_env": {"working_dir": format!("gcs://{name}")}, "submission_id": "pkg-job"});
    assert_eq!(api.json("POST", "/api/jobs/", Some(body))?.0, 200);
    api.wait_status("pkg-job", &["SUCCEEDED"], Duration::from_secs(60))?;
    assert_eq!(
        api.json("GET", "/api/jobs/pkg-job/logs", None)?.1["logs"],
        "from a ray client\n"
    );
    Ok(())
}

#[test]
fn killing_the_leader_disturbs_no_job_and_loses_no_transition() -> Result<()> {
    let mut c = Cluster::start(ClusterOptions {
        heads: 3,
        nodes: 2,
        ..Default::default()
    })?;
    let leader = c.wait_leader(Duration::from_secs(30))?;
    let apis: Vec<Http> = c
        .heads
        .iter()
        .map(|h| Http::new(&h.ready["dashboard_port"], c.token.as_deref()))
        .collect();
    // Jobs run on the worker nodes (their custom resources), not on the heads' nodes, since
    // killing a head also kills its node.
    let submit = |api: &Http, i: usize| -> Result<()> {
        let body = json!({
            "entrypoint": format!("echo start-{i}; sleep 3; echo done-{i}"),
            "submission_id": format!("job-{i}"),
            "client_token": format!("token-{i}"),
            "entrypoint_resources": {format!("node{}", i % 2): 0.04},
        });
        let (code, v) = api.json("POST", "/api/jobs/", Some(body))?;
        if code != 200 {
            bail!("submit job-{i}: {code} {v}");
        }
        Ok(())
    };
    for i in 0..20 {
        submit(&apis[leader], i)?;
    }
    wait_for("20 jobs running", Duration::from_secs(60), || {
        let (_, list) = apis[leader].json("GET", "/api/jobs/", None).ok()?;
        (list
            .as_array()?
            .iter()
            .filter(|j| j["status"] == "RUNNING")
            .count()
            == 20)
            .then_some(())
    })?;
    // 20 more are submitted through the other heads while the leader dies; a submit that
    // fails is retried with the same id and token, as a client does after a timeout.
    let others: Vec<usize> = (0..3).filter(|h| *h != leader).collect();
    let submitter = {
        let ports: Vec<Value> = others
            .iter()
            .map(|h| c.heads[*h].ready["dashboard_port"].clone())
            .collect();
        let token = c.token.clone();
        std::thread::spawn(move || -> Result<()> {
            let apis: Vec<Http> = ports
                .iter()
                .map(|p| Http::new(p, token.as_deref()))
                .collect();
            for i in 20..40 {
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                loop {
                    match submit(&apis[i % apis.len()], i) {
                        Ok(()) => break,
                        Err(e) if std::time::Instant::now() < deadline => {
                            eprintln!("retrying: {e}");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    c.heads[leader].kill9();
    submitter.join().expect("the submitter thread")?;
    let api = &apis[others[0]];
    let jobs: BTreeMap<String, Value> =
        wait_for("all 40 jobs to end", Duration::from_secs(120), || {
            let (code, list) = api.json("GET", "/api/jobs/", None).ok()?;
            let list = list.as_array().filter(|_| code == 200)?.clone();
            let ended = list
                .iter()
                .filter(|j| {
                    ["SUCCEEDED", "FAILED", "STOPPED"].contains(&j["status"].as_str().unwrap_or(""))
                })
                .count();
            (list.len() == 40 && ended == 40).then(|| {
                list.into_iter()
                    .map(|j| (j["submission_id"].as_str().unwrap_or("").to_owned(), j))
                    .collect()
            })
        })?;
    for i in 0..40 {
        let j = &jobs[&format!("job-{i}")];
        assert_eq!(j["status"], "SUCCEEDED", "job-{i}: {j}");
        assert_eq!(j["driver_exit_code"], 0);
        assert_eq!(j["attempt"], 0, "job-{i} ran once");
        let (_, logs) = api.json("GET", &format!("/api/jobs/job-{i}/logs"), None)?;
        assert_eq!(
            logs["logs"],
            format!("start-{i}\ndone-{i}\n"),
            "job-{i}'s log is complete and from one run"
        );
    }
    Ok(())
}

#[test]
fn the_death_of_the_driver_node_fails_the_job_or_retries_it() -> Result<()> {
    let mut c = Cluster::start(ClusterOptions {
        heads: 1,
        nodes: 1,
        ..Default::default()
    })?;
    let api = Http::new(&c.heads[0].ready["dashboard_port"], c.token.as_deref());
    for (id, retries) in [("doomed", 0), ("retried", 1)] {
        let body = json!({"entrypoint": "sleep 4; echo finished", "submission_id": id, "max_retries": retries,
                          "entrypoint_resources": {"node0": 0.1}});
        let (code, v) = api.json("POST", "/api/jobs/", Some(body))?;
        assert_eq!(code, 200, "{v}");
        api.wait_status(id, &["RUNNING"], Duration::from_secs(60))?;
    }
    c.nodes[0].kill9();
    let j = api.wait_status(
        "doomed",
        &["FAILED", "SUCCEEDED", "STOPPED"],
        Duration::from_secs(60),
    )?;
    assert_eq!(j["status"], "FAILED");
    assert!(
        j["message"].as_str().unwrap_or("").contains("died"),
        "the message says why: {j}"
    );
    // The retried job waits for a node with its resource; the node comes back (a new
    // incarnation) and the second attempt runs to the end.
    wait_for("the retry to be queued", Duration::from_secs(30), || {
        let (_, j) = api.json("GET", "/api/jobs/retried", None).ok()?;
        (j["status"] == "PENDING" && j["attempt"] == 1).then_some(())
    })?;
    c.restart_node(0)?;
    let j = api.wait_status("retried", &["SUCCEEDED", "FAILED"], Duration::from_secs(60))?;
    assert_eq!(
        (j["status"].as_str(), j["attempt"].as_u64()),
        (Some("SUCCEEDED"), Some(1)),
        "{j}"
    );
    let (_, logs) = api.json("GET", "/api/jobs/retried/logs", None)?;
    assert!(
        logs["logs"].as_str().unwrap_or("").ends_with("finished\n"),
        "{logs}"
    );
    Ok(())
}

#[test]
fn the_log_tail_is_a_websocket_for_rays_client_and_refuses_strangers() -> Result<()> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::{Error as WsError, Message};

    let c = Cluster::start(ClusterOptions {
        heads: 1,
        token: Some(TOKEN.into()),
        ..Default::default()
    })?;
    let port = c.heads[0].ready["dashboard_port"].clone();
    let api = Http::new(&port, Some(TOKEN));
    let (code, v) = api.json(
        "POST",
        "/api/jobs/",
        Some(json!({"entrypoint": "echo one; sleep 1; echo twö; echo three"})),
    )?;
    assert_eq!(code, 200, "{v}");
    let id = v["submission_id"].as_str().context("id")?.to_owned();
    let url = format!("ws://127.0.0.1:{port}/api/jobs/{id}/logs/tail");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // As Ray's client does: the token in a header, TEXT frames to the end, a normal close.
        let mut req = url.as_str().into_client_request()?;
        req.headers_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse()?);
        let (mut ws, resp) = tokio_tungstenite::connect_async(req).await?;
        assert_eq!(resp.status().as_u16(), 101);
        let (mut text, mut close) = (String::new(), None);
        while let Some(m) = tokio::time::timeout(Duration::from_secs(60), ws.next()).await? {
            match m? {
                Message::Text(t) => text.push_str(t.as_str()),
                Message::Close(f) => {
                    close = f;
                    break;
                }
                _ => {}
            }
        }
        assert_eq!(text, "one\ntwö\nthree\n");
        assert_eq!(close.map(|f| f.code), Some(CloseCode::Normal));

        let status = |e: WsError| match e {
            WsError::Http(r) => r.status().as_u16(),
            other => panic!("expected an HTTP refusal, got {other}"),
        };
        // No token: refused before any upgrade.
        let e = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect_err("no token");
        assert_eq!(status(e), 401);
        // A page on another site cannot open it with the user's credentials.
        let mut req = url.as_str().into_client_request()?;
        req.headers_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse()?);
        req.headers_mut()
            .insert("origin", "http://evil.example".parse()?);
        let e = tokio_tungstenite::connect_async(req)
            .await
            .expect_err("foreign origin");
        assert_eq!(status(e), 403);
        // A job that does not exist: 404, not an empty stream.
        let mut req =
            format!("ws://127.0.0.1:{port}/api/jobs/nosuchjob/logs/tail").into_client_request()?;
        req.headers_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse()?);
        let e = tokio_tungstenite::connect_async(req)
            .await
            .expect_err("unknown job");
        assert_eq!(status(e), 404);
        anyhow::Ok(())
    })?;
    // Without an upgrade the same path still streams plain text.
    let mut r = api
        .agent
        .get(&format!("{}/api/jobs/{id}/logs/tail", api.base))
        .header("authorization", format!("Bearer {TOKEN}"))
        .call()?;
    assert_eq!(r.body_mut().read_to_string()?, "one\ntwö\nthree\n");
    Ok(())
}
