//! Architecture check: `protocol` (default features) and `scheduler` build without tokio, so
//! pure code can depend on them (DESIGN §12).

use std::process::Command;

fn normal_deps(package: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
            package,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn protocol_and_scheduler_have_no_tokio() {
    for p in ["protocol", "scheduler"] {
        let tree = normal_deps(p);
        assert!(
            tree.contains(p),
            "unexpected cargo tree output for {p}: {tree}"
        );
        let bad: Vec<&str> = tree.lines().filter(|l| l.starts_with("tokio")).collect();
        assert!(bad.is_empty(), "{p} depends on tokio: {bad:?}");
    }
}
