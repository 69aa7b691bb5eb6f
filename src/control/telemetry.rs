//! What a running process knows about its guest and its protection, kept
//! in one place and read two ways: the control API's `status` (JSON) and
//! the Prometheus endpoint (`--metrics`). The main loop updates it from
//! the events it already reports; readers never touch the VM.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use serde_json::{Value, json};

/// Samples kept for the percentiles `status` reports (the most recent).
const WINDOW: usize = 1024;

/// What a process does with its guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Runs the guest and protects it (or tries to).
    Primary,
    /// Holds a backup and takes over when its primary is lost.
    Secondary,
    /// Runs the guest, unprotected (`run`, a migration's source, a
    /// secondary after a takeover or a migration arrived).
    Standalone,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Secondary => "secondary",
            Self::Standalone => "standalone",
        }
    }
}

/// Recent samples of a latency, for percentiles.
#[derive(Default)]
struct Window(VecDeque<Duration>);

impl Window {
    fn push(&mut self, sample: Duration) {
        if self.0.len() == WINDOW {
            self.0.pop_front();
        }
        self.0.push_back(sample);
    }

    /// p50, p99 and max in microseconds, or null when empty.
    fn json(&self) -> Value {
        if self.0.is_empty() {
            return Value::Null;
        }
        let mut sorted: Vec<Duration> = self.0.iter().copied().collect();
        sorted.sort_unstable();
        let at =
            |q: f64| sorted[understudy_bench::nearest_rank(sorted.len(), q)].as_secs_f64() * 1e6;
        json!({"p50_us": at(0.5), "p99_us": at(0.99), "max_us": at(1.0), "samples": sorted.len()})
    }
}

/// The `status` fields a main loop updates.
struct Status {
    role: Role,
    vm_id: Option<u64>,
    generation: u64,
    state: String,
    protected: bool,
    why_not: Option<String>,
    epoch: Option<u64>,
    acknowledged: Option<u64>,
    acknowledged_at: Option<Instant>,
    pauses: Window,
    acks: Window,
    raw_bytes: u64,
    wire_bytes: u64,
    codec: Option<String>,
    settings: Value,
    output_held: Option<u64>,
    peer: Option<String>,
    committed: Option<u64>,
    committed_at: Option<Instant>,
    memory_bytes: Option<u64>,
    vcpus: Option<u32>,
    guest: Value,
    started: Instant,
}

/// Label of the byte counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    /// `raw` (page contents) or `wire` (encoded frames and state).
    kind: &'static str,
}

/// The Prometheus side: conventional names, seconds and bytes.
struct Metrics {
    checkpoints: Counter,
    acknowledged: Counter,
    committed: Counter,
    secondary_lost: Counter,
    protection_started: Counter,
    failovers: Counter,
    bytes: Family<BytesLabels, Counter>,
    pause: Histogram,
    ack_latency: Histogram,
    commit_latency: Histogram,
    protected: Gauge,
    epoch: Gauge,
    acknowledged_epoch: Gauge,
    lag_epochs: Gauge,
    output_held: Gauge,
    epoch_target: Gauge<f64, AtomicU64>,
}

/// Status and metrics of one process.
pub struct Telemetry {
    status: Mutex<Status>,
    metrics: Metrics,
    registry: Registry,
}

impl Telemetry {
    /// Fresh telemetry for a process in `role`.
    pub fn new(role: Role) -> Self {
        // 10 µs to ~20 s, doubling: pauses and acknowledgements alike.
        let latency = || Histogram::new(exponential_buckets(1e-5, 2.0, 22));
        let metrics = Metrics {
            checkpoints: Counter::default(),
            acknowledged: Counter::default(),
            committed: Counter::default(),
            secondary_lost: Counter::default(),
            protection_started: Counter::default(),
            failovers: Counter::default(),
            bytes: Family::default(),
            pause: latency(),
            ack_latency: latency(),
            commit_latency: latency(),
            protected: Gauge::default(),
            epoch: Gauge::default(),
            acknowledged_epoch: Gauge::default(),
            lag_epochs: Gauge::default(),
            output_held: Gauge::default(),
            epoch_target: Gauge::default(),
        };
        let mut registry = Registry::with_prefix("understudy");
        let m = &metrics;
        registry.register(
            "checkpoints",
            "Checkpoints taken (primary)",
            m.checkpoints.clone(),
        );
        registry.register(
            "acknowledged_checkpoints",
            "Checkpoints the secondary acknowledged (primary)",
            m.acknowledged.clone(),
        );
        registry.register(
            "committed_epochs",
            "Epochs applied and acknowledged (secondary)",
            m.committed.clone(),
        );
        registry.register(
            "secondary_lost",
            "Times the secondary was lost (primary)",
            m.secondary_lost.clone(),
        );
        registry.register(
            "protection_started",
            "Times protection started or resumed: epoch 0 acknowledged (primary)",
            m.protection_started.clone(),
        );
        registry.register(
            "takeovers",
            "Guests resumed here after a failover or a migration (secondary)",
            m.failovers.clone(),
        );
        registry.register_with_unit(
            "checkpoint",
            "Bytes of checkpointed pages: raw contents and on the wire",
            Unit::Bytes,
            m.bytes.clone(),
        );
        registry.register_with_unit(
            "checkpoint_pause",
            "How long each checkpoint paused the guest",
            Unit::Seconds,
            m.pause.clone(),
        );
        registry.register_with_unit(
            "ack_latency",
            "From a checkpoint's pause to its acknowledgement",
            Unit::Seconds,
            m.ack_latency.clone(),
        );
        registry.register_with_unit(
            "commit_latency",
            "From an epoch's first message to its acknowledgement (secondary)",
            Unit::Seconds,
            m.commit_latency.clone(),
        );
        registry.register(
            "protected",
            "1 while the guest is protected",
            m.protected.clone(),
        );
        registry.register(
            "epoch",
            "The last epoch checkpointed or committed",
            m.epoch.clone(),
        );
        registry.register(
            "acknowledged_epoch",
            "The last epoch the secondary acknowledged",
            m.acknowledged_epoch.clone(),
        );
        registry.register(
            "lag_epochs",
            "Checkpointed epochs not acknowledged yet",
            m.lag_epochs.clone(),
        );
        registry.register(
            "output_held_frames",
            "Guest network frames held until their epoch is acknowledged",
            m.output_held.clone(),
        );
        registry.register_with_unit(
            "epoch_target",
            "The target time between checkpoints",
            Unit::Seconds,
            m.epoch_target.clone(),
        );
        Self {
            status: Mutex::new(Status {
                role,
                vm_id: None,
                generation: 0,
                state: "starting".to_owned(),
                protected: false,
                why_not: Some("not synchronised yet".to_owned()),
                epoch: None,
                acknowledged: None,
                acknowledged_at: None,
                pauses: Window::default(),
                acks: Window::default(),
                raw_bytes: 0,
                wire_bytes: 0,
                codec: None,
                settings: Value::Null,
                output_held: None,
                peer: None,
                committed: None,
                committed_at: None,
                memory_bytes: None,
                vcpus: None,
                guest: Value::Null,
                started: Instant::now(),
            }),
            metrics,
            registry,
        }
    }

    fn update<T>(&self, change: impl FnOnce(&mut Status) -> T) -> T {
        let mut status = self.status.lock().expect("telemetry lock poisoned");
        change(&mut status)
    }

    /// The process's role changed (a takeover, a migration arrived).
    pub fn set_role(&self, role: Role, state: &str) {
        self.update(|status| {
            status.role = role;
            state.clone_into(&mut status.state);
        });
    }

    /// What the process does right now, and whether the guest is protected
    /// (and why not).
    pub fn set_state(&self, state: &str, protected: bool, why_not: Option<String>) {
        self.metrics.protected.set(i64::from(protected));
        self.update(|status| {
            state.clone_into(&mut status.state);
            status.protected = protected;
            status.why_not = why_not;
        });
    }

    /// The guest this process runs or backs up.
    pub fn set_guest(&self, vm_id: u64, memory_bytes: u64, vcpus: u32) {
        self.update(|status| {
            status.vm_id = Some(vm_id);
            status.memory_bytes = Some(memory_bytes);
            status.vcpus = Some(vcpus);
        });
    }

    /// The guest's progress, per vCPU (a running guest's statistics).
    pub fn set_progress(&self, counters: &[u64], pages_written: &[u64]) {
        self.update(|status| {
            status.guest = json!({"counters": counters, "pages_written": pages_written});
        });
    }

    /// The fencing generation.
    pub fn set_generation(&self, generation: u64) {
        self.update(|status| status.generation = generation);
    }

    /// The live settings (`set` changes them): codec, epoch and the rest.
    pub fn set_settings(&self, codec: &str, epoch_target: Duration, settings: Value) {
        self.metrics.epoch_target.set(epoch_target.as_secs_f64());
        self.update(|status| {
            status.codec = Some(codec.to_owned());
            status.settings = settings;
        });
    }

    /// The peer (secondary of a primary, primary of a secondary).
    pub fn set_peer(&self, peer: Option<String>) {
        self.update(|status| status.peer = peer);
    }

    /// A checkpoint was taken.
    pub fn checkpointed(&self, epoch: u64, pause: Duration) {
        self.metrics.checkpoints.inc();
        self.metrics.pause.observe(pause.as_secs_f64());
        self.metrics
            .epoch
            .set(i64::try_from(epoch).unwrap_or(i64::MAX));
        self.update(|status| {
            status.epoch = Some(epoch);
            status.pauses.push(pause);
            self.set_lag(status);
        });
    }

    /// A checkpoint went out.
    pub fn sent(&self, raw_bytes: u64, wire_bytes: u64) {
        let bytes = &self.metrics.bytes;
        bytes
            .get_or_create(&BytesLabels { kind: "raw" })
            .inc_by(raw_bytes);
        bytes
            .get_or_create(&BytesLabels { kind: "wire" })
            .inc_by(wire_bytes);
        self.update(|status| {
            status.raw_bytes += raw_bytes;
            status.wire_bytes += wire_bytes;
        });
    }

    /// The secondary acknowledged `epoch`.
    pub fn acknowledged(&self, epoch: u64, latency: Duration) {
        self.metrics.acknowledged.inc();
        self.metrics.ack_latency.observe(latency.as_secs_f64());
        self.metrics
            .acknowledged_epoch
            .set(i64::try_from(epoch).unwrap_or(i64::MAX));
        self.update(|status| {
            status.acknowledged = Some(epoch);
            status.acknowledged_at = Some(Instant::now());
            status.acks.push(latency);
            self.set_lag(status);
        });
    }

    fn set_lag(&self, status: &Status) {
        let lag = match (status.epoch, status.acknowledged) {
            (Some(epoch), Some(acknowledged)) => epoch.saturating_sub(acknowledged),
            (Some(epoch), None) => epoch + 1,
            _ => 0,
        };
        self.metrics
            .lag_epochs
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
    }

    /// Protection started (epoch 0 acknowledged).
    pub fn protection_started(&self) {
        self.metrics.protection_started.inc();
        self.set_state("protecting", true, None);
    }

    /// The secondary was lost.
    pub fn secondary_lost(&self, reason: &str) {
        self.metrics.secondary_lost.inc();
        self.set_state(
            "unprotected",
            false,
            Some(format!("the secondary was lost: {reason}")),
        );
    }

    /// Frames held by output commit now.
    pub fn output_held(&self, frames: u64) {
        self.metrics
            .output_held
            .set(i64::try_from(frames).unwrap_or(i64::MAX));
        self.update(|status| status.output_held = Some(frames));
    }

    /// The secondary committed `epoch`, received in `receive`.
    pub fn committed(&self, epoch: u64, receive: Duration) {
        self.metrics.committed.inc();
        self.metrics.commit_latency.observe(receive.as_secs_f64());
        self.metrics
            .epoch
            .set(i64::try_from(epoch).unwrap_or(i64::MAX));
        self.update(|status| {
            status.committed = Some(epoch);
            status.committed_at = Some(Instant::now());
            status.acks.push(receive);
        });
    }

    /// The guest was resumed here (a takeover or a migration arrived).
    pub fn took_over(&self, why: &str) {
        self.metrics.failovers.inc();
        self.update(|status| {
            status.role = Role::Standalone;
            status.protected = false;
            status.state = "running".to_owned();
            status.why_not = Some(why.to_owned());
            status.committed = None;
            status.committed_at = None;
        });
        self.metrics.protected.set(0);
    }

    /// The `status` reply.
    pub fn status_json(&self) -> Value {
        self.update(|status| {
            let age = |at: Option<Instant>| at.map(|at| at.elapsed().as_secs_f64() * 1e3);
            let lag = match (status.epoch, status.acknowledged) {
                (Some(epoch), Some(acknowledged)) => Some(epoch.saturating_sub(acknowledged)),
                _ => None,
            };
            let ratio =
                (status.wire_bytes > 0).then(|| status.raw_bytes as f64 / status.wire_bytes as f64);
            json!({
                "role": status.role.name(),
                "state": status.state,
                "vm_id": status.vm_id.map(|id| format!("{id:016x}")),
                "memory_bytes": status.memory_bytes,
                "vcpus": status.vcpus,
                "generation": status.generation,
                "protected": status.protected,
                "why_not_protected": status.why_not,
                "peer": status.peer,
                "epoch": status.epoch,
                "last_acknowledged_epoch": status.acknowledged,
                "lag_epochs": lag,
                "since_last_ack_ms": age(status.acknowledged_at),
                "pause": status.pauses.json(),
                "ack_latency": status.acks.json(),
                "codec": status.codec,
                "compression_ratio": ratio,
                "raw_bytes": status.raw_bytes,
                "wire_bytes": status.wire_bytes,
                "output_held_frames": status.output_held,
                "committed_epoch": status.committed,
                "since_last_commit_ms": age(status.committed_at),
                "settings": status.settings,
                "guest_progress": status.guest,
                "uptime_s": status.started.elapsed().as_secs_f64(),
            })
        })
    }

    /// The Prometheus text exposition (OpenMetrics).
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// Serves `telemetry` to Prometheus at `http://ADDRESS/metrics` (any other
/// path: 404), one short-lived connection at a time, on a thread of its
/// own. A scraper that stalls is cut off after a second.
pub fn serve_metrics(
    address: std::net::SocketAddr,
    telemetry: std::sync::Arc<Telemetry>,
) -> std::io::Result<std::net::SocketAddr> {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind(address)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".to_owned())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                let mut request_line = String::new();
                let Ok(clone) = stream.try_clone() else { continue };
                let mut reader = BufReader::new(std::io::Read::take(clone, 8192));
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                // Headers up to the blank line (ignored).
                let mut header = String::new();
                while reader.read_line(&mut header).is_ok_and(|read| read > 2) {
                    header.clear();
                }
                let path = request_line.split_whitespace().nth(1).unwrap_or("");
                let (status, content_type, body) = if path == "/metrics" {
                    (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        telemetry.metrics_text(),
                    )
                } else {
                    ("404 Not Found", "text/plain", "try /metrics\n".to_owned())
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reports_lag_and_percentiles() {
        let telemetry = Telemetry::new(Role::Primary);
        telemetry.checkpointed(5, Duration::from_micros(300));
        telemetry.checkpointed(6, Duration::from_micros(900));
        telemetry.acknowledged(5, Duration::from_millis(2));

        let status = telemetry.status_json();

        assert_eq!(status["role"], "primary");
        assert_eq!(status["lag_epochs"], 1);
        assert_eq!(status["last_acknowledged_epoch"], 5);
        assert_eq!(status["pause"]["max_us"], 900.0);
    }

    #[test]
    fn metrics_use_conventional_names_and_units() {
        let telemetry = Telemetry::new(Role::Primary);
        telemetry.checkpointed(1, Duration::from_micros(500));
        telemetry.sent(4096, 1000);

        let text = telemetry.metrics_text();

        assert!(
            text.contains("understudy_checkpoint_pause_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("understudy_checkpoints_total 1"), "{text}");
        assert!(
            text.contains("understudy_checkpoint_bytes_total{kind=\"wire\"} 1000"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
