//! `rayctl start` and `rayctl stop`.
//!
//! Process model (DESIGN §1): a head is two processes, the control-plane replica (this
//! process, in `--block` mode) and its node daemon (a child `rayctl start --address … --block`
//! that the kernel kills if the head process dies, as if the machine died). A worker node is
//! one process. Without `--block`, `rayctl start` re-runs itself with `--block` in a new
//! session (setsid), waits until the daemon reports its bound ports in a ready file, prints
//! them and exits.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use protocol::auth::{AuthMode, AuthToken};
use protocol::pb;
use protocol::server::MetricsRender;
use serde_json::{Value, json};

use crate::cli::{StartArgs, StopArgs};
use crate::session::{self, DaemonRecord};

const READY_TIMEOUT: Duration = Duration::from_secs(60);

const NO_TOKEN: &str = "no cluster token found: copy the head's ~/.rayctl/auth_token to this machine (or set RAYCTL_AUTH_TOKEN, RAYCTL_AUTH_TOKEN_PATH or --auth-token-file); a cluster started with --auth-mode disabled needs --auth-mode disabled here too";

const AUTH_DISABLED_WARNING: &str = "WARNING: --auth-mode disabled: every port of this daemon takes calls from anyone who can reach it, and any caller can run code on the cluster";

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The token this daemon serves with: none when auth is disabled; a head's found or
/// generated (saying where, once); a node's found, or an error.
fn daemon_token(a: &StartArgs) -> anyhow::Result<Option<AuthToken>> {
    match a.auth_mode {
        AuthMode::Disabled => {
            eprintln!("{AUTH_DISABLED_WARNING}");
            tracing::warn!("{AUTH_DISABLED_WARNING}");
            Ok(None)
        }
        AuthMode::Token if a.head => {
            let (t, created) = AuthToken::load_or_generate(a.auth_token_file.as_deref())?;
            if let Some(p) = created {
                eprintln!(
                    "Generated a cluster token in {} (mode 0600). Clients on this machine find it there; copy it to other machines (or set RAYCTL_AUTH_TOKEN).",
                    p.display()
                );
            }
            Ok(Some(t))
        }
        AuthMode::Token => Ok(Some(
            AuthToken::load(a.auth_token_file.as_deref())?.context(NO_TOKEN)?,
        )),
    }
}

pub(crate) fn start(args: StartArgs) -> anyhow::Result<ExitCode> {
    validate(&args)?;
    if let Some(dir) = &args.temp_dir {
        // SAFETY: no other thread runs yet (no runtime, no daemon): nothing reads the
        // environment concurrently. The daemon (a child) inherits it.
        unsafe { std::env::set_var("RAYCTL_TMPDIR", dir) };
    }
    if !args.block {
        if args.include_dashboard == Some(false) {
            eprintln!(
                "note: --include-dashboard=false is accepted but the dashboard port stays on: it also serves the Jobs API and Ray's state API"
            );
        }
        if let Some(dir) = &args.temp_dir {
            eprintln!(
                "note: sessions go under {}; clients on this machine find this cluster with RAYCTL_TMPDIR={}",
                dir.display(),
                dir.display()
            );
        }
    }
    if args.block {
        init_tracing();
        let rt = crate::cli::runtime()?;
        rt.block_on(run_blocking(args))?;
        return Ok(ExitCode::SUCCESS);
    }
    launch_background(args)
}

fn validate(a: &StartArgs) -> anyhow::Result<()> {
    if let Some(p) = &a.autoscaling_config {
        crate::autoscaler::read_config(p)?;
    }
    let peers = a
        .peers
        .as_deref()
        .map(protocol::client::HeadClient::parse_addresses)
        .unwrap_or_default();
    if a.peers.is_some() && a.port == 0 {
        bail!("--peers needs a fixed --port (the others must know this head's address)");
    }
    if !peers.is_empty() && ![1, 3, 5, 7].contains(&peers.len()) {
        bail!(
            "--peers lists {} heads; use an odd number (1, 3, 5 or 7) so a majority survives failures",
            peers.len()
        );
    }
    for p in &peers {
        protocol::ids::validate_address(p).with_context(|| format!("bad --peers entry {p:?}"))?;
    }
    if let Some(a) = &a.address {
        for h in protocol::client::HeadClient::parse_addresses(a) {
            protocol::ids::validate_address(&h)
                .with_context(|| format!("bad --address entry {h:?}"))?;
        }
    }
    resources(a)?;
    labels(a)?;
    match a.auth_mode {
        AuthMode::Disabled => {
            if !is_loopback(&a.bind_host) && !a.allow_unauthenticated_remote {
                bail!(
                    "--auth-mode disabled with --bind-host {}: anyone who can reach this machine could run code on the cluster; bind a loopback address, turn auth on, or add --allow-unauthenticated-remote if every host on that network is trusted",
                    a.bind_host
                );
            }
        }
        // A head finds or generates its token; a worker node must find the cluster's.
        AuthMode::Token if a.head => {}
        AuthMode::Token => {
            if AuthToken::load(a.auth_token_file.as_deref())?.is_none() {
                bail!("{NO_TOKEN}");
            }
        }
    }
    if a.health_check_period.is_zero() || a.health_check_failure_threshold == 0 {
        bail!("--health-check-period and --health-check-failure-threshold must be positive");
    }
    Ok(())
}

fn total_memory_bytes() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024.0)
}

/// The node's resources: CPU, GPU, memory and custom ones.
fn resources(a: &StartArgs) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut r: BTreeMap<String, f64> = match &a.resources {
        Some(j) => serde_json::from_str(j)
            .with_context(|| format!("--resources {j:?}: expected a JSON object of numbers"))?,
        None => BTreeMap::new(),
    };
    for k in ["CPU", "GPU", "memory"] {
        if r.contains_key(k) {
            bail!("--resources must not set {k}; use --num-cpus, --num-gpus or --memory");
        }
    }
    let cpus = a
        .num_cpus
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64));
    r.insert("CPU".into(), cpus);
    if let Some(g) = a.num_gpus {
        r.insert("GPU".into(), g);
    }
    let mem = match &a.memory {
        Some(m) => m
            .parse::<bytesize::ByteSize>()
            .map_err(|e| {
                anyhow::anyhow!("--memory {m:?}: {e}; expected a size like 4GiB or 1000000")
            })?
            .as_u64() as f64,
        None => (total_memory_bytes().unwrap_or(0.0) * 0.7).floor(),
    };
    r.insert("memory".into(), mem);
    r.retain(|_, v| *v != 0.0);
    node::check_resources(&r)?;
    Ok(r)
}

fn object_store_options(
    a: &StartArgs,
    session_dir: &Path,
) -> anyhow::Result<node::ObjectStoreOptions> {
    let mut o = node::ObjectStoreOptions::in_session(session_dir);
    o.object_manager_port = a.object_manager_port;
    o.object_transfer_port = a.object_transfer_port;
    o.plasma_dir = a.plasma_directory.clone();
    if let Some(dir) = &a.object_spilling_directory {
        o.spill_root = dir.clone();
    }
    if let Some(m) = &a.object_store_memory {
        let size = m.parse::<bytesize::ByteSize>().map_err(|e| {
            anyhow::anyhow!(
                "--object-store-memory {m:?}: {e}; expected a size like 2GiB or 100000000"
            )
        })?;
        o.memory = Some(size.as_u64());
    }
    Ok(o)
}

/// `--labels`: Ray's `k=v,k2=v2`, or a JSON object of strings.
fn labels(a: &StartArgs) -> anyhow::Result<BTreeMap<String, String>> {
    let Some(text) = a.labels.as_deref().map(str::trim) else {
        return Ok(BTreeMap::new());
    };
    if text.starts_with('{') {
        return serde_json::from_str(text)
            .with_context(|| format!("--labels {text:?}: expected a JSON object of strings"));
    }
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => bail!(
                "--labels {text:?}: {p:?} is not KEY=VALUE (write zone=a,disk=ssd or a JSON object)"
            ),
        })
        .collect()
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RAYCTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Installs the Prometheus recorder for this process and returns its renderer.
fn install_metrics(cluster_name: &str) -> anyhow::Result<MetricsRender> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        // The labels Ray's Grafana dashboards filter every query by.
        .add_global_label("SessionName", cluster_name)
        .add_global_label("ray_io_cluster", cluster_name)
        .set_buckets(&[
            0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0,
        ])?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_batch_size".into()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 512.0],
        )?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(Arc::new(move || handle.render()))
}

fn default_data_dir(a: &StartArgs) -> anyhow::Result<PathBuf> {
    let base = session::base_dir()?;
    Ok(if a.head {
        base.join("data").join(format!("head-{}", a.port))
    } else {
        base.join("data").join("node")
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}

/// Removes this daemon's record from `daemons/` when it exits normally.
struct RecordGuard(Option<PathBuf>);

impl Drop for RecordGuard {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn run_blocking(args: StartArgs) -> anyhow::Result<()> {
    let render = install_metrics(&args.cluster_name)?;
    let token = daemon_token(&args)?;
    let data_dir = match args.data_dir.clone() {
        Some(d) => d,
        None => default_data_dir(&args)?,
    };
    let session_dir = match &args.session_dir {
        Some(s) => s.clone(),
        None if args.head_node => data_dir.clone(),
        None => session::new_session()?,
    };
    let env = DaemonEnv {
        data_dir,
        session_dir,
        token,
        render,
    };
    if args.head {
        run_head(args, env).await
    } else {
        run_node(args, env).await
    }
}

/// What every daemon gets besides its flags.
struct DaemonEnv {
    data_dir: PathBuf,
    session_dir: PathBuf,
    token: Option<AuthToken>,
    render: MetricsRender,
}

async fn run_node(args: StartArgs, env: DaemonEnv) -> anyhow::Result<()> {
    let DaemonEnv {
        data_dir,
        session_dir,
        token,
        render,
    } = env;
    let heads =
        protocol::client::HeadClient::parse_addresses(args.address.as_deref().unwrap_or_default());
    let mut opts = node::NodeOptions::new(heads.clone(), data_dir);
    opts.bind_host = args.bind_host.clone();
    opts.advertise_host = args.node_ip_address.clone();
    opts.node_manager_port = args.node_manager_port;
    opts.metrics_export_port = args.metrics_export_port;
    opts.resources = resources(&args)?;
    opts.labels = labels(&args)?;
    opts.is_head = args.head_node;
    opts.token = token;
    opts.metrics = Some(render);
    opts.object_store = object_store_options(&args, &session_dir)?;
    opts.log_dir = session_dir.join("logs");
    opts.job_dir = session_dir.join("jobs");
    opts.workers.idle_timeout = args.worker_idle_timeout;
    opts.workers.prestart = args.prestart_workers;
    let node = node::start(opts).await?;
    let _record = if args.head_node {
        RecordGuard(None)
    } else {
        session::write_cluster_file(&session_dir, &heads)?;
        RecordGuard(Some(session::register_daemon(&DaemonRecord {
            pid: std::process::id(),
            kind: "node".into(),
            address: node.address.clone(),
            session: session_dir.clone(),
        })?))
    };
    let ready = json!({
        "kind": "node",
        "pid": std::process::id(),
        "node_id": node.node_id.to_string(),
        "address": node.address,
        "node_manager_port": node.node_manager_port,
        "metrics_export_port": node.metrics_export_port,
        "object_manager_port": node.object_manager_port,
        "object_transfer_port": node.object_transfer_port,
        "object_store_socket": node.object_store_socket,
        "object_store_memory": node.store.arena().capacity(),
        "session_dir": session_dir,
    });
    if let Some(f) = &args.ready_file {
        session::write_atomic(f, serde_json::to_string(&ready)?.as_bytes())?;
    }
    tokio::select! {
        r = wait_for_signal() => {
            r?;
            tracing::info!("stopping node");
        }
        reason = node.drained() => tracing::info!(reason, "drained: leaving the cluster"),
    }
    node.shutdown().await;
    Ok(())
}

async fn run_head(args: StartArgs, env: DaemonEnv) -> anyhow::Result<()> {
    let DaemonEnv {
        data_dir,
        session_dir,
        token,
        render,
    } = env;
    let mut opts = control_plane::HeadOptions::new(data_dir.clone());
    opts.bind_host = args.bind_host.clone();
    opts.advertise_host = args.node_ip_address.clone();
    opts.port = args.port;
    opts.dashboard_port = args.dashboard_port;
    opts.peers = args
        .peers
        .as_deref()
        .map(protocol::client::HeadClient::parse_addresses)
        .unwrap_or_default();
    opts.join = args
        .join
        .as_deref()
        .map(protocol::client::HeadClient::parse_addresses)
        .unwrap_or_default();
    opts.token = token.clone();
    opts.peer_secret = Some(protocol::auth::load_peer_secret(
        args.peer_secret_file.as_deref(),
        true,
    )?);
    opts.allowed_origins = args.dashboard_allowed_origins.clone();
    opts.grafana_host = args.grafana_host.clone();
    opts.grafana_iframe_host = args.grafana_iframe_host.clone();
    opts.health = control_plane::HealthConfig {
        period: args.health_check_period,
        failure_threshold: args.health_check_failure_threshold,
    };
    opts.snapshot_every = args.raft_snapshot_interval.max(10);
    opts.logs_to_keep = args.raft_logs_to_keep;
    opts.jobs = control_plane::jobs::JobConfig {
        queue_timeout: args.job_queue_timeout,
        stop_grace: args.job_stop_grace,
    };
    opts.metrics = Some(render);
    opts.service_discovery_file = Some(session_dir.join("prom_metrics_service_discovery.json"));
    // What the autoscaler's local provider runs nodes with: this binary, and the cluster
    // token and name in their environment (never the peer secret).
    opts.provider_env = control_plane::autoscaler::provider::ProviderEnv {
        rayctl: std::env::current_exe()?,
        env: vec![
            match &token {
                Some(t) => (protocol::AUTH_TOKEN_ENV.to_owned(), t.as_str().to_owned()),
                None => (
                    protocol::auth::AUTH_MODE_ENV.to_owned(),
                    "disabled".to_owned(),
                ),
            },
            ("RAYCTL_CLUSTER_NAME".to_owned(), args.cluster_name.clone()),
        ],
        session_root: protocol::session::root_path(),
    };
    let autoscaling = match &args.autoscaling_config {
        Some(p) => Some(crate::autoscaler::read_config(p)?),
        None => None,
    };
    let head = control_plane::start(opts.clone()).await?;
    // A head whose Raft store failed (a full disk) answers "raft stopped" forever and cannot
    // recover in the process: exit non-zero, so a supervisor restarts it (the node daemon, a
    // child, dies with it). Exiting skips the daemon record's removal, as a crash would.
    let failed = head.failed();
    tokio::spawn(async move {
        let e = failed.await;
        tracing::error!("{e:#}");
        std::process::exit(1);
    });
    let mut heads = if opts.peers.is_empty() {
        vec![head.address.clone()]
    } else {
        opts.peers.clone()
    };
    for j in &opts.join {
        if !heads.contains(j) {
            heads.push(j.clone());
        }
    }
    session::write_cluster_file(&session_dir, &heads)?;
    if let Some(yaml) = autoscaling {
        // Through the cluster API, as `rayctl autoscaler apply` does: whichever head leads
        // commits it (retried until a leader is elected).
        let c = protocol::client::HeadClient::new(
            &heads,
            token.clone(),
            protocol::client::ClientOptions {
                deadline: Duration::from_secs(60),
                ..Default::default()
            },
        )?;
        tokio::spawn(async move {
            match c
                .call(|mut c| {
                    let yaml = yaml.clone();
                    async move {
                        c.set_autoscaling_config(pb::SetAutoscalingConfigRequest { yaml })
                            .await
                    }
                })
                .await
            {
                Ok(_) => tracing::info!("autoscaling config applied"),
                Err(e) => tracing::error!("could not apply the autoscaling config: {e}"),
            }
        });
    }

    // The head's node daemon: a child process the kernel kills with us.
    let node_ready = session_dir.join(format!("node-ready-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&node_ready);
    let mut child_args = vec![
        "start".to_string(),
        "--block".into(),
        "--head-node".into(),
        format!("--address={}", heads.join(",")),
        format!("--data-dir={}", data_dir.join("node").display()),
        format!("--session-dir={}", session_dir.display()),
        format!("--ready-file={}", node_ready.display()),
        format!("--node-ip-address={}", args.node_ip_address),
        format!("--bind-host={}", args.bind_host),
        format!("--node-manager-port={}", args.node_manager_port),
        format!("--object-manager-port={}", args.object_manager_port),
        format!("--object-transfer-port={}", args.object_transfer_port),
        format!("--metrics-export-port={}", args.metrics_export_port),
        format!("--plasma-directory={}", args.plasma_directory.display()),
        format!("--cluster-name={}", args.cluster_name),
    ];
    for (flag, v) in [
        ("--num-cpus", args.num_cpus.map(|v| v.to_string())),
        ("--num-gpus", args.num_gpus.map(|v| v.to_string())),
        ("--memory", args.memory.clone()),
        (
            "--worker-idle-timeout",
            Some(humantime::format_duration(args.worker_idle_timeout).to_string()),
        ),
        (
            "--prestart-workers",
            Some(args.prestart_workers.to_string()),
        ),
        ("--resources", args.resources.clone()),
        ("--labels", args.labels.clone()),
        ("--object-store-memory", args.object_store_memory.clone()),
        (
            "--object-spilling-directory",
            args.object_spilling_directory
                .as_ref()
                .map(|p| p.display().to_string()),
        ),
    ] {
        if let Some(v) = v {
            child_args.push(format!("{flag}={v}"));
        }
    }
    let log = std::fs::File::create(
        session_dir
            .join("logs")
            .join(format!("node-{}.log", std::process::id())),
    )
    .or_else(|_| {
        std::fs::File::create(session_dir.join(format!("node-{}.log", std::process::id())))
    })
    .context("cannot create the node daemon's log file")?;
    if args.auth_mode == AuthMode::Disabled {
        child_args.push("--auth-mode=disabled".into());
    }
    let mut cmd = Command::new(std::env::current_exe()?);
    // The node gets the cluster token in its environment (never on its command line) and
    // nothing of the peer secret.
    match &token {
        Some(t) => cmd.env(protocol::AUTH_TOKEN_ENV, t.as_str()),
        None => cmd.env_remove(protocol::AUTH_TOKEN_ENV),
    };
    cmd.args(&child_args)
        .env_remove(protocol::auth::PEER_SECRET_PATH_ENV)
        .env_remove(protocol::auth::AUTH_MODE_ENV)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().context("cannot start the head's node daemon")?;
    let node_info = wait_ready(&node_ready, &mut child, READY_TIMEOUT)?;

    let _record = RecordGuard(Some(session::register_daemon(&DaemonRecord {
        pid: std::process::id(),
        kind: "head".into(),
        address: head.address.clone(),
        session: session_dir.clone(),
    })?));
    let ready = json!({
        "kind": "head",
        "pid": std::process::id(),
        "address": head.address,
        "raft_id": head.raft_id.to_string(),
        "port": head.port,
        "dashboard_port": head.dashboard_port,
        "heads": heads,
        "session_dir": session_dir,
        "node": node_info,
    });
    if let Some(f) = &args.ready_file {
        session::write_atomic(f, serde_json::to_string(&ready)?.as_bytes())?;
    }
    wait_for_signal().await?;
    tracing::info!("stopping head");
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    head.shutdown().await;
    Ok(())
}

/// Waits for a daemon's ready file; fails early if the daemon exits.
fn wait_ready(
    path: &Path,
    child: &mut std::process::Child,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(b) = std::fs::read(path)
            && let Ok(v) = serde_json::from_slice::<Value>(&b)
        {
            let _ = std::fs::remove_file(path);
            return Ok(v);
        }
        if let Some(status) = child.try_wait()? {
            bail!("the daemon exited before it was ready ({status})");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the daemon was not ready within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A head `rayctl start` left running here on the port asked for: say which and how to stop
/// it, instead of failing later on a port in use.
fn refuse_second_head(args: &StartArgs) -> anyhow::Result<()> {
    if !args.head || args.port == 0 {
        return Ok(());
    }
    let suffix = format!(":{}", args.port);
    if let Some((_, r)) = session::list_daemons()?
        .into_iter()
        .find(|(_, r)| r.kind == "head" && r.address.ends_with(&suffix) && session::alive(r.pid))
    {
        bail!(
            "a head already runs here at {} (pid {}, session {}): use it (rayctl status, rayctl job submit …), stop it with `rayctl stop`, or start another with its own --port, --dashboard-port and --data-dir",
            r.address,
            r.pid,
            r.session.display()
        );
    }
    Ok(())
}

fn launch_background(args: StartArgs) -> anyhow::Result<ExitCode> {
    refuse_second_head(&args)?;
    if args.head {
        // Here, not in the daemon, so the user sees where a new token went (the daemon then
        // finds it) and a disabled-auth warning.
        daemon_token(&args)?;
    }
    let session_dir = session::new_session()?;
    let kind = if args.head { "head" } else { "node" };
    let ready = session_dir.join(format!("{kind}-ready.json"));
    let log_path = session_dir.join("logs").join(format!("{kind}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(std::env::args_os().skip(1))
        .arg("--block")
        .arg(format!("--ready-file={}", ready.display()))
        .arg(format!("--session-dir={}", session_dir.display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the daemon leaves our session and terminal.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().context("cannot start the daemon")?;
    let info = match wait_ready(&ready, &mut child, READY_TIMEOUT) {
        Ok(v) => v,
        Err(e) => {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{e}; its log {} ends with:\n{}",
                log_path.display(),
                tail.join("\n")
            );
        }
    };
    if args.head {
        let addr = info["address"].as_str().unwrap_or_default();
        let heads = info["heads"].as_array().map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        });
        let heads = heads.unwrap_or_else(|| addr.to_string());
        println!("Started a head at {addr} (pid {}).", info["pid"]);
        println!(
            "  dashboard and /metrics: http://{}:{}",
            args.node_ip_address, info["dashboard_port"]
        );
        println!(
            "  node {} on port {}",
            info["node"]["node_id"].as_str().unwrap_or("?"),
            info["node"]["node_manager_port"]
        );
        println!("  logs: {}", session_dir.join("logs").display());
        println!("To add a worker node:  rayctl start --address {heads}");
        println!("To see the cluster:    rayctl status");
        println!("To stop everything:    rayctl stop");
    } else {
        println!(
            "Started node {} at {} (pid {}); logs in {}",
            info["node_id"].as_str().unwrap_or("?"),
            info["address"].as_str().unwrap_or("?"),
            info["pid"],
            session_dir.join("logs").display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn stop(args: StopArgs) -> anyhow::Result<ExitCode> {
    let daemons = session::list_daemons()?;
    let mut live = Vec::new();
    for (path, rec) in daemons {
        if session::alive(rec.pid) {
            let sig = if args.force {
                Signal::SIGKILL
            } else {
                Signal::SIGTERM
            };
            let _ = kill(Pid::from_raw(rec.pid as i32), sig);
            live.push((path, rec));
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
    let deadline = Instant::now() + args.grace;
    while Instant::now() < deadline && live.iter().any(|(_, r)| session::alive(r.pid)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut killed = 0;
    for (path, rec) in &live {
        if session::alive(rec.pid) {
            let _ = kill(Pid::from_raw(rec.pid as i32), Signal::SIGKILL);
            killed += 1;
        }
        let _ = std::fs::remove_file(path);
        eprintln!("stopped {} {} (pid {})", rec.kind, rec.address, rec.pid);
    }
    let heads: Vec<String> = live
        .iter()
        .filter(|(_, r)| r.kind == "head")
        .map(|(_, r)| r.address.clone())
        .collect();
    session::mark_stopped(&heads)?;
    eprintln!(
        "Stopped {} daemon(s){}.",
        live.len(),
        if killed > 0 {
            format!(", {killed} with SIGKILL")
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}
