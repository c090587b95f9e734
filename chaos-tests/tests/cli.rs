//! `rayctl start` in the background and `rayctl stop`, in an isolated RAYCTL_TMPDIR and
//! HOME: a default start (no token flags) makes the cluster token, and every client finds it.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use chaos_tests::{rayctl_bin, wait_for};

/// `program` in a session root and home of its own: none of the caller's cluster settings.
fn isolated(program: &std::path::Path, root: &std::path::Path, home: &std::path::Path) -> Command {
    let mut c = Command::new(program);
    c.env("RAYCTL_TMPDIR", root)
        .env("HOME", home)
        .env_remove(protocol::ADDRESS_ENV)
        .env_remove(protocol::AUTH_TOKEN_ENV)
        .env_remove(protocol::auth::AUTH_TOKEN_PATH_ENV)
        .env_remove(protocol::auth::PEER_SECRET_PATH_ENV)
        .env_remove(protocol::auth::AUTH_MODE_ENV);
    c
}

#[test]
fn start_in_background_then_stop_everything() -> Result<()> {
    let bin = rayctl_bin()?;
    let tmp = tempfile::tempdir()?;
    let home = tmp.path().join("home");
    std::fs::create_dir(&home)?;
    let run = |args: &[&str]| isolated(&bin, tmp.path(), &home).args(args).output();
    let out = run(&["start", "--head", "--port", "0", "--dashboard-port", "0"])?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("Started a head at 127.0.0.1:"), "{text}");
    // A default start made a token (and said where, once) and the heads' peer secret.
    let token_file = home.join(".rayctl").join("auth_token");
    assert!(
        err.contains(&format!(
            "Generated a cluster token in {}",
            token_file.display()
        )),
        "{err}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode(&token_file)?, 0o600);
    assert_eq!(mode(&home.join(".rayctl"))?, 0o700);
    assert_eq!(mode(&home.join(".rayctl").join("peer_secret"))?, 0o600);
    let token = std::fs::read_to_string(&token_file)?.trim().to_owned();
    assert_eq!(token.len(), 64, "256 random bits in hex");
    let dash: u16 = text
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no dashboard port in {text}"));
    // A bare POST (no token) is refused; rayctl itself needs no flag.
    let bare = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", dash))?;
        let body = r#"{"entrypoint": "id"}"#;
        write!(
            s,
            "POST /api/jobs/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut r = String::new();
        s.read_to_string(&mut r)?;
        r
    };
    assert!(bare.starts_with("HTTP/1.1 401"), "{bare}");
    let out = run(&["job", "submit", "--", "echo", "hello-from-a-job"])?;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hello-from-a-job"),
        "{} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The status command finds the cluster through the session file.
    let status = wait_for(
        "status with the head's node",
        Duration::from_secs(30),
        || {
            let o = run(&["status", "-o", "json"]).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            (v["nodes"].as_array()?.len() == 1).then_some(v)
        },
    )?;
    let leader = status["leader"].as_str().unwrap().to_string();
    let data = tmp.path().join("w");
    let out = run(&[
        "start",
        "--address",
        &leader,
        "--num-cpus",
        "3",
        "--data-dir",
        data.to_str().unwrap(),
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second daemon on the same data dir is refused with a clear error.
    let out = run(&[
        "start",
        "--address",
        &leader,
        "--data-dir",
        data.to_str().unwrap(),
        "--block",
    ])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("2 nodes", Duration::from_secs(30), || {
        let o = run(&["status", "-o", "json"]).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        (v["nodes"]
            .as_array()?
            .iter()
            .filter(|n| n["state"] == "ALIVE")
            .count()
            == 2)
            .then_some(())
    })?;
    let daemons: Vec<u32> = std::fs::read_dir(tmp.path().join("daemons"))?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_suffix(".json")?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(daemons.len(), 2, "one record per daemon");
    // A driver on this machine finds the cluster and its token with no flag at all.
    let pi = bin.with_file_name("pi");
    anyhow::ensure!(
        pi.is_file(),
        "{} is missing: build it first (cargo build -p task-examples; scripts/test does)",
        pi.display()
    );
    let out = Command::new(&pi)
        .args(["2", "1000"])
        .env("RAYCTL_TMPDIR", tmp.path())
        .env("HOME", &home)
        .env_remove(protocol::ADDRESS_ENV)
        .env_remove(protocol::AUTH_TOKEN_ENV)
        .env_remove(protocol::auth::AUTH_TOKEN_PATH_ENV)
        .output()?;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("pi"),
        "{} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The token never shows: not in status, not in any log, not on a command line.
    let out = run(&["status", "-o", "json"])?;
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&token));
    let mut logs = vec![tmp.path().to_path_buf()];
    while let Some(d) = logs.pop() {
        for e in std::fs::read_dir(&d)?.filter_map(Result::ok) {
            let p = e.path();
            if p.starts_with(&home) || p.is_symlink() {
                continue;
            }
            if p.is_dir() {
                logs.push(p);
            } else if p.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                assert!(!text.contains(&token), "the token is in {}", p.display());
            }
        }
    }
    for e in std::fs::read_dir("/proc")?.filter_map(Result::ok) {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&cmd).contains(&token));
    }
    let out = run(&["stop"])?;
    assert!(out.status.success());
    for pid in daemons {
        wait_for("daemon gone", Duration::from_secs(15), || {
            (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
        })?;
    }
    let out = run(&["status", "--timeout", "500ms"])?;
    assert_eq!(out.status.code(), Some(3), "unreachable cluster exit code");
    Ok(())
}

/// The README's demo command, as written there but with this build's binaries, run twice in
/// a row in a home of its own: the second run stops what the first left and runs again.
#[test]
fn the_readme_demo_runs_twice_in_a_row() -> Result<()> {
    let bin = rayctl_bin()?;
    let wordcount = bin.with_file_name("wordcount");
    anyhow::ensure!(
        wordcount.is_file(),
        "{} is missing: build it first (cargo build -p task-examples; scripts/test does)",
        wordcount.display()
    );
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let demo = readme
        .lines()
        .find(|l| l.starts_with("cargo build --release -p rayctl -p task-examples && "))
        .ok_or_else(|| anyhow::anyhow!("the README has no demo command"))?;
    // This build's binaries instead of a release build, and ports of this test's own (the
    // same in both runs, so the second meets the first's head); the rest as written.
    let (port, dash) = (chaos_tests::free_port(), chaos_tests::free_port());
    let script = demo
        .trim_start_matches("cargo build --release -p rayctl -p task-examples && ")
        .replace(
            "./target/release/rayctl start --head",
            &format!("./target/release/rayctl start --head --port {port} --dashboard-port {dash}"),
        )
        .replace("./target/release/rayctl", &bin.display().to_string())
        .replace(
            "$PWD/target/release/wordcount",
            &wordcount.display().to_string(),
        );
    assert!(script.contains(&format!("--port {port}")), "{script}");
    let tmp = tempfile::tempdir()?;
    let home = tmp.path().join("home");
    std::fs::create_dir(&home)?;
    let run = || {
        isolated(std::path::Path::new("sh"), tmp.path(), &home)
            .arg("-c")
            .arg(&script)
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .output()
    };
    struct Stop<'a>(
        &'a std::path::Path,
        &'a std::path::Path,
        &'a std::path::Path,
    );
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = isolated(self.0, self.1, self.2)
                .args(["stop", "--force"])
                .output();
        }
    }
    let _stop = Stop(&bin, tmp.path(), &home);
    for round in 1..=2 {
        let out = run()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "run {round}: {text}");
        assert!(text.contains(": 294 words"), "run {round}: {text}");
        assert!(
            text.contains("Cluster status") && text.contains(" head node_"),
            "run {round} ends with the status: {text}"
        );
    }
    Ok(())
}

#[test]
fn completions_are_printed_for_each_shell() -> Result<()> {
    let bin = rayctl_bin()?;
    for (shell, mark) in [
        ("bash", "_rayctl()"),
        ("zsh", "#compdef rayctl"),
        ("fish", "complete -c rayctl"),
    ] {
        let out = Command::new(&bin).args(["completions", shell]).output()?;
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(mark),
            "{shell}: {}",
            &text[..text.len().min(300)]
        );
        assert!(
            text.contains("drain-node") && text.contains("logs"),
            "{shell} knows the commands"
        );
    }
    let out = Command::new(&bin).args(["completions", "tcsh"]).output()?;
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
    Ok(())
}
