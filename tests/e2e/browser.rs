//! Headless Chromium for the dashboard's tests: Debian's `chromium` driven through its
//! `chromedriver` (WebDriver, via fantoccini), the page's console read back after each step, and
//! screenshots written to `target/ui-screenshots/`. Without chromium the tests fail, saying how to
//! install it (`.ci/run` does).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fantoccini::{Client, ClientBuilder, Locator, wd::WebDriverCompatibleCommand};
use serde_json::{Value, json};

use crate::harness::{chaos::free_port, eventually};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "chromedriver";

/// Where every test's screenshots go: `<target>/ui-screenshots/<test>-<page>.png`.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("ui-screenshots")
}

/// A chromedriver process of this test, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn missing_browser() -> ! {
    panic!(
        "the dashboard's browser tests need Debian's chromium and chromium-driver \
         ({CHROMIUM} and {CHROMEDRIVER} on PATH): `.ci/run` installs them \
         (`bash .ci/browser.sh`, i.e. apt-get install chromium chromium-driver)"
    )
}

/// A headless Chromium session.
pub struct Browser {
    client: Option<Client>,
    _driver: Driver,
    test: String,
    /// Console messages already checked.
    seen_console: Vec<String>,
}

/// `POST /session/{id}/se/log {"type": "browser"}`: chromedriver's console log since the last call.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (axum::http::Method, Option<String>) {
        (
            axum::http::Method::POST,
            Some(json!({"type": "browser"}).to_string()),
        )
    }
}

impl Browser {
    pub async fn start(test: &str) -> Self {
        if !std::path::Path::new(CHROMIUM).exists() {
            missing_browser();
        }
        let port = free_port();
        let child = match Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing_browser(),
            Err(e) => panic!("cannot start {CHROMEDRIVER}: {e}"),
        };
        let driver = Driver { child, port };
        let url = format!("http://127.0.0.1:{}", driver.port);
        let http = reqwest::Client::new();
        eventually(
            Duration::from_secs(20),
            "chromedriver to answer",
            || async {
                let r = http.get(format!("{url}/status")).send().await.ok()?;
                r.status().is_success().then_some(())
            },
        )
        .await;
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--disable-gpu", "--window-size=1500,1000", "--no-first-run",
                         "--disable-extensions", "--disable-background-networking"],
            }),
        );
        caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("chromium starts under chromedriver: {e}"));
        std::fs::create_dir_all(screenshot_dir()).unwrap();
        Self {
            client: Some(client),
            _driver: driver,
            test: test.to_owned(),
            seen_console: Vec::new(),
        }
    }

    pub fn client(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    pub async fn goto(&self, url: &str) {
        self.client()
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Opens the dashboard and signs in with `token` through its form.
    pub async fn sign_in(&self, base: &str, token: &str) {
        self.goto(&format!("{base}/ui")).await;
        let input = self
            .client()
            .wait()
            .for_element(Locator::Css("#token"))
            .await
            .expect("the sign-in form shows");
        input.send_keys(token).await.unwrap();
        self.client()
            .find(Locator::Css("#sign-in"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        self.until(
            "the dashboard to show after signing in",
            "return !document.getElementById('top').hidden && document.getElementById('who').textContent",
        )
        .await;
    }

    /// Goes to a page of the dashboard (`#/fleet`, `#/dead`, ...).
    pub async fn page(&self, hash: &str) {
        self.js(&format!("location.hash = {}; return true", json!(hash)))
            .await;
        let page = hash.trim_start_matches("#/").split('/').next().unwrap();
        self.until(
            &format!("page {hash}"),
            &format!("return !!document.getElementById('page-{page}')"),
        )
        .await;
    }

    pub async fn js(&self, script: &str) -> Value {
        self.client()
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Polls `script` until it returns something truthy; returns it.
    pub async fn until(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.js(script).await;
            let truthy = match &v {
                Value::Null | Value::Bool(false) => false,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; page text:\n{}",
                self.js("return document.body.innerText").await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clicks the first element matching `css` as a user would (it must be visible).
    pub async fn click(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let attempt = async {
                let el = self.client().find(Locator::Css(css)).await?;
                el.click().await
            };
            match attempt.await {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot click {css}: {e}"),
            }
        }
    }

    /// Types `text` into the first element matching `css`, key by key.
    pub async fn type_into(&self, css: &str, text: &str) {
        let el = self
            .client()
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"));
        el.send_keys(text).await.unwrap();
    }

    /// How many elements match `css`.
    pub async fn count(&self, css: &str) -> usize {
        self.js(&format!(
            "return document.querySelectorAll({}).length",
            json!(css)
        ))
        .await
        .as_u64()
        .unwrap() as usize
    }

    /// Writes `<test>-<name>.png` to [`screenshot_dir`]; returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client().screenshot().await.expect("a screenshot");
        let path = screenshot_dir().join(format!("{}-{name}.png", self.test));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Console messages at level WARNING or SEVERE (errors, failed loads, CSP violations,
    /// uncaught exceptions) since the last call.
    pub async fn console_problems(&mut self) -> Vec<String> {
        let log = self
            .client()
            .issue_cmd(BrowserLog)
            .await
            .expect("chromedriver returns the browser's console log");
        let entries = log.as_array().cloned().unwrap_or_default();
        let mut problems = Vec::new();
        for e in entries {
            let level = e["level"].as_str().unwrap_or_default();
            let message = e["message"].as_str().unwrap_or_default().to_owned();
            if matches!(level, "SEVERE" | "WARNING") {
                problems.push(format!("{level}: {message}"));
            }
            self.seen_console.push(message);
        }
        problems
    }

    /// Fails the test if the console showed any error or warning since the last check.
    pub async fn assert_clean_console(&mut self, step: &str) {
        let problems = self.console_problems().await;
        assert!(
            problems.is_empty(),
            "the console is not clean after {step}:\n{}",
            problems.join("\n")
        );
    }

    pub async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
    }
}
