//! The clap tree and the dispatch to each command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "rayctl",
    version,
    about = "Start, stop and inspect a rayctl cluster"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Start a head (`--head`) or a worker node (`--address`) on this machine.
    Start(Box<StartArgs>),
    /// Stop every daemon `rayctl start` started on this machine.
    Stop(StopArgs),
    /// Show the heads and nodes of the cluster.
    Status(StatusArgs),
    /// Submit and manage jobs.
    Job {
        #[command(subcommand)]
        command: JobCommand,
    },
    /// List actors, tasks, objects or placement groups.
    List(ListArgs),
    /// Summaries of the cluster's state (`summary tasks`: counts by function and state).
    Summary(SummaryArgs),
    /// Object store use per node: stored objects and their pins, and what each process owns.
    Memory(MemoryArgs),
    /// Cluster administration.
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// The autoscaler: its config (Ray's cluster YAML fields) and `request_resources`.
    Autoscaler {
        #[command(subcommand)]
        command: AutoscalerCommand,
    },
    /// Drains a worker node (refused while it is busy) and removes it from the cluster.
    DrainNode(DrainNodeArgs),
    /// Task events as a Chrome trace (Ray's `ray timeline`): open it in chrome://tracing or
    /// Perfetto.
    Timeline(TimelineArgs),
    /// Logs of nodes, workers, actors, tasks and jobs, through any head (Ray's `ray logs`).
    Logs {
        #[command(subcommand)]
        command: LogsCommand,
    },
    /// Prints a shell completion script: `rayctl completions bash > ~/.local/share/bash-completion/completions/rayctl`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum LogsCommand {
    /// A node's log files: lists those the glob matches, or prints the one it matches.
    Cluster {
        /// A glob over file names, e.g. 'worker-*' or node.log (default: every file).
        glob: Option<String>,
        /// The node (its id, an id prefix, or its IP; default: every live node).
        #[arg(long)]
        node_id: Option<String>,
        #[command(flatten)]
        opts: LogOpts,
    },
    /// The log of an actor's worker.
    Actor {
        /// The actor's id.
        id: String,
        #[command(flatten)]
        opts: LogOpts,
    },
    /// The log of the worker that ran a task (its latest attempt).
    Task {
        /// The task's id (or a unique prefix).
        id: String,
        #[command(flatten)]
        opts: LogOpts,
    },
    /// A worker process's log.
    Worker {
        /// The worker's id (as `rayctl list tasks` shows it).
        id: String,
        #[command(flatten)]
        opts: LogOpts,
    },
    /// A job driver's log (followed with -f until the job ends).
    Job {
        /// The job's (submission) id.
        id: String,
        #[command(flatten)]
        opts: LogOpts,
    },
}

#[derive(Args, Debug)]
pub(crate) struct LogOpts {
    /// Keep printing what is appended (a job's log until the job ends; others until Ctrl-C).
    #[arg(short = 'f', long)]
    pub(crate) follow: bool,
    /// Print only the last N lines (-1: the whole file).
    #[arg(long, default_value_t = 1000, allow_negative_numbers = true)]
    pub(crate) tail: i64,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Subcommand, Debug)]
pub(crate) enum AutoscalerCommand {
    /// Replaces the autoscaling config (checked first; every head then uses it).
    Apply {
        /// The YAML file (Ray's cluster config fields).
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Prints the config in use (JSON, which is YAML too); nothing when the autoscaler is off.
    Config(ClientArgs),
    /// Turns the autoscaler off: nodes it launched stay until removed by hand.
    Disable(ClientArgs),
    /// Ray's `request_resources`: the cluster keeps room for these (counting what is in
    /// use) until the next call, which replaces them; no arguments clears them.
    RequestResources {
        /// CPUs as one-CPU bundles.
        #[arg(long)]
        num_cpus: Option<u32>,
        /// Bundles as JSON, e.g. '[{"CPU": 2}, {"GPU": 1}]'.
        #[arg(long)]
        bundles: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args, Debug)]
pub(crate) struct DrainNodeArgs {
    /// The node to drain (its id, as `rayctl status` shows it).
    pub(crate) node_id: String,
    /// Shown as the node's death reason ("drained by operator: REASON").
    #[arg(long)]
    pub(crate) reason: Option<String>,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Subcommand, Debug)]
pub(crate) enum OperatorCommand {
    /// Raft group membership of the heads.
    Raft {
        #[command(subcommand)]
        command: RaftCommand,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum RaftCommand {
    /// List the heads in the Raft group.
    ListPeers(ClientArgs),
    /// Add a head (started with `--join`, or not yet started) as a voter. Needs the heads'
    /// peer secret (run it on a head's machine, or pass --peer-secret-file).
    AddPeer {
        /// The new head's advertised HOST:PORT.
        peer: String,
        /// Add it as a non-voting learner only.
        #[arg(long)]
        learner: bool,
        /// The heads' peer secret (default: RAYCTL_PEER_SECRET_PATH, then ~/.rayctl/peer_secret).
        #[arg(long)]
        peer_secret_file: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a head from the Raft group. Needs the heads' peer secret, as add-peer does.
    RemovePeer {
        /// The head's advertised HOST:PORT.
        peer: String,
        /// The heads' peer secret (default: RAYCTL_PEER_SECRET_PATH, then ~/.rayctl/peer_secret).
        #[arg(long)]
        peer_secret_file: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum JobCommand {
    /// Submit a job; without --no-wait, follow its logs until it ends and exit with its
    /// outcome (0 SUCCEEDED, 1 FAILED, 5 STOPPED).
    Submit(Box<JobSubmitArgs>),
    /// Show one job.
    Status(JobIdArgs),
    /// Print a job's log; -f follows it until the job ends.
    Logs {
        #[command(flatten)]
        job: JobIdArgs,
        /// Follow the log until the job ends.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Stop a job (SIGTERM to its process group, then SIGKILL).
    Stop {
        #[command(flatten)]
        job: JobIdArgs,
        /// Return without waiting for the job to end.
        #[arg(long)]
        no_wait: bool,
    },
    /// List every job.
    List(ClientArgs),
    /// Delete a job that has ended.
    Delete(JobIdArgs),
    /// Wait until a job ends; the exit code reflects its outcome as for `submit`.
    Wait(JobIdArgs),
}

#[derive(Args, Debug)]
pub(crate) struct JobIdArgs {
    /// The job (submission) id.
    pub(crate) id: String,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Args, Debug)]
pub(crate) struct JobSubmitArgs {
    /// The job's id ([A-Za-z0-9_-], at most 128); default: a new raysubmit_… id.
    #[arg(long)]
    pub(crate) submission_id: Option<String>,
    /// Uploaded with the job (`.git` and what `.gitignore` excludes are left out).
    #[arg(long)]
    pub(crate) working_dir: Option<PathBuf>,
    /// The runtime_env as JSON, e.g. '{"env_vars": {"A": "1"}}'.
    #[arg(long)]
    pub(crate) runtime_env_json: Option<String>,
    /// Metadata as a JSON object of strings, kept with the job.
    #[arg(long)]
    pub(crate) metadata_json: Option<String>,
    /// CPUs the entrypoint needs on its node.
    #[arg(long)]
    pub(crate) entrypoint_num_cpus: Option<f64>,
    /// GPUs the entrypoint needs on its node.
    #[arg(long)]
    pub(crate) entrypoint_num_gpus: Option<f64>,
    /// Memory for the entrypoint, e.g. 1GiB.
    #[arg(long)]
    pub(crate) entrypoint_memory: Option<String>,
    /// Custom resources as JSON, e.g. '{"accel": 1}'.
    #[arg(long)]
    pub(crate) entrypoint_resources: Option<String>,
    /// Re-run the job up to this many times when it fails.
    #[arg(long, default_value_t = 0)]
    pub(crate) max_retries: u32,
    /// Higher runs first when jobs wait for resources.
    #[arg(long, default_value_t = 0)]
    pub(crate) priority: i32,
    /// Return once the job is accepted.
    #[arg(long)]
    pub(crate) no_wait: bool,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
    /// The shell command the job runs.
    #[arg(last = true, required = true)]
    pub(crate) entrypoint: Vec<String>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ListKind {
    Actors,
    Tasks,
    Objects,
    PlacementGroups,
}

#[derive(Args, Debug)]
pub(crate) struct ListArgs {
    /// What to list.
    pub(crate) kind: ListKind,
    /// Keep rows whose field equals (KEY=VALUE) or differs from (KEY!=VALUE) a value; may be
    /// repeated (all must hold). Fields are the JSON output's keys.
    #[arg(long = "filter", short = 'f')]
    pub(crate) filters: Vec<String>,
    /// At most this many rows.
    #[arg(long, default_value_t = 100)]
    pub(crate) limit: usize,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum SummaryKind {
    Tasks,
}

#[derive(Args, Debug)]
pub(crate) struct TimelineArgs {
    /// Where to write the trace (default: rayctl-timeline-<time>.json here; - for stdout).
    #[arg(short = 'o', long)]
    pub(crate) output: Option<PathBuf>,
    /// Head addresses HOST:PORT[,HOST:PORT…] or a dashboard URL; default RAYCTL_ADDRESS,
    /// then the local session.
    #[arg(long)]
    pub(crate) address: Option<String>,
    /// File holding the cluster token (as for every command).
    #[arg(long)]
    pub(crate) auth_token_file: Option<PathBuf>,
    /// Give up after this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
}

#[derive(Args, Debug)]
pub(crate) struct SummaryArgs {
    /// What to summarize.
    pub(crate) kind: SummaryKind,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Args, Debug)]
pub(crate) struct MemoryArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    Text,
    Json,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct ClientArgs {
    /// Head addresses HOST:PORT[,HOST:PORT…], or a head's dashboard URL as Ray users type it
    /// (http://HOST:8265); default RAYCTL_ADDRESS, then the local session.
    #[arg(long)]
    pub(crate) address: Option<String>,
    /// File holding the cluster token (default: RAYCTL_AUTH_TOKEN, then the file named by
    /// RAYCTL_AUTH_TOKEN_PATH, then ~/.rayctl/auth_token).
    #[arg(long)]
    pub(crate) auth_token_file: Option<PathBuf>,
    /// Give up after this long (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
    /// Output format: text for people, json for programs.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub(crate) output: Output,
}

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Args, Debug)]
pub(crate) struct StopArgs {
    /// SIGKILL at once instead of SIGTERM and a grace period.
    #[arg(long)]
    pub(crate) force: bool,
    /// How long to wait for a graceful exit before SIGKILL: seconds (Ray's `-g 10`) or a
    /// duration (10s, 500ms).
    #[arg(long, short = 'g', visible_alias = "grace-period", default_value = "10s", value_parser = parse_grace)]
    pub(crate) grace: Duration,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct StartArgs {
    /// Start a head: a control-plane replica plus a node daemon.
    #[arg(long, conflicts_with = "address")]
    pub(crate) head: bool,
    /// Head addresses to join as a worker node: HOST:PORT[,HOST:PORT…].
    #[arg(long, required_unless_present = "head")]
    pub(crate) address: Option<String>,
    /// The head's gRPC port (0 picks a free one).
    #[arg(long, default_value_t = 6379)]
    pub(crate) port: u16,
    /// The head's HTTP port (/metrics; the Jobs API later). 0 picks a free one.
    #[arg(long, default_value_t = 8265)]
    pub(crate) dashboard_port: u16,
    /// Every head's HOST:PORT, this one included, to form a 3- or 5-head group.
    #[arg(long, requires = "head")]
    pub(crate) peers: Option<String>,
    /// Existing heads to join as a new head (the group adds it as a voter).
    #[arg(long, requires = "head", conflicts_with = "peers")]
    pub(crate) join: Option<String>,
    /// Durable state: the Raft log of a head, the identity of a node.
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// The address this machine advertises to the others (never guessed).
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) node_ip_address: String,
    /// The interface every server of this daemon listens on (Ray's `--dashboard-host` is taken
    /// as this flag: the dashboard port has no interface of its own here).
    #[arg(long, visible_alias = "dashboard-host", default_value = "127.0.0.1")]
    pub(crate) bind_host: String,
    /// CPUs this node offers to tasks and actors (default: all of the machine's).
    #[arg(long)]
    pub(crate) num_cpus: Option<f64>,
    /// GPUs this node offers (default: none).
    #[arg(long)]
    pub(crate) num_gpus: Option<f64>,
    /// Memory for tasks, e.g. 4GiB or a byte count.
    #[arg(long)]
    pub(crate) memory: Option<String>,
    /// Custom resources as JSON, e.g. '{"accel": 2}'.
    #[arg(long)]
    pub(crate) resources: Option<String>,
    /// Node labels, as Ray writes them (zone=a,disk=ssd) or as JSON ('{"zone": "a"}').
    #[arg(long)]
    pub(crate) labels: Option<String>,
    /// The node manager's gRPC port (leases, workers, jobs on this node); 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    pub(crate) node_manager_port: u16,
    /// The object manager's port (object transfer between nodes); 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    pub(crate) object_manager_port: u16,
    /// The object transfer port (objects' bytes between nodes over plain TCP, announced by
    /// the object manager); 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    pub(crate) object_transfer_port: u16,
    /// Object store capacity, e.g. 2GiB (default: 30 % of RAM, capped by the free space of
    /// the plasma directory). Reserved in chunks as the store fills.
    #[arg(long)]
    pub(crate) object_store_memory: Option<String>,
    /// The tmpfs that holds the object store's shared memory.
    #[arg(long, default_value = "/dev/shm")]
    pub(crate) plasma_directory: PathBuf,
    /// Where objects spill under memory pressure (default: the session directory).
    #[arg(long)]
    pub(crate) object_spilling_directory: Option<PathBuf>,
    /// The node's /metrics port for Prometheus; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    pub(crate) metrics_export_port: u16,
    /// Ray's flag: the root of this machine's sessions (what RAYCTL_TMPDIR sets; clients here
    /// then need RAYCTL_TMPDIR=DIR to find the cluster).
    #[arg(long)]
    pub(crate) temp_dir: Option<PathBuf>,
    /// Ray's flag, accepted: the dashboard port also serves the Jobs API and the state API,
    /// so it stays on.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub(crate) include_dashboard: Option<bool>,
    /// Ray's flag, accepted: rayctl collects no usage statistics.
    #[arg(long)]
    pub(crate) disable_usage_stats: bool,
    /// File holding the cluster token (default: RAYCTL_AUTH_TOKEN, then the file named by
    /// RAYCTL_AUTH_TOKEN_PATH, then ~/.rayctl/auth_token; a head generates one there if none
    /// exists).
    #[arg(long)]
    pub(crate) auth_token_file: Option<PathBuf>,
    /// `token` (every call needs the cluster token) or `disabled` (no auth at all: only on a
    /// machine whose every user you trust).
    #[arg(long, env = "RAYCTL_AUTH_MODE", default_value = "token", value_parser = parse_auth_mode)]
    pub(crate) auth_mode: protocol::auth::AuthMode,
    /// With --auth-mode disabled, allow binding a non-loopback --bind-host anyway.
    #[arg(long)]
    pub(crate) allow_unauthenticated_remote: bool,
    /// The heads' peer secret for Raft between heads (default: RAYCTL_PEER_SECRET_PATH, then
    /// ~/.rayctl/peer_secret, created if missing). Every head of a group needs the same file.
    #[arg(long, requires = "head")]
    pub(crate) peer_secret_file: Option<PathBuf>,
    /// Origins (e.g. https://dash.example.com) a browser may call the dashboard port from,
    /// comma separated, besides the head's own address.
    #[arg(long, value_delimiter = ',')]
    pub(crate) dashboard_allowed_origins: Vec<String>,
    /// The cluster's name, on every metric as Ray's `SessionName` and `ray_io_cluster`
    /// labels (the filters of Ray's Grafana dashboards); give every head and node the same.
    #[arg(long, env = "RAYCTL_CLUSTER_NAME", default_value = "rayctl")]
    pub(crate) cluster_name: String,
    /// Grafana's address (e.g. http://127.0.0.1:3000): the dashboard's metrics page embeds
    /// the panels of `deploy/grafana/rayctl.json` from it (Ray's RAY_GRAFANA_HOST).
    #[arg(long, env = "RAY_GRAFANA_HOST")]
    pub(crate) grafana_host: Option<String>,
    /// The Grafana address browsers use, when it differs from --grafana-host (Ray's
    /// RAY_GRAFANA_IFRAME_HOST).
    #[arg(long, env = "RAY_GRAFANA_IFRAME_HOST")]
    pub(crate) grafana_iframe_host: Option<String>,
    /// Stay in the foreground (systemd, containers).
    #[arg(long)]
    pub(crate) block: bool,
    /// Expected node heartbeat period (heads).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub(crate) health_check_period: Duration,
    /// Missed heartbeat periods before a node is declared dead (heads).
    #[arg(long, default_value_t = 5)]
    pub(crate) health_check_failure_threshold: u32,
    /// A job that no node can take for this long fails (heads).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub(crate) job_queue_timeout: Duration,
    /// When a job is stopped: SIGTERM, then SIGKILL after this long (heads).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub(crate) job_stop_grace: Duration,
    /// Worker processes a node starts for a driver's program as soon as the driver connects,
    /// so its first tasks find them running (nodes).
    #[arg(long, default_value_t = 0)]
    pub(crate) prestart_workers: u32,
    /// An idle worker process exits after this long (nodes).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) worker_idle_timeout: Duration,
    /// Snapshot the Raft state (and compact the log) every this many entries (heads).
    #[arg(long, default_value_t = 5000)]
    pub(crate) raft_snapshot_interval: u64,
    /// Log entries kept behind each snapshot (heads): a follower lagging by fewer catches up
    /// from the log, one lagging by more gets the snapshot.
    #[arg(long, default_value_t = 1000)]
    pub(crate) raft_logs_to_keep: u64,
    /// Where the daemon reports its bound ports once ready (used by `rayctl start` itself).
    #[arg(long, hide = true)]
    pub(crate) ready_file: Option<PathBuf>,
    #[arg(long, hide = true)]
    pub(crate) session_dir: Option<PathBuf>,
    /// This node daemon belongs to a head (started by the head process).
    #[arg(long, hide = true)]
    pub(crate) head_node: bool,
    /// Ray's flag: an autoscaling config (YAML: max_workers, upscaling_speed,
    /// idle_timeout_minutes, available_node_types, provider), applied once the head is up.
    #[arg(long, requires = "head")]
    pub(crate) autoscaling_config: Option<PathBuf>,
}

pub(crate) fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Start(args) => crate::daemon::start(*args),
        Command::Stop(args) => crate::daemon::stop(args),
        Command::Status(args) => runtime()?.block_on(crate::status::status(args.client)),
        Command::Job { command } => runtime()?.block_on(crate::job::run(command)),
        Command::List(args) => runtime()?.block_on(crate::state::list(args)),
        Command::Summary(args) => runtime()?.block_on(crate::state::summary(args)),
        Command::Memory(args) => runtime()?.block_on(crate::state::memory(args)),
        Command::Autoscaler { command } => runtime()?.block_on(crate::autoscaler::run(command)),
        Command::DrainNode(args) => runtime()?.block_on(crate::autoscaler::drain_node(args)),
        Command::Logs { command } => runtime()?.block_on(crate::logs::run(command)),
        Command::Timeline(args) => runtime()?.block_on(crate::state::timeline(args)),
        Command::Operator {
            command: OperatorCommand::Raft { command },
        } => runtime()?.block_on(crate::status::raft(command)),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "rayctl",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Seconds as Ray's `ray stop -g 10` gives them, or a duration (`10s`, `500ms`).
fn parse_grace(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?}: {e}; expected seconds (10) or a duration (10s)"))
}

fn parse_auth_mode(s: &str) -> Result<protocol::auth::AuthMode, String> {
    s.parse()
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag and argument of every command says what it is (`--help` is the manual).
    #[test]
    fn every_argument_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if a.is_hide_set() || ["help", "version"].contains(&id) {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "rayctl", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    #[test]
    fn rays_spellings_parse() {
        let c = Cli::try_parse_from(["rayctl", "stop", "-g", "7"]).expect("-g");
        let Command::Stop(s) = c.command else {
            panic!()
        };
        assert_eq!(s.grace, Duration::from_secs(7));
        let c = Cli::try_parse_from(["rayctl", "stop", "--grace-period", "2s"])
            .expect("--grace-period");
        let Command::Stop(s) = c.command else {
            panic!()
        };
        assert_eq!(s.grace, Duration::from_secs(2));
        let c = Cli::try_parse_from([
            "rayctl",
            "start",
            "--head",
            "--dashboard-host",
            "0.0.0.0",
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
            "--temp-dir",
            "/tmp/x",
            "--labels",
            "zone=a,disk=ssd",
        ])
        .expect("Ray's start flags");
        let Command::Start(s) = c.command else {
            panic!()
        };
        assert_eq!(s.bind_host, "0.0.0.0");
        assert_eq!(s.include_dashboard, Some(false));
        assert!(s.disable_usage_stats);
        assert!(Cli::try_parse_from(["rayctl", "stop", "-g", "soon"]).is_err());
        assert!(Cli::try_parse_from(["rayctl", "completions", "bash"]).is_ok());
    }
}
