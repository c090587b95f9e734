//! The multi-process fixture every fault test builds on: N heads and M worker nodes started
//! from the real `rayctl` binary on free loopback ports, each with its own data dir under one
//! temp dir; SIGKILL / SIGSTOP / SIGCONT / restart any of them; poll with deadlines.
//!
//! Invariant: dropping a `Cluster` kills every process it started (SIGKILL after SIGCONT, so
//! stopped ones die too) and removes its temp dir, also when the test panics.
//!
//! The binary is `$RAYCTL_BIN`, else `rayctl` beside the test executable's target dir
//! (`cargo build -p rayctl` first; `scripts/test` does).

pub mod disk;
pub mod driver;
pub mod harness;
pub mod netns;
pub mod probe;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use protocol::auth::AuthToken;
use protocol::client::{ClientOptions, HeadClient};
use serde_json::Value;

/// Path of the `rayctl` binary under test.
pub fn rayctl_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RAYCTL_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> or target/<profile>/<bench>
    for dir in exe.ancestors().skip(1).take(3) {
        let cand = dir.join("rayctl");
        if cand.is_file() {
            return Ok(cand);
        }
    }
    bail!(
        "rayctl binary not found near {}; run `cargo build -p rayctl` (or set RAYCTL_BIN)",
        exe.display()
    )
}

/// A `rayctl` command kept to `dir`: its session root, and the token and peer secret files it
/// finds or makes, are there; nothing of the caller's cluster settings comes through.
pub fn rayctl_in(dir: &Path) -> Result<Command> {
    let mut cmd = Command::new(rayctl_bin()?);
    cmd.env("RAYCTL_TMPDIR", dir)
        .env(protocol::auth::AUTH_TOKEN_PATH_ENV, dir.join("auth_token"))
        .env(
            protocol::auth::PEER_SECRET_PATH_ENV,
            dir.join("peer_secret"),
        )
        .env_remove(protocol::AUTH_TOKEN_ENV)
        .env_remove(protocol::auth::AUTH_MODE_ENV)
        .env_remove(protocol::ADDRESS_ENV);
    Ok(cmd)
}

/// Whether process `pid` runs (a zombie does not).
pub fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(false)
}

/// A free loopback port (bound once, then released for the process to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// The value of the first series in Prometheus text `text` that `query` names: `name`, or
/// `name{k="v",…}` for a series of that name carrying at least those labels (every series
/// also has the global labels, e.g. `SessionName`).
pub fn find_metric(text: &str, query: &str) -> Option<f64> {
    let (name, want) = match query.split_once('{') {
        Some((n, rest)) => (n, rest.trim_end_matches('}')),
        None => (query, ""),
    };
    let want: Vec<&str> = want.split(',').filter(|p| !p.is_empty()).collect();
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let have: Vec<&str> = labels.split(',').collect();
        (n == name && want.iter().all(|w| have.contains(w)))
            .then(|| value.parse().ok())
            .flatten()
    })
}

/// Every file below `dir` (at any depth) whose name `keep` accepts.
pub fn files_below(dir: &Path, keep: &dyn Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_below(&p, keep));
        } else if p.file_name().and_then(|n| n.to_str()).is_some_and(keep) {
            out.push(p);
        }
    }
    out
}

/// Polls `f` until it returns `Some`, or fails after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// One daemon process (`rayctl start --block …`) and how to start it again.
pub struct Proc {
    pub name: String,
    args: Vec<String>,
    ready_file: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// What the daemon reported when it became ready (ports, ids).
    pub ready: Value,
    /// How it ended, when `exited` saw it end on its own.
    pub exit_status: Option<std::process::ExitStatus>,
}

impl Proc {
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether the process has exited on its own (reaped here if so; its status is kept in
    /// `exit_status`).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut().map(std::process::Child::try_wait) {
            Some(Ok(Some(st))) => {
                self.child = None;
                self.exit_status = Some(st);
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    pub fn signal(&self, sig: Signal) -> Result<()> {
        let pid = self.pid().context("process is not running")?;
        kill(Pid::from_raw(pid), sig).with_context(|| format!("kill -{sig} {}", self.name))
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `rayctl start --block ARGS` named `name`, with its ready file, log and session dir in
    /// `dir`; not started yet.
    fn daemon(dir: &Path, name: &str, mut args: Vec<String>) -> Proc {
        let ready_file = dir.join(format!("{name}.ready.json"));
        let log = dir.join(format!("{name}.log"));
        let mut full = vec!["start".to_string(), "--block".into()];
        full.append(&mut args);
        full.push(format!("--ready-file={}", ready_file.display()));
        full.push(format!(
            "--session-dir={}",
            dir.join(format!("{name}-session")).display()
        ));
        Proc {
            name: name.into(),
            args: full,
            ready_file,
            log,
            child: None,
            ready: Value::Null,
            exit_status: None,
        }
    }

    /// Waits (60 s at most) for the daemon's ready file; fails early if it exits.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(b) = std::fs::read(&self.ready_file)
                && let Ok(v) = serde_json::from_slice::<Value>(&b)
            {
                self.ready = v;
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                self.child = None;
                bail!(
                    "{} exited before ready ({st}):\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!("{} not ready within 60s:\n{}", self.name, self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where the daemon's stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

pub struct ClusterOptions {
    pub heads: usize,
    pub nodes: usize,
    /// A token the test chose (given to every daemon with `--auth-token-file`). None: the
    /// default, as a user gets it: the first head generates one at `RAYCTL_AUTH_TOKEN_PATH`
    /// (the cluster's temp dir) and every other process finds it there.
    pub token: Option<String>,
    pub health_period: Duration,
    pub health_threshold: u32,
    pub snapshot_interval: u64,
    pub node_cpus: f64,
    pub head_cpus: f64,
    /// More `rayctl start` flags for every head and node.
    pub extra_args: Vec<String>,
    /// Custom resources of every worker node, besides its own `node<i>: 1`.
    pub node_resources: Vec<(String, f64)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            heads: 1,
            nodes: 0,
            token: None,
            health_period: Duration::from_millis(500),
            health_threshold: 5,
            snapshot_interval: 5000,
            node_cpus: 1.0,
            head_cpus: 1.0,
            extra_args: Vec::new(),
            node_resources: Vec::new(),
        }
    }
}

/// Ray 2.60's own CLI (`ray`) and Python, from the venv `scripts/test` installs
/// (`target/ray-venv`, or `RAYCTL_RAY_VENV`): the real client where we promise
/// compatibility. Missing is an error that says how to get it, never a skip.
pub fn ray_venv() -> Result<PathBuf> {
    let dir = std::env::var_os("RAYCTL_RAY_VENV").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ray-venv"),
        PathBuf::from,
    );
    if !dir.join("bin/ray").exists() {
        bail!(
            "Ray 2.60's CLI is required at {}/bin/ray: scripts/test installs it \
             (python3 -m venv target/ray-venv && target/ray-venv/bin/pip install \
             'ray[default]==2.60.0'), or set RAYCTL_RAY_VENV to such a venv",
            dir.display()
        );
    }
    Ok(dir)
}

/// Names each applied autoscaling config file apart.
static APPLIED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub heads: Vec<Proc>,
    pub nodes: Vec<Proc>,
    pub head_addrs: Vec<String>,
    /// The cluster token (the test's, or the one the first head generated).
    pub token: Option<String>,
    /// Extra environment of every daemon (e.g. `RAYCTL_AUTH_MODE=disabled`).
    pub daemon_env: Vec<(String, String)>,
    bin: PathBuf,
    /// The token and extra flags every node is started with (for `add_node`).
    node_flags: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in self.heads.iter_mut().chain(self.nodes.iter_mut()) {
            p.kill9();
        }
        // The heads' node daemons die with their head (PR_SET_PDEATHSIG); make sure.
        let marker = self.dir.path().display().to_string();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.filter_map(Result::ok) {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmd).contains(&marker) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        // For post-mortems: keep the logs and data when asked to.
        if std::env::var_os("RAYCTL_KEEP_TEST_DIRS").is_some() {
            let dir = std::mem::replace(
                &mut self.dir,
                tempfile::Builder::new()
                    .prefix("rayctl-chaos-empty-")
                    .tempdir()
                    .expect("tempdir"),
            );
            eprintln!("kept {}", dir.keep().display());
        }
    }
}

impl Cluster {
    /// Starts `opts.heads` heads (one group) and `opts.nodes` worker nodes, and waits until
    /// every one of them is ready.
    pub fn start(opts: ClusterOptions) -> Result<Self> {
        let bin = rayctl_bin()?;
        let dir = tempfile::Builder::new().prefix("rayctl-chaos-").tempdir()?;
        let ports: Vec<u16> = (0..opts.heads).map(|_| free_port()).collect();
        let head_addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut c = Cluster {
            dir,
            heads: Vec::new(),
            nodes: Vec::new(),
            head_addrs: head_addrs.clone(),
            token: opts.token.clone(),
            daemon_env: Vec::new(),
            bin,
            node_flags: Vec::new(),
        };
        let token_args = match &opts.token {
            Some(t) => {
                let f = c.dir.path().join("token");
                std::fs::write(&f, t)?;
                vec![format!("--auth-token-file={}", f.display())]
            }
            None => vec![],
        };
        for (i, port) in ports.iter().enumerate() {
            let mut args = vec![
                "--head".to_string(),
                format!("--port={port}"),
                "--dashboard-port=0".into(),
                format!("--peers={}", head_addrs.join(",")),
                format!(
                    "--data-dir={}",
                    c.dir.path().join(format!("head-{i}")).display()
                ),
                format!("--health-check-period={}ms", opts.health_period.as_millis()),
                format!("--health-check-failure-threshold={}", opts.health_threshold),
                format!("--raft-snapshot-interval={}", opts.snapshot_interval),
                format!("--num-cpus={}", opts.head_cpus),
                "--memory=1GiB".into(),
            ];
            args.extend(token_args.clone());
            args.extend(opts.extra_args.clone());
            let p = c.spawn(&format!("head-{i}"), args)?;
            c.heads.push(p);
        }
        // Nodes find the token the heads generated: start them once it exists.
        for i in 0..c.heads.len() {
            c.wait_ready(true, i)?;
        }
        if c.token.is_none() {
            let t = std::fs::read_to_string(c.token_path())
                .context("the first head did not generate a cluster token")?;
            c.token = Some(t.trim().to_owned());
        }
        c.node_flags = token_args.iter().chain(&opts.extra_args).cloned().collect();
        for i in 0..opts.nodes {
            let mut args = vec![
                format!("--address={}", head_addrs.join(",")),
                format!(
                    "--data-dir={}",
                    c.dir.path().join(format!("node-{i}")).display()
                ),
                format!("--num-cpus={}", opts.node_cpus),
                "--memory=1GiB".into(),
                format!("--resources={}", {
                    let mut m = serde_json::Map::new();
                    m.insert(format!("node{i}"), 1.into());
                    for (k, v) in &opts.node_resources {
                        m.insert(k.clone(), (*v).into());
                    }
                    Value::Object(m)
                }),
            ];
            args.extend(token_args.clone());
            args.extend(opts.extra_args.clone());
            let p = c.spawn(&format!("node-{i}"), args)?;
            c.nodes.push(p);
        }
        for i in 0..c.nodes.len() {
            c.wait_ready(false, i)?;
        }
        Ok(c)
    }

    /// Where the heads of this cluster generate its token (`RAYCTL_AUTH_TOKEN_PATH`).
    pub fn token_path(&self) -> PathBuf {
        self.dir.path().join("auth_token")
    }

    /// Where the heads of this cluster keep their peer secret (`RAYCTL_PEER_SECRET_PATH`).
    pub fn peer_secret_path(&self) -> PathBuf {
        self.dir.path().join("peer_secret")
    }

    /// A client process of this cluster: its session root and its token in the environment.
    pub fn client_env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("RAYCTL_TMPDIR", self.dir.path())
            .env_remove(protocol::auth::AUTH_TOKEN_PATH_ENV)
            .env_remove(protocol::auth::PEER_SECRET_PATH_ENV);
        match &self.token {
            Some(t) => cmd.env(protocol::AUTH_TOKEN_ENV, t),
            None => cmd.env_remove(protocol::AUTH_TOKEN_ENV),
        }
    }

    /// The value of the first series of a process's `/metrics` (on `port`) that starts with
    /// `name` (a metric name, or a name with labels).
    pub fn metric(&self, port: u64, name: &str) -> Option<f64> {
        let mut req = ureq::get(&format!("http://127.0.0.1:{port}/metrics"));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let text = req.call().ok()?.body_mut().read_to_string().ok()?;
        find_metric(&text, name)
    }

    /// The sum over every label set of series `name` at a `/metrics` port.
    pub fn metric_sum(&self, port: u64, name: &str) -> Option<f64> {
        let mut req = ureq::get(&format!("http://127.0.0.1:{port}/metrics"));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let text = req.call().ok()?.body_mut().read_to_string().ok()?;
        Some(
            text.lines()
                .filter(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
                })
                .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                .sum(),
        )
    }

    fn spawn(&self, name: &str, args: Vec<String>) -> Result<Proc> {
        let mut p = Proc::daemon(self.dir.path(), name, args);
        self.launch(&mut p)?;
        Ok(p)
    }

    fn launch(&self, p: &mut Proc) -> Result<()> {
        let _ = std::fs::remove_file(&p.ready_file);
        std::fs::create_dir_all(
            self.dir
                .path()
                .join(format!("{}-session", p.name))
                .join("logs"),
        )?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.log)?;
        let child = Command::new(&self.bin)
            .args(&p.args)
            .env("RAYCTL_TMPDIR", self.dir.path())
            .env(protocol::auth::AUTH_TOKEN_PATH_ENV, self.token_path())
            .env(
                protocol::auth::PEER_SECRET_PATH_ENV,
                self.peer_secret_path(),
            )
            .env_remove(protocol::AUTH_TOKEN_ENV)
            .env_remove(protocol::auth::AUTH_MODE_ENV)
            .env_remove(protocol::ADDRESS_ENV)
            .envs(self.daemon_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", p.name))?;
        p.child = Some(child);
        Ok(())
    }

    fn wait_ready(&mut self, head: bool, i: usize) -> Result<()> {
        if head {
            self.heads[i].wait_ready()
        } else {
            self.nodes[i].wait_ready()
        }
    }

    /// Starts one more worker node with `cpus` CPUs and the resource `node<i>: 1` (a node
    /// that has never seen a job's binary). Returns its index in `nodes`, once it is ready.
    pub fn add_node(&mut self, cpus: f64) -> Result<usize> {
        let i = self.nodes.len();
        let mut args = vec![
            format!("--address={}", self.head_addrs.join(",")),
            format!(
                "--data-dir={}",
                self.dir.path().join(format!("node-{i}")).display()
            ),
            format!("--num-cpus={cpus}"),
            "--memory=1GiB".into(),
            format!("--resources={{\"node{i}\": 1}}"),
        ];
        args.extend(self.node_flags.clone());
        let p = self.spawn(&format!("node-{i}"), args)?;
        self.nodes.push(p);
        self.wait_ready(false, i)?;
        Ok(i)
    }

    /// Starts a new head that joins the existing group with `--join` (it asks the leader to
    /// add it as a voter). Returns its index in `heads`.
    pub fn add_joining_head(&mut self) -> Result<usize> {
        let i = self.heads.len();
        let port = free_port();
        let args = vec![
            "--head".to_string(),
            format!("--port={port}"),
            "--dashboard-port=0".into(),
            format!("--join={}", self.head_addrs.join(",")),
            format!(
                "--data-dir={}",
                self.dir.path().join(format!("head-{i}")).display()
            ),
            "--num-cpus=1".into(),
            "--memory=1GiB".into(),
        ];
        let p = self.spawn(&format!("head-{i}"), args)?;
        self.heads.push(p);
        self.head_addrs.push(format!("127.0.0.1:{port}"));
        self.wait_ready(true, i)?;
        Ok(i)
    }

    /// Starts head `i` again with its original arguments and data dir.
    pub fn restart_head(&mut self, i: usize) -> Result<()> {
        self.restart(true, i)
    }

    /// Starts worker node `i` again with its original arguments and data dir.
    pub fn restart_node(&mut self, i: usize) -> Result<()> {
        self.restart(false, i)
    }

    fn restart(&mut self, head: bool, i: usize) -> Result<()> {
        let list = if head {
            &mut self.heads
        } else {
            &mut self.nodes
        };
        list[i].kill9();
        let mut p = std::mem::replace(&mut list[i], placeholder());
        let r = self.launch(&mut p);
        if head {
            self.heads[i] = p
        } else {
            self.nodes[i] = p
        }
        r?;
        self.wait_ready(head, i)
    }

    pub fn auth(&self) -> Option<AuthToken> {
        self.token
            .as_deref()
            .and_then(|t| AuthToken::new(t, "test").ok())
    }

    /// A client holding every head address.
    pub fn client(&self) -> HeadClient {
        self.client_for(&self.head_addrs, ClientOptions::default())
    }

    pub fn client_for(&self, addrs: &[String], opts: ClientOptions) -> HeadClient {
        HeadClient::new(addrs, self.auth(), opts).expect("valid addresses")
    }

    /// Replaces the autoscaling config (`rayctl autoscaler apply` of a file holding `yaml`).
    pub fn apply_autoscaling(&self, yaml: &str) -> Result<()> {
        let n = APPLIED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let f = self.path().join(format!("autoscaling-{n}.yaml"));
        std::fs::write(&f, yaml)?;
        let (code, _, err) = self.rayctl(&[
            "autoscaler",
            "apply",
            f.to_str().context("path")?,
            "--address",
            &self.head_addrs.join(","),
        ])?;
        if code != 0 {
            bail!("rayctl autoscaler apply exited {code}: {err}");
        }
        Ok(())
    }

    /// Runs `rayctl ARGS` against this cluster and returns (exit code, stdout, stderr).
    pub fn rayctl(&self, args: &[&str]) -> Result<(i32, String, String)> {
        let mut cmd = Command::new(&self.bin);
        self.client_env(cmd.args(args).env_remove(protocol::ADDRESS_ENV));
        let out = cmd.output().context("run rayctl")?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `rayctl job submit --no-wait ARGS… -- ENTRYPOINT` against every head; the job id.
    pub fn submit_job(&self, args: &[&str], entrypoint: &str) -> Result<String> {
        let addrs = self.head_addrs.join(",");
        let mut all = vec!["job", "submit", "--no-wait", "--address", &addrs];
        all.extend_from_slice(args);
        all.extend(["--", entrypoint]);
        let (code, out, err) = self.rayctl(&all)?;
        if code != 0 {
            bail!("rayctl job submit exited {code}: {out} {err}");
        }
        out.trim()
            .rsplit(' ')
            .next()
            .map(str::to_owned)
            .context("no job id in the output")
    }

    /// `rayctl status -o json --address ADDR` (ADDR: one head, or all when `None`).
    pub fn status(&self, via: Option<usize>) -> Result<Value> {
        let addr = match via {
            Some(i) => self.head_addrs[i].clone(),
            None => self.head_addrs.join(","),
        };
        let (code, out, err) = self.rayctl(&[
            "status",
            "-o",
            "json",
            "--timeout",
            "5s",
            "--address",
            &addr,
        ])?;
        if code != 0 {
            bail!("rayctl status exited {code}: {err}");
        }
        Ok(serde_json::from_str(&out)?)
    }

    /// Index of the current leader in `heads`, once one is elected and serving.
    pub fn wait_leader(&self, timeout: Duration) -> Result<usize> {
        wait_for("a leader", timeout, || {
            let s = self.status(None).ok()?;
            let l = s["leader"].as_str()?.to_string();
            self.head_addrs.iter().position(|a| *a == l)
        })
    }

    /// Nodes in `status` with the given state.
    /// Waits until the leader sees `n` nodes ALIVE (up to a minute).
    pub fn wait_alive(&self, n: usize) -> Result<()> {
        wait_for(&format!("{n} alive nodes"), Duration::from_secs(60), || {
            let s = self.status(None).ok()?;
            (Self::nodes_in_state(&s, "ALIVE").len() == n).then_some(())
        })
    }

    pub fn nodes_in_state(status: &Value, state: &str) -> Vec<Value> {
        status["nodes"]
            .as_array()
            .map(|a| a.iter().filter(|n| n["state"] == state).cloned().collect())
            .unwrap_or_default()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

pub(crate) fn placeholder() -> Proc {
    Proc {
        name: String::new(),
        args: vec![],
        ready_file: PathBuf::new(),
        log: PathBuf::new(),
        child: None,
        ready: Value::Null,
        exit_status: None,
    }
}
