//! A cluster of real processes in network namespaces: every head and node is a host of its
//! own (`ip netns`), with its own address on a bridge this fixture creates, so a partition
//! between any two sets of hosts is a firewall rule inside their namespaces (`nft`,
//! `../shared/CHAOS.md` §2). Used by the partition tests and, later, the chaos harness.
//!
//! The test process itself sits in the root namespace as an observer: the bridge carries its
//! address (`.254`), which no partition rule names, so it can always ask every head.
//!
//! Invariant: everything a `NetCluster` creates (processes, veths, the bridge, namespaces,
//! its temp dir) is removed when it drops, also when the test panics; a run that was killed
//! leaves names that carry its pid, and [`clean_leftovers`] (called by every `start`)
//! removes those whose pid no longer runs. Traffic goes only to addresses inside the
//! namespaces made here.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use protocol::auth::AuthToken;
use protocol::client::{ClientOptions, HeadClient};
use serde_json::Value;

use crate::Proc;

/// Every name this fixture makes starts with this, then the creating pid.
const PREFIX: &str = "rcn";
/// Temp dirs are `<tmp>/rayctl-netns-<pid>-…`.
const DIR_PREFIX: &str = "rayctl-netns-";
const HEAD_PORT: u16 = 7000;
const DASHBOARD_PORT: u16 = 8265;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Checks that this machine can build namespaces: root, `ip` (iproute2) and `nft` (nftables).
pub fn check_prerequisites() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("network-namespace tests need root (CI runs as root)");
    }
    for (tool, pkg) in [("ip", "iproute2"), ("nft", "nftables")] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            bail!("`{tool}` is missing: apt-get install {pkg} (.ci/run does)");
        }
    }
    Ok(())
}

/// Removes namespaces and links of earlier runs whose creating process is gone.
pub fn clean_leftovers() {
    let dead = |name: &str| -> bool {
        name.strip_prefix(PREFIX)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(links) = ip(&["-o", "link", "show"]) {
        for l in links.lines() {
            let name = l
                .split(':')
                .nth(1)
                .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
                .unwrap_or_default();
            if dead(&name) {
                let _ = ip(&["link", "del", &name]);
            }
        }
    }
    if let Ok(list) = ip(&["netns", "list"]) {
        for l in list.lines() {
            let name = l.split_whitespace().next().unwrap_or("");
            if dead(name) {
                kill_in(name);
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
    // Temp dirs of dead runs, after unmounting whatever a scenario mounted below them (a
    // small tmpfs for a full disk).
    let tmp = std::env::temp_dir();
    let dead_dir = |name: &str| -> bool {
        name.strip_prefix(DIR_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(rd) = std::fs::read_dir(&tmp) {
        for e in rd.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead_dir(&name) {
                unmount_below(&e.path());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Unmounts (lazily) every mount point at or below `dir`, deepest first.
pub fn unmount_below(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    points.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in points {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// SIGKILLs every process in namespace `ns`.
fn kill_in(ns: &str) {
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for p in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = kill(Pid::from_raw(p), Signal::SIGCONT);
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
}

/// One host: a namespace, the host side of its veth, and its address.
pub struct Host {
    pub ns: String,
    pub veth: String,
    pub ip: String,
}

pub struct NetOptions {
    pub heads: usize,
    pub nodes: usize,
    pub health_period: Duration,
    pub health_threshold: u32,
    /// Custom resources of worker node `i` (besides its own `node<i>: 1`).
    pub node_resources: Vec<(String, f64)>,
    pub node_cpus: f64,
    /// Hosts for heads that join later (`join_head`), after the worker nodes' hosts.
    pub spare_heads: usize,
    /// Extra arguments of every head (e.g. `--raft-snapshot-interval=100`).
    pub head_args: Vec<String>,
    /// Extra arguments of every worker node (e.g. `--object-store-memory=32MiB`).
    pub node_args: Vec<String>,
    /// Hosts with no daemon, after the worker nodes' (for clients that a partition can name).
    pub clients: usize,
    /// Each head's Raft store (`<data dir>/raft`) on a tmpfs of this size (e.g. "32m"), so a
    /// scenario can fill it.
    pub store_tmpfs: Option<String>,
    /// Extra environment of the daemon on host `i` (heads first, then nodes), e.g.
    /// libfaketime's. `{dir}` in a value stands for the cluster's temp dir.
    pub env: Vec<(usize, Vec<(String, String)>)>,
}

impl Default for NetOptions {
    fn default() -> Self {
        Self {
            heads: 3,
            nodes: 2,
            health_period: Duration::from_millis(500),
            health_threshold: 5,
            node_resources: Vec::new(),
            node_cpus: 1.0,
            clients: 0,
            spare_heads: 0,
            head_args: Vec::new(),
            node_args: Vec::new(),
            store_tmpfs: None,
            env: Vec::new(),
        }
    }
}

pub struct NetCluster {
    pub dir: tempfile::TempDir,
    /// Heads' hosts first (`0..heads`), then the worker nodes' (`heads..`).
    pub hosts: Vec<Host>,
    pub heads: Vec<Proc>,
    pub nodes: Vec<Proc>,
    pub head_addrs: Vec<String>,
    pub token: String,
    bridge: String,
    bin: PathBuf,
    /// Extra environment of each host's daemon, kept across restarts (e.g. libfaketime).
    host_env: Vec<Vec<(String, String)>>,
    /// The heads' store filesystems, when `store_tmpfs` asked for them (by head).
    pub stores: Vec<crate::disk::Tmpfs>,
    /// The host of each head (a joined head's is a spare host, not its index).
    head_hosts: Vec<usize>,
    /// Spare hosts not yet used by `join_head`.
    spare: Vec<usize>,
    /// The first worker node's host (the heads started with the cluster come before).
    node_base: usize,
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        for p in self.heads.iter_mut().chain(self.nodes.iter_mut()) {
            p.kill9();
        }
        for h in &self.hosts {
            // Heads' node daemons, workers and drivers started in the namespace die too.
            kill_in(&h.ns);
        }
        // Veths first (namespace deletion is asynchronous), then namespaces, then the bridge.
        for h in &self.hosts {
            let _ = ip(&["link", "del", &h.veth]);
        }
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
        unmount_below(self.dir.path());
    }
}

impl NetCluster {
    /// Builds the hosts, starts `heads` heads (one group) and `nodes` worker nodes in them,
    /// and waits until every daemon is ready.
    pub fn start(opts: NetOptions) -> Result<Self> {
        check_prerequisites()?;
        clean_leftovers();
        let bin = crate::rayctl_bin()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{PREFIX}{pid}x{n}");
        anyhow::ensure!(
            tag.len() + 3 <= 15,
            "interface names would be too long: {tag}"
        );
        // 10.<a>.<b>.0/24, unique per (pid, cluster) among the runs alive here.
        let (a, b) = (100 + (n % 100) as u8, (pid % 251) as u8);
        let subnet = format!("10.{a}.{b}");
        if ip(&["route", "show", &format!("{subnet}.0/24")])?.trim() != "" {
            bail!("subnet {subnet}.0/24 is in use on this machine");
        }
        // The pid in the name lets `clean_leftovers` find a killed run's directory.
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{pid}-"))
            .tempdir()?;
        let bridge = format!("{tag}br");
        let mut c = NetCluster {
            dir,
            hosts: Vec::new(),
            heads: Vec::new(),
            nodes: Vec::new(),
            head_addrs: Vec::new(),
            token: String::new(),
            bridge: bridge.clone(),
            bin,
            host_env: vec![Vec::new(); opts.heads + opts.nodes],
            stores: Vec::new(),
            head_hosts: (0..opts.heads).collect(),
            spare: (opts.heads + opts.nodes..opts.heads + opts.nodes + opts.spare_heads).collect(),
            node_base: opts.heads,
        };
        for (host, env) in &opts.env {
            let dir = c.dir.path().display().to_string();
            if let Some(slot) = c.host_env.get_mut(*host) {
                *slot = env
                    .iter()
                    .map(|(k, v)| (k.clone(), v.replace("{dir}", &dir)))
                    .collect();
            }
        }
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{subnet}.254/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..opts.heads + opts.nodes + opts.spare_heads + opts.clients {
            let ns = format!("{tag}h{i}");
            let veth = format!("{tag}v{i}");
            let addr = format!("{subnet}.{}", i + 1);
            ip(&["netns", "add", &ns])?;
            // Recorded before the rest, so a failure below still cleans this host up.
            c.hosts.push(Host {
                ns: ns.clone(),
                veth: veth.clone(),
                ip: addr.clone(),
            });
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", &bridge])?;
            ip(&["link", "set", &veth, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        c.head_addrs = (0..opts.heads)
            .map(|i| format!("{}:{HEAD_PORT}", c.hosts[i].ip))
            .collect();
        if let Some(size) = &opts.store_tmpfs {
            for i in 0..opts.heads {
                let store = c.dir.path().join(format!("head-{i}")).join("raft");
                c.stores.push(crate::disk::Tmpfs::mount(&store, size)?);
            }
        }
        for i in 0..opts.heads {
            let hostip = c.hosts[i].ip.clone();
            let mut args = vec![
                "--head".to_string(),
                format!("--port={HEAD_PORT}"),
                format!("--dashboard-port={DASHBOARD_PORT}"),
                format!("--peers={}", c.head_addrs.join(",")),
                format!("--bind-host={hostip}"),
                format!("--node-ip-address={hostip}"),
                format!(
                    "--data-dir={}",
                    c.dir.path().join(format!("head-{i}")).display()
                ),
                format!("--health-check-period={}ms", opts.health_period.as_millis()),
                format!("--health-check-failure-threshold={}", opts.health_threshold),
                "--num-cpus=1".into(),
                "--memory=1GiB".into(),
            ];
            args.extend(opts.head_args.iter().cloned());
            let p = c.spawn(&format!("head-{i}"), i, args)?;
            c.heads.push(p);
        }
        for i in 0..c.heads.len() {
            c.wait_ready(true, i)?;
        }
        c.token = std::fs::read_to_string(c.token_path())
            .context("the first head did not generate a cluster token")?
            .trim()
            .to_owned();
        for i in 0..opts.nodes {
            let host = opts.heads + i;
            let hostip = c.hosts[host].ip.clone();
            let mut res = serde_json::Map::new();
            res.insert(format!("node{i}"), 1.into());
            for (k, v) in &opts.node_resources {
                res.insert(k.clone(), (*v).into());
            }
            let mut args = vec![
                format!("--address={}", c.head_addrs.join(",")),
                format!("--bind-host={hostip}"),
                format!("--node-ip-address={hostip}"),
                format!(
                    "--data-dir={}",
                    c.dir.path().join(format!("node-{i}")).display()
                ),
                format!("--num-cpus={}", opts.node_cpus),
                "--memory=1GiB".into(),
                format!("--resources={}", Value::Object(res)),
            ];
            args.extend(opts.node_args.iter().cloned());
            let p = c.spawn(&format!("node-{i}"), host, args)?;
            c.nodes.push(p);
        }
        for i in 0..c.nodes.len() {
            c.wait_ready(false, i)?;
        }
        Ok(c)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn token_path(&self) -> PathBuf {
        self.dir.path().join("auth_token")
    }

    /// Index in `hosts` of head `i`.
    pub fn head_host(&self, i: usize) -> usize {
        self.head_hosts[i]
    }

    /// The addresses heads started on the spare hosts will have.
    pub fn spare_addresses(&self) -> Vec<String> {
        self.spare
            .iter()
            .map(|h| format!("{}:{HEAD_PORT}", self.hosts[*h].ip))
            .collect()
    }

    /// Starts a head on the next spare host that joins the group (`--join`, it asks the
    /// leader to add it as a voter); waits until it is ready. Returns its index in `heads`.
    pub fn join_head(&mut self) -> Result<usize> {
        anyhow::ensure!(!self.spare.is_empty(), "no spare host left for a head");
        let host = self.spare.remove(0);
        let i = self.heads.len();
        let hostip = self.hosts[host].ip.clone();
        let args = vec![
            "--head".to_string(),
            format!("--port={HEAD_PORT}"),
            format!("--dashboard-port={DASHBOARD_PORT}"),
            format!("--join={}", self.head_addrs.join(",")),
            format!("--bind-host={hostip}"),
            format!("--node-ip-address={hostip}"),
            format!(
                "--data-dir={}",
                self.dir.path().join(format!("head-{i}")).display()
            ),
            "--num-cpus=1".into(),
            "--memory=1GiB".into(),
        ];
        let p = self.spawn(&format!("head-{i}"), host, args)?;
        self.heads.push(p);
        self.head_hosts.push(host);
        self.head_addrs.push(format!("{hostip}:{HEAD_PORT}"));
        self.heads[i].wait_ready()?;
        Ok(i)
    }

    /// Index in `hosts` of worker node `i`.
    pub fn node_host(&self, i: usize) -> usize {
        self.node_base + i
    }

    /// `ip netns exec <host's namespace> program`, with this cluster's session root and token.
    pub fn exec(&self, host: usize, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.hosts[host].ns])
            .arg(program)
            .env("RAYCTL_TMPDIR", self.dir.path())
            .env(protocol::AUTH_TOKEN_ENV, &self.token)
            .env(protocol::ADDRESS_ENV, self.head_addrs.join(","))
            .env_remove(protocol::auth::AUTH_TOKEN_PATH_ENV)
            .env_remove(protocol::auth::PEER_SECRET_PATH_ENV)
            .env_remove("RAYCTL_NODE_ADDRESS")
            .env_remove("RAYCTL_WORKER_ID")
            .env_remove("RAYCTL_REMOTE");
        cmd
    }

    fn spawn(&self, name: &str, host: usize, args: Vec<String>) -> Result<Proc> {
        let mut p = Proc::daemon(self.dir.path(), name, args);
        self.launch(&mut p, host)?;
        Ok(p)
    }

    fn launch(&self, p: &mut Proc, host: usize) -> Result<()> {
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
        // `ip netns exec` execs the daemon, so the child's pid is the daemon's.
        let extra = self.host_env.get(host).cloned().unwrap_or_default();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.hosts[host].ns])
            .arg(&self.bin)
            .args(&p.args)
            .envs(extra)
            .env("RAYCTL_TMPDIR", self.dir.path())
            .env(protocol::auth::AUTH_TOKEN_PATH_ENV, self.token_path())
            .env(
                protocol::auth::PEER_SECRET_PATH_ENV,
                self.dir.path().join("peer_secret"),
            )
            .env_remove(protocol::AUTH_TOKEN_ENV)
            .env_remove(protocol::auth::AUTH_MODE_ENV)
            .env_remove(protocol::ADDRESS_ENV)
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

    /// Head `i` again, with its arguments and data dir (after a kill).
    pub fn restart_head(&mut self, i: usize) -> Result<()> {
        self.restart_heads(&[i])
    }

    /// Worker node `i` again, on its data dir (after a kill).
    pub fn restart_node(&mut self, i: usize) -> Result<()> {
        self.nodes[i].kill9();
        let mut p = std::mem::replace(&mut self.nodes[i], crate::placeholder());
        let r = self.launch(&mut p, self.node_base + i);
        self.nodes[i] = p;
        r?;
        self.wait_ready(false, i)
    }

    /// Sets (Some) or removes (None) variable `key` of host `host`'s daemon environment, from
    /// its next start on.
    pub fn set_env(&mut self, host: usize, key: &str, value: Option<&str>) {
        if let Some(env) = self.host_env.get_mut(host) {
            env.retain(|(k, _)| k != key);
            if let Some(v) = value {
                env.push((key.to_string(), v.to_string()));
            }
        }
    }

    /// Starts heads `which` again (after killing them) without waiting for them: a head
    /// set to crash at a fail point may never become ready.
    pub fn relaunch_heads(&mut self, which: &[usize]) -> Result<()> {
        for &i in which {
            self.heads[i].kill9();
            let mut p = std::mem::replace(&mut self.heads[i], crate::placeholder());
            let r = self.launch(&mut p, self.head_hosts[i]);
            self.heads[i] = p;
            r?;
        }
        Ok(())
    }

    /// Heads `which` again, all started before any is waited for (a head may need the
    /// others to become ready).
    pub fn restart_heads(&mut self, which: &[usize]) -> Result<()> {
        for &i in which {
            self.heads[i].kill9();
            let mut p = std::mem::replace(&mut self.heads[i], crate::placeholder());
            let r = self.launch(&mut p, self.head_hosts[i]);
            self.heads[i] = p;
            r?;
        }
        for &i in which {
            self.wait_ready(true, i)?;
        }
        Ok(())
    }

    /// Cuts every host of `a` off from every host of `b` (both ways), with drop rules inside
    /// their namespaces. Established connections stall rather than break, as on a real
    /// network. Replaces any earlier partition.
    pub fn partition(&self, a: &[usize], b: &[usize]) -> Result<()> {
        self.heal()?;
        for (side, other) in [(a, b), (b, a)] {
            let Some(set) = self.ip_set(other) else {
                continue;
            };
            for h in side {
                self.set_rules(
                    *h,
                    &[format!("ip saddr {set} drop")],
                    &[format!("ip daddr {set} drop")],
                )?;
            }
        }
        Ok(())
    }

    /// Drops what hosts `from` send to hosts `to`, and nothing the other way (rules at the
    /// receivers only). Replaces any earlier partition.
    pub fn one_way(&self, from: &[usize], to: &[usize]) -> Result<()> {
        self.heal()?;
        let Some(set) = self.ip_set(from) else {
            return Ok(());
        };
        for h in to {
            self.set_rules(*h, &[format!("ip saddr {set} drop")], &[])?;
        }
        Ok(())
    }

    /// Drops `percent` % of the packets every host of `hosts` receives on its link, at
    /// random (nft numgen). Replaces any earlier partition.
    pub fn lossy(&self, hosts: &[usize], percent: u32) -> Result<()> {
        self.heal()?;
        for h in hosts {
            self.set_rules(
                *h,
                &[format!(
                    "iifname \"eth0\" numgen random mod 100 < {percent} drop"
                )],
                &[],
            )?;
        }
        Ok(())
    }

    /// Sends every packet hosts `hosts` send to another host twice (nft `dup`, which only an
    /// `ip` family table takes). Undone by `heal`.
    pub fn duplicate(&self, hosts: &[usize]) -> Result<()> {
        for &h in hosts {
            let rules: String = self
                .hosts
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != h)
                .map(|(_, o)| format!("ip daddr {0} dup to {0} device \"eth0\"; ", o.ip))
                .collect();
            let text = format!(
                "add table ip chaosdup\ndelete table ip chaosdup\ntable ip chaosdup {{\n chain out {{ type filter hook output priority 0; policy accept; {rules}}}\n}}\n"
            );
            self.nft(h, &text)?;
        }
        Ok(())
    }

    /// Runs `nft -f -` with `text` inside host `h`'s namespace.
    fn nft(&self, h: usize, text: &str) -> Result<()> {
        let ns = &self.hosts[h].ns;
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("nft")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(text.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft in {ns} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Caps host `h`'s outgoing bandwidth with a token bucket (`tc tbf`), e.g. `"1mbit"`.
    pub fn cap_bandwidth(&self, h: usize, rate: &str) -> Result<()> {
        run(Command::new("ip").args([
            "netns",
            "exec",
            &self.hosts[h].ns,
            "tc",
            "qdisc",
            "replace",
            "dev",
            "eth0",
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "32kbit",
            "latency",
            "400ms",
        ]))
        .map(|_| ())
    }

    /// Removes host `h`'s bandwidth cap, if any.
    pub fn uncap_bandwidth(&self, h: usize) -> Result<()> {
        let q = run(Command::new("ip").args([
            "netns",
            "exec",
            &self.hosts[h].ns,
            "tc",
            "qdisc",
            "show",
            "dev",
            "eth0",
        ]))?;
        if q.contains("tbf") {
            run(Command::new("ip").args([
                "netns",
                "exec",
                &self.hosts[h].ns,
                "tc",
                "qdisc",
                "del",
                "dev",
                "eth0",
                "root",
            ]))?;
        }
        Ok(())
    }

    /// `{ a, b }` of the hosts' addresses, None when there are none.
    fn ip_set(&self, hosts: &[usize]) -> Option<String> {
        let ips: Vec<&str> = hosts.iter().map(|h| self.hosts[*h].ip.as_str()).collect();
        (!ips.is_empty()).then(|| format!("{{ {} }}", ips.join(", ")))
    }

    /// Installs (replacing) host `h`'s `inet chaos` table with these input and output rules.
    fn set_rules(&self, h: usize, input: &[String], output: &[String]) -> Result<()> {
        let body = format!(
            "table inet chaos {{\n chain in {{ type filter hook input priority 0; policy accept; {} }}\n chain out {{ type filter hook output priority 0; policy accept; {} }}\n}}\n",
            input.iter().map(|r| format!("{r};")).collect::<String>(),
            output.iter().map(|r| format!("{r};")).collect::<String>(),
        );
        // `add table` + `delete table` first makes the file replace, not extend, the table.
        self.nft(
            h,
            &format!("add table inet chaos\ndelete table inet chaos\n{body}"),
        )
    }

    /// Removes every partition rule.
    pub fn heal(&self) -> Result<()> {
        for h in &self.hosts {
            let has =
                run(Command::new("ip").args(["netns", "exec", &h.ns, "nft", "list", "tables"]))?;
            if has.contains("inet chaos") {
                run(Command::new("ip").args([
                    "netns", "exec", &h.ns, "nft", "delete", "table", "inet", "chaos",
                ]))?;
            }
            if has.contains("ip chaosdup") {
                run(Command::new("ip").args([
                    "netns", "exec", &h.ns, "nft", "delete", "table", "ip", "chaosdup",
                ]))?;
            }
        }
        Ok(())
    }

    /// A client in the root namespace (the observer), holding every head address.
    pub fn client(&self) -> HeadClient {
        let opts = ClientOptions {
            deadline: Duration::from_secs(5),
            rpc_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        HeadClient::new(
            &self.head_addrs,
            AuthToken::new(&self.token, "test").ok(),
            opts,
        )
        .expect("valid addresses")
    }

    /// `rayctl status -o json` from the observer through `via` (one head) or all heads.
    pub fn status(&self, via: Option<usize>) -> Result<Value> {
        let addr = match via {
            Some(i) => self.head_addrs[i].clone(),
            None => self.head_addrs.join(","),
        };
        let out = Command::new(&self.bin)
            .args([
                "status",
                "-o",
                "json",
                "--timeout",
                "3s",
                "--address",
                &addr,
            ])
            .env("RAYCTL_TMPDIR", self.dir.path())
            .env(protocol::AUTH_TOKEN_ENV, &self.token)
            .output()?;
        if !out.status.success() {
            bail!("rayctl status: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Index of the head that leads (as the majority's answer says).
    pub fn wait_leader(&self, timeout: Duration) -> Result<usize> {
        crate::wait_for("a leader", timeout, || {
            let s = self.status(None).ok()?;
            let l = s["leader"].as_str()?.to_string();
            self.head_addrs.iter().position(|a| *a == l)
        })
    }

    /// What head `i` says of itself (`HeadInfo`, which any head answers): (role, term).
    pub fn head_view(&self, i: usize) -> Option<(String, u64)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let opts = ClientOptions {
                deadline: Duration::from_secs(2),
                rpc_timeout: Duration::from_secs(1),
                ..Default::default()
            };
            let c = HeadClient::new(
                std::slice::from_ref(&self.head_addrs[i]),
                AuthToken::new(&self.token, "test").ok(),
                opts,
            )
            .ok()?;
            let r = c
                .call(|mut h| async move { h.head_info(protocol::pb::HeadInfoRequest {}).await })
                .await
                .ok()?;
            Some((r.role, r.term))
        })
    }
}
