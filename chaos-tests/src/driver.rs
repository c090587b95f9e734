//! A driver process built with the SDK, run by a test: its `RESULT <json>` lines are read
//! as they come, and each line on its stdin tells it to take the next step.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::Cluster;

/// A running driver whose `RESULT` lines are read as they come.
pub struct Driver {
    pub child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    pub fn start(bin: &str, c: &Cluster, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let mut cmd = Command::new(bin);
        c.client_env(&mut cmd);
        cmd.args(args)
            .env("RAYCTL_ADDRESS", c.head_addrs.join(","))
            .env_remove("RAYCTL_NODE_ADDRESS")
            .env_remove("RAYCTL_WORKER_ID")
            .env_remove("RAYCTL_REMOTE");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(cmd)
    }

    /// Starts `cmd` (environment already set) with its stdin, stdout and stderr piped.
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("start the driver")?;
        let (tx, lines) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let out = child.stdout.take().context("stdout")?;
        let err = child.stderr.take().context("stderr")?;
        let (l, o) = (log.clone(), stdout.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(line.clone());
                o.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(line.clone());
                if let Some(r) = line.strip_prefix("RESULT ") {
                    let _ = tx.send(r.to_owned());
                }
            }
        });
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        Ok(Self {
            child,
            lines,
            log,
            stdout,
        })
    }

    /// Every line the driver printed on stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn output(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    pub fn result(&mut self, timeout: Duration) -> Result<Value> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => Ok(serde_json::from_str(&l)?),
            Err(_) => bail!(
                "no result within {timeout:?}; driver output:\n{}",
                self.output()
            ),
        }
    }

    /// Sends one line to the driver's stdin.
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("stdin")?;
        writeln!(stdin, "{line}")?;
        Ok(stdin.flush()?)
    }

    pub fn next_step(&mut self) -> Result<()> {
        self.send_line("go")
    }

    pub fn finish(mut self, timeout: Duration) -> Result<()> {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                if !st.success() {
                    bail!("driver exited with {st}:\n{}", self.output());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("driver did not exit within {timeout:?}:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs a driver to completion and returns its one result.
pub fn run(bin: &str, c: &Cluster, args: &[&str], env: &[(&str, &str)]) -> Result<Value> {
    let mut d = Driver::start(bin, c, args, env)?;
    let r = d.result(Duration::from_secs(120))?;
    d.finish(Duration::from_secs(30))?;
    Ok(r)
}
