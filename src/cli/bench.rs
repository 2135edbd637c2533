//! `streamhub bench SCENARIO`: runs one benchmark scenario, prints its
//! summary and writes its results as JSON (see BENCHMARKS.md).

use std::path::PathBuf;

use anyhow::Context as _;

use crate::bench::{self, Options, Scenario};

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
pub async fn run(server: &str, args: BenchArgs) -> anyhow::Result<()> {
    let mut options = args.options;
    options.server = server.to_owned();
    let report = bench::run(args.scenario, &options)
        .await
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
