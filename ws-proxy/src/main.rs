//! `ws-proxy`: serve the gateway until SIGTERM/SIGINT; restart in-process on
//! the configured restart signals.

use clap::Parser;
use std::process::ExitCode;
use std::time::Duration;
use ws_proxy::{AuthMode, Cli, RunningServer, Settings};

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

/// What the startup banner says about auth.
struct Banner {
    mode: AuthMode,
    secret: Option<String>,
    generated: Option<std::path::PathBuf>,
}

impl Banner {
    fn from(s: &Settings) -> Self {
        Banner {
            mode: s.auth.mode,
            secret: s.auth.secret.clone(),
            generated: s
                .auth
                .generated
                .then(|| s.state_dir.join(ws_proxy::config::TOKEN_FILE)),
        }
    }

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
        let cred = match (self.mode, &self.generated, &self.secret) {
            (AuthMode::None, _, _) => {
                println!("auth: none");
                String::new()
            }
            (AuthMode::Token, Some(path), Some(token)) => {
                println!("auth: token (generated, stored in {})", path.display());
                format!(" --token {token}")
            }
            (AuthMode::Token, _, _) => {
                println!("auth: token");
                " --token \"$GATEWAY_TOKEN\"".to_string()
            }
            (AuthMode::Password, _, _) => {
                println!("auth: password");
                " --password \"$GATEWAY_PASSWORD\"".to_string()
            }
        };
        println!("connect: openclaw gateway call health --url {url}{cred} --json");
    }
}
