//! The agent's counters and gauges, served as Prometheus text on `/metrics`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::decode::Reject;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RejectLabels {
    pub reason: Reject,
}

impl EncodeLabelValue for Reject {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.label())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// Outcomes of requests to the aggregator: `ok`; `invalid_block` (one block dead-lettered for
/// good); and failures that keep the data and retry with backoff: `bad_request` (any other 400,
/// e.g. from a proxy), `unsupported_format`, `too_large` (413: the request is split), `unauthorized`
/// (401/403), `server_error` (5xx, other statuses, unreadable answers), `tls` (the TLS handshake
/// failed: a certificate not trusted, or not presented to an aggregator that wants one),
/// `unreachable` (network, timeout).
pub const FORWARD_OUTCOMES: [&str; 9] = [
    "ok",
    "invalid_block",
    "bad_request",
    "unsupported_format",
    "too_large",
    "unauthorized",
    "server_error",
    "tls",
    "unreachable",
];

/// Why the pre-filters drop readings, by filter: shown from the start, 0 until it happens.
pub const FILTER_DROPS: [(&str, &str); 5] = [
    ("range", "below_min"),
    ("range", "above_max"),
    ("spike", "spike"),
    ("deadband", "unchanged"),
    ("downsample", "aggregated"),
];

/// Why the pre-filters restart a sensor's state.
pub const FILTER_RESETS: [(&str, &str); 2] = [("deadband", "clock_backwards"), ("downsample", "clock_backwards")];

/// Outcomes of a configuration read again (SIGHUP): `applied` (what can change at runtime did; the
/// rest waits for a restart) or `refused` (the file did not load; the configuration in force stays).
pub const RELOAD_RESULTS: [&str; 2] = ["applied", "refused"];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

/// A serial port, by name (the file name of its configured path).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PortLabels {
    pub port: String,
}

/// A pre-filter (`range`, `spike`, `deadband`, `downsample`) and why it acted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FilterLabels {
    pub filter: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SerialRejectLabels {
    pub port: String,
    pub reason: &'static str,
}

/// Every metric of the agent. Cloning a metric shares it.
pub struct Metrics {
    registry: Registry,
    /// MQTT messages read from the broker.
    pub messages: Counter,
    /// Readings decoded and validated, handed to the pre-filters (then the spool).
    pub readings_accepted: Counter,
    /// Messages or fields not turned into readings, by reason.
    pub rejected: Family<RejectLabels, Counter>,
    /// Publishes the embedded broker refused (non-UTF-8 topics, protocol errors): it drops the client.
    pub broker_rejected: Counter,
    /// Clients the embedded broker refused at CONNECT for a missing or wrong username or password.
    pub broker_auth_failures: Counter,
    /// TLS handshakes that failed or timed out on the embedded broker's `tls_listen`.
    pub broker_tls_handshake_failures: Counter,
    /// Messages the embedded broker acknowledged but evicted before the agent read them. Always 0
    /// since connections hand publishes to the agent directly (not through rumqttd's log); kept so
    /// that dashboards and alerts on it go on working.
    pub broker_dropped: Counter,
    /// Times an embedded-broker connection waited before handing publishes over, because the
    /// agent was half `mqtt.broker_buffer_bytes` behind (its client was slowed down, nothing was lost).
    pub broker_backlog_waits: Counter,
    /// Readings committed to the spool.
    pub readings_spooled: Counter,
    pub spool_commits: Counter,
    /// How long a spool transaction takes (its fsync too with `spool.sync_interval = "0s"`): with
    /// the commit interval, the time a reading the embedded broker acknowledged waits before it
    /// is committed.
    pub spool_commit_seconds: Histogram,
    /// Readings and bytes in the spool, not yet acknowledged by the aggregator.
    pub spool_readings: Gauge,
    pub spool_bytes: Gauge,
    /// Readings dropped because the spool hit `spool.max_bytes` or its file system was full.
    pub spool_dropped_readings: Counter,
    /// The spool size limit in effect: `spool.max_bytes`, lowered when it does not fit on the file
    /// system or while the file system is full.
    pub spool_max_bytes: Gauge,
    /// Spool commits refused because the file system was full (SQLITE_FULL).
    pub spool_disk_full: Counter,
    /// Times the spool was found behind the aggregator's mark for its epoch (restored or rewound).
    pub spool_rewinds: Counter,
    /// Readings renumbered past the aggregator's mark after a rewind.
    pub spool_renumbered_readings: Counter,
    /// Readings a damaged spool gave back at start, and readings it could not.
    pub spool_salvaged_readings: Counter,
    pub spool_salvage_lost_readings: Counter,
    /// 1 once the gateway clock has been synchronised since the agent started, 0 before.
    pub clock_synced: Gauge,
    /// Readings stamped before the clock was synchronised and re-stamped once it was.
    pub clock_restamped_readings: Counter,
    /// Readings sent in flagged blocks (stamped by a clock never synchronised in time, or device
    /// timestamps beyond the limits with `on_device_skew = "flag"`): the aggregator quarantines them.
    pub readings_forwarded_flagged: Counter,
    /// Device timestamps beyond `validation.max_clock_skew` (or `clock.max_device_age`) that were
    /// re-stamped or flagged (`clock.on_device_skew`; rejected ones count as `bad_timestamp`).
    pub device_skew_readings: Counter,
    /// Readings the aggregator acknowledged.
    pub readings_forwarded: Counter,
    /// Readings sent ahead of an older backlog (live first after an outage); also in `readings_forwarded`.
    pub readings_forwarded_live_first: Counter,
    /// Forward requests by outcome (see [`FORWARD_OUTCOMES`]).
    pub forward_requests: Family<OutcomeLabels, Counter>,
    /// Readings moved to the dead-letter table because the aggregator refused their block as malformed.
    pub dead_letter_readings: Counter,
    /// 1 while the MQTT client is connected to its broker (client mode).
    pub mqtt_connected: Gauge,
    /// Messages the broker delivered again (`dup` set; client mode): their first delivery was not
    /// acknowledged before the connection dropped or the agent stopped, so they may be spooled twice.
    pub mqtt_redelivered: Counter,
    /// Bytes read from each serial port.
    pub serial_bytes: Family<PortLabels, Counter>,
    /// Readings each serial port delivered to the spool.
    pub serial_readings: Family<PortLabels, Counter>,
    /// Frames, lines or readings of a serial port not turned into readings, by reason.
    pub serial_rejected: Family<SerialRejectLabels, Counter>,
    /// 1 while a serial port is open.
    pub serial_open: Family<PortLabels, Gauge>,
    /// Times a serial port was opened (more than one: the device went away and came back).
    pub serial_opens: Family<PortLabels, Counter>,
    /// Readings the pre-filters dropped, by filter and reason (see [`crate::filter`]).
    pub filter_dropped: Family<FilterLabels, Counter>,
    /// Readings whose value the range filter clamped to a bound.
    pub filter_clamped: Counter,
    /// Readings the deadband passed only because `max_silence` had passed.
    pub filter_heartbeats: Counter,
    /// Times a filter restarted a sensor's state, by filter and reason (`clock_backwards`).
    pub filter_resets: Family<FilterLabels, Counter>,
    /// Readings of new sensors passed unfiltered because the filters hold state for the most sensors they may.
    pub filter_state_full: Counter,
    /// Readings the filters hold back: spike-held readings and open downsample intervals.
    pub filter_held_readings: Gauge,
    /// Sensors the filters keep state for.
    pub filter_sensors: Gauge,
    /// Configurations read again (SIGHUP), by result (see [`RELOAD_RESULTS`]).
    pub config_reloads: Family<ReloadLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tributary_agent");
        let m = Metrics {
            messages: Counter::default(),
            readings_accepted: Counter::default(),
            rejected: Family::default(),
            broker_rejected: Counter::default(),
            broker_auth_failures: Counter::default(),
            broker_tls_handshake_failures: Counter::default(),
            broker_dropped: Counter::default(),
            broker_backlog_waits: Counter::default(),
            readings_spooled: Counter::default(),
            spool_commits: Counter::default(),
            spool_commit_seconds: Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            spool_readings: Gauge::default(),
            spool_bytes: Gauge::default(),
            spool_dropped_readings: Counter::default(),
            spool_max_bytes: Gauge::default(),
            spool_disk_full: Counter::default(),
            spool_rewinds: Counter::default(),
            spool_renumbered_readings: Counter::default(),
            spool_salvaged_readings: Counter::default(),
            spool_salvage_lost_readings: Counter::default(),
            clock_synced: Gauge::default(),
            clock_restamped_readings: Counter::default(),
            readings_forwarded_flagged: Counter::default(),
            device_skew_readings: Counter::default(),
            readings_forwarded: Counter::default(),
            readings_forwarded_live_first: Counter::default(),
            forward_requests: Family::default(),
            dead_letter_readings: Counter::default(),
            mqtt_connected: Gauge::default(),
            mqtt_redelivered: Counter::default(),
            serial_bytes: Family::default(),
            serial_readings: Family::default(),
            serial_rejected: Family::default(),
            serial_open: Family::default(),
            serial_opens: Family::default(),
            filter_dropped: Family::default(),
            filter_clamped: Counter::default(),
            filter_heartbeats: Counter::default(),
            filter_resets: Family::default(),
            filter_state_full: Counter::default(),
            filter_held_readings: Gauge::default(),
            filter_sensors: Gauge::default(),
            config_reloads: Family::default(),
            registry: Registry::default(),
        };
        registry.register("mqtt_messages", "MQTT messages read from the broker", m.messages.clone());
        registry.register(
            "readings_accepted",
            "Readings decoded and validated, handed to the pre-filters (then the spool)",
            m.readings_accepted.clone(),
        );
        registry.register("rejected", "Messages or fields not turned into readings, by reason", m.rejected.clone());
        registry.register(
            "broker_rejected",
            "Publishes the embedded broker refused (e.g. non-UTF-8 topics); it disconnects the client",
            m.broker_rejected.clone(),
        );
        registry.register(
            "broker_auth_failures",
            "Clients the embedded broker refused at CONNECT for a missing or wrong username or password",
            m.broker_auth_failures.clone(),
        );
        registry.register(
            "broker_tls_handshake_failures",
            "TLS handshakes that failed or timed out on the embedded broker's mqtt.tls_listen (wrong CA, no \
             client certificate, a plain MQTT client, ...)",
            m.broker_tls_handshake_failures.clone(),
        );
        registry.register(
            "broker_dropped",
            "Messages the embedded broker acknowledged but evicted before the agent read them",
            m.broker_dropped.clone(),
        );
        registry.register(
            "broker_backlog_waits",
            "Times an embedded-broker connection waited for the agent to take what it handed over \
             (half mqtt.broker_buffer_bytes behind): its client was slowed down, nothing was lost",
            m.broker_backlog_waits.clone(),
        );
        registry.register("readings_spooled", "Readings committed to the spool", m.readings_spooled.clone());
        registry.register("spool_commits", "Spool transactions committed", m.spool_commits.clone());
        registry.register(
            "spool_commit_seconds",
            "Duration of spool transactions (fsync included only when spool.sync_interval is 0s)",
            m.spool_commit_seconds.clone(),
        );
        registry.register(
            "spool_readings",
            "Readings in the spool not yet acknowledged upstream",
            m.spool_readings.clone(),
        );
        registry.register("spool_bytes", "Bytes of blocks in the spool", m.spool_bytes.clone());
        registry.register(
            "clock_synced",
            "1 once the gateway clock has been synchronised since the agent started",
            m.clock_synced.clone(),
        );
        registry.register(
            "clock_restamped_readings",
            "Readings stamped before the clock was synchronised, re-stamped once it was",
            m.clock_restamped_readings.clone(),
        );
        registry.register(
            "readings_forwarded_flagged",
            "Readings sent in blocks flagged unsynced or device-skewed (quarantined by the aggregator)",
            m.readings_forwarded_flagged.clone(),
        );
        registry.register(
            "device_skew_readings",
            "Device timestamps beyond the limits that were re-stamped or flagged (clock.on_device_skew)",
            m.device_skew_readings.clone(),
        );
        registry.register(
            "spool_dropped_readings",
            "Readings dropped because the spool reached its size limit or its file system was full",
            m.spool_dropped_readings.clone(),
        );
        registry.register(
            "spool_max_bytes",
            "Spool size limit in effect (spool.max_bytes, lowered to what fits on the file system)",
            m.spool_max_bytes.clone(),
        );
        registry.register(
            "spool_disk_full",
            "Spool commits refused because the file system was full",
            m.spool_disk_full.clone(),
        );
        registry.register(
            "spool_rewinds",
            "Times the spool was found behind the aggregator's mark for its epoch (restored or rewound)",
            m.spool_rewinds.clone(),
        );
        registry.register(
            "spool_renumbered_readings",
            "Readings renumbered past the aggregator's mark after a rewind",
            m.spool_renumbered_readings.clone(),
        );
        registry.register(
            "spool_salvaged_readings",
            "Readings a damaged spool gave back at start (moved into a fresh spool)",
            m.spool_salvaged_readings.clone(),
        );
        registry.register(
            "spool_salvage_lost_readings",
            "Readings of a damaged spool that could not be decoded (gaps at the aggregator)",
            m.spool_salvage_lost_readings.clone(),
        );
        registry.register(
            "readings_forwarded",
            "Readings acknowledged by the aggregator",
            m.readings_forwarded.clone(),
        );
        registry.register(
            "readings_forwarded_live_first",
            "Readings sent ahead of an older backlog, newest first after an outage (also in readings_forwarded)",
            m.readings_forwarded_live_first.clone(),
        );
        registry.register("forward_requests", "Requests to the aggregator by outcome", m.forward_requests.clone());
        registry.register(
            "dead_letter_readings",
            "Readings set aside because the aggregator refused their block as malformed",
            m.dead_letter_readings.clone(),
        );
        registry.register(
            "mqtt_connected",
            "1 while connected to the MQTT broker (client mode)",
            m.mqtt_connected.clone(),
        );
        registry.register(
            "mqtt_redelivered",
            "Messages the broker delivered again (dup flag, client mode); they may be spooled twice",
            m.mqtt_redelivered.clone(),
        );
        registry.register("serial_bytes", "Bytes read from each serial port", m.serial_bytes.clone());
        registry.register(
            "serial_readings",
            "Readings each serial port handed to the spool",
            m.serial_readings.clone(),
        );
        registry.register(
            "serial_rejected",
            "Frames, lines or readings of a serial port not turned into readings, by reason",
            m.serial_rejected.clone(),
        );
        registry.register("serial_open", "1 while the serial port is open", m.serial_open.clone());
        registry.register(
            "serial_opens",
            "Times the serial port was opened (more than once: the device went away and came back)",
            m.serial_opens.clone(),
        );
        registry.register(
            "filter_dropped",
            "Readings the pre-filters dropped, by filter and reason",
            m.filter_dropped.clone(),
        );
        registry.register(
            "filter_clamped",
            "Readings whose value the range filter clamped to a bound",
            m.filter_clamped.clone(),
        );
        registry.register(
            "filter_heartbeats",
            "Readings the deadband filter passed only because max_silence had passed",
            m.filter_heartbeats.clone(),
        );
        registry.register(
            "filter_resets",
            "Times a filter restarted a sensor's state, by filter and reason",
            m.filter_resets.clone(),
        );
        registry.register(
            "filter_state_full",
            "Readings of new sensors passed unfiltered because the filters' sensor state was full",
            m.filter_state_full.clone(),
        );
        registry.register(
            "filter_held_readings",
            "Readings the pre-filters hold back (spike-held readings, open downsample intervals)",
            m.filter_held_readings.clone(),
        );
        registry.register("filter_sensors", "Sensors the pre-filters keep state for", m.filter_sensors.clone());
        registry.register(
            "config_reloads",
            "Configurations read again on SIGHUP, by result (applied, or refused: the old one stays)",
            m.config_reloads.clone(),
        );
        for (filter, reason) in FILTER_DROPS {
            let _ = m.filter_dropped.get_or_create(&FilterLabels { filter, reason });
        }
        for (filter, reason) in FILTER_RESETS {
            let _ = m.filter_resets.get_or_create(&FilterLabels { filter, reason });
        }
        // Make every reason visible from the start, so a dashboard sees 0 rather than nothing.
        for reason in Reject::ALL {
            let _ = m.rejected.get_or_create(&RejectLabels { reason });
        }
        for outcome in FORWARD_OUTCOMES {
            let _ = m.forward_requests.get_or_create(&OutcomeLabels { outcome });
        }
        for result in RELOAD_RESULTS {
            let _ = m.config_reloads.get_or_create(&ReloadLabels { result });
        }
        Metrics { registry, ..m }
    }

    pub fn reject(&self, reason: Reject) {
        self.rejected.get_or_create(&RejectLabels { reason }).inc();
    }

    /// The counter of readings `filter` dropped for `reason`.
    pub fn filter_drop_counter(&self, filter: &'static str, reason: &'static str) -> Counter {
        self.filter_dropped.get_or_create(&FilterLabels { filter, reason }).clone()
    }

    /// The counter of `filter`'s state resets for `reason`.
    pub fn filter_reset_counter(&self, filter: &'static str, reason: &'static str) -> Counter {
        self.filter_resets.get_or_create(&FilterLabels { filter, reason }).clone()
    }

    pub fn forward_outcome(&self, outcome: &'static str) {
        self.forward_requests.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Counts a configuration read again: `applied` or `refused`.
    pub fn config_reload(&self, result: &'static str) {
        self.config_reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// The Prometheus / OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed() {
        let m = Metrics::new();
        m.spool_commit_seconds.observe(0.003);
        m.forward_outcome("ok");
        let port = || PortLabels { port: "ttyUSB0".into() };
        m.serial_bytes.get_or_create(&port()).inc();
        m.serial_readings.get_or_create(&port()).inc();
        m.serial_open.get_or_create(&port()).set(1);
        m.serial_opens.get_or_create(&port()).inc();
        m.serial_rejected.get_or_create(&SerialRejectLabels { port: "ttyUSB0".into(), reason: "crc" }).inc();
        let text = m.render();
        for name in [
            "tributary_agent_mqtt_messages_total",
            "tributary_agent_readings_accepted_total",
            "tributary_agent_rejected_total{reason=\"not_finite\"} 0",
            "tributary_agent_broker_rejected_total",
            "tributary_agent_broker_auth_failures_total 0",
            "tributary_agent_broker_tls_handshake_failures_total 0",
            "tributary_agent_broker_dropped_total",
            "tributary_agent_broker_backlog_waits_total 0",
            "tributary_agent_readings_spooled_total",
            "tributary_agent_spool_commits_total",
            "tributary_agent_spool_commit_seconds_bucket{le=\"0.005\"} 1",
            "tributary_agent_spool_readings",
            "tributary_agent_spool_bytes",
            "tributary_agent_clock_synced",
            "tributary_agent_clock_restamped_readings_total",
            "tributary_agent_readings_forwarded_flagged_total",
            "tributary_agent_device_skew_readings_total",
            "tributary_agent_spool_dropped_readings_total",
            "tributary_agent_spool_max_bytes",
            "tributary_agent_spool_disk_full_total",
            "tributary_agent_spool_rewinds_total",
            "tributary_agent_spool_renumbered_readings_total",
            "tributary_agent_spool_salvaged_readings_total",
            "tributary_agent_forward_requests_total{outcome=\"too_large\"} 0",
            "tributary_agent_readings_forwarded_total",
            "tributary_agent_readings_forwarded_live_first_total 0",
            "tributary_agent_forward_requests_total{outcome=\"ok\"} 1",
            "tributary_agent_dead_letter_readings_total",
            "tributary_agent_mqtt_connected",
            "tributary_agent_mqtt_redelivered_total",
            "tributary_agent_rejected_total{reason=\"sensor_limit\"} 0",
            "tributary_agent_rejected_total{reason=\"too_many_readings\"} 0",
            "tributary_agent_serial_bytes_total{port=\"ttyUSB0\"} 1",
            "tributary_agent_serial_readings_total{port=\"ttyUSB0\"} 1",
            "tributary_agent_serial_rejected_total{port=\"ttyUSB0\",reason=\"crc\"} 1",
            "tributary_agent_serial_open{port=\"ttyUSB0\"} 1",
            "tributary_agent_serial_opens_total{port=\"ttyUSB0\"} 1",
            "tributary_agent_filter_dropped_total{filter=\"deadband\",reason=\"unchanged\"} 0",
            "tributary_agent_filter_dropped_total{filter=\"range\",reason=\"below_min\"} 0",
            "tributary_agent_filter_resets_total{filter=\"downsample\",reason=\"clock_backwards\"} 0",
            "tributary_agent_filter_clamped_total 0",
            "tributary_agent_filter_heartbeats_total 0",
            "tributary_agent_filter_state_full_total 0",
            "tributary_agent_filter_held_readings 0",
            "tributary_agent_filter_sensors 0",
            "tributary_agent_config_reloads_total{result=\"applied\"} 0",
            "tributary_agent_config_reloads_total{result=\"refused\"} 0",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
