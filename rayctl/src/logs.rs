//! `rayctl logs …`: Ray's `ray logs` through any head (`control_plane::logs` finds the node
//! and file; the node serves it).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use control_plane::logs::{Located, Logs, Target};
use protocol::auth::AuthToken;
use protocol::pb;
use serde_json::json;

use crate::cli::{LogOpts, LogsCommand, Output};
use crate::status::client;

const POLL: Duration = Duration::from_millis(200);

pub(crate) async fn run(cmd: LogsCommand) -> anyhow::Result<ExitCode> {
    let (target, opts) = match cmd {
        LogsCommand::Cluster {
            glob,
            node_id,
            opts,
        } => {
            let logs = logs(&opts)?;
            let listed = logs
                .list(node_id.as_deref(), glob.as_deref().unwrap_or(""))
                .await?;
            let found: Vec<(&str, &str)> = listed
                .iter()
                .flat_map(|n| {
                    n.files
                        .iter()
                        .map(move |f| (n.node_id.as_str(), f.name.as_str()))
                })
                .collect();
            // One file matched: print it, as Ray does; else list what matched.
            if let (Some(_), [(node, file)]) = (&glob, found.as_slice()) {
                let t = Target::File {
                    node: (*node).to_owned(),
                    filename: (*file).to_owned(),
                };
                return print(&logs, t, &opts).await;
            }
            if opts.client.output == Output::Json {
                let v: Vec<_> = listed
                    .iter()
                    .map(|n| {
                        json!({"node_id": n.node_id, "files": n.files.iter().map(|f| json!({"name": f.name, "size": f.size})).collect::<Vec<_>>()})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for n in &listed {
                    println!("node {} ({}):", n.node_id, n.node_address);
                    for f in &n.files {
                        println!("  {:<48} {}", f.name, bytesize::ByteSize(f.size));
                    }
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        LogsCommand::Actor { id, opts } => (Target::Actor(id), opts),
        LogsCommand::Task { id, opts } => (Target::Task(id), opts),
        LogsCommand::Worker { id, opts } => (Target::Worker(id), opts),
        LogsCommand::Job { id, opts } => (Target::Job(id), opts),
    };
    let logs = logs(&opts)?;
    print(&logs, target, &opts).await
}

fn logs(opts: &LogOpts) -> anyhow::Result<Logs> {
    let token = AuthToken::load(opts.client.auth_token_file.as_deref())?;
    Ok(Logs::new(client(&opts.client)?, token, opts.client.timeout))
}

/// Prints the file (its last `--tail` lines), then with `-f` what is appended.
async fn print(logs: &Logs, target: Target, opts: &LogOpts) -> anyhow::Result<ExitCode> {
    let at: Located = logs.locate(&target).await?;
    eprintln!("--- {} on node {} ---", at.filename, at.node_id);
    let tail = u32::try_from(opts.tail).unwrap_or(0);
    let mut r = logs.read(&at, 0, tail).await?;
    let mut out = std::io::stdout().lock();
    loop {
        out.write_all(&r.data)?;
        out.flush()?;
        if r.next_offset < r.size {
            // More than one read's worth: keep reading.
            r = logs.read(&at, r.next_offset, 0).await?;
            continue;
        }
        if !opts.follow || (matches!(target, Target::Job(_)) && job_ended(logs, &target).await) {
            // A job's last lines may land just before it ends: read once more.
            if opts.follow {
                let last = logs.read(&at, r.next_offset, 0).await?;
                out.write_all(&last.data)?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        drop(out);
        tokio::time::sleep(POLL).await;
        out = std::io::stdout().lock();
        r = logs.read(&at, r.next_offset, 0).await?;
    }
}

async fn job_ended(logs: &Logs, target: &Target) -> bool {
    let Target::Job(id) = target else {
        return false;
    };
    logs.job_status(id).await.is_some_and(|s| {
        matches!(
            pb::JobStatus::try_from(s),
            Ok(pb::JobStatus::Succeeded | pb::JobStatus::Failed | pb::JobStatus::Stopped)
        )
    })
}
