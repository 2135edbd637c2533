//! Building the server's tokio runtime from [`RuntimeConfig`].
//!
//! On one CPU the current-thread scheduler is chosen: the multi-thread
//! scheduler's "LIFO slot" runs a task woken by the running task next, so
//! each subscriber stream that hands a frame to its connection's HTTP/2 task
//! makes that task run and write at once, one `writev` per delivery. On one
//! thread the woken connection task queues behind the other streams and
//! writes their frames together (BENCHMARKS.md, Tuning).

use std::{io, num::NonZeroUsize};

use tokio::runtime::{Builder, Runtime};

use crate::config::{RuntimeConfig, RuntimeFlavor};

/// The scheduler [`build`] chooses for `config` on this machine, with the
/// number of threads running tasks.
pub fn resolve(config: &RuntimeConfig) -> (RuntimeFlavor, usize) {
    let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let workers = if config.worker_threads == 0 {
        cpus
    } else {
        config.worker_threads
    };
    match config.flavor {
        RuntimeFlavor::CurrentThread => (RuntimeFlavor::CurrentThread, 1),
        RuntimeFlavor::MultiThread => (RuntimeFlavor::MultiThread, workers),
        RuntimeFlavor::Auto if workers == 1 => (RuntimeFlavor::CurrentThread, 1),
        RuntimeFlavor::Auto => (RuntimeFlavor::MultiThread, workers),
    }
}

/// Builds the runtime `config` asks for (see [`resolve`]) and logs which.
pub fn build(config: &RuntimeConfig) -> io::Result<Runtime> {
    let (flavor, workers) = resolve(config);
    tracing::info!(?flavor, workers, "runtime");
    let mut builder = if flavor == RuntimeFlavor::MultiThread {
        let mut builder = Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    } else {
        Builder::new_current_thread()
    };
    builder.enable_all().thread_name("streamhub").build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_means_current_thread() {
        let config = RuntimeConfig {
            flavor: RuntimeFlavor::Auto,
            worker_threads: 1,
        };
        assert_eq!(resolve(&config), (RuntimeFlavor::CurrentThread, 1));
    }

    #[test]
    fn explicit_flavor_wins() {
        let config = RuntimeConfig {
            flavor: RuntimeFlavor::MultiThread,
            worker_threads: 1,
        };
        assert_eq!(resolve(&config), (RuntimeFlavor::MultiThread, 1));
        let config = RuntimeConfig {
            flavor: RuntimeFlavor::CurrentThread,
            worker_threads: 8,
        };
        assert_eq!(resolve(&config), (RuntimeFlavor::CurrentThread, 1));
    }

    #[test]
    fn built_runtime_runs_tasks() {
        let config = RuntimeConfig {
            flavor: RuntimeFlavor::Auto,
            worker_threads: 2,
        };
        let runtime = build(&config).expect("runtime builds");
        assert_eq!(
            runtime
                .block_on(async { tokio::spawn(async { 7 }).await })
                .ok(),
            Some(7)
        );
    }
}
