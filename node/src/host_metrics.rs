//! The series Ray's default Grafana dashboard reads about a node, under Ray's names and
//! labels (Ray 2.60, `dashboard/modules/metrics/dashboards/default_dashboard_panels.py`):
//! the machine (`ray_node_*`: CPU, memory, disk, disk and network speed), the processes of
//! this node by component (`ray_component_*`), the logical resources (`ray_resources{Name,
//! State}`), and tasks by state and function (`ray_tasks{State,Name,IsRetry,Source}`).
//! Machine figures come from `sysinfo`; per-process shared memory from `/proc/PID/statm`
//! (sysinfo does not read it). Refreshed every few seconds by the node daemon.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use metrics::{Unit, counter, describe_counter, describe_gauge, gauge};
use sysinfo::{Disks, Networks, Pid, ProcessRefreshKind, ProcessesToUpdate, System};

use crate::NodeShared;

pub(crate) const CPU_UTILIZATION: &str = "ray_node_cpu_utilization";
pub(crate) const CPU_COUNT: &str = "ray_node_cpu_count";
pub(crate) const MEM_USED: &str = "ray_node_mem_used_host";
pub(crate) const MEM_TOTAL: &str = "ray_node_mem_total_host";
pub(crate) const MEM_SHARED: &str = "ray_node_mem_shared_bytes";
pub(crate) const DISK_USAGE: &str = "ray_node_disk_usage";
pub(crate) const DISK_FREE: &str = "ray_node_disk_free";
pub(crate) const DISK_READ: &str = "ray_node_disk_io_read_speed";
pub(crate) const DISK_WRITE: &str = "ray_node_disk_io_write_speed";
pub(crate) const NET_RECEIVE: &str = "ray_node_network_receive_speed";
pub(crate) const NET_SEND: &str = "ray_node_network_send_speed";
pub(crate) const COMPONENT_CPU: &str = "ray_component_cpu_percentage";
pub(crate) const COMPONENT_RSS: &str = "ray_component_rss_bytes";
pub(crate) const COMPONENT_SHARED: &str = "ray_component_shared_bytes";
pub(crate) const RESOURCES: &str = "ray_resources";
pub(crate) const WORKER_FAILURES: &str = "ray_node_manager_unexpected_worker_failure_total";

pub(crate) fn describe() {
    describe_gauge!(
        CPU_UTILIZATION,
        "the machine's CPU use, percent of all cores"
    );
    describe_gauge!(CPU_COUNT, "the machine's logical CPUs");
    describe_gauge!(MEM_USED, Unit::Bytes, "the machine's memory in use");
    describe_gauge!(MEM_TOTAL, Unit::Bytes, "the machine's memory");
    describe_gauge!(
        MEM_SHARED,
        Unit::Bytes,
        "shared memory in use on the machine (Shmem: the object store arena is in it)"
    );
    describe_gauge!(
        DISK_USAGE,
        Unit::Bytes,
        "bytes used on the file system of the node's session directory"
    );
    describe_gauge!(
        DISK_FREE,
        Unit::Bytes,
        "bytes free on the file system of the node's session directory"
    );
    describe_gauge!(DISK_READ, "bytes per second read from the machine's disks");
    describe_gauge!(
        DISK_WRITE,
        "bytes per second written to the machine's disks"
    );
    describe_gauge!(
        NET_RECEIVE,
        "bytes per second received on the machine's interfaces"
    );
    describe_gauge!(
        NET_SEND,
        "bytes per second sent on the machine's interfaces"
    );
    describe_gauge!(
        COMPONENT_CPU,
        "CPU use of this node's processes by component (raylet: the node daemon, gcs: its head, ray::IDLE and ray::worker: workers, driver), percent of one core"
    );
    describe_gauge!(
        COMPONENT_RSS,
        Unit::Bytes,
        "resident memory of this node's processes by component"
    );
    describe_gauge!(
        COMPONENT_SHARED,
        Unit::Bytes,
        "resident shared memory of this node's processes by component"
    );
    describe_gauge!(
        "ray_actors",
        "actors whose workers run on this node, by State and Name (class), Source=executor"
    );
    describe_gauge!(
        RESOURCES,
        "logical resources of this node by Name and State (AVAILABLE, USED)"
    );
    describe_counter!(
        WORKER_FAILURES,
        "worker processes that died while running work (a task lease or an actor) without this node killing them or a clean exit, by Type and Name (the actor's class)"
    );
    // None so far: the series is there from the start, at zero.
    counter!(WORKER_FAILURES, "Type" => "SYSTEM_ERROR", "Name" => "").absolute(0);
}

/// A worker died while running work, not killed by this node and not a clean exit.
pub(crate) fn worker_failed(name: String) {
    counter!(WORKER_FAILURES, "Type" => "SYSTEM_ERROR", "Name" => name).increment(1);
}

/// Shared resident bytes of a process (`/proc/PID/statm`, third field, in pages).
fn shared_bytes(pid: u32) -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse::<u64>().ok())
        .map_or(0, |p| p * page)
}

/// `Shmem` of `/proc/meminfo`, in bytes.
fn shmem_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("Shmem:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Keeps what the rates need between refreshes.
pub(crate) struct HostMetrics {
    sys: System,
    disks: Disks,
    networks: Networks,
    last: Instant,
    node_type: &'static str,
    ip: String,
    /// Label sets set last round, so those gone are set to zero (not left stale).
    components: HashSet<String>,
    tasks: HashSet<(String, String, &'static str)>,
    actors: HashSet<(&'static str, String)>,
}

impl HostMetrics {
    pub(crate) fn new(is_head: bool, ip: &str) -> Self {
        let mut sys = System::new();
        sys.refresh_cpu_usage();
        Self {
            sys,
            disks: Disks::new_with_refreshed_list(),
            networks: Networks::new_with_refreshed_list(),
            last: Instant::now(),
            node_type: if is_head { "head" } else { "worker" },
            ip: ip.to_owned(),
            components: HashSet::new(),
            tasks: HashSet::new(),
            actors: HashSet::new(),
        }
    }

    /// Refreshes every series from the machine and the node's state.
    pub(crate) fn record(&mut self, sh: &NodeShared) {
        let secs = self.last.elapsed().as_secs_f64().max(0.001);
        self.last = Instant::now();
        let l = [("RayNodeType", self.node_type), ("ip", self.ip.as_str())];
        let labels = || {
            l.iter()
                .map(|(k, v)| metrics::Label::new(*k, v.to_string()))
                .collect::<Vec<_>>()
        };

        self.sys.refresh_cpu_usage();
        self.sys.refresh_memory();
        gauge!(CPU_UTILIZATION, labels()).set(f64::from(self.sys.global_cpu_usage()));
        gauge!(CPU_COUNT, labels()).set(self.sys.cpus().len() as f64);
        gauge!(MEM_USED, labels()).set(self.sys.used_memory() as f64);
        gauge!(MEM_TOTAL, labels()).set(self.sys.total_memory() as f64);
        gauge!(MEM_SHARED, labels()).set(shmem_bytes() as f64);

        self.disks.refresh(true);
        let (mut read, mut written) = (0u64, 0u64);
        for d in self.disks.list() {
            let u = d.usage();
            read += u.read_bytes;
            written += u.written_bytes;
        }
        gauge!(DISK_READ, labels()).set(read as f64 / secs);
        gauge!(DISK_WRITE, labels()).set(written as f64 / secs);
        // The file system of the session directory: the longest mount point above it.
        if let Some(d) = self
            .disks
            .list()
            .iter()
            .filter(|d| sh.log_dir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len())
        {
            gauge!(DISK_USAGE, labels())
                .set(d.total_space().saturating_sub(d.available_space()) as f64);
            gauge!(DISK_FREE, labels()).set(d.available_space() as f64);
        }

        self.networks.refresh(true);
        let (mut rx, mut tx) = (0u64, 0u64);
        for (_, n) in self.networks.iter() {
            rx += n.received();
            tx += n.transmitted();
        }
        gauge!(NET_RECEIVE, labels()).set(rx as f64 / secs);
        gauge!(NET_SEND, labels()).set(tx as f64 / secs);

        self.components(sh);
        self.resources(sh);
    }

    /// CPU and memory of this node's processes by component.
    fn components(&mut self, sh: &NodeShared) {
        let mut pids: Vec<(u32, &'static str)> = vec![(std::process::id(), "raylet")];
        if sh.is_head {
            // A head's node daemon is its child.
            pids.push((std::os::unix::process::parent_id(), "gcs"));
        }
        for p in sh.workers.processes() {
            let c = if p.worker_id.is_empty() {
                "driver"
            } else if p.tasks_running == 0 {
                "ray::IDLE"
            } else {
                "ray::worker"
            };
            pids.push((p.pid, c));
        }
        let ids: Vec<Pid> = pids.iter().map(|(p, _)| Pid::from_u32(*p)).collect();
        self.sys.refresh_processes_specifics(
            ProcessesToUpdate::Some(&ids),
            true,
            ProcessRefreshKind::nothing().with_cpu().with_memory(),
        );
        let mut by: BTreeMap<&'static str, (f64, u64, u64)> = BTreeMap::new();
        for (pid, c) in &pids {
            if let Some(p) = self.sys.process(Pid::from_u32(*pid)) {
                let e = by.entry(c).or_default();
                e.0 += f64::from(p.cpu_usage());
                e.1 += p.memory();
                e.2 += shared_bytes(*pid);
            }
        }
        let now: HashSet<String> = by.keys().map(|c| c.to_string()).collect();
        for gone in self.components.difference(&now) {
            for m in [COMPONENT_CPU, COMPONENT_RSS, COMPONENT_SHARED] {
                gauge!(m, "Component" => gone.clone(), "ip" => self.ip.clone()).set(0.0);
            }
        }
        for (c, (cpu, rss, shared)) in by {
            gauge!(COMPONENT_CPU, "Component" => c, "ip" => self.ip.clone()).set(cpu);
            gauge!(COMPONENT_RSS, "Component" => c, "ip" => self.ip.clone()).set(rss as f64);
            gauge!(COMPONENT_SHARED, "Component" => c, "ip" => self.ip.clone()).set(shared as f64);
        }
        self.components = now;
    }

    /// Logical resources: what the node has and what is free, and the object store's bytes
    /// as Ray's `object_store_memory` resource.
    fn resources(&self, sh: &NodeShared) {
        let total = sh.leases.total();
        let available = sh.leases.available();
        for (name, t) in total.iter() {
            let a = available.get(name);
            gauge!(RESOURCES, "Name" => name.to_owned(), "State" => "AVAILABLE").set(a);
            gauge!(RESOURCES, "Name" => name.to_owned(), "State" => "USED").set(t - a);
        }
        let s = sh.store.stats();
        gauge!(RESOURCES, "Name" => "object_store_memory", "State" => "AVAILABLE")
            .set(s.capacity.saturating_sub(s.used) as f64);
        gauge!(RESOURCES, "Name" => "object_store_memory", "State" => "USED").set(s.used as f64);
    }

    /// Actors whose workers run on this node (Ray's `Source="executor"` view).
    pub(crate) fn actors(&mut self, counts: HashMap<(&'static str, String), u64>) {
        let mut now = HashSet::new();
        for ((state, class), n) in counts {
            gauge!("ray_actors", "State" => state, "Name" => class.clone(), "Source" => "executor", "NodeAddress" => self.ip.clone())
                .set(n as f64);
            now.insert((state, class));
        }
        for (state, class) in self.actors.difference(&now) {
            gauge!("ray_actors", "State" => *state, "Name" => class.clone(), "Source" => "executor", "NodeAddress" => self.ip.clone())
                .set(0.0);
        }
        self.actors = now;
    }

    /// Tasks owned by processes of this node, by state, function and whether a retry, from
    /// the node's task table (each task is reported by its owner only, so nothing is counted
    /// twice across nodes), as `Source="owner"`. What runs here is `Source="executor"`
    /// (`metrics::workers`).
    pub(crate) fn tasks(&mut self, counts: HashMap<(String, String, bool), u64>) {
        let mut now = HashSet::new();
        for ((state, name, retry), n) in counts {
            let is_retry = if retry { "1" } else { "0" };
            gauge!(crate::metrics::TASKS, "State" => state.clone(), "Name" => name.clone(), "IsRetry" => is_retry, "Source" => "owner")
                .set(n as f64);
            now.insert((state, name, is_retry));
        }
        for (state, name, is_retry) in self.tasks.difference(&now) {
            gauge!(crate::metrics::TASKS, "State" => state.clone(), "Name" => name.clone(), "IsRetry" => *is_retry, "Source" => "owner")
                .set(0.0);
        }
        self.tasks = now;
    }
}
