//! HTTPS between agent and aggregator, through the real binaries, with a CA, server and client
//! certificates made at test time: the agent trusts only its `ca_file`, the aggregator can ask
//! every client for a certificate (`tls_client_ca`), and a refused handshake keeps the readings in
//! the spool and says why.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tributary_tests::certs::{ExtendedKeyUsagePurpose, TestCa};
use tributary_tests::{Agent, Aggregator, MqttInput, bin, eventually, publish};

const TOKEN_1: &str = "secret-gw-1";
const TOKEN_2: &str = "secret-gw-2";

/// `dir/ca.pem` with `dir/server.{pem,key}` (127.0.0.1 and localhost) and `dir/client.{pem,key}`,
/// and an unrelated `dir/other-ca.pem`.
fn make_certificates(dir: &Path) {
    let ca = TestCa::new(dir, "ca");
    ca.issue("server", &["127.0.0.1", "localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    ca.issue("client", &["gw-2"], ExtendedKeyUsagePurpose::ClientAuth);
    TestCa::new(dir, "other-ca");
}

/// An HTTPS client trusting `dir/ca.pem`, with `dir/client.{pem,key}` if `with_certificate`.
fn client(dir: &Path, with_certificate: bool) -> reqwest::Client {
    tributary_tests::http(); // installs the ring provider
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&ca).unwrap());
    if with_certificate {
        let mut identity = std::fs::read(dir.join("client.pem")).unwrap();
        identity.extend(std::fs::read(dir.join("client.key")).unwrap());
        builder = builder.identity(reqwest::Identity::from_pem(&identity).unwrap());
    }
    builder.build().unwrap()
}

fn messages(sensor: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n).map(|i| (format!("sensors/{sensor}"), format!("{}.25", i % 40).into_bytes())).collect()
}

fn outcome(name: &str) -> String {
    format!("tributary_agent_forward_requests_total{{outcome=\"{name}\"}}")
}

const HANDSHAKE_FAILURES: &str = "tributary_tls_handshake_failures_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_trusting_the_ca_forwards_over_https_and_garbage_connections_harm_no_one() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    // Paths relative to the aggregator's configuration file, which sits in the same directory.
    let tls = "tls_cert = \"server.pem\"\ntls_key = \"server.key\"";
    let mut aggregator = Aggregator::start_tls(dir.path(), &[("gw-1", TOKEN_1)], tls, client(dir.path(), false)).await;
    assert!(aggregator.url().starts_with("https://"));
    assert!(
        aggregator.process.log_text().contains(&format!("listening on https://127.0.0.1:{}", aggregator.port)),
        "{}",
        aggregator.process.log_tail(5)
    );

    // A client that connects and says nothing, held open for the whole test: the others' handshakes
    // do not wait for it.
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", aggregator.port)).await.unwrap();
    // Plain HTTP instead of a TLS hello: the connection is closed, counted, and that is all.
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", aggregator.port)).await.unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the server closes a connection that is not TLS");
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"), "no plain HTTP on the TLS port");
    eventually("the failed handshake counted", Duration::from_secs(5), || async {
        (aggregator.metric(HANDSHAKE_FAILURES).await >= 1.0).then_some(())
    })
    .await;

    let agent = Agent::start_with_upstream(
        dir.path(),
        "gw-1",
        TOKEN_1,
        &aggregator.url(),
        MqttInput::Embedded,
        "ca_file = \"ca.pem\"",
        "",
    )
    .await;
    publish(agent.mqtt_port, "plc", &messages("line1/flow", 50)).await;
    eventually("50 readings over HTTPS", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == 50).then_some(())
    })
    .await;
    assert!(agent.metric(&outcome("ok")).await >= 1.0);
    assert_eq!(agent.metric(&outcome("tls")).await, 0.0);
    assert!(!agent.process.log_text().contains("forwarding failed"), "{}", agent.process.log_tail(20));

    // SIGTERM stops the HTTPS server as it stops the plain one: cleanly, with the silent client
    // still connected.
    let status = aggregator.process.terminate();
    assert!(status.success(), "{status}\n{}", aggregator.process.log_tail(20));
    assert!(aggregator.process.log_text().contains("HTTP server stopped"));
    assert!(!aggregator.process.log_text().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_client_ca_only_an_agent_with_a_client_certificate_gets_through() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let tls = "tls_cert = \"server.pem\"\ntls_key = \"server.key\"\ntls_client_ca = \"ca.pem\"";
    let agents = [("gw-1", TOKEN_1), ("gw-2", TOKEN_2)];
    let aggregator = Aggregator::start_tls(dir.path(), &agents, tls, client(dir.path(), true)).await;
    // Every client needs a certificate, the harness's own reads too.
    let without = client(dir.path(), false).get(format!("{}/healthz", aggregator.url())).send().await;
    assert!(without.is_err(), "served a client without a certificate: {without:?}");

    // Each agent in a directory of its own; its paths are relative to its configuration file.
    let (dir_1, dir_2) = (dir.path().join("gw-1"), dir.path().join("gw-2"));
    std::fs::create_dir_all(&dir_1).unwrap();
    std::fs::create_dir_all(&dir_2).unwrap();
    let url = aggregator.url();
    let plain = "ca_file = \"../ca.pem\"";
    let with_cert = "ca_file = \"../ca.pem\"\nclient_cert = \"../client.pem\"\nclient_key = \"../client.key\"";
    let agent_1 = Agent::start_with_upstream(&dir_1, "gw-1", TOKEN_1, &url, MqttInput::Embedded, plain, "").await;
    let agent_2 = Agent::start_with_upstream(&dir_2, "gw-2", TOKEN_2, &url, MqttInput::Embedded, with_cert, "").await;
    publish(agent_1.mqtt_port, "plc-1", &messages("gw1/temp", 20)).await;
    publish(agent_2.mqtt_port, "plc-2", &messages("gw2/temp", 30)).await;

    eventually("gw-2's 30 readings", Duration::from_secs(30), || async {
        (aggregator.sensor_counts().await.get("gw2/temp") == Some(&30)).then_some(())
    })
    .await;
    // With TLS 1.3 the client learns of the refusal after its side of the handshake, as an alert
    // (`tls`); a reset that overtakes the alert would count as `unreachable`.
    eventually("gw-1's refused requests counted", Duration::from_secs(20), || async {
        let failed = agent_1.metric(&outcome("tls")).await + agent_1.metric(&outcome("unreachable")).await;
        (failed >= 3.0).then_some(())
    })
    .await;
    assert!(agent_1.metric(&outcome("tls")).await >= 1.0);
    assert_eq!(agent_1.metric("tributary_agent_spool_readings").await, 20.0, "kept in the spool");
    assert_eq!(agent_1.metric(&outcome("ok")).await, 0.0);
    assert!(!aggregator.sensor_counts().await.contains_key("gw1/temp"));
    assert!(aggregator.metric(HANDSHAKE_FAILURES).await >= 3.0);
    let log = agent_1.process.log_text();
    assert!(log.contains("received fatal alert: CertificateRequired"), "{}", agent_1.process.log_tail(10));
    assert_eq!(agent_2.metric(&outcome("tls")).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_trusting_another_ca_refuses_the_aggregators_certificate() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let tls = "tls_cert = \"server.pem\"\ntls_key = \"server.key\"";
    let aggregator = Aggregator::start_tls(dir.path(), &[("gw-1", TOKEN_1)], tls, client(dir.path(), false)).await;
    let trust = "ca_file = \"other-ca.pem\"";
    let agent =
        Agent::start_with_upstream(dir.path(), "gw-1", TOKEN_1, &aggregator.url(), MqttInput::Embedded, trust, "")
            .await;
    publish(agent.mqtt_port, "plc", &messages("line1/flow", 10)).await;
    eventually("refused handshakes counted", Duration::from_secs(20), || async {
        (agent.metric(&outcome("tls")).await >= 3.0).then_some(())
    })
    .await;
    assert_eq!(agent.metric("tributary_agent_spool_readings").await, 10.0, "kept in the spool");
    assert_eq!(aggregator.total_readings().await, 0);
    let log = agent.process.log_text();
    assert!(log.contains("invalid peer certificate: UnknownIssuer"), "{}", agent.process.log_tail(10));
}

/// Runs `tributary-agent --check-config` on `config` written to `dir/agent.toml`: (exit code, stderr).
fn check_config(dir: &Path, config: &str) -> (Option<i32>, String) {
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).unwrap();
    let output = Command::new(bin("tributary-agent")).arg("--check-config").arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.code(), text)
}

/// Starts `tributary-aggregator` on `config` written to `dir/aggregator.toml` and waits for it to
/// exit: (exit code, stderr). Fails if it keeps running.
fn start_aggregator(dir: &Path, config: &str) -> (Option<i32>, String) {
    let path = dir.join("aggregator.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(bin("tributary-aggregator"))
        .arg("--config")
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the aggregator kept running with a bad configuration");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn bad_tls_settings_are_configuration_errors_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let file = dir.path().join("agent.toml").display().to_string();
    let agent = |upstream_keys: &str| {
        format!(
            "agent_id = \"gw-1\"\ndata_dir = \"data\"\n[upstream]\nurl = \"https://127.0.0.1:9\"\n\
             token = \"t\"\n{upstream_keys}\n"
        )
    };
    let refused = |upstream_keys: &str, key: &str, reason: &str| {
        let (code, text) = check_config(dir.path(), &agent(upstream_keys));
        assert_eq!(code, Some(1), "{upstream_keys}: {text}");
        assert!(text.contains(&file) && text.contains(key) && text.contains(reason), "{upstream_keys}: {text}");
        assert!(!text.contains("panicked"), "{text}");
    };
    refused("ca_file = \"ca.pem\"\nclient_cert = \"client.pem\"", "upstream.client_key", "required with client_cert");
    refused("client_key = \"client.key\"", "upstream.client_cert", "required with client_key");
    refused("ca_file = \"missing.pem\"", "upstream.ca_file", "cannot read");
    refused("ca_file = \"client.key\"", "upstream.ca_file", "holds no certificate");
    refused(
        "ca_file = \"ca.pem\"\nclient_cert = \"client.pem\"\nclient_key = \"server.key\"",
        "upstream.client_key",
        "is not the private key of",
    );
    let plain = agent("ca_file = \"ca.pem\"").replace("https://", "http://");
    let (code, text) = check_config(dir.path(), &plain);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("upstream.ca_file") && text.contains("TLS needs an https://"), "{text}");
    let (code, text) = check_config(
        dir.path(),
        &agent("ca_file = \"ca.pem\"\nclient_cert = \"client.pem\"\nclient_key = \"client.key\""),
    );
    assert_eq!(code, Some(0), "{text}");

    let aggregator = |http_keys: &str| {
        format!(
            "data_dir = \"data\"\n[http]\nlisten = \"127.0.0.1:0\"\n{http_keys}\n[[agents]]\nid = \"gw-1\"\ntoken = \"t\"\n"
        )
    };
    let file = dir.path().join("aggregator.toml").display().to_string();
    for (keys, key, reason) in [
        ("tls_cert = \"server.pem\"", "http.tls_key", "required with tls_cert"),
        ("tls_cert = \"server.pem\"\ntls_key = \"missing.key\"", "http.tls_key", "cannot read"),
        ("tls_client_ca = \"ca.pem\"", "http.tls_client_ca", "need HTTPS"),
        ("tls_cert = \"server.pem\"\ntls_key = \"client.key\"", "http.tls_key", "is not the private key of"),
    ] {
        let (code, stderr) = start_aggregator(dir.path(), &aggregator(keys));
        assert_eq!(code, Some(1), "{keys}: {stderr}");
        assert!(stderr.contains(&file) && stderr.contains(key) && stderr.contains(reason), "{keys}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_ca_certificates_still_forwards_over_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(dir.path(), &[("gw-1", TOKEN_1)]).await;
    // rustls-native-certs reads only these when they are set: the system's CA store is empty.
    let no_roots = [("SSL_CERT_FILE", "/dev/null"), ("SSL_CERT_DIR", "/nonexistent")];
    let agent = Agent::start_with_env(dir.path(), "gw-1", TOKEN_1, &aggregator.url(), "", &no_roots).await;
    publish(agent.mqtt_port, "plc", &messages("line1/flow", 10)).await;
    eventually("10 readings over plain HTTP", Duration::from_secs(30), || async {
        (aggregator.total_readings().await == 10).then_some(())
    })
    .await;
}
