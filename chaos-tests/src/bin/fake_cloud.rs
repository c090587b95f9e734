//! Stand-ins for what the autoscaler's `command` and `kubernetes` providers call, for the
//! autoscaler tests. Everything lives in `$FAKE_CLOUD_DIR`:
//!
//! - `fake_cloud launch|terminate|list`: an operator's scripts for the command provider
//!   (JSON on stdin and stdout). `launch` starts real node processes (`$RAYCTL_BIN start
//!   --block`, in their own session) labelled with their instance id; `list` prints the live
//!   ones. A file `fail_launch` (or `fail_list`) makes that command fail. Every call is
//!   appended to `calls.log`.
//! - `fake_cloud kubectl ARGS…`: enough of kubectl for the kubernetes provider (get, patch
//!   and annotate of a StatefulSet or Deployment and its pods), recording every call in
//!   `kubectl.log` and keeping the workloads in `k8s.json`. No pod runs anything.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn dir() -> PathBuf {
    PathBuf::from(std::env::var("FAKE_CLOUD_DIR").expect("FAKE_CLOUD_DIR"))
}

fn log(file: &str, line: &str) -> R<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir().join(file))?;
    writeln!(f, "{line}")?;
    Ok(())
}

fn stdin_json() -> R<Value> {
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s)?;
    Ok(serde_json::from_str(&s)?)
}

fn alive(pid: u64, id: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(id))
        .unwrap_or(false)
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
}

fn instances() -> R<Vec<Value>> {
    let d = dir().join("instances");
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&d) {
        for e in rd.flatten() {
            if e.path().extension().is_some_and(|x| x == "json") {
                out.push(serde_json::from_slice(&std::fs::read(e.path())?)?);
            }
        }
    }
    Ok(out)
}

fn launch() -> R<()> {
    let req = stdin_json()?;
    log("calls.log", &format!("launch {req}"))?;
    if dir().join("fail_launch").exists() {
        eprintln!("quota exceeded (fail_launch is set)");
        std::process::exit(1);
    }
    let rayctl = std::env::var("RAYCTL_BIN")?;
    let request = req["request_id"].as_str().unwrap_or_default().to_owned();
    let count = req["count"].as_u64().unwrap_or(1);
    let d = dir().join("instances");
    std::fs::create_dir_all(&d)?;
    for k in 0..count {
        let id = if count == 1 {
            request.clone()
        } else {
            format!("{request}-{k}")
        };
        let rec = d.join(format!("{id}.json"));
        if rec.exists() {
            continue;
        }
        let mut labels = req["labels"].as_object().cloned().unwrap_or_default();
        labels.insert(
            req["cloud_instance_id_label"]
                .as_str()
                .unwrap_or_default()
                .into(),
            id.clone().into(),
        );
        labels.insert("rayctl.io/node-type".into(), req["node_type"].clone());
        let heads: Vec<&str> = req["head_addresses"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let cpus = req["resources"]["CPU"].as_f64().unwrap_or(0.0);
        let logf = std::fs::File::create(d.join(format!("{id}.log")))?;
        let mut cmd = std::process::Command::new(&rayctl);
        cmd.args([
            "start".to_string(),
            format!("--address={}", heads.join(",")),
            format!("--num-cpus={cpus}"),
            format!("--data-dir={}", d.join(format!("{id}-data")).display()),
            format!("--labels={}", Value::Object(labels)),
            "--block".into(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf);
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn()?;
        std::fs::write(
            &rec,
            json!({"id": id, "node_type": req["node_type"], "request_id": request, "pid": child.id()})
                .to_string(),
        )?;
    }
    Ok(())
}

fn terminate() -> R<()> {
    let req = stdin_json()?;
    log("calls.log", &format!("terminate {req}"))?;
    for id in req["ids"].as_array().cloned().unwrap_or_default() {
        let id = id.as_str().unwrap_or_default().to_owned();
        let rec = dir().join("instances").join(format!("{id}.json"));
        if let Ok(b) = std::fs::read(&rec) {
            let v: Value = serde_json::from_slice(&b)?;
            let pid = v["pid"].as_u64().unwrap_or(0);
            if alive(pid, &id) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::fs::remove_file(&rec)?;
        }
    }
    Ok(())
}

fn list() -> R<()> {
    log("calls.log", "list")?;
    if dir().join("fail_list").exists() {
        eprintln!("the cloud API timed out (fail_list is set)");
        std::process::exit(1);
    }
    let live: Vec<Value> = instances()?
        .into_iter()
        .filter(|v| alive(v["pid"].as_u64().unwrap_or(0), v["id"].as_str().unwrap_or("?")))
        .map(|v| json!({"id": v["id"], "node_type": v["node_type"], "request_id": v["request_id"], "running": true}))
        .collect();
    println!("{}", Value::Array(live));
    Ok(())
}

fn k8s_state(path: &Path) -> R<Value> {
    Ok(match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)?,
        Err(_) => json!({}),
    })
}

/// kubectl --namespace NS <verb> …
fn kubectl(args: &[String]) -> R<()> {
    log("kubectl.log", &args.join(" "))?;
    let path = dir().join("k8s.json");
    let mut st = k8s_state(&path)?;
    let a: Vec<&str> = args.iter().map(String::as_str).skip(2).collect();
    match a.as_slice() {
        ["get", "pods", "-l", selector, "-o", "json"] => {
            let items: Vec<Value> = st["workloads"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, w)| w["selector"] == *selector)
                .flat_map(|(name, w)| {
                    (0..w["spec"]["replicas"].as_u64().unwrap_or(0)).map(move |i| {
                        json!({"metadata": {"name": format!("{name}-{i}")}, "status": {"phase": "Running"}})
                    })
                })
                .collect();
            println!("{}", json!({"items": items}));
        }
        ["get", _kind, name, "-o", "json"] => {
            let w = &st["workloads"][*name];
            if w.is_null() {
                eprintln!("Error from server (NotFound): {name} not found");
                std::process::exit(1);
            }
            println!("{w}");
        }
        ["patch", _kind, name, "--type=merge", "-p", patch] => {
            let p: Value = serde_json::from_str(patch)?;
            let w = &mut st["workloads"][*name];
            if w.is_null() {
                eprintln!("Error from server (NotFound): {name} not found");
                std::process::exit(1);
            }
            w["spec"]["replicas"] = p["spec"]["replicas"].clone();
            for (k, v) in p["metadata"]["annotations"]
                .as_object()
                .into_iter()
                .flatten()
            {
                w["metadata"]["annotations"][k] = v.clone();
            }
            std::fs::write(&path, st.to_string())?;
        }
        ["annotate", "pod", _pod, _kv, "--overwrite"] => {}
        other => {
            eprintln!("fake kubectl: unsupported {other:?}");
            std::process::exit(1);
        }
    }
    Ok(())
}

fn main() -> R<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("launch") => launch(),
        Some("terminate") => terminate(),
        Some("list") => list(),
        Some("kubectl") => kubectl(&args[1..]),
        other => {
            Err(format!("usage: fake_cloud launch|terminate|list|kubectl …, got {other:?}").into())
        }
    }
}
