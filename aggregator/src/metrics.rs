//! Prometheus metrics, served as text on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The ingest statuses that get a series from the start, so dashboards see zeros rather than gaps.
const INGEST_STATUSES: [u16; 7] = [200, 400, 401, 403, 413, 415, 503];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

/// The aggregator's metrics; cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    ingest_requests: Family<StatusLabel, Counter>,
    pub readings_appended: Counter,
    pub readings_duplicate: Counter,
    pub gap_readings: Counter,
    pub gap_filled_readings: Counter,
    pub log_end_offset: Gauge,
    pub processor_offset: Gauge,
    notifications: Family<Vec<(String, String)>, Counter>,
    pub processor_lag_readings: Gauge,
    pub processor_stalled: Gauge,
    pub processor_step_failures: Counter,
    pub set_aside_blocks: Counter,
    pub set_aside_readings: Counter,
    influx_requests: Family<StatusLabel, Counter>,
    /// Line-protocol lines refused by `POST /write` (bad syntax, id, value or timestamp).
    pub influx_lines_rejected: Counter,
    /// Line-protocol fields that are not numbers, skipped by `POST /write`.
    pub influx_fields_skipped_string: Counter,
    pub influx_fields_skipped_boolean: Counter,
    /// The pipeline version the API serves.
    pub pipeline_serving_version: Gauge,
    /// The offset a version being replayed has committed (0 when none replays).
    pub replay_offset: Gauge,
    /// The log's first offset (above 0 once retention has dropped blocks).
    pub log_first_offset: Gauge,
    /// Readings dropped by log retention.
    pub log_dropped_readings: Counter,
    agent_backlog: Family<Vec<(String, String)>, Gauge>,
    /// HTTPS connections dropped in the TLS handshake (not TLS, no or an untrusted client
    /// certificate, too slow); see [`crate::tls`].
    pub tls_handshake_failures: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let ingest_requests = Family::<StatusLabel, Counter>::default();
        registry.register("tributary_ingest_requests", "Ingest requests by HTTP status", ingest_requests.clone());
        for status in INGEST_STATUSES {
            let _ = ingest_requests.get_or_create(&StatusLabel { status: status.to_string() });
        }
        let readings = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "tributary_ingest_readings",
            "Readings in ingested batches: appended to the log, or dropped as already logged",
            readings.clone(),
        );
        let readings_appended = readings.get_or_create(&vec![("result".into(), "appended".into())]).clone();
        let readings_duplicate = readings.get_or_create(&vec![("result".into(), "duplicate".into())]).clone();
        let gap_readings = Counter::default();
        registry.register(
            "tributary_ingest_gap_readings",
            "Sequence numbers agents never sent (dropped by their spool policy), recorded as gaps",
            gap_readings.clone(),
        );
        let gap_filled_readings = Counter::default();
        registry.register(
            "tributary_ingest_gap_filled_readings",
            "Sequence numbers recorded as gaps that arrived later (out of order) and filled them",
            gap_filled_readings.clone(),
        );
        let pipeline_serving_version = Gauge::default();
        registry.register(
            "tributary_pipeline_serving_version",
            "The pipeline version the API serves ([pipeline] version)",
            pipeline_serving_version.clone(),
        );
        let replay_offset = Gauge::default();
        registry.register(
            "tributary_replay_offset",
            "Log offset a new pipeline version being replayed has reached (0 when none replays)",
            replay_offset.clone(),
        );
        let agent_backlog = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "tributary_agent_backlog_readings",
            "Readings an agent's spool still held at its last batch (it says so in a header)",
            agent_backlog.clone(),
        );
        let log_first_offset = Gauge::default();
        registry.register(
            "tributary_log_first_offset",
            "The log's first offset: readings before it were dropped by retention ([log] retain)",
            log_first_offset.clone(),
        );
        let log_dropped_readings = Counter::default();
        registry.register(
            "tributary_log_dropped_readings",
            "Readings dropped from the log by retention ([log] retain)",
            log_dropped_readings.clone(),
        );
        let log_end_offset = Gauge::default();
        registry.register("tributary_log_end_offset", "Readings in the log (the next offset)", log_end_offset.clone());
        let processor_offset = Gauge::default();
        registry.register(
            "tributary_processor_offset",
            "Log offset up to which the processor has committed its results",
            processor_offset.clone(),
        );
        let notifications = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "tributary_notify",
            "Alert notifications by result: delivered, retried, failed, dropped (queue full), replayed (history, not sent)",
            notifications.clone(),
        );
        let processor_lag_readings = Gauge::default();
        registry.register(
            "tributary_processor_lag_readings",
            "Readings in the log the processor has not committed yet (log end offset - processor offset)",
            processor_lag_readings.clone(),
        );
        let processor_stalled = Gauge::default();
        registry.register(
            "tributary_processor_stalled",
            "1 while the processor has failed without progress for a while (/healthz says why), else 0",
            processor_stalled.clone(),
        );
        let processor_step_failures = Counter::default();
        registry.register(
            "tributary_processor_step_failures",
            "Processor steps that failed (log unreadable, store commit refused); each is retried",
            processor_step_failures.clone(),
        );
        let set_aside_blocks = Counter::default();
        registry.register(
            "tributary_processor_set_aside_blocks",
            "Log blocks the processor left out of the store (listed by /api/v1/set-aside); since the store was built",
            set_aside_blocks.clone(),
        );
        let set_aside_readings = Counter::default();
        registry.register(
            "tributary_processor_set_aside_readings",
            "Readings in the set-aside log blocks, as the log counts them",
            set_aside_readings.clone(),
        );
        let influx_requests = Family::<StatusLabel, Counter>::default();
        registry.register(
            "tributary_influx_requests",
            "Line-protocol writes (POST /write) by HTTP status",
            influx_requests.clone(),
        );
        for status in [204, 400, 401, 413] {
            let _ = influx_requests.get_or_create(&StatusLabel { status: status.to_string() });
        }
        let influx_lines_rejected = Counter::default();
        registry.register(
            "tributary_influx_lines_rejected",
            "Line-protocol lines refused by POST /write (syntax, sensor id, value or timestamp); the others were written",
            influx_lines_rejected.clone(),
        );
        let skipped = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "tributary_influx_fields_skipped",
            "Line-protocol string and boolean fields, which are not readings and are skipped",
            skipped.clone(),
        );
        let influx_fields_skipped_string = skipped.get_or_create(&vec![("kind".into(), "string".into())]).clone();
        let influx_fields_skipped_boolean = skipped.get_or_create(&vec![("kind".into(), "boolean".into())]).clone();
        let tls_handshake_failures = Counter::default();
        registry.register(
            "tributary_tls_handshake_failures",
            "HTTPS connections dropped in the TLS handshake: not TLS, no or an untrusted client certificate, too slow",
            tls_handshake_failures.clone(),
        );
        Metrics {
            tls_handshake_failures,
            influx_requests,
            influx_lines_rejected,
            influx_fields_skipped_string,
            influx_fields_skipped_boolean,
            pipeline_serving_version,
            replay_offset,
            log_first_offset,
            log_dropped_readings,
            agent_backlog,
            notifications,
            registry,
            ingest_requests,
            readings_appended,
            readings_duplicate,
            gap_readings,
            gap_filled_readings,
            log_end_offset,
            processor_offset,
            processor_lag_readings,
            processor_stalled,
            processor_step_failures,
            set_aside_blocks,
            set_aside_readings,
        }
    }

    /// What `agent`'s spool held at its last batch.
    pub fn agent_backlog(&self, agent: &str, readings: u64) {
        self.agent_backlog
            .get_or_create(&vec![("agent".to_string(), agent.to_string())])
            .set(readings.min(i64::MAX as u64) as i64);
    }

    /// Counts one webhook notification outcome.
    pub fn notify(&self, result: &str) {
        self.notifications.get_or_create(&vec![("result".to_string(), result.to_string())]).inc();
    }

    /// Counts one ingest request by its response status.
    pub fn ingest_request(&self, status: u16) {
        self.ingest_requests.get_or_create(&StatusLabel { status: status.to_string() }).inc();
    }

    /// Counts one `POST /write` request by its response status.
    pub fn influx_request(&self, status: u16) {
        self.influx_requests.get_or_create(&StatusLabel { status: status.to_string() }).inc();
    }

    /// The metrics in the Prometheus text format (0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_metric_names_are_exported() {
        let metrics = Metrics::new();
        metrics.ingest_request(401);
        metrics.readings_appended.inc_by(5);
        metrics.log_end_offset.set(5);
        let text = metrics.encode();
        for line in [
            "tributary_ingest_requests_total{status=\"401\"} 1",
            "tributary_ingest_requests_total{status=\"503\"} 0",
            "tributary_ingest_readings_total{result=\"appended\"} 5",
            "tributary_ingest_readings_total{result=\"duplicate\"} 0",
            "tributary_ingest_gap_readings_total 0",
            "tributary_ingest_gap_filled_readings_total 0",
            "tributary_log_end_offset 5",
            "tributary_processor_offset 0",
            "tributary_processor_lag_readings 0",
            "tributary_processor_stalled 0",
            "tributary_processor_step_failures_total 0",
            "tributary_processor_set_aside_blocks_total 0",
            "tributary_processor_set_aside_readings_total 0",
            "tributary_influx_requests_total{status=\"204\"} 0",
            "tributary_influx_lines_rejected_total 0",
            "tributary_influx_fields_skipped_total{kind=\"string\"} 0",
            "tributary_influx_fields_skipped_total{kind=\"boolean\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
