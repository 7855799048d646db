//! `herald-loadtest`: the load generator and benchmark harness for Herald.
//!
//! Map of the modules:
//! - [`cli`]: the command line (one subcommand per scenario);
//! - [`setup`]: the cluster under test (given, or spawned by [`cluster`]), keys, run id;
//! - [`client`]: the lean WebSocket client (connect, hello, read loop, reconnect+resume);
//! - [`publish`]: publishing through the HTTP API; [`token`]: locally signed tokens;
//! - [`ledger`]: exact loss / duplicate / reorder accounting by offset;
//! - [`latency`]: sharded HDR histograms; [`nodes`]: node pids, memory, connection gauge;
//! - [`actions`]: the timed kill / drain / restart / exec steps of `chaos`;
//! - [`scenario`]: `connections` (with worker processes), `push` (+ `chaos`), `broadcast`;
//! - [`workers`]: worker processes for more sockets than one process may hold;
//! - [`report`]: the JSON report and the human summary; [`progress`]: progress bars.

mod actions;
mod cli;
mod client;
mod cluster;
mod latency;
mod ledger;
mod nodes;
mod progress;
mod publish;
mod redis_cpu;
mod report;
mod scenario;
mod setup;
mod token;
mod workers;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::report::Report;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Every socket is a descriptor: take the whole hard limit.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (report, check) = match runtime.block_on(run(&cli))? {
        Some(r) => r,
        None => return Ok(()),
    };
    print!("{}", report.summary());
    if check {
        let bad = report.lost + report.duplicates + report.reordered + report.resyncs;
        if bad > 0 || report.connections == 0 {
            eprintln!("check failed: lost, duplicated, reordered or resynced messages (or no connections)");
            std::process::exit(3);
        }
    }
    // Sessions and spawned nodes are gone; do not wait for stray tasks.
    runtime.shutdown_background();
    Ok(())
}

async fn run(cli: &Cli) -> anyhow::Result<Option<(Report, bool)>> {
    let (report, common) = match &cli.command {
        Command::Worker(args) => {
            match args.kind.as_str() {
                "connections" => scenario::connections::worker(&args.spec).await?,
                "broadcast" => scenario::broadcast::worker(&args.spec).await?,
                other => anyhow::bail!("unknown worker kind {other:?}"),
            }
            return Ok(None);
        }
        Command::Connections(args) => (scenario::connections::run(args).await?, &args.common),
        Command::Push(args) => (
            scenario::push::run(args, Vec::new(), "push").await?,
            &args.common,
        ),
        Command::Chaos(args) => {
            let mut steps = Vec::new();
            for a in &args.action {
                steps.push(actions::parse_action(a)?);
            }
            for e in &args.exec {
                steps.push(actions::parse_exec(e)?);
            }
            (
                scenario::push::run(&args.push, steps, "chaos").await?,
                &args.push.common,
            )
        }
        Command::Broadcast(args) => (scenario::broadcast::run(args).await?, &args.common),
    };
    if let Some(path) = &common.report {
        report.write(path)?;
    }
    Ok(Some((report, common.check)))
}
