//! Hostile clients: bad gRPC, HTTP, archives and CLI arguments, and the credential
//! matrix, on every port.

use super::*;

/// Every daemon's listeners, and the pids whose memory the probes must not grow.
pub(super) fn listeners(run: &Run) -> (crate::probe::Listeners, Vec<(String, i32)>) {
    let mut l = crate::probe::Listeners::default();
    let mut pids = Vec::new();
    for (i, h) in run.c.heads.iter().enumerate() {
        let ip = &run.c.hosts[run.c.head_host(i)].ip;
        l.heads.push(run.c.head_addrs[i].clone());
        if let Some(p) = h.ready["dashboard_port"].as_u64() {
            l.http.push((
                format!("head-{i} REST"),
                format!("{ip}:{p}"),
                "/api/jobs/".into(),
            ));
            l.http.push((
                format!("head-{i} /metrics"),
                format!("{ip}:{p}"),
                "/metrics".into(),
            ));
        }
        if let Some(p) = h.pid() {
            pids.push((h.name.clone(), p));
        }
        node_listeners(
            &mut l,
            &mut pids,
            &format!("head-{i}'s node"),
            ip,
            &h.ready["node"],
        );
    }
    for (i, n) in run.c.nodes.iter().enumerate() {
        let ip = &run.c.hosts[run.c.node_host(i)].ip;
        node_listeners(&mut l, &mut pids, &n.name, ip, &n.ready);
    }
    (l, pids)
}

pub(super) fn node_listeners(
    l: &mut crate::probe::Listeners,
    pids: &mut Vec<(String, i32)>,
    name: &str,
    ip: &str,
    ready: &serde_json::Value,
) {
    if let Some(p) = ready["node_manager_port"].as_u64() {
        l.node_managers.push(format!("{ip}:{p}"));
    }
    if let Some(p) = ready["object_manager_port"].as_u64() {
        l.object_managers.push(format!("{ip}:{p}"));
    }
    if let Some(p) = ready["object_transfer_port"].as_u64() {
        l.bulk.push(format!("{ip}:{p}"));
    }
    if let Some(p) = ready["metrics_export_port"].as_u64() {
        l.http.push((
            format!("{name} /metrics"),
            format!("{ip}:{p}"),
            "/metrics".into(),
        ));
    }
    if let Some(p) = ready["pid"].as_i64() {
        pids.push((name.to_string(), p as i32));
    }
}

pub(super) fn hostile_clients(run: &mut Run) -> Result<()> {
    use prost::Message;
    let started = Instant::now();
    pause(run.random_start())?;
    let (l, pids) = listeners(run);
    let before: Vec<Option<u64>> = pids.iter().map(|(_, p)| crate::probe::rss(*p)).collect();
    let token = run.c.token.clone();
    run.fault(&format!(
        "hostile clients on {} head, {} node manager, {} object manager and {} object transfer ports, {} HTTP endpoints",
        l.heads.len(),
        l.node_managers.len(),
        l.object_managers.len(),
        l.bulk.len(),
        l.http.len()
    ));
    let mut seed = run.rng.next_u64() | 1;
    let mut garbage = 0;
    for a in l
        .heads
        .iter()
        .chain(&l.node_managers)
        .chain(&l.object_managers)
        .chain(&l.bulk)
    {
        garbage += crate::probe::garbage(a, 10, &mut seed);
    }
    let unknown = "ab".repeat(16);
    let head_paths: Vec<(&'static str, Vec<u8>)> = vec![
        (
            "/rayctl.v1.ControlPlane/HeadInfo",
            pb_bytes(&protocol::pb::HeadInfoRequest {}),
        ),
        (
            "/rayctl.v1.ControlPlane/KvPut",
            protocol::pb::KvPutRequest {
                namespace: "hostile".into(),
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                overwrite: true,
            }
            .encode_to_vec(),
        ),
        (
            "/rayctl.v1.ControlPlane/GetNode",
            protocol::pb::GetNodeRequest {
                node_id: unknown.clone(),
            }
            .encode_to_vec(),
        ),
        (
            "/rayctl.v1.ControlPlane/GetJob",
            protocol::pb::GetJobRequest {
                job_id: "nope".into(),
            }
            .encode_to_vec(),
        ),
        (
            "/rayctl.v1.ControlPlane/Heartbeat",
            protocol::pb::HeartbeatRequest {
                node_id: unknown.clone(),
                incarnation: 1,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    ];
    let node_paths: Vec<(&'static str, Vec<u8>)> = vec![(
        "/rayctl.v1.NodeManager/HealthCheck",
        pb_bytes(&protocol::pb::NodeHealthCheckRequest {}),
    )];
    let om_paths: Vec<(&'static str, Vec<u8>)> = vec![(
        "/rayctl.v1.ObjectManager/GetObjectInfo",
        protocol::pb::GetObjectInfoRequest {
            object_id: vec![9; 20],
            ..Default::default()
        }
        .encode_to_vec(),
    )];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (seen, auth) = rt.block_on(async {
        let mut seen = crate::probe::Seen::default();
        for h in &l.heads {
            crate::probe::bad_grpc(h, &token, &head_paths, 10_000, &mut seen).await?;
        }
        for n in &l.node_managers {
            crate::probe::bad_grpc(n, &token, &node_paths, 1000, &mut seen).await?;
        }
        for o in &l.object_managers {
            crate::probe::bad_grpc(o, &token, &om_paths, 1000, &mut seen).await?;
        }
        let auth = crate::probe::auth_matrix(&l, &token).await?;
        anyhow::Ok((seen, auth))
    })?;
    drop(rt);
    run.heal("the hostile clients stop");
    run.checks.push(Check::new(
        "bad-grpc-answered-clearly",
        seen.bad.is_empty(),
        if seen.bad.is_empty() {
            format!(
                "{garbage} garbage connections and {} bad calls; answers by code: {:?}",
                seen.calls, seen.codes
            )
        } else {
            format!(
                "{} bad answers of {}: {}",
                seen.bad.len(),
                seen.calls,
                seen.bad
                    .iter()
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        },
    ));
    run.checks.push(Check::new(
        "auth-on-every-port",
        auth.is_empty(),
        if auth.is_empty() {
            format!(
                "{} gRPC listeners, {} object transfer ports and {} HTTP endpoints: no and wrong tokens refused, the cluster token admitted (never on Raft)",
                l.heads.len() * 2 + l.node_managers.len() + l.object_managers.len(),
                l.bulk.len(),
                l.http.len()
            )
        } else {
            auth.join("; ")
        },
    ));
    // Memory settles after the flood; then no daemon may have grown by 50 MiB or more.
    pause(Duration::from_secs(2))?;
    let mut grew = Vec::new();
    let mut growth = Vec::new();
    for ((name, pid), b) in pids.iter().zip(&before) {
        if let (Some(b), Some(a)) = (b, crate::probe::rss(*pid)) {
            let mib = (a as f64 - *b as f64) / f64::from(1 << 20);
            growth.push(format!("{name} {mib:+.1}"));
            if mib >= 50.0 {
                grew.push(format!("{name} grew {mib:.1} MiB"));
            }
        }
    }
    run.checks.push(Check::new(
        "memory-bounded",
        grew.is_empty(),
        format!("RSS change in MiB: {}", growth.join(", ")),
    ));
    // The token in no log, no metric.
    let mut leaks = Vec::new();
    for f in crate::files_below(run.c.path(), &|n: &str| {
        n.ends_with(".log") || n.ends_with(".out") || n.ends_with(".err")
    }) {
        if std::fs::read_to_string(&f).is_ok_and(|t| t.contains(&token)) {
            leaks.push(f.display().to_string());
        }
    }
    for (name, addr, path) in l.http.iter().filter(|(_, _, p)| p == "/metrics") {
        let text = ureq::get(&format!("http://{addr}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .unwrap_or_default();
        if text.contains(&token) {
            leaks.push(name.clone());
        }
    }
    run.checks.push(Check::new(
        "token-not-leaked",
        leaks.is_empty(),
        format!("logs and /metrics holding the token: {leaks:?}"),
    ));
    run.until_end(started)
}

pub(super) fn pb_bytes<M: prost::Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
}

/// `(status, body)` of one HTTP request with the cluster token.
pub(super) fn http(
    run: &Run,
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<(u16, String)> {
    let url = format!("http://{addr}{path}");
    let auth = format!("Bearer {}", run.c.token);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let mut r = match method {
        "GET" => agent.get(&url).header("authorization", &auth).call()?,
        "POST" => agent
            .post(&url)
            .header("authorization", &auth)
            .header("content-type", content_type)
            .send(&body[..])?,
        "PUT" => agent
            .put(&url)
            .header("authorization", &auth)
            .header("content-type", content_type)
            .send(&body[..])?,
        other => bail!("no method {other}"),
    };
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    Ok((status, text))
}

pub(super) fn hostile_http(run: &mut Run) -> Result<()> {
    use crate::probe::{zip_archive, zip_bomb, zip_many_entries};
    let started = Instant::now();
    pause(run.random_start())?;
    let tag = run.target.tag.clone();
    let ip = run.c.hosts[run.c.head_host(0)].ip.clone();
    let port = run.c.heads[0].ready["dashboard_port"]
        .as_u64()
        .context("dashboard port")?;
    let api = format!("{ip}:{port}");
    let node_id = run.c.nodes[0].ready["node_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // Where an escape would land: none of these may exist afterwards.
    let escapes = [
        std::env::temp_dir().join(format!("escape-{tag}")),
        std::env::temp_dir().join(format!("abs-{tag}")),
        run.c.path().join(format!("escape-{tag}")),
    ];
    run.fault("hostile HTTP requests, archives and CLI arguments");
    let pkg = "_ray_pkg_00112233445566778899aabbccddeeff.zip";
    let json = "application/json";
    let zip = "application/zip";
    let abs = format!("/tmp/abs-{tag}");
    let cases: Vec<(String, &str, String, &str, Vec<u8>)> = vec![
        (
            "unknown job".into(),
            "GET",
            "/api/jobs/no-such-job".into(),
            json,
            vec![],
        ),
        (
            "../ in a job id".into(),
            "GET",
            "/api/jobs/..%2F..%2Fetc%2Fpasswd".into(),
            json,
            vec![],
        ),
        (
            "unknown job's logs".into(),
            "GET",
            "/api/jobs/no-such-job/logs".into(),
            json,
            vec![],
        ),
        (
            "invalid JSON".into(),
            "POST",
            "/api/jobs/".into(),
            json,
            b"{not json".to_vec(),
        ),
        (
            "a number for the entrypoint".into(),
            "POST",
            "/api/jobs/".into(),
            json,
            br#"{"entrypoint": 5}"#.to_vec(),
        ),
        (
            "a lone surrogate in an env value".into(),
            "POST",
            "/api/jobs/".into(),
            json,
            br#"{"entrypoint": "true", "runtime_env": {"env_vars": {"A": "\ud800"}}}"#.to_vec(),
        ),
        (
            "a host path as working_dir".into(),
            "POST",
            "/api/jobs/".into(),
            json,
            br#"{"entrypoint": "true", "runtime_env": {"working_dir": "/etc"}}"#.to_vec(),
        ),
        (
            "an archive entry with ../".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            zip_archive(&[(&format!("../../escape-{tag}"), b"x")], &[]),
        ),
        (
            "an absolute archive entry".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            zip_archive(&[(&abs, b"x")], &[]),
        ),
        (
            "a link out".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            zip_archive(&[], &[("out", "../../../etc")]),
        ),
        (
            "a chain of links out".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            zip_archive(&[], &[("a", "b"), ("b", "c/.."), ("c", "../..")]),
        ),
        (
            "a file through a link out".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            zip_archive(&[(&format!("t/escape-{tag}"), b"x")], &[("t", "/tmp")]),
        ),
        (
            "a zip bomb by size".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            zip_bomb(),
        ),
        (
            "a zip bomb by count".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            zip_many_entries(100_001),
        ),
        (
            "not a zip".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            b"not a zip".to_vec(),
        ),
        (
            "an over-limit upload".into(),
            "PUT",
            format!("/api/packages/gcs/{pkg}"),
            zip,
            vec![0u8; (protocol::package::DEFAULT_MAX_BYTES + 2) as usize],
        ),
        (
            "../ in a package name".into(),
            "PUT",
            "/api/packages/gcs/..%2F..%2Fx.zip".into(),
            zip,
            zip_archive(&[("a", b"x")], &[]),
        ),
        (
            "a log file outside the logs".into(),
            "GET",
            format!("/api/v0/logs/file?node_id={node_id}&filename=../../../../etc/passwd"),
            json,
            vec![],
        ),
        (
            "an absolute log file".into(),
            "GET",
            format!("/api/v0/logs/file?node_id={node_id}&filename=/etc/passwd"),
            json,
            vec![],
        ),
        (
            "an unknown State API resource".into(),
            "GET",
            "/api/v0/nonsense".into(),
            json,
            vec![],
        ),
    ];
    let mut bad = Vec::new();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for (what, method, path, ct, body) in cases {
        match http(run, &api, method, &path, ct, body) {
            Ok((code, text)) => {
                *statuses.entry(code).or_default() += 1;
                if !(400..500).contains(&code) || text.trim().is_empty() {
                    bad.push(format!(
                        "{what}: HTTP {code} {:?}",
                        text.chars().take(120).collect::<String>()
                    ));
                }
            }
            Err(e) => bad.push(format!("{what}: {e:#}")),
        }
    }
    // Nothing of the refused archives was stored.
    if let Ok((code, _)) = http(
        run,
        &api,
        "GET",
        &format!("/api/packages/gcs/{pkg}"),
        json,
        vec![],
    ) && code != 404
    {
        bad.push(format!(
            "a refused package is there after all (HTTP {code})"
        ));
    }
    run.checks.push(Check::new(
        "bad-http-refused-clearly",
        bad.is_empty(),
        if bad.is_empty() {
            format!("every bad request answered 4xx with a reason: {statuses:?}")
        } else {
            bad.join("; ")
        },
    ));
    // The CLI: clear errors and usage exit codes.
    let rayctl = |args: &[&std::ffi::OsStr]| -> Result<(i32, String)> {
        let out = std::process::Command::new(crate::rayctl_bin()?)
            .args(args)
            .env("RAYCTL_TMPDIR", run.c.path())
            .env(protocol::AUTH_TOKEN_ENV, &run.c.token)
            .env(protocol::ADDRESS_ENV, run.c.head_addrs.join(","))
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    use std::os::unix::ffi::OsStrExt;
    let os = |s: &str| std::ffi::OsStr::new(s).to_os_string();
    let mut cli_bad = Vec::new();
    for (what, args, want) in [
        (
            "invalid runtime_env JSON",
            vec![
                os("job"),
                os("submit"),
                os("--runtime-env-json"),
                os("{bad"),
                os("--"),
                os("true"),
            ],
            "runtime",
        ),
        (
            "a non-UTF-8 argument",
            vec![
                os("job"),
                os("submit"),
                os("--runtime-env-json"),
                std::ffi::OsStr::from_bytes(b"{\"env_vars\": {\"A\": \"\xff\"}}").to_os_string(),
                os("--"),
                os("true"),
            ],
            "UTF-8",
        ),
        (
            "../ as a job id",
            vec![os("job"), os("logs"), os("../../etc/passwd")],
            "",
        ),
    ] {
        let a: Vec<&std::ffi::OsStr> = args.iter().map(|s| s.as_os_str()).collect();
        match rayctl(&a) {
            Ok((0, _)) => cli_bad.push(format!("{what}: exit 0")),
            Ok((code, err)) if !err.contains("error") || !err.contains(want) => {
                cli_bad.push(format!("{what}: exit {code}, {:?}", err.trim()))
            }
            Ok(_) => {}
            Err(e) => cli_bad.push(format!("{what}: {e:#}")),
        }
    }
    run.checks.push(Check::new(
        "bad-cli-input-refused",
        cli_bad.is_empty(),
        if cli_bad.is_empty() {
            "each refused with a named error and a non-zero exit".into()
        } else {
            cli_bad.join("; ")
        },
    ));
    run.heal("the hostile clients stop");
    let found: Vec<String> = escapes
        .iter()
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .chain(
            crate::files_below(run.c.path(), &|n: &str| {
                n.contains(&format!("escape-{tag}")) || n.contains(&format!("abs-{tag}"))
            })
            .into_iter()
            .map(|p| p.display().to_string()),
        )
        .collect();
    run.checks.push(Check::new(
        "nothing-written-outside",
        found.is_empty(),
        format!("files the archives tried to plant: {found:?}"),
    ));
    run.until_end(started)
}
