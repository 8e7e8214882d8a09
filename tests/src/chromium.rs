//! A headless Chromium driven over the DevTools protocol, for tests of pages in a real
//! browser.
//!
//! [`Chromium::launch`] starts `chromium` with a throwaway profile and connects to its
//! browser endpoint over a WebSocket; [`Chromium::open`] opens a tab and attaches to it (a
//! flat session), and [`Page::eval`] and [`Page::wait_until`] run JavaScript in it.
//!
//! Without `chromium` on the `PATH` the test says that it skipped, unless
//! `REQCTX_CHROMIUM_REQUIRED=1` (CI), which makes that a failure.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// How long anything the browser does may take before the test fails: generous, for a
/// loaded machine. Not a measure of speed.
const GIVE_UP: Duration = Duration::from_secs(30);

/// How often [`Page::wait_until`] asks again.
const POLL: Duration = Duration::from_millis(50);

/// A headless Chromium; killed (with every process it started) and its profile removed on
/// drop.
#[derive(Debug)]
pub struct Chromium {
    cdp: Arc<Cdp>,
    _process: Process,
}

/// The browser's process group and its profile directory: killed and removed on drop.
#[derive(Debug)]
struct Process {
    child: Child,
    profile: PathBuf,
}

/// A tab of a [`Chromium`], attached over a flat session; closed on drop.
#[derive(Debug)]
pub struct Page {
    cdp: Arc<Cdp>,
    target: String,
    session: String,
}

type Reply = Result<Value, String>;

/// One DevTools connection: commands go out through the writer task; the reader task hands
/// each reply to the command that waits for it (events are not used).
#[derive(Debug)]
struct Cdp {
    next_id: AtomicU64,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>,
    out: mpsc::UnboundedSender<Message>,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Cdp {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Cdp {
    async fn connect(ws_url: &str) -> Cdp {
        let authority = ws_url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("not a ws:// URL: {ws_url}"));
        let tcp = tokio::net::TcpStream::connect(authority)
            .await
            .unwrap_or_else(|e| panic!("connect to Chromium's DevTools at {authority}: {e}"));
        let (ws, _) = tokio_tungstenite::client_async(ws_url, tcp)
            .await
            .unwrap_or_else(|e| panic!("DevTools WebSocket handshake with {ws_url}: {e}"));
        let (mut sink, mut stream) = ws.split();
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>> = Arc::default();
        let (out, mut rx) = mpsc::unbounded_channel::<Message>();
        let writer = tokio::spawn(async move {
            while let Some(message) = rx.recv().await {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
        });
        let replies = pending.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let Ok(value) = serde_json::from_str::<Value>(text.as_str()) else {
                    continue;
                };
                let Some(id) = value.get("id").and_then(Value::as_u64) else {
                    continue; // an event
                };
                let reply = match value.get("error") {
                    Some(error) => Err(error.to_string()),
                    None => Ok(value.get("result").cloned().unwrap_or(Value::Null)),
                };
                if let Some(tx) = replies.lock().unwrap().remove(&id) {
                    let _ = tx.send(reply);
                }
            }
            // The connection is gone: every waiting command hears it (its sender drops).
            replies.lock().unwrap().clear();
        });
        Cdp {
            next_id: AtomicU64::new(1),
            pending,
            out,
            tasks: [writer, reader],
        }
    }

    fn message(&self, method: &str, params: Value, session: Option<&str>) -> (u64, Message) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            command["sessionId"] = Value::from(session);
        }
        (id, Message::text(command.to_string()))
    }

    /// Sends a command and waits for its reply; a protocol error is an `Err`.
    async fn call(&self, method: &str, params: Value, session: Option<&str>) -> Reply {
        let (id, message) = self.message(method, params, session);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        if self.out.send(message).is_err() {
            return Err(format!("{method}: the DevTools connection is closed"));
        }
        match tokio::time::timeout(GIVE_UP, rx).await {
            Ok(Ok(reply)) => reply.map_err(|e| format!("{method}: {e}")),
            Ok(Err(_)) => Err(format!("{method}: the DevTools connection closed")),
            Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                Err(format!("{method}: no reply in {GIVE_UP:?}"))
            }
        }
    }

    /// Sends a command without waiting for its reply.
    fn send(&self, method: &str, params: Value) {
        let (_, message) = self.message(method, params, None);
        let _ = self.out.send(message);
    }
}

impl Chromium {
    /// Starts a headless Chromium, or says why it cannot (no `chromium` on the `PATH`):
    /// `None`, after a SKIPPED line on stderr, unless `REQCTX_CHROMIUM_REQUIRED=1`, which
    /// panics instead.
    pub async fn launch() -> Option<Chromium> {
        if !crate::tool_on_path("chromium", "--version", "REQCTX_CHROMIUM_REQUIRED") {
            return None;
        }

        static PROFILES: AtomicU64 = AtomicU64::new(0);
        let profile = std::env::temp_dir().join(format!(
            "reqctx-chromium-{}-{}",
            std::process::id(),
            PROFILES.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&profile).unwrap();
        let mut child = {
            use std::os::unix::process::CommandExt;
            Command::new("chromium")
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--remote-debugging-port=0",
                    // Containers often have a small /dev/shm: use /tmp instead.
                    "--disable-dev-shm-usage",
                ])
                .arg(format!("--user-data-dir={}", profile.display()))
                .arg("about:blank")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                // Its own process group: the drop ends the renderers and helpers too.
                .process_group(0)
                .spawn()
                .expect("start chromium")
        };

        // Chromium says where its DevTools endpoint is on stderr; the thread reads on (a
        // full pipe would stall the browser) and keeps what it read for error messages.
        let stderr = child.stderr.take().unwrap();
        let said = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log = said.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(url.trim().to_owned());
                    }
                }
                let mut log = log.lock().unwrap();
                if log.len() < 16 * 1024 {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let ws_url = tokio::task::spawn_blocking(move || rx.recv_timeout(GIVE_UP))
            .await
            .unwrap();
        let mut process = Process { child, profile };
        let Ok(ws_url) = ws_url else {
            let status = process.child.try_wait().ok().flatten();
            panic!(
                "chromium did not say where its DevTools endpoint is (exit: {status:?}); \
                 it wrote:\n{}",
                said.lock().unwrap()
            );
        };
        Some(Chromium {
            cdp: Arc::new(Cdp::connect(&ws_url).await),
            _process: process,
        })
    }

    /// Opens `url` in a new tab and waits until its document has loaded.
    pub async fn open(&self, url: &str) -> Page {
        let cdp = &self.cdp;
        let created = cdp
            .call("Target.createTarget", json!({ "url": "about:blank" }), None)
            .await
            .unwrap();
        let target = created["targetId"].as_str().unwrap().to_owned();
        let attached = cdp
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target, "flatten": true }),
                None,
            )
            .await
            .unwrap();
        let page = Page {
            cdp: cdp.clone(),
            target,
            session: attached["sessionId"].as_str().unwrap().to_owned(),
        };
        let navigated = page.call("Page.navigate", json!({ "url": url })).await;
        if let Some(error) = navigated.get("errorText") {
            panic!("open {url}: {error}");
        }
        page.wait_until(
            "location.href !== 'about:blank' && document.readyState === 'complete'",
            &format!("{url} loaded"),
        )
        .await;
        page
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // The whole process group: the browser and every process it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Page {
    async fn call(&self, method: &str, params: Value) -> Value {
        self.cdp
            .call(method, params, Some(&self.session))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Evaluates `js` in the page (a promise is awaited) and returns its value as JSON, or
    /// the text of the exception it threw (or of the protocol's error).
    pub async fn try_eval(&self, js: &str) -> Result<Value, String> {
        let reply = self
            .cdp
            .call(
                "Runtime.evaluate",
                json!({ "expression": js, "returnByValue": true, "awaitPromise": true }),
                Some(&self.session),
            )
            .await?;
        if let Some(exception) = reply.get("exceptionDetails") {
            let text = exception["exception"]["description"]
                .as_str()
                .or_else(|| exception["text"].as_str())
                .unwrap_or("an exception");
            return Err(format!("{js}: {text}"));
        }
        Ok(reply["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Evaluates `js` in the page and returns its value as JSON; panics with the exception's
    /// text if it throws.
    pub async fn eval(&self, js: &str) -> Value {
        self.try_eval(js).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Evaluates `js` every 50 ms until it is `true`; panics after 30 s, naming `what` and
    /// the last value (or exception: one thrown while the page navigates is retried).
    pub async fn wait_until(&self, js: &str, what: &str) {
        let give_up = tokio::time::Instant::now() + GIVE_UP;
        loop {
            let last = self.try_eval(js).await;
            if last == Ok(Value::Bool(true)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "waited {GIVE_UP:?} for {what} ({js}); last: {last:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Emulates a screen of `width` × `height` CSS pixels; `mobile` also honours the page's
    /// viewport meta tag, as a phone does.
    pub async fn set_viewport(&self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({
                "width": width,
                "height": height,
                "deviceScaleFactor": if mobile { 3 } else { 1 },
                "mobile": mobile,
            }),
        )
        .await;
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        self.cdp
            .send("Target.closeTarget", json!({ "targetId": self.target }));
    }
}
