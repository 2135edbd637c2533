//! `streamhub bench SCENARIO`: runs one benchmark scenario, prints its
//! summary and writes its results as JSON (see BENCHMARKS.md).

use std::path::PathBuf;

use anyhow::Context as _;

use crate::{
    bench::{self, Options, Scenario},
    config::RuntimeConfig,
    runtime,
};

/// Arguments of `streamhub bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Where to write the JSON results [default: bench/results/SCENARIO.json].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Settings of the run.
    #[command(flatten)]
    pub options: Options,
}

/// Runs the scenario, prints the summary, writes the JSON.
///
/// Pins this process first, then builds its runtime: pinned to one core,
/// the load generator runs on one thread (current-thread scheduler), which
/// decodes more messages per second on that core than worker threads
/// taking turns on it.
pub fn run(server: &str, args: BenchArgs) -> anyhow::Result<()> {
    let mut options = args.options;
    options.server = server.to_owned();
    let pinning = bench::Pinning::apply(&options);
    let runtime =
        runtime::build(&RuntimeConfig::default()).context("cannot start the async runtime")?;
    let report = runtime
        .block_on(bench::run(args.scenario, &options, pinning))
        .with_context(|| format!("benchmark {} failed", args.scenario.name()))?;
    print!("{}", report.summary(bench::summary_keys(args.scenario)));
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from(format!("bench/results/{}.json", args.scenario.name())));
    report
        .write(&out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!("results written to {}", out.display());
    Ok(())
}
