//! Architecture check: `protocol` (default features) and `scheduler` build without tokio, so
//! pure code can depend on them (DESIGN §12).

use std::process::Command;

/// `cargo tree -e normal --prefix none -p PACKAGE [EXTRA…]`, offline.
fn cargo_tree(package: &str, extra: &[&str]) -> String {
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
        .args(extra)
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

fn normal_deps(package: &str) -> String {
    cargo_tree(package, &[])
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

/// The workspace crates `package` depends on (normal dependencies, one level).
fn internal_deps(package: &str) -> Vec<String> {
    let tree = cargo_tree(package, &["--depth", "1"]);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_string_lossy()
        .into_owned();
    tree.lines()
        .skip(1)
        .filter(|l| l.contains(&format!("({root}")))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// DESIGN §12's table, checked: each library crate depends only on the workspace crates it
/// names. One addition, recorded in docs/decisions.md: `sdk → scheduler`, so a program's
/// resource shapes are checked by the same code that nodes and the autoscaler use (the
/// scheduler is pure, so this adds no runtime to the SDK).
#[test]
fn crate_dependencies_follow_the_design() {
    let allowed: &[(&str, &[&str])] = &[
        ("protocol", &[]),
        ("scheduler", &["protocol"]),
        ("object-store", &["protocol"]),
        ("control-plane", &["protocol", "scheduler"]),
        ("node", &["protocol", "scheduler", "object-store"]),
        (
            "sdk",
            &["protocol", "object-store", "scheduler", "sdk-macros"],
        ),
        ("sdk-macros", &[]),
        ("rayctl", &["control-plane", "node", "protocol"]),
    ];
    let mut broken = Vec::new();
    for (package, may) in allowed {
        for dep in internal_deps(package) {
            if !may.contains(&dep.as_str()) {
                broken.push(format!("{package} → {dep}"));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "dependencies DESIGN §12 does not allow: {broken:?}"
    );
    // The check itself sees dependencies.
    assert!(internal_deps("node").contains(&"object-store".to_owned()));
}
