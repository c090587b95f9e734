//! Benchmarks of the hot paths over real processes. Prints one JSON line per figure:
//! `{"name": …, "value": …, "unit": …}`; baselines (e.g. the disk's fsync rate) are measured
//! in the same run so figures can be quoted as ratios.
//!
//! `cargo run --release -p bench -- control-plane|object-store|jobs|tasks|actors|autoscaler|all` (add `--smoke` for the
//! quick CI run).

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};

mod actors;
mod autoscaler;
mod control_plane;
mod jobs;
mod object_store;
mod tasks;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Suite {
    All,
    ControlPlane,
    ObjectStore,
    Jobs,
    Tasks,
    Actors,
    Autoscaler,
    /// The second process of the object-store get benchmark.
    #[value(hide = true)]
    GetChild,
}

#[derive(Parser, Debug)]
#[command(about = "rayctl benchmarks (JSON lines on stdout)")]
struct Args {
    #[arg(value_enum)]
    suite: Suite,
    /// A short run that only proves the benchmark works (CI).
    #[arg(long)]
    smoke: bool,
    /// Heads in the control-plane cluster (failover is measured only with 3 or more).
    #[arg(long, default_value_t = 3)]
    heads: usize,
    #[arg(long, hide = true)]
    socket: Option<std::path::PathBuf>,
    #[arg(long, hide = true)]
    id: Option<protocol::ObjectId>,
    #[arg(long, hide = true, default_value_t = 1000)]
    iters: usize,
}

pub(crate) fn emit(name: &str, value: f64, unit: &str) {
    println!(
        "{}",
        serde_json::json!({ "name": name, "value": (value * 1000.0).round() / 1000.0, "unit": unit })
    );
}

/// CPU time all processes on the machine have spent (user, nice, system, irq, softirq), in
/// seconds, from `/proc/stat`.
pub(crate) fn busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("/proc/stat is empty")?;
    let f: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("/proc/stat's cpu line")?;
    anyhow::ensure!(f.len() >= 7, "/proc/stat's cpu line has {} fields", f.len());
    // user nice system idle iowait irq softirq, in clock ticks.
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?
        .context("no clock tick rate")? as f64;
    Ok((f[0] + f[1] + f[2] + f[5] + f[6]) / hz)
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Under `cargo run`, (re)build the rayctl binary of the same profile so the figures are of
/// the current code.
fn ensure_rayctl() -> Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(());
    };
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", "rayctl"]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let st = cmd.status().context("cargo build -p rayctl")?;
    if !st.success() {
        bail!("cargo build -p rayctl failed");
    }
    Ok(())
}

fn main() -> Result<()> {
    // The nodes run this binary again as the tasks suite's workers.
    if sdk::is_worker() {
        // In a worker, init serves tasks and never returns.
        let _worker = sdk::init()?;
    }
    let args = Args::parse();
    if args.suite == Suite::GetChild {
        let (Some(socket), Some(id)) = (&args.socket, args.id) else {
            bail!("get-child needs --socket and --id")
        };
        return object_store::get_child(socket, id, args.iters);
    }
    ensure_rayctl()?;
    let started = Instant::now();
    if matches!(args.suite, Suite::All | Suite::ControlPlane) {
        control_plane::run(args.smoke, args.heads)?;
    }
    if matches!(args.suite, Suite::All | Suite::ObjectStore) {
        object_store::run(args.smoke)?;
    }
    if matches!(args.suite, Suite::All | Suite::Jobs) {
        jobs::run(args.smoke)?;
    }
    let (t, a) = (
        matches!(args.suite, Suite::All | Suite::Tasks),
        matches!(args.suite, Suite::All | Suite::Actors),
    );
    if t || a {
        tasks::run(args.smoke, t, a)?;
    }
    if matches!(args.suite, Suite::All | Suite::Autoscaler) {
        autoscaler::run(args.smoke)?;
    }
    eprintln!("bench finished in {:.1?}", started.elapsed());
    Ok(())
}
