//! The autoscaler's config, in the shape of Ray's cluster YAML (`max_workers`,
//! `upscaling_speed`, `idle_timeout_minutes`, `available_node_types`, `head_node_type`,
//! `provider`), so a Ray user's block reads the same. Parsed with serde-saphyr (see
//! docs/decisions.md); every unknown field and every impossible value is an error that names
//! the field. Stored in the Raft state as canonical JSON (`to_json`), so every head uses the
//! same one.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The largest config text accepted.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;

fn default_max_workers() -> u32 {
    2
}
fn default_upscaling_speed() -> f64 {
    1.0
}
fn default_idle_timeout_minutes() -> f64 {
    5.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Accepted (Ray's files have it) and shown; it changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    /// Workers in the whole cluster, the head not counted (Ray's default: 2).
    #[serde(default = "default_max_workers")]
    pub max_workers: u32,
    /// Launches in flight per type are capped at max(5, upscaling_speed × running).
    #[serde(default = "default_upscaling_speed")]
    pub upscaling_speed: f64,
    #[serde(default = "default_idle_timeout_minutes")]
    pub idle_timeout_minutes: f64,
    pub available_node_types: BTreeMap<String, NodeTypeConfig>,
    /// The type of the heads (not launched by the autoscaler); must name a type above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_node_type: Option<String>,
    pub provider: ProviderConfig,
    // Ray's cluster-launcher fields (`ray up`, `python/ray/autoscaler/ray-schema.json`):
    // accepted so a Ray user's file reads as it is, never stored, and named by
    // `ignored_fields`. Our providers start nodes with `rayctl start` themselves, so there is
    // nothing to log in to, install, sync or run first.
    #[serde(default, skip_serializing)]
    auth: Option<serde::de::IgnoredAny>,
    #[serde(default, skip_serializing)]
    docker: Option<serde::de::IgnoredAny>,
    #[serde(default, skip_serializing)]
    file_mounts: Option<serde::de::IgnoredAny>,
    #[serde(default, skip_serializing)]
    cluster_synced_files: Option<serde::de::IgnoredAny>,
    #[serde(default, skip_serializing)]
    file_mounts_sync_continuously: Option<serde::de::IgnoredAny>,
    #[serde(default, skip_serializing)]
    rsync_exclude: Option<serde::de::IgnoredAny>,
    #[serde(default, skip_serializing)]
    rsync_filter: Option<serde::de::IgnoredAny>,
    #[serde(default, skip_serializing)]
    initialization_commands: Option<serde::de::IgnoredAny>,
    #[serde(default, skip_serializing)]
    setup_commands: Option<serde::de::IgnoredAny>,
    #[serde(default, skip_serializing)]
    head_setup_commands: Option<serde::de::IgnoredAny>,
    #[serde(default, skip_serializing)]
    worker_setup_commands: Option<serde::de::IgnoredAny>,
    #[serde(default, skip_serializing)]
    head_start_ray_commands: Option<serde::de::IgnoredAny>,
    #[serde(default, skip_serializing)]
    worker_start_ray_commands: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeTypeConfig {
    pub resources: BTreeMap<String, f64>,
    #[serde(default)]
    pub min_workers: u32,
    /// Default: the global `max_workers` (as Ray's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_workers: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Default: `idle_timeout_minutes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<f64>,
    /// Opaque to the autoscaler; handed to the provider (the kubernetes provider reads its
    /// workload from here).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub node_config: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ProviderConfig {
    /// Node processes on this machine (`rayctl start --address …`), each in its own session
    /// and directory under `state_dir` (default: `<session root>/autoscaler`).
    Local {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state_dir: Option<PathBuf>,
    },
    /// Operator scripts (`sh -c`), JSON on stdin and stdout: the way to any cloud CLI.
    Command {
        launch: String,
        terminate: String,
        list: String,
        #[serde(default = "default_command_timeout_s")]
        timeout_s: f64,
    },
    /// A worker StatefulSet or Deployment per node type (named in the type's `node_config`),
    /// scaled through `kubectl`.
    Kubernetes {
        #[serde(default = "default_kubectl")]
        kubectl: String,
        namespace: String,
        #[serde(default = "default_command_timeout_s")]
        timeout_s: f64,
    },
}

fn default_command_timeout_s() -> f64 {
    30.0
}
fn default_kubectl() -> String {
    "kubectl".into()
}

/// What the kubernetes provider needs in a type's `node_config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesWorkload {
    /// `StatefulSet` or `Deployment`.
    pub kind: String,
    pub name: String,
    /// The label selector of its pods, e.g. `app=ray-worker-cpu2`.
    pub selector: String,
}

impl KubernetesWorkload {
    pub fn of(node_config: &serde_json::Value) -> Result<Self, String> {
        let w: Self = serde_json::from_value(node_config.clone()).map_err(|e| e.to_string())?;
        if w.kind != "StatefulSet" && w.kind != "Deployment" {
            return Err(format!(
                "kind must be StatefulSet or Deployment, got {:?}",
                w.kind
            ));
        }
        if w.name.is_empty() || w.selector.is_empty() {
            return Err("name and selector must not be empty".into());
        }
        Ok(w)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("autoscaling config: {0}")]
    Parse(String),
    #[error("autoscaling config: {field}: {why}")]
    Invalid { field: String, why: String },
}

fn invalid(field: impl Into<String>, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        why: why.into(),
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Config {
    /// Parses and checks a YAML (or JSON) text.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        if text.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::Parse(format!(
                "{} bytes is over the {MAX_CONFIG_BYTES}-byte limit",
                text.len()
            )));
        }
        let c: Config =
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        c.check()?;
        Ok(c)
    }

    /// Ray cluster-launcher fields the text had: accepted, and without effect here.
    pub fn ignored_fields(&self) -> Vec<&'static str> {
        [
            ("auth", self.auth.is_some()),
            ("docker", self.docker.is_some()),
            ("file_mounts", self.file_mounts.is_some()),
            ("cluster_synced_files", self.cluster_synced_files.is_some()),
            (
                "file_mounts_sync_continuously",
                self.file_mounts_sync_continuously.is_some(),
            ),
            ("rsync_exclude", self.rsync_exclude.is_some()),
            ("rsync_filter", self.rsync_filter.is_some()),
            (
                "initialization_commands",
                self.initialization_commands.is_some(),
            ),
            ("setup_commands", self.setup_commands.is_some()),
            ("head_setup_commands", self.head_setup_commands.is_some()),
            (
                "worker_setup_commands",
                self.worker_setup_commands.is_some(),
            ),
            (
                "head_start_ray_commands",
                self.head_start_ray_commands.is_some(),
            ),
            (
                "worker_start_ray_commands",
                self.worker_start_ray_commands.is_some(),
            ),
        ]
        .into_iter()
        .filter_map(|(name, here)| here.then_some(name))
        .collect()
    }

    /// The stored form (canonical JSON), and back.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let c: Config =
            serde_json::from_str(json).map_err(|e| ConfigError::Parse(e.to_string()))?;
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if !self.upscaling_speed.is_finite() || self.upscaling_speed <= 0.0 {
            return Err(invalid(
                "upscaling_speed",
                format!("must be a positive number, got {}", self.upscaling_speed),
            ));
        }
        if !self.idle_timeout_minutes.is_finite() || self.idle_timeout_minutes < 0.0 {
            return Err(invalid(
                "idle_timeout_minutes",
                format!("must be 0 or more, got {}", self.idle_timeout_minutes),
            ));
        }
        if self.available_node_types.is_empty() {
            return Err(invalid(
                "available_node_types",
                "needs at least one node type",
            ));
        }
        let mut min_sum = 0u64;
        for (name, t) in &self.available_node_types {
            let f = |x: &str| format!("available_node_types.{name}.{x}");
            if !valid_name(name) {
                return Err(invalid(
                    format!("available_node_types.{name}"),
                    "a type name is 1-64 letters, digits, '-', '_' or '.'",
                ));
            }
            if t.resources.is_empty() {
                return Err(invalid(
                    f("resources"),
                    "a node type needs its resources (e.g. {CPU: 2}): they are what the node is started with",
                ));
            }
            scheduler::ResourceSet::from_map(t.resources.iter().map(|(k, v)| (k.as_str(), *v)))
                .map_err(|e| invalid(f("resources"), e.to_string()))?;
            let max = t.max_workers.unwrap_or(self.max_workers);
            if t.min_workers > max {
                return Err(invalid(
                    f("min_workers"),
                    format!("{} is over its max_workers ({max})", t.min_workers),
                ));
            }
            min_sum += u64::from(t.min_workers);
            if let Some(s) = t.idle_timeout_s
                && (!s.is_finite() || s < 0.0)
            {
                return Err(invalid(
                    f("idle_timeout_s"),
                    format!("must be 0 or more, got {s}"),
                ));
            }
            for k in t.labels.keys() {
                if k.is_empty() || k.len() > 256 {
                    return Err(invalid(
                        f("labels"),
                        format!("label key {k:?} must be 1-256 bytes"),
                    ));
                }
            }
            if let ProviderConfig::Kubernetes { .. } = self.provider {
                KubernetesWorkload::of(&t.node_config).map_err(|e| {
                    invalid(
                        f("node_config"),
                        format!("the kubernetes provider needs {{kind, name, selector}}: {e}"),
                    )
                })?;
            }
        }
        if min_sum > u64::from(self.max_workers) {
            return Err(invalid(
                "max_workers",
                format!(
                    "the types' min_workers add up to {min_sum}, over max_workers ({})",
                    self.max_workers
                ),
            ));
        }
        if let Some(h) = &self.head_node_type
            && !self.available_node_types.contains_key(h)
        {
            return Err(invalid(
                "head_node_type",
                format!("{h:?} is not one of available_node_types"),
            ));
        }
        match &self.provider {
            ProviderConfig::Local { .. } => {}
            ProviderConfig::Command {
                launch,
                terminate,
                list,
                timeout_s,
            } => {
                for (n, v) in [("launch", launch), ("terminate", terminate), ("list", list)] {
                    if v.trim().is_empty() {
                        return Err(invalid(format!("provider.{n}"), "must name a command"));
                    }
                }
                check_timeout(*timeout_s)?;
            }
            ProviderConfig::Kubernetes {
                kubectl,
                namespace,
                timeout_s,
            } => {
                if kubectl.trim().is_empty() {
                    return Err(invalid("provider.kubectl", "must name the kubectl binary"));
                }
                if !valid_name(namespace) {
                    return Err(invalid(
                        "provider.namespace",
                        format!("{namespace:?} is not a namespace name"),
                    ));
                }
                check_timeout(*timeout_s)?;
            }
        }
        Ok(())
    }

    /// The planner's view of the node types.
    pub fn node_types(&self) -> Vec<scheduler::autoscale::NodeType> {
        self.available_node_types
            .iter()
            .map(|(name, t)| scheduler::autoscale::NodeType {
                name: name.clone(),
                resources: scheduler::ResourceSet::from_map(
                    t.resources.iter().map(|(k, v)| (k.as_str(), *v)),
                )
                .unwrap_or_default(),
                min_workers: t.min_workers,
                max_workers: t.max_workers.unwrap_or(self.max_workers),
                idle_timeout_ms: (t.idle_timeout_s.unwrap_or(self.idle_timeout_minutes * 60.0)
                    * 1000.0) as u64,
                paused: false,
            })
            .collect()
    }
}

fn check_timeout(t: f64) -> Result<(), ConfigError> {
    if !t.is_finite() || t <= 0.0 || t > 3600.0 {
        return Err(invalid(
            "provider.timeout_s",
            format!("must be in (0, 3600], got {t}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAY_BLOCK: &str = r#"
cluster_name: demo
max_workers: 4
upscaling_speed: 2.0
idle_timeout_minutes: 0.5
head_node_type: head
available_node_types:
  head:
    resources: {CPU: 0}
    max_workers: 0
  cpu2:
    resources: {"CPU": 2, "memory": 4000000000}
    min_workers: 1
    max_workers: 3
    labels: {zone: a}
    idle_timeout_s: 5
    node_config: {InstanceType: m5.large}
provider:
  type: local
"#;

    #[test]
    fn ray_launcher_fields_are_accepted_named_and_not_stored() {
        let text = format!(
            "{RAY_BLOCK}auth: {{ssh_user: ubuntu}}\nsetup_commands: [pip install foo]\ndocker: {{image: rayproject/ray}}\n"
        );
        let c = Config::from_yaml(&text).expect("valid");
        assert_eq!(c.ignored_fields(), ["auth", "docker", "setup_commands"]);
        let stored = c.to_json();
        assert!(
            !stored.contains("ssh_user") && !stored.contains("setup_commands"),
            "{stored}"
        );
        assert!(
            Config::from_json(&stored)
                .expect("json")
                .ignored_fields()
                .is_empty()
        );
        // Anything else at the top level is still an error naming it.
        let e = Config::from_yaml(&format!("{RAY_BLOCK}setup_comands: []\n")).unwrap_err();
        assert!(e.to_string().contains("setup_comands"), "{e}");
    }

    #[test]
    fn a_ray_block_reads_the_same() {
        let c = Config::from_yaml(RAY_BLOCK).expect("valid");
        assert_eq!(c.max_workers, 4);
        assert_eq!(c.upscaling_speed, 2.0);
        let t = &c.available_node_types["cpu2"];
        assert_eq!(t.resources["CPU"], 2.0);
        assert_eq!(t.min_workers, 1);
        assert_eq!(t.node_config["InstanceType"], "m5.large");
        let types = c.node_types();
        let cpu2 = types.iter().find(|t| t.name == "cpu2").expect("cpu2");
        assert_eq!((cpu2.max_workers, cpu2.idle_timeout_ms), (3, 5000));
        let head = types.iter().find(|t| t.name == "head").expect("head");
        assert_eq!(head.idle_timeout_ms, 30_000, "from idle_timeout_minutes");
        // The stored form reads back the same.
        assert_eq!(Config::from_json(&c.to_json()).expect("json"), c);
    }

    #[test]
    fn the_shipped_configs_are_valid() {
        let local = Config::from_yaml(include_str!("../../../examples/autoscaler/local.yaml"))
            .expect("examples/autoscaler/local.yaml");
        assert_eq!(local.provider, ProviderConfig::Local { state_dir: None });
        #[derive(serde::Deserialize)]
        struct ConfigMap {
            data: BTreeMap<String, String>,
        }
        let cm: ConfigMap = serde_saphyr::from_str(include_str!(
            "../../../deploy/kubernetes/autoscaling-configmap.yaml"
        ))
        .expect("the ConfigMap parses");
        let k8s = Config::from_yaml(&cm.data["autoscaling.yaml"]).expect("its autoscaling.yaml");
        assert!(matches!(k8s.provider, ProviderConfig::Kubernetes { .. }));
    }

    #[test]
    fn defaults_are_rays() {
        let c = Config::from_yaml(
            "available_node_types: {w: {resources: {CPU: 1}}}\nprovider: {type: local}\n",
        )
        .expect("valid");
        assert_eq!(
            (c.max_workers, c.upscaling_speed, c.idle_timeout_minutes),
            (2, 1.0, 5.0)
        );
        assert_eq!(c.node_types()[0].max_workers, 2);
    }

    fn err(yaml: &str) -> String {
        Config::from_yaml(yaml)
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn bad_input_names_the_field() {
        let e = err(
            "max_worker: 3\navailable_node_types: {w: {resources: {CPU: 1}}}\nprovider: {type: local}\n",
        );
        assert!(e.contains("max_worker"), "{e}");
        let e = err(
            "available_node_types: {w: {resources: {CPU: 1}, min_worker: 1}}\nprovider: {type: local}\n",
        );
        assert!(e.contains("min_worker"), "{e}");
        let e = err(
            "available_node_types: {w: {resources: {CPU: 1}, min_workers: 3, max_workers: 2}}\nprovider: {type: local}\n",
        );
        assert!(
            e.contains("available_node_types.w.min_workers") && e.contains("over its max_workers"),
            "{e}"
        );
        let e = err(
            "upscaling_speed: 0\navailable_node_types: {w: {resources: {CPU: 1}}}\nprovider: {type: local}\n",
        );
        assert!(e.contains("upscaling_speed"), "{e}");
        let e = err("available_node_types: {w: {resources: {CPU: -1}}}\nprovider: {type: local}\n");
        assert!(e.contains("available_node_types.w.resources"), "{e}");
        let e = err("available_node_types: {w: {resources: {CPU: 1}}}\nprovider: {type: aws}\n");
        assert!(e.contains("aws"), "{e}");
        let e = err(
            "available_node_types: {w: {resources: {CPU: 1}}}\nprovider: {type: local, foo: 1}\n",
        );
        assert!(e.contains("foo"), "{e}");
        let e = err(
            "head_node_type: h\navailable_node_types: {w: {resources: {CPU: 1}}}\nprovider: {type: local}\n",
        );
        assert!(e.contains("head_node_type"), "{e}");
        let e = err(
            "max_workers: 1\navailable_node_types: {a: {resources: {CPU: 1}, min_workers: 1}, b: {resources: {CPU: 1}, min_workers: 1}}\nprovider: {type: local}\n",
        );
        assert!(e.contains("add up to 2"), "{e}");
        let e = err(
            "available_node_types: {w: {resources: {CPU: 1}}}\nprovider: {type: kubernetes, namespace: ray}\n",
        );
        assert!(e.contains("available_node_types.w.node_config"), "{e}");
        let e = err("available_node_types: {}\nprovider: {type: local}\n");
        assert!(e.contains("available_node_types"), "{e}");
        let e = err("provider: {type: local}\n");
        assert!(e.contains("available_node_types"), "{e}");
        let e = err(
            "available_node_types: {w: {resources: {CPU: 1}}}\nprovider: {type: command, launch: a, terminate: b, list: ''}\n",
        );
        assert!(e.contains("provider.list"), "{e}");
    }
}
