//! The `streamhub` binary: parses arguments, sets up logging, and calls the
//! library.

use clap::{Parser, Subcommand};
use streamhub::cli::{self, Context};
use tracing_subscriber::EnvFilter;

/// A gRPC streaming hub: live telemetry, metrics in and alerts out,
/// resumable chunked uploads, and chat rooms.
#[derive(Debug, Parser)]
#[command(name = "streamhub", version, about)]
struct Cli {
    /// Server URL the client subcommands talk to; several (comma-separated
    /// or repeated) for the nodes of a cluster: the first that answers is
    /// used, and a reconnect moves on to the next when a node is gone.
    #[arg(
        long,
        global = true,
        env = "STREAMHUB_SERVER",
        default_value = "http://127.0.0.1:50051",
        value_delimiter = ','
    )]
    server: Vec<String>,
    /// Print one JSON object per line instead of human-readable text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (until SIGTERM or Ctrl-C).
    Serve(cli::serve::ServeArgs),
    /// Show the latest sample of a service.
    Snapshot(cli::telemetry::SnapshotArgs),
    /// List the services the server knows, with their latest samples.
    Services,
    /// Print a service's samples as they arrive, until Ctrl-C.
    Subscribe(cli::telemetry::SubscribeArgs),
    /// Stream this machine's metrics through LiveFeed and print the alerts.
    Feed(cli::telemetry::FeedArgs),
    /// Upload a file in chunks, resuming where an interrupted upload stopped.
    Upload(cli::upload::UploadArgs),
    /// List the stored files with their sizes and SHA-256.
    Files,
    /// Download a stored file and verify its SHA-256.
    Download(cli::upload::DownloadArgs),
    /// Chat in a room: lines typed (or piped) are sent, messages received
    /// are shown; survives server restarts without loss or repeats.
    Chat(cli::chat::ChatArgs),
    /// A short tour of every streaming pattern against a running server.
    Demo(cli::demo::DemoArgs),
    /// Run a benchmark scenario and write its results as JSON.
    Bench(Box<cli::bench::BenchArgs>),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        // The NATS client logs every reconnect attempt at info.
        Command::Bench(_) => "info,async_nats=warn",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let ctx = Context::new(cli.server, cli.json);
    match cli.command {
        // The server builds the runtime its configuration asks for.
        Command::Serve(args) => cli::serve::run(args),
        Command::Snapshot(args) => block_on(cli::telemetry::snapshot(&ctx, args)),
        Command::Services => block_on(cli::telemetry::services(&ctx)),
        Command::Subscribe(args) => block_on(cli::telemetry::subscribe(&ctx, args)),
        Command::Feed(args) => block_on(cli::telemetry::feed(&ctx, args)),
        Command::Upload(args) => block_on(cli::upload::upload(&ctx, args)),
        Command::Files => block_on(cli::upload::files(&ctx)),
        Command::Download(args) => block_on(cli::upload::download(&ctx, args)),
        Command::Chat(args) => block_on(cli::chat::run(&ctx, args)),
        Command::Demo(args) => block_on(cli::demo::run(&ctx, args)),
        // The load generator pins itself, then builds its runtime.
        Command::Bench(args) => cli::bench::run(&ctx.server, *args),
    }
}

/// Runs a client subcommand on tokio's default multi-thread runtime.
fn block_on(command: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(command)
}
