//! `chaos`: the chaos-test runner. Builds a cluster in network namespaces per run, injects a
//! scenario's faults at seeded points under recorded traffic, and checks the history.
//!
//! ```text
//! chaos list
//! chaos run SCENARIO… [--seed N] [--runs N] [--duration 30s] [--report DIR]
//! chaos run --profile quick|long
//! chaos clean
//! ```
//! Needs root, `ip` and `nft` (as the partition tests do) and a built `rayctl` beside this
//! binary (or `RAYCTL_BIN`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use chaos_tests::harness::{self, Config, report, scenarios};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "chaos",
    about = "Fault-injection runs against a cluster in network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Profile {
    /// Every scenario once, 12 s fault phases (CI).
    Quick,
    /// Every scenario 20 times, 30 s fault phases (by hand; its table goes in docs/chaos.md).
    Long,
}

#[derive(Subcommand)]
enum Cmd {
    /// The scenarios, one per line.
    List,
    /// Runs scenarios (all of them when none is named) and writes the report.
    Run {
        scenarios: Vec<String>,
        /// The first run's seed (the k-th run uses seed + k); printed, so a run repeats
        /// with `--seed S --runs 1`. Default: from the clock.
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        runs: Option<u32>,
        /// Length of each run's fault phase.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        #[arg(long, value_enum)]
        profile: Option<Profile>,
        /// Where report.json, results.csv, summary.md and failing histories go.
        /// Default: target/chaos-report/<seed>.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Keep the JSONL history of passing runs too.
        #[arg(long)]
        keep_history: bool,
    },
    /// Removes what a killed run left: namespaces, links, mounts, freezer cgroups, temp dirs.
    Clean,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::List => {
            for s in scenarios::all() {
                println!("{:20} {}", s.name, s.about);
            }
            Ok(())
        }
        Cmd::Clean => {
            chaos_tests::netns::check_prerequisites()?;
            chaos_tests::netns::clean_leftovers();
            scenarios::clean_freezers();
            println!("cleaned");
            Ok(())
        }
        Cmd::Run {
            scenarios: names,
            seed,
            runs,
            duration,
            profile,
            report: report_dir,
            keep_history,
        } => {
            let (p_runs, p_duration) = match profile {
                Some(Profile::Quick) => (1, Duration::from_secs(12)),
                Some(Profile::Long) => (20, Duration::from_secs(30)),
                None => (1, Duration::from_secs(30)),
            };
            let runs = runs.unwrap_or(p_runs);
            let cfg = Config {
                duration: duration.unwrap_or(p_duration),
                keep_history,
            };
            let all = scenarios::all();
            let chosen: Vec<&harness::Scenario> = if names.is_empty() {
                all.iter().collect()
            } else {
                let mut v = Vec::new();
                for n in &names {
                    match all.iter().find(|s| s.name == n) {
                        Some(s) => v.push(s),
                        None => bail!("no scenario {n:?}; `chaos list` names them"),
                    }
                }
                v
            };
            chaos_tests::netns::check_prerequisites()?;
            let base = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_secs())
            });
            let dir = report_dir
                .unwrap_or_else(|| PathBuf::from("target/chaos-report").join(base.to_string()));
            std::fs::create_dir_all(&dir)?;
            harness::catch_interrupts();
            println!(
                "chaos: seed {base}, {} scenario(s) × {runs} run(s), fault phase {:?}, report in {}",
                chosen.len(),
                cfg.duration,
                dir.display()
            );
            let mut results = Vec::new();
            'outer: for s in &chosen {
                for k in 0..runs {
                    if harness::interrupted() {
                        break 'outer;
                    }
                    let seed = base.wrapping_add(u64::from(k));
                    println!("== {} run {}/{runs} seed {seed}", s.name, k + 1);
                    let r = harness::run_once(s, seed, k, &cfg, &dir);
                    if harness::interrupted() {
                        // Cut short by Ctrl-C: neither a pass nor a failure, and not reported.
                        println!("   interrupted: this run is not counted");
                        break 'outer;
                    }
                    for c in &r.checks {
                        println!(
                            "   {} {:22} {}",
                            if c.pass { "ok  " } else { "FAIL" },
                            c.name,
                            c.detail
                        );
                    }
                    if let Some(e) = &r.error {
                        println!("   FAIL run error: {e}");
                    }
                    for n in &r.notes {
                        println!("   note: {n}");
                    }
                    let f = &r.figures;
                    println!(
                        "   {} in {:.0} s: ops {} (ok {}), failover {:?} s, unavailable {:?} s, \
                         lost {}, dup {}, stale reads {}, crashes {}, leader terms {}{}",
                        if r.pass { "PASS" } else { "FAIL" },
                        r.seconds,
                        f.ops,
                        f.ops_ok,
                        f.failover_s.map(|x| (x * 100.0).round() / 100.0),
                        f.unavail_s.map(|x| (x * 100.0).round() / 100.0),
                        f.lost,
                        f.dup,
                        f.stale_reads,
                        f.crashes,
                        f.leader_terms,
                        r.history
                            .as_ref()
                            .map(|h| format!("; history {}", h.display()))
                            .unwrap_or_default()
                    );
                    results.push(r);
                    report::write(&dir, base, &results)?;
                }
            }
            let sums = report::summarize(&results);
            println!("\n{}", report::markdown(&sums));
            let failed = results.iter().filter(|r| !r.pass).count();
            println!(
                "chaos: {} run(s), {} passed, {failed} failed; seed {base}; report {}",
                results.len(),
                results.len() - failed,
                dir.join("report.json").display()
            );
            if harness::interrupted() {
                bail!(
                    "interrupted; the report has the {} complete run(s), and everything the runs made is removed",
                    results.len()
                );
            }
            if failed > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
