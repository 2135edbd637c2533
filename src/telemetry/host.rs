//! This machine's real CPU usage and used memory, read from the OS through
//! `sysinfo`, and the server task that reports them as a service.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use sysinfo::{MemoryRefreshKind, System};
use tokio_util::sync::CancellationToken;

use super::{Hub, Report};

/// Reads the host's CPU usage (%) and used memory (MB).
pub struct HostSampler {
    system: System,
}

impl std::fmt::Debug for HostSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSampler").finish_non_exhaustive()
    }
}

impl Default for HostSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl HostSampler {
    /// A sampler primed with a first CPU reading (CPU usage is a difference
    /// between two readings, so the very first sample is measured over the
    /// time since this call).
    pub fn new() -> Self {
        let mut system = System::new();
        system.refresh_cpu_usage();
        Self { system }
    }

    /// CPU usage in percent of all cores, and used memory in MB, since the
    /// previous call.
    pub fn sample(&mut self) -> (f64, f64) {
        self.system.refresh_cpu_usage();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let cpu = f64::from(self.system.global_cpu_usage());
        // Bytes to MB; precision loss is far below a byte of a MB.
        #[allow(clippy::cast_precision_loss)]
        let memory_mb = self.system.used_memory() as f64 / (1024.0 * 1024.0);
        (cpu.clamp(0.0, 100.0), memory_mb)
    }
}

/// The name a server reports its own host under: `configured` if set,
/// else `streamhub`, or `streamhub@<node>` for a cluster node named `node`
/// (every node its own, so they do not overwrite each other's values).
pub fn self_name(configured: &str, node: Option<&str>) -> String {
    match (configured, node) {
        ("", None) => "streamhub".to_owned(),
        ("", Some(node)) => format!("streamhub@{node}"),
        (name, _) => name.to_owned(),
    }
}

/// Reports this host's metrics under the configured self-name every
/// `interval` until `token` is cancelled. The request count is the number of
/// RPCs the server has handled.
pub async fn report_self(hub: Arc<Hub>, token: CancellationToken) {
    let interval = hub.config().self_sample_interval;
    if interval.is_zero() {
        return;
    }
    let name = hub.config().self_name.clone();
    let counter = hub.rpc_counter();
    let mut sampler = HostSampler::new();
    let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(200)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick completes at once; wait one period so the first CPU
    // reading covers a real span of time.
    ticks.tick().await;
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let (cpu_usage, memory_mb) = sampler.sample();
        let report = Report {
            service: name.clone(),
            cpu_usage,
            memory_mb,
            request_count: counter.load(Ordering::Relaxed),
            timestamp_ms: 0,
        };
        if let Err(err) = hub.ingest(report) {
            tracing::warn!(%err, service = %name, "could not record the host's own sample");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::self_name;

    #[test]
    fn the_default_self_name_names_the_cluster_node() {
        assert_eq!(self_name("", None), "streamhub");
        assert_eq!(self_name("", Some("a:50051")), "streamhub@a:50051");
        assert_eq!(self_name("mine", Some("a:50051")), "mine");
        assert_eq!(self_name("mine", None), "mine");
    }
}
