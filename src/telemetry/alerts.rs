//! Edge-triggered threshold alerts.
//!
//! For each rule and service, an alert fires once when the value crosses
//! above the threshold, repeats at most once per repeat interval while it
//! stays above, and a `<NAME>_RESOLVED` alert follows when it falls back.
//!
//! Time is the samples' own time (`timestamp_ms`, which the hub sets to the
//! server's clock when a client leaves it 0), so the rules are a pure
//! function of the samples and can be tested without waiting.

use std::{collections::HashMap, sync::Arc, time::Duration};

use super::Sample;
use crate::config::{AlertRuleConfig, Metric};

/// An alert produced by a rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// `CPU_HIGH`, `CPU_HIGH_RESOLVED`, …
    pub alert_type: String,
    /// Human-readable text naming service, value and threshold.
    pub message: String,
    /// The value that triggered the alert.
    pub value: f64,
    /// Time of the sample that triggered it (Unix ms).
    pub timestamp_ms: u64,
}

impl Metric {
    fn of(self, sample: &Sample) -> f64 {
        match self {
            Metric::CpuUsage => sample.cpu_usage,
            Metric::MemoryMb => sample.memory_mb,
            // Precision loss above 2^53 requests is irrelevant for a threshold.
            #[allow(clippy::cast_precision_loss)]
            Metric::RequestCount => sample.request_count as f64,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Metric::CpuUsage => "CPU",
            Metric::MemoryMb => "Memory",
            Metric::RequestCount => "Requests",
        }
    }

    fn format(self, value: f64) -> String {
        match self {
            Metric::CpuUsage => format!("{value:.1}%"),
            Metric::MemoryMb => format!("{value:.0}MB"),
            Metric::RequestCount => format!("{value:.0}"),
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Metric::CpuUsage => "%",
            Metric::MemoryMb => "MB",
            Metric::RequestCount => "",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Firing {
    last_sent_ms: u64,
}

/// Alert state of one stream of samples (one LiveFeed call).
#[derive(Debug)]
pub struct AlertEngine {
    rules: Arc<[AlertRuleConfig]>,
    repeat_ms: u64,
    /// Only rules currently above their threshold have an entry, so the map
    /// stays as small as the set of ongoing alerts.
    firing: HashMap<(Arc<str>, usize), Firing>,
}

impl AlertEngine {
    /// An engine running `rules`, repeating ongoing alerts at most once per
    /// `repeat`.
    pub fn new(rules: Arc<[AlertRuleConfig]>, repeat: Duration) -> Self {
        Self {
            rules,
            repeat_ms: u64::try_from(repeat.as_millis()).unwrap_or(u64::MAX),
            firing: HashMap::new(),
        }
    }

    /// Runs every rule on `sample`; returns the alerts it causes.
    pub fn evaluate(&mut self, sample: &Sample) -> Vec<Alert> {
        let mut alerts = Vec::new();
        for (index, rule) in self.rules.iter().enumerate() {
            let value = rule.metric.of(sample);
            let key = (Arc::clone(&sample.service), index);
            let now = sample.timestamp_ms;
            let above = value > rule.above;
            match (above, self.firing.get_mut(&key)) {
                (true, None) => {
                    self.firing.insert(key, Firing { last_sent_ms: now });
                    alerts.push(raise(rule, sample, value));
                }
                (true, Some(firing)) => {
                    if now.saturating_sub(firing.last_sent_ms) >= self.repeat_ms {
                        firing.last_sent_ms = now;
                        alerts.push(raise(rule, sample, value));
                    }
                }
                (false, Some(_)) => {
                    self.firing.remove(&key);
                    alerts.push(resolve(rule, sample, value));
                }
                (false, None) => {}
            }
        }
        alerts
    }
}

fn raise(rule: &AlertRuleConfig, sample: &Sample, value: f64) -> Alert {
    let metric = rule.metric;
    Alert {
        alert_type: rule.name.clone(),
        message: format!(
            "{}: {} at {} — above {}{} threshold",
            sample.service,
            metric.label(),
            metric.format(value),
            rule.above,
            metric.unit()
        ),
        value,
        timestamp_ms: sample.timestamp_ms,
    }
}

fn resolve(rule: &AlertRuleConfig, sample: &Sample, value: f64) -> Alert {
    let metric = rule.metric;
    Alert {
        alert_type: format!("{}_RESOLVED", rule.name),
        message: format!(
            "{}: {} back to {} — at or below {}{} threshold",
            sample.service,
            metric.label(),
            metric.format(value),
            rule.above,
            metric.unit()
        ),
        value,
        timestamp_ms: sample.timestamp_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TelemetryConfig;

    fn sample(service: &str, cpu: f64, memory: f64, at_s: u64) -> Sample {
        Sample {
            service: Arc::from(service),
            cpu_usage: cpu,
            memory_mb: memory,
            request_count: 0,
            timestamp_ms: at_s * 1000,
            seq: 0,
        }
    }

    fn engine() -> AlertEngine {
        let config = TelemetryConfig::default();
        AlertEngine::new(config.rules.into(), config.alert_repeat_interval)
    }

    fn types(alerts: &[Alert]) -> Vec<&str> {
        alerts.iter().map(|a| a.alert_type.as_str()).collect()
    }

    #[test]
    fn fires_once_repeats_after_interval_and_resolves() {
        let mut e = engine();
        assert!(e.evaluate(&sample("api", 45.0, 100.0, 0)).is_empty());
        let fired = e.evaluate(&sample("api", 95.0, 100.0, 1));
        assert_eq!(types(&fired), ["CPU_HIGH"]);
        assert_eq!(fired[0].message, "api: CPU at 95.0% — above 90% threshold");
        assert_eq!(fired[0].value, 95.0);
        // Still above, within the repeat interval: silence.
        for t in 2..61 {
            assert!(
                e.evaluate(&sample("api", 97.0, 100.0, t)).is_empty(),
                "t={t}"
            );
        }
        // 60 s after the first alert: one repeat.
        assert_eq!(
            types(&e.evaluate(&sample("api", 97.0, 100.0, 61))),
            ["CPU_HIGH"]
        );
        let resolved = e.evaluate(&sample("api", 50.0, 100.0, 62));
        assert_eq!(types(&resolved), ["CPU_HIGH_RESOLVED"]);
        assert!(resolved[0].message.contains("back to 50.0%"));
        assert!(e.evaluate(&sample("api", 50.0, 100.0, 63)).is_empty());
    }

    #[test]
    fn services_and_rules_are_independent() {
        let mut e = engine();
        let both = e.evaluate(&sample("a", 95.0, 5000.0, 1));
        assert_eq!(types(&both), ["CPU_HIGH", "MEMORY_HIGH"]);
        assert_eq!(
            both[1].message,
            "a: Memory at 5000MB — above 4096MB threshold"
        );
        assert_eq!(types(&e.evaluate(&sample("b", 95.0, 1.0, 1))), ["CPU_HIGH"]);
        assert_eq!(
            types(&e.evaluate(&sample("a", 95.0, 1.0, 2))),
            ["MEMORY_HIGH_RESOLVED"]
        );
    }

    #[test]
    fn threshold_is_strict() {
        let mut e = engine();
        assert!(e.evaluate(&sample("a", 90.0, 4096.0, 1)).is_empty());
    }

    #[test]
    fn clock_going_backwards_does_not_repeat() {
        let mut e = engine();
        e.evaluate(&sample("a", 95.0, 1.0, 100));
        assert!(e.evaluate(&sample("a", 95.0, 1.0, 5)).is_empty());
    }
}
