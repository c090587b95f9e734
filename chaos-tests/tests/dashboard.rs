//! The web dashboard in a real browser: headless Chromium (Debian's `chromium`) over the
//! DevTools protocol against a live 3-head, 2-node cluster with a running job, an actor, tasks
//! and a placement group. Every page loads with no console errors and shows the live data; a
//! follower's dashboard shows the same; without the cookie the login page comes first.
//! Screenshots of each page land in `target/dashboard-screenshots/`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use chaos_tests::driver::Driver;
use chaos_tests::{Cluster, ClusterOptions, wait_for};
use chromiumoxide::browser::{Browser, BrowserConfig};
use chromiumoxide::cdp::browser_protocol::log as cdp_log;
use chromiumoxide::cdp::js_protocol::runtime;
use chromiumoxide::page::{Page, ScreenshotParams};
use futures_util::StreamExt;

const CHROMIUM: &str = "/usr/bin/chromium";

fn screenshots() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("dashboard-screenshots")
}

/// What the page said on its console that is an error: exceptions, `console.error`, and the
/// browser's own error entries (a CSP violation, a failed request).
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<String>>>);

impl Console {
    async fn watch(&self, page: &Page) -> Result<()> {
        page.execute(cdp_log::EnableParams::default()).await?;
        page.execute(runtime::EnableParams::default()).await?;
        let mut calls = page
            .event_listener::<runtime::EventConsoleApiCalled>()
            .await?;
        let mut thrown = page
            .event_listener::<runtime::EventExceptionThrown>()
            .await?;
        let mut entries = page.event_listener::<cdp_log::EventEntryAdded>().await?;
        let out = self.0.clone();
        tokio::spawn(async move {
            loop {
                let line = tokio::select! {
                    Some(e) = calls.next() => (e.r#type == runtime::ConsoleApiCalledType::Error)
                        .then(|| format!("console.error: {:?}", e.args.iter().map(|a| a.value.clone()).collect::<Vec<_>>())),
                    Some(e) = thrown.next() => Some(format!(
                        "exception: {} {:?}",
                        e.exception_details.text,
                        e.exception_details.exception.as_ref().and_then(|x| x.description.clone())
                    )),
                    Some(e) = entries.next() => (e.entry.level == cdp_log::LogEntryLevel::Error)
                        .then(|| format!("{:?}: {} {}", e.entry.source, e.entry.text, e.entry.url.clone().unwrap_or_default())),
                    else => break,
                };
                if let Some(l) = line {
                    out.lock().unwrap_or_else(|p| p.into_inner()).push(l);
                }
            }
        });
        Ok(())
    }

    fn errors(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes what was said so far.
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Evaluates `js` (an expression) until it yields `true`, or fails naming `what` and what the
/// page showed.
async fn until(page: &Page, what: &str, timeout: Duration, js: &str) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ok = page
            .evaluate(js)
            .await
            .ok()
            .and_then(|r| r.into_value::<bool>().ok())
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            let text = page
                .evaluate("document.body ? document.body.innerText : ''")
                .await
                .ok()
                .and_then(|r| r.into_value::<String>().ok())
                .unwrap_or_default();
            bail!(
                "timed out after {timeout:?} waiting for {what}; the page showed:\n{}",
                text.chars().take(3000).collect::<String>()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Text of the element `sel` ("" when absent).
async fn text_of(page: &Page, sel: &str) -> String {
    let js = format!(
        "(() => {{ const e = document.querySelector({}); return e ? e.innerText : ''; }})()",
        serde_json::to_string(sel).unwrap_or_default()
    );
    page.evaluate(js)
        .await
        .ok()
        .and_then(|r| r.into_value::<String>().ok())
        .unwrap_or_default()
}

/// Opens view `hash` and waits until it has rendered data.
async fn open_view(page: &Page, hash: &str, view: &str) -> Result<()> {
    page.evaluate(format!("location.hash = {}", serde_json::to_string(hash)?))
        .await?;
    until(
        page,
        &format!("the {view} view loaded"),
        Duration::from_secs(30),
        &format!(
            "(() => {{ const v = document.getElementById('view'); return !!v && v.dataset.view === '{view}' && v.dataset.loaded === 'true'; }})()"
        ),
    )
    .await
}

async fn shot(page: &Page, name: &str) -> Result<()> {
    let dir = screenshots();
    std::fs::create_dir_all(&dir)?;
    page.save_screenshot(
        ScreenshotParams::builder().full_page(true).build(),
        dir.join(format!("{name}.png")),
    )
    .await?;
    Ok(())
}

/// Waits until element `sel` shows every one of `needles`.
async fn shows(page: &Page, sel: &str, needles: &[&str]) -> Result<()> {
    let js = format!(
        "(() => {{ const e = document.querySelector({}); if (!e) return false; const t = e.innerText; return {}.every(n => t.includes(n)); }})()",
        serde_json::to_string(sel)?,
        serde_json::to_string(needles)?
    );
    until(
        page,
        &format!("{sel} to show {needles:?}"),
        Duration::from_secs(30),
        &js,
    )
    .await
}

#[test]
fn the_dashboard_shows_the_live_cluster_in_a_real_browser_behind_its_login() -> Result<()> {
    if !Path::new(CHROMIUM).exists() {
        bail!("{CHROMIUM} is missing: install Debian's chromium package (.ci/run does)");
    }
    let c = Cluster::start(ClusterOptions {
        heads: 3,
        nodes: 2,
        ..Default::default()
    })?;
    let leader = c.wait_leader(Duration::from_secs(30))?;
    let follower = (0..3).find(|i| *i != leader).context("a follower")?;
    let token = c.token.clone().context("the cluster token")?;
    // A job that keeps printing, an actor, tasks (one failed) and placement groups.
    let job = c.submit_job(
        &["--submission-id", "dashboard-job"],
        "i=0; while true; do i=$((i+1)); echo \"dashboard line $i\"; sleep 0.5; done",
    )?;
    let mut d = Driver::start(env!("CARGO_BIN_EXE_actor_driver"), &c, &["introspect"], &[])?;
    let r = d.result(Duration::from_secs(120))?;
    let actor = r["actor"].as_str().context("actor id")?.to_owned();
    let status = c.status(None)?;
    let node_ids: Vec<String> = status["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .filter_map(|n| n["node_id"].as_str().map(|s| s[..8].to_owned()))
        .collect();
    assert_eq!(node_ids.len(), 5, "three head nodes and two workers");
    let url = |i: usize| {
        format!(
            "http://127.0.0.1:{}/",
            c.heads[i].ready["dashboard_port"].as_u64().unwrap_or(0)
        )
    };
    let job_log = |c: &Cluster| -> Option<u64> {
        let (code, out, _) = c
            .rayctl(&["job", "logs", &job, "--address", &c.head_addrs.join(",")])
            .ok()?;
        (code == 0).then_some(())?;
        out.lines()
            .rev()
            .find_map(|l| l.strip_prefix("dashboard line ")?.trim().parse().ok())
    };
    wait_for("the job printing", Duration::from_secs(60), || job_log(&c))?;

    let profile = tempfile::tempdir()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let config = BrowserConfig::builder()
            .chrome_executable(CHROMIUM)
            .no_sandbox()
            .new_headless_mode()
            .window_size(1280, 900)
            .user_data_dir(profile.path())
            .arg("--disable-gpu")
            .arg("--disable-dev-shm-usage")
            .launch_timeout(Duration::from_secs(60))
            .request_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| anyhow!("chromium config: {e}"))?;
        let (mut browser, mut handler) = Browser::launch(config).await?;
        let events = tokio::spawn(async move { while handler.next().await.is_some() {} });
        let result = async {
            let page = browser.new_page("about:blank").await?;
            let console = Console::default();
            console.watch(&page).await?;

            // No cookie: the login page, and nothing of the cluster.
            page.goto(url(leader)).await?;
            until(
                &page,
                "the login page",
                Duration::from_secs(30),
                "!!document.getElementById('login-token')",
            )
            .await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let body = text_of(&page, "body").await;
            for n in &node_ids {
                assert!(!body.contains(n.as_str()), "cluster data before login: {body}");
            }
            shot(&page, "login").await?;
            // A wrong token is refused and the form stays.
            let input = page.find_element("#login-token").await?;
            input.click().await?.type_str("not-the-token").await?;
            input.press_key("Enter").await?;
            until(
                &page,
                "the wrong token refused",
                Duration::from_secs(15),
                "(() => { const l = document.getElementById('login'); return !!l && /wrong/i.test(l.innerText); })()",
            )
            .await?;
            // The browser logs the refused request itself, and nothing else was said.
            let said = console.take();
            assert!(
                said.iter().all(|l| l.contains("/api/authenticate") && l.contains("403")),
                "console before login: {said:#?}"
            );
            page.evaluate("document.getElementById('login-token').value = ''")
                .await?;
            let input = page.find_element("#login-token").await?;
            input.click().await?.type_str(&token).await?;
            input.press_key("Enter").await?;

            // Overview: the Raft group, the nodes.
            open_view(&page, "#/", "overview").await?;
            shows(&page, "#view", &["Leader"]).await?;
            let leader_addr = c.head_addrs[leader].as_str();
            shows(&page, "#view", &[leader_addr]).await?;
            shot(&page, "overview").await?;

            open_view(&page, "#/nodes", "nodes").await?;
            let ids: Vec<&str> = node_ids.iter().map(String::as_str).collect();
            shows(&page, "#nodes-table", &ids).await?;
            shot(&page, "nodes").await?;

            open_view(&page, "#/jobs", "jobs").await?;
            shows(&page, "#jobs-table", &["dashboard-job", "RUNNING"]).await?;
            shot(&page, "jobs").await?;

            // The job page: its latest log line, then a later one (live).
            open_view(&page, &format!("#/jobs/{job}"), "job").await?;
            let now = job_log(&c).context("the job's log")?;
            let line = format!("dashboard line {now}");
            shows(&page, "#job-log", &[line.as_str()]).await?;
            let later = format!("dashboard line {}", now + 4);
            shows(&page, "#job-log", &[later.as_str()]).await?;
            shows(&page, "#job-history", &["Submitted", "Driver started"]).await?;
            shows(&page, "#view", &["while true"]).await?;
            shot(&page, "job").await?;

            open_view(&page, "#/actors", "actors").await?;
            shows(&page, "#actors-table", &[actor.as_str(), "Counter", "ALIVE"]).await?;
            shot(&page, "actors").await?;

            open_view(&page, "#/tasks", "tasks").await?;
            shows(&page, "#tasks-table", &["where_am_i", "FINISHED", "FAILED"]).await?;
            shows(&page, "#view", &["for the list"]).await?;
            shot(&page, "tasks").await?;

            open_view(&page, "#/placement-groups", "placement-groups").await?;
            shows(&page, "#pgs-table", &["intro-pg", "CREATED", "intro-stuck", "PENDING"]).await?;
            shot(&page, "placement-groups").await?;

            open_view(&page, "#/logs", "logs").await?;
            shows(&page, "#view", &["node", ".log"]).await?;
            shot(&page, "logs").await?;

            open_view(&page, "#/metrics", "metrics").await?;
            shows(&page, "#view", &["/metrics"]).await?;
            shot(&page, "metrics").await?;

            // A follower's dashboard (the cookie is the host's, whatever the port): the same
            // cluster, through the leader.
            page.goto(format!("{}#/nodes", url(follower))).await?;
            open_view(&page, "#/nodes", "nodes").await?;
            shows(&page, "#nodes-table", &ids).await?;
            open_view(&page, "#/", "overview").await?;
            shows(&page, "#view", &[leader_addr]).await?;
            shot(&page, "follower-overview").await?;

            let errors = console.errors();
            assert!(errors.is_empty(), "console errors: {errors:#?}");
            page.close().await?;
            anyhow::Ok(())
        }
        .await;
        let _ = browser.close().await;
        let _ = browser.wait().await;
        events.abort();
        result
    })?;
    d.send_line("done")?;
    Ok(())
}
