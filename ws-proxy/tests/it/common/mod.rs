//! Shared test helpers: an in-process server, the ws-proxy binary as a child
//! process, and a small protocol client.
#![allow(dead_code, unreachable_pub, missing_debug_implementations)]

use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

/// How long any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(10);
/// The token every test server uses.
pub const TOKEN: &str = "test-token-123";

/// A server started in this process.
pub struct Server {
    pub server: Option<ws_proxy::RunningServer>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Server {
    /// Start with `--port 0 --token TOKEN --state-dir <tmp>` plus `args`.
    pub async fn start(args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut argv: Vec<String> = vec!["ws-proxy".into(), "--port".into(), "0".into()];
        if !args.contains(&"--auth") {
            argv.extend(["--token".into(), TOKEN.into()]);
        }
        argv.extend(["--state-dir".into(), state.display().to_string()]);
        argv.extend(args.iter().map(|s| s.to_string()));
        let cli = ws_proxy::Cli::parse_from(argv);
        let settings = ws_proxy::Settings::resolve(&cli).expect("settings");
        let server = ws_proxy::start(settings).await.expect("start");
        let addr = server.local_addr();
        Server {
            server: Some(server),
            addr,
            dir,
        }
    }

    /// Start with a config file holding `toml` (written to the temp dir).
    pub async fn with_config(toml: &str, args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, toml).unwrap();
        let p = path.display().to_string();
        let mut all = vec!["--config", p.as_str()];
        all.extend_from_slice(args);
        let mut s = Server::start(&all).await;
        s.dir = dir;
        s
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn running(&self) -> &ws_proxy::RunningServer {
        self.server.as_ref().unwrap()
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
    }
}

/// A client WebSocket speaking the protocol.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub events: VecDeque<Value>,
    next_id: u64,
}

/// What ended a connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Closed {
    pub code: Option<u16>,
    pub reason: String,
}

impl Client {
    /// Open a WebSocket; nothing read yet.
    pub async fn open(url: &str) -> Client {
        let (ws, _) = timeout(WAIT, connect_async(url))
            .await
            .expect("connect timed out")
            .expect("connect");
        Client {
            ws,
            events: VecDeque::new(),
            next_id: 0,
        }
    }

    /// Open, read the challenge, connect with `token` and `scopes`; returns hello-ok.
    pub async fn connect(url: &str, token: Option<&str>, scopes: &[&str]) -> (Client, Value) {
        let mut c = Client::open(url).await;
        let ch = c.next_frame().await.expect("challenge");
        assert_eq!(ch["event"], "connect.challenge", "{ch}");
        let mut params = connect_params(4, 4, scopes);
        if let Some(t) = token {
            params["auth"] = json!({"token": t});
        }
        let res = c.request_raw("connect", params).await;
        assert_eq!(res["ok"], true, "connect failed: {res}");
        let hello = res["payload"].clone();
        (c, hello)
    }

    /// Connect as an admin operator with the test token.
    pub async fn admin(url: &str) -> (Client, Value) {
        Client::connect(url, Some(TOKEN), &["operator.admin"]).await
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text.to_string())).await.unwrap();
    }

    /// Send; `false` when the connection is gone.
    pub async fn send_json_checked(&mut self, v: &Value) -> bool {
        self.ws.send(Message::text(v.to_string())).await.is_ok()
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string()).await;
    }

    /// The next text frame as JSON, or `Err` with how the connection ended.
    pub async fn next_frame(&mut self) -> Result<Value, Closed> {
        loop {
            let msg = timeout(WAIT, self.ws.next())
                .await
                .expect("no frame within the deadline");
            match msg {
                Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(f))) => return Err(closed(f)),
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    return Err(Closed {
                        code: None,
                        reason: e.to_string(),
                    });
                }
                None => {
                    return Err(Closed {
                        code: None,
                        reason: "stream ended".into(),
                    });
                }
            }
        }
    }

    /// Read until the close frame; events and responses before it are returned.
    pub async fn until_closed(&mut self) -> (Vec<Value>, Closed) {
        let mut seen = Vec::new();
        loop {
            match self.next_frame().await {
                Ok(v) => seen.push(v),
                Err(c) => return (seen, c),
            }
        }
    }

    pub fn fresh_id(&mut self) -> String {
        self.next_id += 1;
        format!("r{}", self.next_id)
    }

    /// Send a request with params (raw) and wait for its response; events
    /// arriving meanwhile are kept in `events`.
    pub async fn request_raw(&mut self, method: &str, params: Value) -> Value {
        let id = self.fresh_id();
        self.send_json(&json!({"type":"req","id":id,"method":method,"params":params}))
            .await;
        self.response(&id).await
    }

    /// Call a method with params.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.request_raw(method, params).await
    }

    /// Wait for the response to `id`.
    pub async fn response(&mut self, id: &str) -> Value {
        loop {
            let f = self
                .next_frame()
                .await
                .unwrap_or_else(|c| panic!("closed while waiting for {id}: {c:?}"));
            if f["type"] == "res" && f["id"] == id {
                return f;
            }
            if f["type"] == "event" {
                self.events.push_back(f);
            }
        }
    }

    /// Wait for an event named `name` (checking those already received first).
    pub async fn event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i).unwrap();
        }
        loop {
            let f = self
                .next_frame()
                .await
                .unwrap_or_else(|c| panic!("closed while waiting for event {name}: {c:?}"));
            if f["type"] == "event" {
                if f["event"] == name {
                    return f;
                }
                self.events.push_back(f);
            }
        }
    }
}

fn closed(f: Option<CloseFrame>) -> Closed {
    match f {
        Some(f) => Closed {
            code: Some(u16::from(f.code)),
            reason: f.reason.to_string(),
        },
        None => Closed {
            code: None,
            reason: String::new(),
        },
    }
}

/// `connect` params like the OpenClaw CLI sends.
pub fn connect_params(min: u32, max: u32, scopes: &[&str]) -> Value {
    json!({
        "minProtocol": min, "maxProtocol": max,
        "client": {"id":"cli","version":"2026.9.6","platform":"linux","deviceFamily":"Linux","mode":"cli","instanceId":"t"},
        "caps": [], "role": "operator", "scopes": scopes,
    })
}

/// Plain HTTP request; returns status, lower-cased headers and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = timeout(WAIT, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Value of an unlabelled metric (or a full `name{labels}` key).
pub fn metric(body: &str, key: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == key).then(|| v.parse().ok())?
    })
}

/// Poll `f` until it returns `Some`, or panic after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Write a plugin dir with one manifest plugin `id` serving `methods`
/// (`(name, handler, scope)`).
/// `dir/gateway.toml` loading plugins from `dir/plugins` (created), plus
/// `extra` TOML; returns its path.
pub fn config_for(dir: &Path, extra: &str) -> std::path::PathBuf {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[plugins]\ndirs = [{:?}]\n{extra}",
            plugins.display().to_string()
        ),
    )
    .unwrap();
    path
}

pub fn write_plugin(dir: &Path, id: &str, methods: &[(&str, &str)]) {
    let pdir = dir.join(id);
    std::fs::create_dir_all(&pdir).unwrap();
    let methods: Vec<Value> = methods
        .iter()
        .map(|(name, handler)| json!({"name": name, "handler": handler, "scope": "operator.read", "ms": 50}))
        .collect();
    let manifest = json!({"id": id, "version": "1.0.0", "methods": methods});
    let tmp = pdir.join("openclaw.plugin.json.tmp");
    std::fs::write(&tmp, manifest.to_string()).unwrap();
    std::fs::rename(&tmp, pdir.join("openclaw.plugin.json")).unwrap();
}

/// The ws-proxy binary as a child process.
pub struct Proc {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// Stdout after the listening line.
    pub stdout: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Proc {
    /// Start the binary with `--port 0 --token TOKEN --state-dir <tmp>` plus
    /// `args`, and read the bound address from its stdout.
    pub async fn start(args: &[String]) -> Proc {
        let dir = tempfile::tempdir().unwrap();
        Proc::start_in(dir, args).await
    }

    pub async fn start_in(dir: tempfile::TempDir, args: &[String]) -> Proc {
        let mut all: Vec<String> =
            vec!["--port".into(), "0".into(), "--token".into(), TOKEN.into()];
        all.push("--state-dir".into());
        all.push(dir.path().join("state").display().to_string());
        all.extend(args.iter().cloned());
        Proc::spawn(dir, &all).await
    }

    /// [`Proc::start_in`] for a gateway whose file access file modes bind.
    /// As root (CI runs as root, and modes do not bind root), the binary is
    /// copied into `dir`, `dir` is handed to `nobody`, and the gateway runs
    /// as `nobody`; as any other user it runs as that user.
    pub async fn start_unprivileged_in(dir: tempfile::TempDir, args: &[String]) -> Proc {
        let mut all: Vec<String> =
            vec!["--port".into(), "0".into(), "--token".into(), TOKEN.into()];
        all.push("--state-dir".into());
        all.push(dir.path().join("state").display().to_string());
        all.extend(args.iter().cloned());
        if !nix::unistd::geteuid().is_root() {
            return Proc::spawn(dir, &all).await;
        }
        const NOBODY: u32 = 65534;
        let program = dir.path().join("ws-proxy");
        std::fs::copy(env!("CARGO_BIN_EXE_ws-proxy"), &program).unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            std::os::unix::fs::chown(entry.unwrap().path(), Some(NOBODY), Some(NOBODY)).unwrap();
        }
        std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
        let mut cmd = tokio::process::Command::new(&program);
        cmd.uid(NOBODY).gid(NOBODY);
        Proc::spawn_command(cmd, dir, &all).await
    }

    /// Start the binary with exactly `args`, in `dir` as working directory.
    pub async fn spawn(dir: tempfile::TempDir, args: &[String]) -> Proc {
        let cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_ws-proxy"));
        Proc::spawn_command(cmd, dir, args).await
    }

    async fn spawn_command(
        mut cmd: tokio::process::Command,
        dir: tempfile::TempDir,
        args: &[String],
    ) -> Proc {
        cmd.args(args)
            .current_dir(dir.path())
            .env_remove("GATEWAY_TOKEN")
            .env_remove("GATEWAY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn ws-proxy");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        collect(child.stderr.take().unwrap(), stderr.clone());
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("ws-proxy listening on ws://") {
                    let a = rest.split_whitespace().next().unwrap();
                    return a.parse::<SocketAddr>().ok();
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no listening line; stderr:\n{}", stderr.lock().unwrap()));
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let out = stdout.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                let mut s = out.lock().unwrap();
                s.push_str(&l);
                s.push('\n');
            }
        });
        Proc {
            stdout,
            child,
            addr,
            dir,
            stderr,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id().unwrap() as i32)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).unwrap();
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Wait for exit; panics after `within`.
    pub async fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        match timeout(within, self.child.wait()).await {
            Ok(s) => s.unwrap(),
            Err(_) => panic!("ws-proxy did not exit; stderr:\n{}", self.stderr()),
        }
    }
}

fn collect(
    r: impl AsyncRead + Unpin + Send + 'static,
    into: std::sync::Arc<std::sync::Mutex<String>>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            let mut s = into.lock().unwrap();
            s.push_str(&l);
            s.push('\n');
        }
    });
}

/// Run the binary to completion with `args` (no port/token defaults).
pub async fn run_binary(args: &[&str], cwd: Option<&PathBuf>) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_ws-proxy"));
    cmd.args(args)
        .env_remove("GATEWAY_TOKEN")
        .env_remove("GATEWAY_CONFIG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let out = timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("binary did not exit")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The method names of a `features` object (hello-ok's or `gateway.generation`'s).
pub fn methods_of(features: &Value) -> std::collections::BTreeSet<String> {
    features["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect()
}
