//! `cargo xtask idle-conns --conns N`: open N authenticated, idle WebSocket
//! connections to the release ws-proxy binary and report its RSS per
//! connection (RSS with N open minus RSS before, over N).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::net::TcpStream;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::soak::Gateway;

/// Handshakes in flight at once (below the gateway's pending cap).
const CONCURRENCY: usize = 128;
/// The goal per idle authenticated connection.
const GOAL_KIB: f64 = 32.0;

/// `true` when all `conns` connections were open at once.
pub(crate) fn run(conns: usize) -> Result<bool> {
    raise_fd_limit(conns)?;
    let binary = crate::process::build_binary("ws-proxy", true)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let g = Gateway::start_with(&binary, &[]).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = g.rss_kib()?;
        let started = Instant::now();
        let mut open = Vec::with_capacity(conns);
        let mut pending = FuturesUnordered::new();
        let mut next = 0;
        while open.len() < conns {
            while next < conns && pending.len() < CONCURRENCY {
                pending.push(connect(&g));
                next += 1;
            }
            let ws = pending
                .next()
                .await
                .context("no connection pending")?
                .with_context(|| format!("connection {} failed", open.len() + 1))?;
            open.push(ws);
        }
        let took = started.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let counted = g.metric("gateway_connections_open").await?;
        let after = g.rss_kib()?;
        let per = (after.saturating_sub(before)) as f64 / conns as f64;
        println!(
            "idle-conns: {conns} authenticated idle connections opened in {:.1}s; gateway_connections_open {counted}",
            took.as_secs_f64()
        );
        println!(
            "idle-conns: RSS {before} KiB before, {after} KiB with them open: {per:.1} KiB per connection (goal < {GOAL_KIB} KiB)"
        );
        ensure!(counted as usize == conns, "the gateway counts {counted} open");
        drop(open);
        Ok(per < GOAL_KIB)
    })
}

/// One authenticated connection with small client-side buffers.
async fn connect(
    g: &Gateway,
) -> Result<tokio_tungstenite::WebSocketStream<MaybeTlsStream<TcpStream>>> {
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096);
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(g.url(), Some(config), true).await?;
    crate::hostile::handshake_on(&mut ws, g).await?;
    Ok(ws)
}

/// Raise this process's descriptor soft limit to the hard one; the gateway
/// raises its own at start.
fn raise_fd_limit(conns: usize) -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if hard > soft {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    ensure!(
        hard as usize > conns + 64,
        "the descriptor limit ({hard}) is too low for {conns} connections"
    );
    Ok(())
}
