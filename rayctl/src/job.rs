//! `rayctl job …`: the Jobs API through the cluster's gRPC API (the same calls the REST API
//! makes), following the leader like every other client.
//!
//! Exit codes of `submit` (without --no-wait) and `wait`: 0 SUCCEEDED, 1 FAILED, 5 STOPPED.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use protocol::client::HeadClient;
use protocol::pb;
use serde_json::{Value, json};

use crate::cli::{ClientArgs, JobCommand, JobSubmitArgs, Output};
use crate::status::client;

pub(crate) const EXIT_STOPPED: u8 = 5;

/// The shell command a job runs: one argument is taken as the command line itself (a quoted
/// script: `-- 'make && ./run'`); several are quoted word by word, as Ray's CLI does
/// (`shlex.join`), so `-- sh -c 'echo a; echo b'` runs what it says.
fn entrypoint(args: &[String]) -> anyhow::Result<String> {
    match args {
        [] => anyhow::bail!("no entrypoint: give the command after --"),
        [one] => Ok(one.clone()),
        many => shlex::try_join(many.iter().map(String::as_str))
            .map_err(|e| anyhow::anyhow!("the entrypoint cannot be quoted for the shell: {e}")),
    }
}

pub(crate) async fn run(cmd: JobCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        JobCommand::Submit(a) => submit(*a).await,
        JobCommand::Status(a) => {
            let c = client(&a.client)?;
            let j = get(&c, &a.id).await?;
            print_job(&j, a.client.output);
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Logs { job, follow } => {
            let c = client(&job.client)?;
            logs(&c, &job.id, follow).await?;
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Stop { job, no_wait } => {
            let c = client(&job.client)?;
            let req = pb::StopJobRequest {
                job_id: job.id.clone(),
            };
            let j = c
                .call(|mut c| {
                    let r = req.clone();
                    async move { c.stop_job(r).await }
                })
                .await
                .with_context(|| format!("cannot stop job {}", job.id))?;
            let j = if no_wait {
                j
            } else {
                wait_terminal(&c, &j.job_id).await?
            };
            print_job(&j, job.client.output);
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::List(a) => list(&a).await,
        JobCommand::Delete(a) => {
            let c = client(&a.client)?;
            let req = pb::DeleteJobRequest {
                job_id: a.id.clone(),
            };
            c.call(|mut c| {
                let r = req.clone();
                async move { c.delete_job(r).await }
            })
            .await
            .with_context(|| format!("cannot delete job {}", a.id))?;
            match a.client.output {
                Output::Json => println!("{}", json!({ "deleted": true, "job_id": a.id })),
                Output::Text => println!("deleted job {}", a.id),
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Wait(a) => {
            let c = client(&a.client)?;
            let j = wait_terminal(&c, &a.id).await?;
            print_job(&j, a.client.output);
            Ok(outcome(&j))
        }
    }
}

fn is_terminal(j: &pb::JobInfo) -> bool {
    matches!(
        protocol::job_status_name(j.status),
        "SUCCEEDED" | "FAILED" | "STOPPED"
    )
}

fn outcome(j: &pb::JobInfo) -> ExitCode {
    match protocol::job_status_name(j.status) {
        "SUCCEEDED" => ExitCode::SUCCESS,
        "STOPPED" => ExitCode::from(EXIT_STOPPED),
        _ => ExitCode::FAILURE,
    }
}

fn job_json(j: &pb::JobInfo) -> Value {
    json!({
        "job_id": j.job_id,
        "submission_id": j.submission_id,
        "status": protocol::job_status_name(j.status),
        "entrypoint": j.entrypoint,
        "message": j.message,
        "driver_node_id": j.driver_node_id,
        "driver_exit_code": if j.has_exit_code { json!(j.exit_code) } else { Value::Null },
        "submitted_at_ms": j.submitted_at_ms,
        "started_at_ms": j.started_at_ms,
        "ended_at_ms": j.ended_at_ms,
        "attempt": j.attempt,
        "max_retries": j.max_retries,
        "priority": j.priority,
        "runtime_env": serde_json::from_str::<Value>(&j.runtime_env_json).unwrap_or(Value::Null),
        "metadata": j.metadata.iter().collect::<BTreeMap<_, _>>(),
        "entrypoint_resources": j.entrypoint_resources.iter().collect::<BTreeMap<_, _>>(),
    })
}

fn print_job(j: &pb::JobInfo, output: Output) {
    match output {
        Output::Json => println!("{}", job_json(j)),
        Output::Text => {
            let code = if j.has_exit_code {
                format!(", exit code {}", j.exit_code)
            } else {
                String::new()
            };
            println!(
                "job {}: {}{code} ({})",
                j.job_id,
                protocol::job_status_name(j.status),
                j.message
            );
        }
    }
}

async fn get(c: &HeadClient, id: &str) -> anyhow::Result<pb::JobInfo> {
    let req = pb::GetJobRequest {
        job_id: id.to_owned(),
    };
    c.call(|mut c| {
        let r = req.clone();
        async move { c.get_job(r).await }
    })
    .await
    .with_context(|| format!("cannot get job {id}"))
}

async fn wait_terminal(c: &HeadClient, id: &str) -> anyhow::Result<pb::JobInfo> {
    loop {
        let j = get(c, id).await?;
        if is_terminal(&j) {
            return Ok(j);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints the log from the start; with `follow`, until the job ends.
async fn logs(c: &HeadClient, id: &str, follow: bool) -> anyhow::Result<()> {
    let mut offset = 0;
    let mut out = std::io::stdout();
    loop {
        let req = pb::GetJobLogsRequest {
            job_id: id.to_owned(),
            offset,
            max_bytes: 4 << 20,
        };
        let l = c
            .call(|mut c| {
                let r = req.clone();
                async move { c.get_job_logs(r).await }
            })
            .await
            .with_context(|| format!("cannot read the log of job {id}"))?;
        if !l.data.is_empty() {
            out.write_all(&l.data)?;
            out.flush()?;
            offset = l.next_offset;
            continue;
        }
        if !follow || l.complete {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn list(a: &ClientArgs) -> anyhow::Result<ExitCode> {
    let c = client(a)?;
    let r = c
        .call(|mut c| async move { c.list_jobs(pb::ListJobsRequest {}).await })
        .await
        .context("cannot list jobs")?;
    match a.output {
        Output::Json => println!("{}", Value::Array(r.jobs.iter().map(job_json).collect())),
        Output::Text => {
            println!("{:<28} {:<10} {:<6} ENTRYPOINT", "JOB", "STATUS", "EXIT");
            for j in &r.jobs {
                let code = if j.has_exit_code {
                    j.exit_code.to_string()
                } else {
                    "-".into()
                };
                let ep: String = j.entrypoint.chars().take(60).collect();
                println!(
                    "{:<28} {:<10} {:<6} {ep}",
                    j.job_id,
                    protocol::job_status_name(j.status),
                    code
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_json_map<T: serde::de::DeserializeOwned>(
    flag: &str,
    s: &Option<String>,
) -> anyhow::Result<BTreeMap<String, T>> {
    match s {
        None => Ok(BTreeMap::new()),
        Some(j) => {
            serde_json::from_str(j).with_context(|| format!("{flag} {j:?}: expected a JSON object"))
        }
    }
}

/// A token unique to this invocation: a retried submit of it returns the same job.
fn client_token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

async fn submit(a: JobSubmitArgs) -> anyhow::Result<ExitCode> {
    let c = client(&a.client)?;
    let mut resources: BTreeMap<String, f64> =
        parse_json_map("--entrypoint-resources", &a.entrypoint_resources)?;
    if let Some(v) = a.entrypoint_num_cpus {
        resources.insert("CPU".into(), v);
    }
    if let Some(v) = a.entrypoint_num_gpus {
        resources.insert("GPU".into(), v);
    }
    if let Some(m) = &a.entrypoint_memory {
        let b = m.parse::<bytesize::ByteSize>().map_err(|e| {
            anyhow::anyhow!("--entrypoint-memory {m:?}: {e}; expected a size like 1GiB")
        })?;
        resources.insert("memory".into(), b.as_u64() as f64);
    }
    let mut env: serde_json::Map<String, Value> = match &a.runtime_env_json {
        None => serde_json::Map::new(),
        Some(j) => serde_json::from_str(j)
            .with_context(|| format!("--runtime-env-json {j:?}: expected a JSON object"))?,
    };
    if let Some(dir) = &a.working_dir {
        let uri = crate::package::upload(&c, dir).await?;
        env.insert("working_dir".into(), Value::String(uri));
    }
    let metadata: BTreeMap<String, String> = parse_json_map("--metadata-json", &a.metadata_json)?;
    // Chosen here, so the retries HeadClient makes carry the same id and token.
    let submission_id = a
        .submission_id
        .clone()
        .unwrap_or_else(control_plane::jobs::new_submission_id);
    let req = pb::SubmitJobRequest {
        submission_id,
        entrypoint: entrypoint(&a.entrypoint)?,
        runtime_env_json: if env.is_empty() {
            String::new()
        } else {
            Value::Object(env).to_string()
        },
        metadata: metadata.into_iter().collect(),
        entrypoint_resources: resources.into_iter().collect(),
        max_retries: a.max_retries,
        priority: a.priority,
        client_token: client_token(),
    };
    let j = c
        .call(|mut c| {
            let r = req.clone();
            async move { c.submit_job(r).await }
        })
        .await
        .context("cannot submit the job")?;
    if a.no_wait {
        match a.client.output {
            Output::Json => println!("{}", job_json(&j)),
            Output::Text => println!("submitted job {}", j.job_id),
        }
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("submitted job {}; following its logs", j.job_id);
    logs(&c, &j.job_id, true).await?;
    let j = wait_terminal(&c, &j.job_id).await?;
    match a.client.output {
        Output::Json => println!("{}", job_json(&j)),
        Output::Text => eprintln!(
            "job {} {} ({})",
            j.job_id,
            protocol::job_status_name(j.status),
            j.message
        ),
    }
    Ok(outcome(&j))
}

#[cfg(test)]
mod tests {
    use super::entrypoint;

    fn ep(a: &[&str]) -> String {
        entrypoint(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn entrypoints_keep_their_words_as_the_shell_will_see_them() {
        assert_eq!(ep(&["echo", "hi"]), "echo hi");
        assert_eq!(
            ep(&["sh", "-c", "echo a; echo b"]),
            "sh -c 'echo a; echo b'"
        );
        assert_eq!(
            ep(&["echo $HOME; ls"]),
            "echo $HOME; ls",
            "one argument is the command line"
        );
        assert_eq!(ep(&["cat", "it's.txt"]), "cat \"it's.txt\"");
        assert!(entrypoint(&[]).is_err());
    }
}
