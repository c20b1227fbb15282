//! MQTT over TLS, through the real binaries, with a CA, server and client certificates made at
//! test time: the embedded broker's `tls_listen` (beside its plain listener), with and without
//! client certificates (`tls_client_ca`), and client mode joining a real Mosquitto's TLS listener
//! (`mqtts://`, `ca_file`, `client_cert`, `client_key`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tributary_tests::certs::{ExtendedKeyUsagePurpose, TestCa};
use tributary_tests::{
    Agent, Aggregator, Mosquitto, MosquittoTls, MqttInput, eventually, free_port, publish, try_publish_with,
};

const TOKEN: &str = "secret-gw-1";
const TLS_FAILURES: &str = "tributary_agent_broker_tls_handshake_failures_total";

/// `dir/ca.pem` with `dir/server.{pem,key}` (127.0.0.1, localhost) and `dir/client.{pem,key}`;
/// an unrelated `dir/other-ca.pem` with `dir/stranger.{pem,key}`, a client certificate it signed.
fn make_certificates(dir: &Path) {
    let ca = TestCa::new(dir, "ca");
    ca.issue("server", &["127.0.0.1", "localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    ca.issue("client", &["sensor-1"], ExtendedKeyUsagePurpose::ClientAuth);
    let other = TestCa::new(dir, "other-ca");
    other.issue("stranger", &["sensor-2"], ExtendedKeyUsagePurpose::ClientAuth);
}

/// A TLS client's settings: trusting `dir/<ca>.pem` only, showing `dir/<cert>.{pem,key}` if given.
fn tls_client(dir: &Path, ca: &str, cert: Option<&str>) -> TlsConfiguration {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join(format!("{ca}.pem"))).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let chain = CertificateDer::pem_file_iter(dir.join(format!("{name}.pem")))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    TlsConfiguration::Rustls(Arc::new(config))
}

/// Publishes `messages` with QoS 1 to the broker on `port` (over TLS with `tls`) and returns once
/// every one is acknowledged, or the first connection error (no retry: a refused client stays
/// refused).
async fn publish_over(
    port: u16,
    client_id: &str,
    tls: Option<TlsConfiguration>,
    messages: &[(String, Vec<u8>)],
) -> Result<(), String> {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30)).set_inflight(50);
    if let Some(tls) = tls {
        options.set_transport(Transport::tls_with_config(tls));
    }
    try_publish_with(options, messages).await
}

fn messages(sensor: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n).map(|i| (format!("sensors/{sensor}"), format!("{}.5", i % 30).into_bytes())).collect()
}

/// Starts agent gw-1 with an embedded broker whose TLS listener is `tls_keys` (to which
/// `tls_listen` is added): the agent and its TLS port.
async fn embedded_tls_agent(dir: &Path, aggregator: &Aggregator, tls_keys: &str) -> (Agent, u16) {
    let tls_port = free_port();
    let extra = format!("tls_listen = \"127.0.0.1:{tls_port}\"\n{tls_keys}\n");
    let agent = Agent::start(dir, "gw-1", TOKEN, &aggregator.url(), MqttInput::Embedded, &extra).await;
    (agent, tls_port)
}

async fn total_is(aggregator: &Aggregator, what: &str, n: u64) {
    eventually(what, Duration::from_secs(30), || async { (aggregator.total_readings().await == n).then_some(()) })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_takes_mqtt_over_tls_beside_plain_mqtt_and_refuses_bad_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", TOKEN)]).await;
    // Paths relative to the agent's configuration file, in the same directory.
    let (mut agent, tls_port) =
        embedded_tls_agent(dir.path(), &aggregator, "tls_cert = \"server.pem\"\ntls_key = \"server.key\"").await;

    // A client that connects and never starts its handshake, held open for the whole test: no one
    // else waits for it, and the agent still stops.
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", tls_port)).await.unwrap();
    // Plain MQTT on the TLS port, and a client trusting another CA: refused, counted.
    let plain = publish_over(tls_port, "plain", None, &messages("plain/temp", 1)).await;
    assert!(plain.is_err(), "plain MQTT was served on the TLS port");
    let distrust =
        publish_over(tls_port, "distrust", Some(tls_client(dir.path(), "other-ca", None)), &messages("d/t", 1)).await;
    let distrust = distrust.expect_err("a client trusting another CA connected");
    assert!(distrust.contains("UnknownIssuer"), "{distrust}");
    eventually("both failed handshakes counted", Duration::from_secs(10), || async {
        (agent.metric(TLS_FAILURES).await >= 2.0).then_some(())
    })
    .await;

    // The good client, trusting the CA: its readings reach the aggregator.
    let trusting = Some(tls_client(dir.path(), "ca", None));
    let good = publish_over(tls_port, "sensor-1", trusting, &messages("tls/temp", 50)).await;
    good.expect("a TLS client trusting the CA publishes");
    total_is(&aggregator, "the 50 readings sent over TLS", 50).await;
    // The plain listener still serves plain clients.
    publish(agent.mqtt_port, "local", &messages("plain/temp", 10)).await;
    total_is(&aggregator, "the 10 plain readings too", 60).await;
    let counts = aggregator.sensor_counts().await;
    assert_eq!((counts.get("tls/temp"), counts.get("plain/temp")), (Some(&50), Some(&10)), "{counts:?}");

    let log = agent.process.log_text();
    assert!(log.contains("embedded MQTT broker listening (plain and TLS)"), "{}", agent.process.log_tail(10));
    assert!(log.contains("the client does not speak TLS"), "{}", agent.process.log_tail(10));
    assert!(log.contains("the client refused the broker's certificate"), "{}", agent.process.log_tail(10));
    assert!(!log.contains("panicked"));
    let status = agent.process.terminate();
    assert!(status.success(), "{status}\n{}", agent.process.log_tail(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_client_ca_the_embedded_broker_lets_in_only_clients_with_a_certificate_of_that_ca() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", TOKEN)]).await;
    let keys = "tls_cert = \"server.pem\"\ntls_key = \"server.key\"\ntls_client_ca = \"ca.pem\"";
    let (agent, tls_port) = embedded_tls_agent(dir.path(), &aggregator, keys).await;

    // With TLS 1.3 the client learns of the refusal after its side of the handshake, as an alert
    // when it reads the CONNACK (or a reset that overtakes it).
    let without =
        publish_over(tls_port, "anonymous", Some(tls_client(dir.path(), "ca", None)), &messages("a/t", 1)).await;
    assert!(without.is_err(), "a client without a certificate was served");
    let stranger = Some(tls_client(dir.path(), "ca", Some("stranger")));
    let stranger = publish_over(tls_port, "stranger", stranger, &messages("s/t", 1)).await;
    assert!(stranger.is_err(), "a client with another CA's certificate was served");
    eventually("both refusals counted", Duration::from_secs(10), || async {
        (agent.metric(TLS_FAILURES).await >= 2.0).then_some(())
    })
    .await;
    let log = agent.process.log_text();
    assert!(log.contains("the client showed no certificate"), "{}", agent.process.log_tail(10));
    assert!(log.contains("is not signed by a CA in mqtt.tls_client_ca"), "{}", agent.process.log_tail(10));

    let good = Some(tls_client(dir.path(), "ca", Some("client")));
    publish_over(tls_port, "sensor-1", good, &messages("cert/temp", 40)).await.expect("the client with a certificate");
    total_is(&aggregator, "the 40 readings of the client with a certificate", 40).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = aggregator.sensor_counts().await;
    assert_eq!(counts.values().sum::<u64>(), 40, "nothing of the refused clients: {counts:?}");
}

/// Mosquitto with a TLS listener (server.pem from ca.pem; client certificates of ca.pem required
/// if `require_certificate`).
async fn mosquitto_tls(dir: &Path, require_certificate: bool) -> Mosquitto {
    let (cafile, certfile, keyfile) = (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"));
    let tls = MosquittoTls { cafile: &cafile, certfile: &certfile, keyfile: &keyfile, require_certificate };
    Mosquitto::start_with_tls(dir, &tls).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_client_mode_the_agent_reads_a_mosquitto_tls_listener_with_its_own_certificate() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let mosquitto = mosquitto_tls(dir.path(), true).await;
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", TOKEN)]).await;
    let keys = "ca_file = \"ca.pem\"\nclient_cert = \"client.pem\"\nclient_key = \"client.key\"\n";
    let input = MqttInput::ClientTls { port: mosquitto.tls_port.unwrap() };
    let agent = Agent::start(dir.path(), "gw-1", TOKEN, &aggregator.url(), input, keys).await;
    eventually("the agent connected over TLS", Duration::from_secs(30), || async {
        (agent.metric("tributary_agent_mqtt_connected").await == 1.0).then_some(())
    })
    .await;
    // The subscription follows the connection: probe until a reading gets through, then the rest
    // (published to Mosquitto's plain listener; the agent reads them on its TLS one).
    eventually("a probe reading through Mosquitto", Duration::from_secs(30), || async {
        publish(mosquitto.port, "plc", &messages("probe", 1)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        aggregator.sensor_counts().await.contains_key("probe").then_some(())
    })
    .await;
    publish(mosquitto.port, "plc", &messages("line1/flow", 60)).await;
    eventually("the 60 readings", Duration::from_secs(30), || async {
        (aggregator.sensor_counts().await.get("line1/flow") == Some(&60)).then_some(())
    })
    .await;
    let log = agent.process.log_text();
    assert!(!log.contains("certificate was refused") && !log.contains("refused the TLS handshake"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_client_mode_refused_handshakes_are_logged_with_the_file_to_check() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let mosquitto = mosquitto_tls(dir.path(), true).await;
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", TOKEN), ("gw-2", "secret-gw-2")]).await;
    let tls_port = mosquitto.tls_port.unwrap();
    // Trusting the right CA but without a certificate of its own: the broker refuses it.
    let dir_2 = dir.path().join("gw-2");
    std::fs::create_dir_all(&dir_2).unwrap();
    let input = MqttInput::ClientTls { port: tls_port };
    let mut anonymous =
        Agent::start(&dir_2, "gw-2", "secret-gw-2", &aggregator.url(), input, "ca_file = \"../ca.pem\"\n").await;
    // Trusting another CA than the broker's: the agent refuses the broker.
    let input = MqttInput::ClientTls { port: tls_port };
    let mut agent =
        Agent::start(dir.path(), "gw-1", TOKEN, &aggregator.url(), input, "ca_file = \"other-ca.pem\"\n").await;
    let refusal = "the MQTT broker's certificate was refused";
    eventually("three refused handshakes in the log", Duration::from_secs(30), || async {
        (agent.process.log_text().matches(refusal).count() >= 3).then_some(())
    })
    .await;
    let log = agent.process.log_text();
    assert!(log.contains("check that mqtt.ca_file (other-ca.pem) holds the CA that signed it"), "{log}");
    assert!(agent.process.is_running(), "a refused certificate is retried, not fatal");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(agent.metric("tributary_agent_mqtt_connected").await, 0.0);
    let status = agent.process.terminate();
    assert!(status.success(), "{status}\n{}", agent.process.log_tail(20));

    // With TLS 1.3 the agent learns of the refusal after its side of the handshake, as an alert
    // when it reads the CONNACK; a reset that overtakes the alert is a plain lost connection.
    let refused = "the MQTT broker refused the TLS handshake";
    eventually("a refused handshake in the log", Duration::from_secs(30), || async {
        anonymous.process.log_text().contains(refused).then_some(())
    })
    .await;
    let log = anonymous.process.log_text();
    assert!(log.contains("set mqtt.client_cert and client_key"), "{log}");
    assert_eq!(anonymous.metric("tributary_agent_mqtt_connected").await, 0.0);
    assert!(!log.contains("panicked"), "{log}");
    let status = anonymous.process.terminate();
    assert!(status.success(), "{status}\n{}", anonymous.process.log_tail(20));
}
