//! `ws-proxy`: serve the gateway until SIGTERM/SIGINT; restart in-process on
//! the configured restart signals.

use clap::Parser;
use std::process::ExitCode;
use std::time::Duration;
use ws_proxy::{AuthMode, Cli, RunningServer, SecretOrigin, Settings};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::resolve(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ws-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    ws_proxy::init_logging(settings.log_format, &settings.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ws-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(settings));
    // A stuck plugin task cannot hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(2));
    code
}

async fn run(settings: Settings) -> ExitCode {
    let signals = settings.initial.restart.signals.clone();
    let banner = Banner::from(&settings);
    let server = match ws_proxy::start(settings).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ws-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let stop = match ws_proxy::signals::install(server.gateway(), &signals) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ws-proxy: cannot install signal handlers: {e}");
            return ExitCode::from(2);
        }
    };
    banner.print(&server);
    stop.cancelled().await;
    server.stop().await;
    ExitCode::SUCCESS
}

/// What the startup banner says about auth and where the dashboard is.
struct Banner {
    mode: AuthMode,
    secret: Option<String>,
    origin: SecretOrigin,
}

impl Banner {
    fn from(s: &Settings) -> Self {
        Banner {
            mode: s.auth.mode,
            secret: s.auth.secret.clone(),
            origin: s.auth.origin.clone(),
        }
    }

    /// The token appears in full only when it was generated at this start
    /// (nobody knows it yet) and in the dashboard link's fragment, which a
    /// browser never sends to the server.
    #[allow(clippy::print_stdout)]
    fn print(&self, server: &RunningServer) {
        let addr = server.local_addr();
        let url = format!("ws://{addr}");
        let g = server.gateway().current();
        println!(
            "ws-proxy listening on {url} (generation {}, {} methods)",
            g.generation(),
            g.features().methods.len()
        );
        let (cred, fragment) = match (self.mode, &self.secret) {
            (AuthMode::None, _) => {
                println!("auth: none");
                (String::new(), String::new())
            }
            (AuthMode::Token, Some(token)) => {
                println!("auth: token ({})", self.origin.describe());
                let cred = if matches!(self.origin, SecretOrigin::Generated(_)) {
                    format!(" --token {token}")
                } else {
                    " --token \"$GATEWAY_TOKEN\"".to_string()
                };
                (cred, format!("#token={}", fragment_escape(token)))
            }
            (AuthMode::Token, None) => {
                println!("auth: token");
                (" --token \"$GATEWAY_TOKEN\"".to_string(), String::new())
            }
            (AuthMode::Password, _) => {
                println!("auth: password ({})", self.origin.describe());
                (
                    " --password \"$GATEWAY_PASSWORD\"".to_string(),
                    String::new(),
                )
            }
        };
        println!("dashboard: http://{addr}/{fragment}");
        println!("connect: openclaw gateway call health --url {url}{cred} --json");
    }
}

/// Percent-encode what would end or confuse a URL fragment.
fn fragment_escape(s: &str) -> String {
    s.bytes()
        .fold(String::with_capacity(s.len()), |mut out, b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
            out
        })
}
