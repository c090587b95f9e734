//! `rayctl autoscaler …` and `rayctl drain-node`: clients of the heads' autoscaler RPCs.

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::{Context, bail};
use protocol::pb;

use crate::cli::{AutoscalerCommand, DrainNodeArgs, Output};
use crate::status::client;

/// Reads a config file and checks it here, so mistakes show before anything is sent.
pub(crate) fn read_config(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the autoscaling config {}", path.display()))?;
    let c = control_plane::autoscaler::config::Config::from_yaml(&text)
        .with_context(|| format!("in {}", path.display()))?;
    let ignored = c.ignored_fields();
    if !ignored.is_empty() {
        eprintln!(
            "note: {} ignores Ray's cluster-launcher fields {}: the provider starts nodes with `rayctl start` itself",
            path.display(),
            ignored.join(", ")
        );
    }
    Ok(text)
}

/// The bundles of `request-resources`: `--num-cpus N` as N one-CPU bundles, plus `--bundles`.
pub(crate) fn floor_bundles(
    num_cpus: Option<u32>,
    bundles: Option<&str>,
) -> anyhow::Result<Vec<pb::Bundle>> {
    let mut out = Vec::new();
    for _ in 0..num_cpus.unwrap_or(0) {
        out.push(pb::Bundle {
            resources: HashMap::from([("CPU".to_owned(), 1.0)]),
        });
    }
    if let Some(b) = bundles {
        let parsed: Vec<HashMap<String, f64>> = serde_json::from_str(b).context(
            "--bundles must be a JSON list of objects, e.g. '[{\"CPU\": 2}, {\"GPU\": 1}]'",
        )?;
        for (i, r) in parsed.into_iter().enumerate() {
            if let Some((k, v)) = r.iter().find(|(_, v)| !v.is_finite() || **v < 0.0) {
                bail!("--bundles: bundle {i}: {k} = {v} must be a non-negative number");
            }
            out.push(pb::Bundle { resources: r });
        }
    }
    Ok(out)
}

pub(crate) async fn run(cmd: AutoscalerCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AutoscalerCommand::Apply { file, client: args } => {
            let yaml = read_config(&file)?;
            let c = client(&args)?;
            c.call(|mut c| {
                let yaml = yaml.clone();
                async move {
                    c.set_autoscaling_config(pb::SetAutoscalingConfigRequest { yaml })
                        .await
                }
            })
            .await
            .context("cannot apply the autoscaling config")?;
            eprintln!("autoscaling config applied from {}", file.display());
        }
        AutoscalerCommand::Config(args) => {
            let c = client(&args)?;
            let r = c
                .call(|mut c| async move {
                    c.get_autoscaling_config(pb::GetAutoscalingConfigRequest {})
                        .await
                })
                .await
                .context("cannot read the autoscaling config")?;
            if r.config_json.is_empty() {
                eprintln!("the autoscaler is off (no autoscaling config)");
            } else {
                let v: serde_json::Value = serde_json::from_str(&r.config_json)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
        AutoscalerCommand::Disable(args) => {
            let c = client(&args)?;
            c.call(|mut c| async move {
                c.set_autoscaling_config(pb::SetAutoscalingConfigRequest {
                    yaml: String::new(),
                })
                .await
            })
            .await
            .context("cannot turn the autoscaler off")?;
            eprintln!("autoscaler off");
        }
        AutoscalerCommand::RequestResources {
            num_cpus,
            bundles,
            client: args,
        } => {
            let bundles = floor_bundles(num_cpus, bundles.as_deref())?;
            let n = bundles.len();
            let c = client(&args)?;
            c.call(|mut c| {
                let bundles = bundles.clone();
                async move {
                    c.request_resources(pb::RequestResourcesRequest { bundles })
                        .await
                }
            })
            .await
            .context("cannot request resources")?;
            if n == 0 {
                eprintln!("request_resources cleared");
            } else {
                eprintln!("request_resources: the cluster keeps room for {n} bundle(s)");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn drain_node(args: DrainNodeArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.client)?;
    let req = pb::DrainNodeRequest {
        node_id: args.node_id.clone(),
        reason: args.reason.clone().unwrap_or_default(),
    };
    let r = c
        .call(|mut c| {
            let req = req.clone();
            async move { c.drain_node(req).await }
        })
        .await
        .context("cannot drain the node")?;
    if args.client.output == Output::Json {
        println!(
            "{}",
            serde_json::json!({"accepted": r.accepted, "rejected_because": r.rejected_because})
        );
    }
    if r.accepted {
        eprintln!("node {} drained: it leaves the cluster", args.node_id);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "node {} refused the drain: {}",
            args.node_id, r.rejected_because
        );
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_resources_bundles() {
        let b = floor_bundles(Some(2), Some(r#"[{"GPU": 1}]"#)).expect("valid");
        assert_eq!(b.len(), 3);
        assert_eq!(b[2].resources["GPU"], 1.0);
        assert!(floor_bundles(None, None).expect("empty").is_empty());
        let e = floor_bundles(None, Some("{"))
            .expect_err("bad json")
            .to_string();
        assert!(e.contains("--bundles"), "{e}");
        let e = floor_bundles(None, Some(r#"[{"CPU": -1}]"#))
            .expect_err("negative")
            .to_string();
        assert!(e.contains("non-negative"), "{e}");
    }
}
