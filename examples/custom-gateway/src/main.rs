//! A gateway with one extra compiled-in plugin (`greeter`), built on the
//! `ws_proxy` library: the same flags, config file, signals and protocol as
//! the `ws-proxy` binary, plus `greeter.hello`.
//!
//! ```sh
//! cargo run -p custom-gateway -- --port 18790
//! ```

use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let settings = match ws_proxy::Settings::resolve(&ws_proxy::Cli::parse()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("custom-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    ws_proxy::init_logging(settings.log_format, &settings.log_level);
    let signals = settings.initial.restart.signals.clone();
    let server = match ws_proxy::ServerBuilder::new(settings)
        .plugin(custom_gateway::factory())
        .start()
        .await
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("custom-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    // SIGUSR1/SIGUSR2 restart in-process (the greeter is constructed anew),
    // SIGTERM/SIGINT stop gracefully.
    let stop = match ws_proxy::signals::install(server.gateway(), &signals) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("custom-gateway: cannot install signal handlers: {e}");
            return ExitCode::from(2);
        }
    };
    eprintln!("custom-gateway listening on ws://{}", server.local_addr());
    stop.cancelled().await;
    server.stop().await;
    ExitCode::SUCCESS
}
