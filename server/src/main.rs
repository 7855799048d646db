//! The `herald` binary: configuration from the environment and flags, logging, signals.
//! Everything else lives in the library (`herald_server::run`).

use anyhow::Context;
use std::process::ExitCode;

use clap::Parser;
use herald_server::{Config, StartError};
use tracing_subscriber::EnvFilter;

/// The allocator: mimalloc keeps per-thread free lists and returns memory to the OS in
/// small pages. glibc's malloc showed up as about a tenth of the node's CPU under push
/// load (`perf`), and its arenas hold on to freed memory after connection bursts.
/// The `system-alloc` feature keeps the system allocator instead, for heap profilers
/// that hook `malloc` (heaptrack; docs/benchmarks.md, "Memory per connection").
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status of a configuration the node refuses (as clap's for a bad flag).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let config = Config::parse();
    // The startup rules (keys, dev mode) before binding anything: a node that must not
    // run never listens, not even for a moment. `run` checks them again for the bound
    // address.
    if let Err(e) = herald_server::auth::dev_mode(&config) {
        eprintln!("herald: cannot start: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    match start(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line. A start error's own message is complete (its source is already
            // in it); anything else gets its chain of causes.
            match e.downcast_ref::<StartError>() {
                Some(StartError::Keys(k)) => {
                    eprintln!("herald: cannot start: {k}");
                    ExitCode::from(EXIT_CONFIG)
                }
                Some(other) => {
                    eprintln!("herald: cannot start: {other}");
                    ExitCode::FAILURE
                }
                None => {
                    eprintln!("herald: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn start(config: Config) -> anyhow::Result<()> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    runtime
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if config.log_format == "json" {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    raise_fd_limit();
    let listener =
        listen(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
    herald_server::run(listener, config, shutdown_signal()).await?;
    Ok(())
}

/// Pending connections the kernel queues for `accept` (capped by `net.core.somaxconn`).
/// tokio's `bind` asks for 1024; a reconnect wave after a node failure brings thousands
/// of handshakes at once, and a full queue drops SYNs, which clients retry only after a
/// second.
const LISTEN_BACKLOG: i32 = 8192;

/// Binds the listening socket with a deep accept queue.
fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Raises the soft file-descriptor limit to the hard limit, so the node can hold as many
/// sockets as the machine allows without tuning.
fn raise_fd_limit() {
    #[cfg(unix)]
    {
        use rlimit::Resource;
        match Resource::NOFILE.get() {
            Ok((soft, hard)) if soft < hard => match Resource::NOFILE.set(hard, hard) {
                Ok(()) => {
                    tracing::info!(from = soft, to = hard, "raised the file-descriptor limit")
                }
                Err(e) => {
                    tracing::warn!(error = %e, soft, hard, "could not raise the file-descriptor limit")
                }
            },
            Ok((soft, _)) => tracing::info!(limit = soft, "file-descriptor limit"),
            Err(e) => tracing::warn!(error = %e, "could not read the file-descriptor limit"),
        }
    }
}
