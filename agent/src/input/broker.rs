//! The embedded MQTT broker: sensors publish to the agent itself, no broker to install.
//!
//! rumqttd's router (commit log, sessions, acks) runs on its own thread, but the agent owns the
//! listening socket and every client connection, and moves packets between sockets and router
//! itself, as rumqttd's own server does (`rumqttd::link::remote`). rumqttd's server cannot be
//! stopped, and stopping is the reason: a clean stop must stop taking publishes, then take
//! everything the router acknowledged, then end, in bounded time whatever the clients do.
//!
//! The stop, in order:
//! 1. the listener closes and every connection stops reading its socket;
//! 2. the gate closes: a connection hands packets to the router only while holding the gate open
//!    (a read lock, once per batch), so once the gate is closed (write lock) nothing more reaches
//!    the router, and nothing more can be acknowledged;
//! 3. the agent publishes a marker through its own link: the router handles events in order, so
//!    every publish it acknowledged is in the commit log before the marker;
//! 4. the agent reads its link up to the marker into the spool;
//! 5. connections write the acks still due (for at most [`ACK_FLUSH`]) and close.
//!
//! rumqttd acknowledges a QoS-1 publish as soon as it is in its in-memory log, before the agent has
//! read it; the spool's group commit follows within `spool.gather_interval` under load, within
//! `spool.max_commit_interval` on a quiet gateway. That interval is the only window in which a
//! crash can lose an acknowledged reading (a power cut also loses the commits of the last
//! `spool.sync_interval`). QoS 2 gets the same guarantee:
//! connections hand QoS-2 publishes to the router as QoS 1 and answer PUBREC only once the router
//! has logged the message (rumqttd itself would answer PUBREC first and log on PUBREL).
//!
//! The agent reads through a local link subscribed to `#` (one commit log inside the broker, however
//! many topics), and matches topics against its own filters. rumqttd keeps a bounded in-memory log
//! (`mqtt.broker_buffer_bytes`) and evicts its oldest messages when full, read or not. So that it
//! never evicts what the agent has not read, connections hand publishes over only while the agent's
//! link is less than the log's size behind ([`Backlog`]); past that they wait, and stop reading
//! their sockets, which slows the clients down instead of losing their messages. Were messages
//! evicted all the same, the gap in the link's offsets is counted as
//! `tributary_agent_broker_dropped_total`.
//!
//! With `[[mqtt.users]]` configured, a client must present one's username and password in its
//! CONNECT; any other is answered CONNACK 4 (bad username or password), counted as
//! `tributary_agent_broker_auth_failures_total`, and closed before the router hears of it.
//!
//! With `mqtt.tls_listen`, a second listener takes MQTT over TLS (tokio-rustls; with
//! `tls_client_ca`, only clients whose certificate that CA signed), beside the plain one on
//! `mqtt.listen`, as Mosquitto users expect (1883 and 8883). Each connection's handshake runs in
//! the connection's own task, within [`HANDSHAKE_TIMEOUT`], so a client that stalls or fails it
//! delays no one; failures are counted as `tributary_agent_broker_tls_handshake_failures_total`
//! and logged. After the handshake a TLS connection is served exactly as a plain one.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::v4::{self, V4};
use rumqttd::protocol::{
    self, ConnAck, ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill, Login, Packet, Protocol, PubComp,
    PubCompReason, PubRec, PubRecReason, Publish,
};
use rumqttd::{Notification, Router, RouterConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, RwLock, Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::Intake;
use crate::config::{MqttConfig, MqttTls};
use crate::metrics::Metrics;

/// rumqttd's in-memory log per filter is `mqtt.broker_buffer_bytes` in this many segments, evicted
/// oldest first whatever the agent has read. It only has to cover the agent's scheduling delays:
/// the agent takes messages as fast as they come (they wait for a slow disk in the intake's chunk,
/// 24 bytes a reading, not here at five times their size: rumqttd keeps some 230 bytes per message
/// besides its topic and payload), and connections wait while the agent is behind by half the log
/// ([`Backlog`]).
const SEGMENT_COUNT: usize = 4;
/// rumqttd refuses smaller segments.
const MIN_SEGMENT_BYTES: usize = 1024;
/// With the agent's link this long without a message, what it has not read is nothing (see
/// [`Backlog::settle`]).
const BACKLOG_SETTLE: Duration = Duration::from_millis(200);

/// Client connections at once (rumqttd's router refuses more anyway).
const MAX_CONNECTIONS: usize = 10_000;
/// A client that opened a connection must send CONNECT within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A client of `tls_listen` must finish its TLS handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection may take to say so (a TLS close_notify, a TCP FIN).
const CLOSE_TIMEOUT: Duration = Duration::from_millis(200);
/// Stop step 4: reading up to the marker only waits for the router to forward what it holds.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Stop step 5: how long connections may take to write the acks due to their clients.
const ACK_FLUSH: Duration = Duration::from_secs(1);
/// A read asks the socket for at least this much room.
const READ_CHUNK: usize = 8 * 1024;
/// Reads smaller than this are framed from a copy (see [`Connection::frame`]).
const SMALL_READ: usize = 2 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{key} {addr}: cannot listen: {source}")]
    Bind { key: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("embedded broker: {0}")]
    Setup(String),
    #[error("the embedded broker stopped: {0}")]
    Stopped(String),
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
}

/// Registers a connection with the router: (client id, clean session, last will).
type NewLink = Arc<dyn Fn(&str, bool, Option<LastWill>) -> Result<Link, String> + Send + Sync>;
type Link = (LinkTx, LinkRx, Notification);

/// A running embedded broker and the agent's link into it.
pub struct EmbeddedBroker {
    listener: TcpListener,
    /// `tls_listen`'s listener, and the handshakes it makes.
    tls_listener: Option<(TcpListener, TlsAcceptor)>,
    new_link: NewLink,
    link_tx: LinkTx,
    link_rx: LinkRx,
    max_packet: usize,
    /// Username → password; empty: every client is let in.
    users: HashMap<String, String>,
    backlog: Arc<Backlog>,
}

impl EmbeddedBroker {
    /// Listens on `mqtt.listen` and starts rumqttd's router on its own thread.
    pub async fn start(config: &MqttConfig) -> Result<EmbeddedBroker, BrokerError> {
        let addr = config.listen;
        let listener =
            TcpListener::bind(addr).await.map_err(|source| BrokerError::Bind { key: "mqtt.listen", addr, source })?;
        let tls_listener = match (config.tls_listen, &config.tls) {
            (Some(addr), Some(MqttTls::Server(tls))) => {
                let listener = TcpListener::bind(addr).await.map_err(|source| BrokerError::Bind {
                    key: "mqtt.tls_listen",
                    addr,
                    source,
                })?;
                Some((listener, TlsAcceptor::from(tls.clone())))
            }
            (Some(_), _) => {
                return Err(BrokerError::Setup("mqtt.tls_listen: no TLS settings (tls_cert, tls_key) loaded".into()));
            }
            (None, _) => None,
        };
        let segment_bytes = (config.broker_buffer_bytes / SEGMENT_COUNT).max(MIN_SEGMENT_BYTES);
        let router_tx = Router::new(0, router_config(segment_bytes)).spawn();
        let new_link: NewLink = Arc::new(move |client_id, clean, will| {
            let builder = LinkBuilder::new(client_id, router_tx.clone()).clean_session(clean).last_will(will);
            builder.build().map_err(|e| e.to_string())
        });
        let (mut link_tx, link_rx, _) = new_link("tributary-agent-spool", true, None)
            .map_err(|e| BrokerError::Setup(format!("local link: {e}")))?;
        link_tx.subscribe("#").map_err(|e| BrokerError::Setup(format!("subscribe: {e}")))?;
        let users: HashMap<String, String> =
            config.users.iter().map(|u| (u.username.clone(), u.password.clone())).collect();
        // Client certificates let in only the clients their CA signed, on the TLS listener.
        let open = [Some(addr), config.tls_listen.filter(|_| config.tls_client_ca.is_none())];
        for addr in open.into_iter().flatten() {
            if users.is_empty() && !addr.ip().is_loopback() {
                tracing::warn!(
                    %addr,
                    "the embedded MQTT broker listens beyond this host and lets in any client: list the \
                     allowed clients in [[mqtt.users]]"
                );
            }
        }
        if let Some(tls_addr) = config.tls_listen {
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    %addr,
                    %tls_addr,
                    "the embedded MQTT broker takes unencrypted MQTT from beyond this host beside TLS: set \
                     mqtt.listen to a loopback address (127.0.0.1:1883) to take only TLS from the network"
                );
            }
            tracing::info!(
                %addr,
                %tls_addr,
                users = users.len(),
                client_certificates = config.tls_client_ca.is_some(),
                "embedded MQTT broker listening (plain and TLS)"
            );
        } else {
            tracing::info!(%addr, users = users.len(), "embedded MQTT broker listening");
        }
        Ok(EmbeddedBroker {
            listener,
            tls_listener,
            new_link,
            link_tx,
            link_rx,
            // Payloads above max_payload_bytes still reach the agent, to be counted as rejected;
            // only far larger packets make the broker drop the client.
            max_packet: config.max_payload_bytes.saturating_mul(8),
            users,
            backlog: Arc::new(Backlog::new(segment_bytes * (SEGMENT_COUNT - 2), segment_bytes)),
        })
    }

    /// Reads messages until shutdown, then stops as the module doc describes.
    pub async fn run(self, mut intake: Intake, mut shutdown: watch::Receiver<bool>) -> Result<(), BrokerError> {
        let EmbeddedBroker { listener, tls_listener, new_link, mut link_tx, link_rx, max_packet, users, backlog } =
            self;
        let metrics = intake.metrics().clone();
        let shared = Arc::new(Shared {
            new_link,
            gate: RwLock::new(false),
            max_packet,
            metrics,
            users,
            backlog: backlog.clone(),
        });
        let (phase_tx, phase) = watch::channel(Phase::Open);
        // Every connection task holds a clone; recv() returns None once all have ended.
        let (ended_tx, mut ended) = tokio::sync::mpsc::channel::<()>(1);
        // Connections of both listeners share the limit on connections.
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        if let Some((tls_listener, acceptor)) = tls_listener {
            let (shared, phase, ended_tx, slots) = (shared.clone(), phase.clone(), ended_tx.clone(), slots.clone());
            tokio::spawn(accept(tls_listener, Some(acceptor), slots, shared, phase, ended_tx));
        }
        tokio::spawn(accept(listener, None, slots, shared.clone(), phase, ended_tx));

        let spool = intake.sender();
        let mut reader =
            LinkReader { link_rx, last_offset: None, marker: None, backlog, read_since_settle: 0, settle_handed: 0 };
        let mut ticker = intake.ticker();
        let mut settle = tokio::time::interval(BACKLOG_SETTLE);
        settle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                // What the pre-filters held long enough goes out even when no message comes.
                _ = ticker.tick() => if let Err(e) = intake.tick(&mut ticker) { break Err(e.into()) },
                // The writer has room again: hand over what piled up meanwhile.
                permit = spool.reserve(), if intake.has_pending() => match permit {
                    Ok(permit) => intake.send_with(permit),
                    Err(_) => break Err(BrokerError::Spool(crate::spool::SpoolError::Closed)),
                },
                n = reader.link_rx.next(), if !intake.is_full() => match n {
                    Ok(Some(n)) => { reader.handle(n, &mut intake).await?; }
                    Ok(None) => {}
                    Err(e) => break Err(BrokerError::Stopped(format!("local link: {e}"))),
                },
                _ = settle.tick(), if !intake.is_full() && reader.backlog.behind() > 0 => reader.settle(),
                _ = shutdown.changed() => break Ok(()),
            }
        };

        // 1. Stop accepting connections and reading sockets. 2. Close the gate.
        let _ = phase_tx.send(Phase::Stopping);
        *shared.gate.write().await = true;
        if result.is_ok() {
            // 3. The marker. 4. Everything before it into the spool.
            let marker = Bytes::from(format!("tributary-agent/stop/{:016x}", fastrand::u64(..)));
            reader.marker = Some(marker.clone());
            link_tx.publish(marker, "stop").map_err(|e| BrokerError::Stopped(format!("local link: {e}")))?;
            let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
                loop {
                    match reader.link_rx.next().await {
                        Ok(Some(n)) => {
                            if reader.handle(n, &mut intake).await? {
                                return Ok(());
                            }
                        }
                        Ok(None) => {}
                        Err(e) => return Err(BrokerError::Stopped(format!("local link: {e}"))),
                    }
                }
            })
            .await;
            match drained {
                Ok(r) => r?,
                Err(_) => tracing::error!(
                    "the embedded broker did not forward everything it acknowledged within {DRAIN_TIMEOUT:?}; \
                     acknowledged messages may be lost"
                ),
            }
            // With what the pre-filters still hold.
            intake.finish().await?;
        }
        // 5. Connections write the acks due and close.
        let _ = phase_tx.send(Phase::Closing);
        let _ = tokio::time::timeout(ACK_FLUSH + Duration::from_secs(1), ended.recv()).await;
        result
    }
}

/// Where the broker is in its life; connections and the acceptor watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// No new connections, no more reading from sockets; acks still go out.
    Stopping,
    /// Write the acks still due, then close.
    Closing,
}

/// What every connection task shares.
struct Shared {
    new_link: NewLink,
    /// `true` once closed: nothing more reaches the router (see the module doc).
    gate: RwLock<bool>,
    max_packet: usize,
    metrics: Arc<Metrics>,
    /// Username → password; empty: every client is let in.
    users: HashMap<String, String>,
    backlog: Arc<Backlog>,
}

/// How far the agent's link is behind what connections handed to the router, in rumqttd's own
/// measure of a message's size (4 bytes + topic + payload), so that connections can wait before
/// rumqttd's log would evict what the agent has not read.
///
/// Connections add what they hand over, the agent's link what it reads. The two counts can part
/// for good only in rare cases (a publish the router refuses after it was counted, a will the
/// router publishes itself); [`LinkReader::settle`] mends that when the link has been idle for
/// [`BACKLOG_SETTLE`] while the agent was ready to read.
struct Backlog {
    handed: AtomicU64,
    read: AtomicU64,
    /// Connections wait while more than this is unread: the log's size less two segments (rumqttd
    /// drops a whole segment when it starts one past its count, and a segment may exceed its size
    /// by a message).
    limit: u64,
    /// What [`LinkReader::settle`] lets connections hand over at a time: a segment.
    slack: u64,
    /// A connection waits on `room`.
    waiting: AtomicBool,
    room: Notify,
}

impl Backlog {
    fn new(limit: usize, slack: usize) -> Backlog {
        Backlog {
            handed: AtomicU64::new(0),
            read: AtomicU64::new(0),
            limit: limit as u64,
            slack: slack as u64,
            waiting: AtomicBool::new(false),
            room: Notify::new(),
        }
    }

    /// rumqttd's size of a publish the agent's link (`#`) receives; 0 for others.
    fn size(packet: &Packet) -> u64 {
        match packet {
            // `#` does not match topics starting with `$` (rumqttd follows MQTT there).
            Packet::Publish(p, _) if p.topic.first() != Some(&b'$') => 4 + (p.topic.len() + p.payload.len()) as u64,
            _ => 0,
        }
    }

    fn behind(&self) -> u64 {
        self.handed.load(Ordering::SeqCst).saturating_sub(self.read.load(Ordering::SeqCst))
    }

    /// Waits until `bytes` more fit within the limit (or nothing is unread: a message larger than
    /// the log goes alone), or until the broker stops taking publishes.
    async fn room_for(&self, bytes: u64, phase: &watch::Receiver<Phase>, metrics: &Metrics) {
        let fits = |behind: u64| behind == 0 || behind + bytes <= self.limit;
        if bytes == 0 || fits(self.behind()) {
            return;
        }
        metrics.broker_backlog_waits.inc();
        let mut phase = phase.clone();
        loop {
            let notified = self.room.notified();
            let mut notified = pin!(notified);
            notified.as_mut().enable();
            self.waiting.store(true, Ordering::SeqCst);
            if fits(self.behind()) {
                return;
            }
            tokio::select! {
                _ = notified => {}
                _ = phase.wait_for(|p| *p != Phase::Open) => return,
            }
        }
    }

    fn handed(&self, bytes: u64) {
        if bytes > 0 {
            self.handed.fetch_add(bytes, Ordering::SeqCst);
        }
    }

    fn read(&self, bytes: u64) {
        self.read.fetch_add(bytes, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) && self.waiting.swap(false, Ordering::SeqCst) {
            self.room.notify_waiters();
        }
    }
}

/// Accepts connections until the broker stops; `tls`: handshakes each first (`tls_listen`).
async fn accept(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    slots: Arc<Semaphore>,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
    ended: tokio::sync::mpsc::Sender<()>,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            _ = phase.wait_for(|p| *p != Phase::Open) => break,
        };
        let Ok(slot) = slot else { break };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = phase.wait_for(|p| *p != Phase::Open) => break,
        };
        match accepted {
            Ok((socket, addr)) => {
                backoff = Duration::from_millis(10);
                let (shared, phase, ended, tls) = (shared.clone(), phase.clone(), ended.clone(), tls.clone());
                tokio::spawn(async move {
                    let _ = socket.set_nodelay(true);
                    match tls {
                        None => serve(socket, addr, &shared, phase).await,
                        Some(acceptor) => {
                            if let Some(socket) = handshake(&acceptor, socket, addr, &shared, phase.clone()).await {
                                serve(socket, addr, &shared, phase).await;
                            }
                        }
                    }
                    drop((slot, ended));
                });
            }
            // Out of file descriptors, typically: wait instead of spinning.
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "embedded broker: cannot accept a connection");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    // The listener closes here: new connections are refused from now on.
}

/// The TLS handshake of a `tls_listen` client: its stream, or `None` if it failed (counted and
/// logged), timed out, or the broker stopped meanwhile.
async fn handshake(
    acceptor: &TlsAcceptor,
    socket: TcpStream,
    addr: SocketAddr,
    shared: &Shared,
    mut phase: watch::Receiver<Phase>,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let done = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)) => r,
        _ = phase.wait_for(|p| *p != Phase::Open) => return None,
    };
    let error = match done {
        Ok(Ok(stream)) => return Some(stream),
        Ok(Err(error)) => error,
        Err(_) => {
            shared.metrics.broker_tls_handshake_failures.inc();
            tracing::debug!(%addr, timeout = ?HANDSHAKE_TIMEOUT, "embedded broker: TLS handshake timed out");
            return None;
        }
    };
    shared.metrics.broker_tls_handshake_failures.inc();
    // rustls' own verdicts say what to fix; a client that closed without a word (a port probe) does not.
    let verdict = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    let hint = match verdict {
        None => {
            tracing::debug!(%addr, %error, "embedded broker: TLS handshake failed");
            return None;
        }
        Some(rustls::Error::InvalidMessage(_)) => {
            "the client does not speak TLS: plain MQTT belongs on mqtt.listen, TLS clients connect to mqtt.tls_listen"
        }
        Some(rustls::Error::NoCertificatesPresented) => {
            "the client showed no certificate: with mqtt.tls_client_ca set, every client needs one signed by that CA"
        }
        Some(rustls::Error::InvalidCertificate(_)) => {
            "the client's certificate is not signed by a CA in mqtt.tls_client_ca, or has expired"
        }
        Some(rustls::Error::AlertReceived(_)) => {
            "the client refused the broker's certificate: it must trust the CA that signed mqtt.tls_cert \
             and connect by a name (or address) the certificate holds"
        }
        Some(_) => "check the client's TLS settings against mqtt.tls_cert and tls_client_ca",
    };
    tracing::warn!(%addr, %error, hint, "embedded broker: refused a client: TLS handshake failed");
    None
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT.
    Goodbye,
    /// The client closed the socket, or it failed.
    Closed(Option<std::io::Error>),
    KeepAlive,
    /// The client sent something that is not MQTT 3.1.1.
    Protocol(protocol::Error),
    /// The router dropped the connection: it refused a packet, or a new connection took over the
    /// client id. Nothing to tell it.
    Router,
    /// The broker is stopping.
    Stopped,
}

/// One client: its socket (TCP, or TLS over TCP) and its buffers.
struct Connection<S> {
    socket: S,
    peer: SocketAddr,
    read: BytesMut,
    write: BytesMut,
    max_packet: usize,
}

/// A connection's QoS bookkeeping.
#[derive(Default)]
struct Session {
    /// QoS-1/2 publishes handed to the router whose ack is not written yet.
    acks_due: usize,
    /// QoS-2 publishes handed to the router (as QoS 1), awaiting its ack to answer PUBREC.
    qos2_logged: HashSet<u16>,
    /// QoS-2 publishes answered with PUBREC, awaiting the client's PUBREL.
    qos2_received: HashSet<u16>,
}

/// Packets read from the socket in one go.
#[derive(Default)]
struct Batch {
    /// For the router.
    packets: Vec<Packet>,
    /// Of those, QoS-1/2 publishes (acks due once handed over).
    acks: usize,
    /// Of those, QoS-2 publishes by packet id.
    qos2: Vec<u16>,
    /// Answers the connection gives itself (PUBCOMP, repeated PUBREC).
    replies: Vec<Packet>,
    goodbye: bool,
}

/// Serves one client until either side ends, then closes the connection (a TLS one with its
/// close_notify).
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    socket: S,
    addr: SocketAddr,
    shared: &Shared,
    phase: watch::Receiver<Phase>,
) {
    let mut conn = Connection {
        socket,
        peer: addr,
        read: BytesMut::with_capacity(READ_CHUNK),
        write: BytesMut::with_capacity(1024),
        max_packet: shared.max_packet,
    };
    serve_client(&mut conn, shared, phase).await;
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.socket.shutdown()).await;
}

async fn serve_client<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    shared: &Shared,
    mut phase: watch::Receiver<Phase>,
) {
    let addr = conn.peer;
    let first = tokio::select! {
        r = tokio::time::timeout(CONNECT_TIMEOUT, conn.read_packet()) => r,
        _ = phase.wait_for(|p| *p != Phase::Open) => return,
    };
    let (connect, will, login) = match first {
        Ok(Ok(Packet::Connect(connect, _, will, _, login))) => (connect, will, login),
        Ok(Ok(packet)) => return refuse(shared, addr, &format!("first packet is not CONNECT: {packet:?}")),
        Ok(Err(End::Protocol(e))) => return refuse(shared, addr, &e.to_string()),
        Ok(Err(_)) => return,
        Err(_) => {
            tracing::debug!(%addr, "no CONNECT within {CONNECT_TIMEOUT:?}");
            return;
        }
    };
    if !shared.users.is_empty() && !authenticated(&shared.users, login.as_ref()) {
        let code = ConnectReturnCode::BadUserNamePassword;
        let _ = conn.write_packets(vec![Packet::ConnAck(ConnAck { session_present: false, code }, None)]).await;
        shared.metrics.broker_auth_failures.inc();
        let username = login.as_ref().map(|l| l.username.as_str());
        tracing::warn!(%addr, client_id = connect.client_id, ?username, "embedded broker: refused a client: bad username or password");
        return;
    }
    // rumqttd's own rules: a client must ping (a silent half-open connection would hold its slot
    // for ever), and a persistent session needs an id. The router refuses ids with +, $, # or /.
    if connect.keep_alive == 0 {
        return refuse(shared, addr, "keep alive 0 is not supported");
    }
    if (connect.client_id.is_empty() && !connect.clean_session) || connect.client_id.contains(['+', '$', '#', '/']) {
        let code = ConnectReturnCode::ClientIdentifierNotValid;
        let _ = conn.write_packets(vec![Packet::ConnAck(ConnAck { session_present: false, code }, None)]).await;
        tracing::debug!(%addr, client_id = connect.client_id, "client id refused");
        return;
    }
    let client_id = match connect.client_id.is_empty() {
        true => format!("tributary-assigned-{:016x}", fastrand::u64(..)),
        false => connect.client_id.clone(),
    };
    // LinkBuilder::build waits for the router's answer on a blocking channel.
    let new_link = shared.new_link.clone();
    let (clean, id) = (connect.clean_session, client_id.clone());
    let will_to_router = will.clone();
    let link = tokio::task::spawn_blocking(move || new_link(&id, clean, will_to_router)).await;
    let (mut link_tx, mut link_rx, connack) = match link {
        Ok(Ok(link)) => link,
        _ => {
            let code = ConnectReturnCode::ServiceUnavailable;
            let _ = conn.write_packets(vec![Packet::ConnAck(ConnAck { session_present: false, code }, None)]).await;
            tracing::warn!(%addr, client_id, "the embedded broker's router refused the connection");
            return;
        }
    };
    let connack: Option<Packet> = connack.into();
    let keep_alive = Duration::from_secs(connect.keep_alive as u64).mul_f32(1.5);
    let mut session = Session::default();
    let end = match conn.write_packets(connack.into_iter().collect()).await {
        Ok(()) => conn.run(shared, &mut link_tx, &mut link_rx, &mut phase, &mut session, keep_alive).await,
        Err(e) => End::Closed(Some(e)),
    };

    match &end {
        End::Protocol(e) => refuse(shared, addr, &e.to_string()),
        End::KeepAlive => tracing::debug!(%addr, client_id, "keep alive timed out"),
        End::Closed(Some(e)) => tracing::debug!(%addr, client_id, error = %e, "connection failed"),
        _ => tracing::trace!(%addr, client_id, ?end, "connection ended"),
    }
    // The client vanished without DISCONNECT: its will is due, and the router must forget it.
    if matches!(end, End::Closed(_) | End::KeepAlive | End::Protocol(_)) {
        let mut packets = Vec::new();
        if let Some(will) = will {
            packets.push(Packet::Publish(Publish::new(will.topic, will.message, false), None));
        }
        let disconnect = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
        packets.push(Packet::Disconnect(disconnect, None));
        let _ = hand_over(shared, &mut link_tx, packets).await;
    }
}

/// Whether `login` names a configured user with its password. The password is compared in time
/// independent of where it differs (as the aggregator compares tokens), so that timing does not
/// reveal how much of a guess was right.
fn authenticated(users: &HashMap<String, String>, login: Option<&Login>) -> bool {
    use subtle::ConstantTimeEq;
    let Some(login) = login else { return false };
    let Some(password) = users.get(&login.username) else { return false };
    bool::from(password.as_bytes().ct_eq(login.password.as_bytes()))
}

/// Counts and logs a client the broker refuses (it closes the connection).
fn refuse(shared: &Shared, addr: SocketAddr, reason: &str) {
    shared.metrics.broker_rejected.inc();
    tracing::warn!(%addr, reason, "embedded broker: refused a client's packet and closed its connection");
}

/// Hands packets to the router in pieces that fit in its log, each once the agent's link is close
/// enough behind that rumqttd would evict nothing unread ([`Backlog`]); `false` if the gate was
/// closed before the first piece (once a piece is in, the rest counts as handed over: at worst the
/// connection waits [`ACK_FLUSH`] for acks that do not come).
async fn hand_over_paced(
    shared: &Shared,
    link_tx: &mut LinkTx,
    packets: Vec<Packet>,
    phase: &watch::Receiver<Phase>,
) -> Result<bool, LinkError> {
    let backlog = &shared.backlog;
    // In pieces of a segment at most: what a settle lets through at a time.
    let total: u64 = packets.iter().map(Backlog::size).sum();
    if total <= backlog.slack {
        backlog.room_for(total, phase, &shared.metrics).await;
        return hand_over(shared, link_tx, packets).await;
    }
    let mut handed = false;
    let mut piece = Vec::new();
    let mut piece_bytes = 0;
    let mut packets = packets.into_iter().peekable();
    while let Some(packet) = packets.next() {
        piece_bytes += Backlog::size(&packet);
        piece.push(packet);
        let next = packets.peek().map_or(u64::MAX, Backlog::size);
        if packets.peek().is_none() || piece_bytes.saturating_add(next) > backlog.slack {
            backlog.room_for(piece_bytes, phase, &shared.metrics).await;
            let ok = hand_over(shared, link_tx, std::mem::take(&mut piece)).await?;
            if !ok {
                return Ok(handed);
            }
            handed = true;
            piece_bytes = 0;
        }
    }
    Ok(handed)
}

/// Hands packets to the router unless the gate is closed; `false` if it was.
async fn hand_over(shared: &Shared, link_tx: &mut LinkTx, mut packets: Vec<Packet>) -> Result<bool, LinkError> {
    let Some(last) = packets.pop() else { return Ok(true) };
    // Held until the router has been told: the stop waits for it (see the module doc).
    let sealed = shared.gate.read().await;
    if *sealed {
        return Ok(false);
    }
    let bytes = packets.iter().chain([&last]).map(Backlog::size).sum();
    link_tx.buffer().extend(packets);
    // Pushes `last` and wakes the router (a blocking send: the router only ever waits on its own queue).
    link_tx.send(last).await?;
    shared.backlog.handed(bytes);
    Ok(true)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Reads until one packet is complete (the CONNECT).
    async fn read_packet(&mut self) -> Result<Packet, End> {
        loop {
            match V4.read_mut(&mut self.read, self.max_packet) {
                Ok(packet) => return Ok(packet),
                Err(protocol::Error::InsufficientBytes(n)) => self.fill(n).await?,
                Err(e) => return Err(End::Protocol(e)),
            }
        }
    }

    async fn fill(&mut self, wanted: usize) -> Result<(), End> {
        self.read.reserve(wanted.max(READ_CHUNK));
        match self.socket.read_buf(&mut self.read).await {
            Ok(0) => Err(End::Closed(None)),
            Ok(_) => Ok(()),
            Err(e) => Err(End::Closed(Some(e))),
        }
    }

    /// Moves packets between the socket and the router until either side ends or the broker stops.
    async fn run(
        &mut self,
        shared: &Shared,
        link_tx: &mut LinkTx,
        link_rx: &mut LinkRx,
        phase: &mut watch::Receiver<Phase>,
        session: &mut Session,
        keep_alive: Duration,
    ) -> End {
        // A client may send packets right behind its CONNECT, without waiting for CONNACK.
        if !self.read.is_empty() {
            if let Err(end) = self.take_input(shared, link_tx, session, phase).await {
                return end;
            }
        }
        let mut closing_by: Option<Instant> = None;
        loop {
            let reading = *phase.borrow() == Phase::Open;
            tokio::select! {
                biased;
                changed = phase.changed() => {
                    if changed.is_err() {
                        return End::Stopped;
                    }
                    if *phase.borrow_and_update() == Phase::Closing {
                        if session.acks_due == 0 {
                            return End::Stopped;
                        }
                        closing_by = Some(Instant::now() + ACK_FLUSH);
                    }
                }
                _ = tokio::time::sleep_until(closing_by.unwrap_or_else(Instant::now)), if closing_by.is_some() => {
                    return End::Stopped;
                }
                n = link_rx.next() => {
                    let first = match n {
                        Ok(first) => first,
                        Err(_) => return End::Router,
                    };
                    if let Err(end) = self.deliver(first, shared, link_rx, session).await {
                        return end;
                    }
                    if closing_by.is_some() && session.acks_due == 0 {
                        return End::Stopped;
                    }
                }
                r = tokio::time::timeout(keep_alive, self.socket.read_buf(&mut self.read)), if reading => {
                    match r {
                        Err(_) => return End::KeepAlive,
                        Ok(Ok(0)) => return End::Closed(None),
                        Ok(Err(e)) => return End::Closed(Some(e)),
                        Ok(Ok(_)) => {}
                    }
                    if let Err(end) = self.take_input(shared, link_tx, session, phase).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Hands the complete packets read so far to the router, and answers what the connection
    /// answers itself.
    async fn take_input(
        &mut self,
        shared: &Shared,
        link_tx: &mut LinkTx,
        session: &mut Session,
        phase: &watch::Receiver<Phase>,
    ) -> Result<(), End> {
        let Batch { packets, acks, qos2, replies, goodbye } = self.frame(session).map_err(End::Protocol)?;
        match hand_over_paced(shared, link_tx, packets, phase).await {
            Ok(true) => {
                session.acks_due += acks;
                session.qos2_logged.extend(qos2);
            }
            // The broker is stopping: these go unacknowledged, the client sends them again.
            Ok(false) => {}
            Err(_) => return Err(End::Router),
        }
        self.write_packets(replies).await.map_err(|e| End::Closed(Some(e)))?;
        match goodbye {
            true => Err(End::Goodbye),
            false => Ok(()),
        }
    }

    /// Frames every complete packet in the read buffer; reserves room for the rest of a partial one.
    fn frame(&mut self, session: &mut Session) -> Result<Batch, protocol::Error> {
        // Frames share their buffer's allocation, and rumqttd's log holds them until evicted, which
        // takes minutes when traffic is light: a lone 60-byte publish would pin a whole read buffer.
        // A small read is framed from an exact-size copy; busy connections frame in place.
        let (batch, wanted) = if self.read.len() < SMALL_READ {
            let mut copy = BytesMut::from(&self.read[..]);
            self.read.clear();
            let framed = frame(&mut copy, self.max_packet, session)?;
            self.read.extend_from_slice(&copy);
            framed
        } else {
            frame(&mut self.read, self.max_packet, session)?
        };
        if self.read.capacity() - self.read.len() < wanted.max(READ_CHUNK / 2) {
            self.read.reserve(wanted.max(READ_CHUNK));
        }
        Ok(batch)
    }

    /// Writes `first` and every other notification the router has queued for this client.
    async fn deliver(
        &mut self,
        first: Option<Notification>,
        shared: &Shared,
        link_rx: &mut LinkRx,
        session: &mut Session,
    ) -> Result<(), End> {
        let mut packets = Vec::new();
        let mut unscheduled = false;
        let mut next = first;
        loop {
            match next {
                Some(Notification::Unschedule) => unscheduled = true,
                // The router refused a packet (a non-UTF-8 topic, typically) and dropped the client.
                Some(Notification::Disconnect(..)) => {
                    let _ = self.write_packets(packets).await;
                    refuse(shared, self.peer(), "the router refused a packet (e.g. a topic that is not UTF-8)");
                    return Err(End::Router);
                }
                Some(n) => {
                    if let Some(packet) = Option::<Packet>::from(n) {
                        packets.push(session.outgoing(packet));
                    }
                }
                None => {}
            }
            next = match ready(link_rx.next()) {
                Some(Ok(Some(n))) => Some(n),
                Some(Ok(None)) | None => break,
                Some(Err(_)) => {
                    let _ = self.write_packets(packets).await;
                    return Err(End::Router);
                }
            };
        }
        self.write_packets(packets).await.map_err(|e| End::Closed(Some(e)))?;
        if unscheduled {
            link_rx.wake().await.map_err(|_| End::Router)?;
        }
        Ok(())
    }

    async fn write_packets(&mut self, packets: Vec<Packet>) -> std::io::Result<()> {
        if packets.is_empty() {
            return Ok(());
        }
        for packet in packets {
            if let Err(e) = V4.write(without_properties(packet), &mut self.write) {
                tracing::warn!(error = %e, "embedded broker: cannot encode a packet for a client");
            }
        }
        let mut r = self.socket.write_all(&self.write).await;
        if r.is_ok() {
            // TLS holds written data until flushed; TCP's flush does nothing.
            r = self.socket.flush().await;
        }
        self.write.clear();
        r
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }
}

/// Frames every complete packet in `buf`: the batch, and how many more bytes a partial packet needs.
fn frame(buf: &mut BytesMut, max_packet: usize, session: &mut Session) -> Result<(Batch, usize), protocol::Error> {
    let mut batch = Batch::default();
    loop {
        let header = match v4::check(buf.iter(), max_packet) {
            Ok(header) => header,
            Err(protocol::Error::InsufficientBytes(n)) => return Ok((batch, n)),
            Err(e) => return Err(e),
        };
        let is_publish = header.byte1 >> 4 == 3;
        let qos = (header.byte1 >> 1) & 0b11;
        let mut qos2_pkid = None;
        if is_publish && qos == 2 {
            let pkid = qos2_packet_id(buf, header.fixed_header_len).ok_or(protocol::Error::MalformedPacket)?;
            if session.qos2_received.contains(&pkid) {
                // Sent again before our PUBREC arrived: it is logged already.
                let _ = V4.read_mut(buf, max_packet)?;
                batch.replies.push(pubrec(pkid));
                continue;
            }
            // Logged as QoS 1; the router's PUBACK becomes our PUBREC.
            buf[0] = (header.byte1 & !0b0110) | 0b0010;
            qos2_pkid = Some(pkid);
        }
        match V4.read_mut(buf, max_packet)? {
            Packet::PubRel(pubrel, _) => {
                session.qos2_received.remove(&pubrel.pkid);
                let pubcomp = PubComp { pkid: pubrel.pkid, reason: PubCompReason::Success };
                batch.replies.push(Packet::PubComp(pubcomp, None));
            }
            // The router would refuse it too, but drop the client without saying why.
            Packet::Publish(publish, _) if std::str::from_utf8(&publish.topic).is_err() => {
                return Err(protocol::Error::TopicNotUtf8);
            }
            // rumqttd's topic matching slices the topic's first byte and panics (killing its
            // router, and with it the broker) when that byte starts a multi-byte character.
            Packet::Publish(publish, _) if publish.topic.first().is_some_and(|b| !b.is_ascii()) => {
                tracing::warn!(
                    topic = %String::from_utf8_lossy(&publish.topic),
                    "embedded broker: topics must start with an ASCII character (a limit of rumqttd); refusing the client"
                );
                return Err(protocol::Error::TopicNotUtf8);
            }
            packet => {
                if is_publish && qos > 0 {
                    batch.acks += 1;
                }
                batch.qos2.extend(qos2_pkid);
                batch.goodbye = matches!(packet, Packet::Disconnect(..));
                batch.packets.push(packet);
                if batch.goodbye {
                    return Ok((batch, 0));
                }
            }
        }
    }
}

impl Session {
    /// Accounts for a packet on its way to the client: the router's PUBACK of a QoS-2 publish
    /// becomes PUBREC.
    fn outgoing(&mut self, packet: Packet) -> Packet {
        match packet {
            Packet::PubAck(puback, props) => {
                self.acks_due = self.acks_due.saturating_sub(1);
                if self.qos2_logged.remove(&puback.pkid) {
                    self.qos2_received.insert(puback.pkid);
                    pubrec(puback.pkid)
                } else {
                    Packet::PubAck(puback, props)
                }
            }
            packet => packet,
        }
    }
}

fn pubrec(pkid: u16) -> Packet {
    Packet::PubRec(PubRec { pkid, reason: PubRecReason::Success }, None)
}

/// The packet id of a complete QoS-2 PUBLISH frame: after the fixed header and the topic.
fn qos2_packet_id(frame: &[u8], fixed_header_len: usize) -> Option<u16> {
    let topic_len = u16::from_be_bytes([*frame.get(fixed_header_len)?, *frame.get(fixed_header_len + 1)?]);
    let at = fixed_header_len + 2 + topic_len as usize;
    Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]))
}

/// MQTT 3.1.1 packets carry no properties; rumqttd's v4 encoder panics on any.
fn without_properties(packet: Packet) -> Packet {
    match packet {
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::Disconnect(p, _) => Packet::Disconnect(p, None),
        packet => packet,
    }
}

/// Polls a future once: its output if it is ready without waiting. Takes what a link already
/// holds, so a burst of acks goes out in one write.
fn ready<F: Future>(f: F) -> Option<F::Output> {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

struct LinkReader {
    link_rx: LinkRx,
    last_offset: Option<u64>,
    /// The stop marker's topic, once published.
    marker: Option<Bytes>,
    backlog: Arc<Backlog>,
    /// Messages read since the last [`LinkReader::settle`].
    read_since_settle: u64,
    /// What connections had handed over at the last [`LinkReader::settle`].
    settle_handed: u64,
}

impl LinkReader {
    /// Takes one notification; `true` if it was the stop marker.
    async fn handle(&mut self, notification: Notification, intake: &mut Intake) -> Result<bool, BrokerError> {
        match notification {
            Notification::Forward(forward) => {
                self.read_since_settle += 1;
                self.backlog.read(4 + (forward.publish.topic.len() + forward.publish.payload.len()) as u64);
                if let Some((_, offset)) = forward.cursor {
                    if let Some(last) = self.last_offset {
                        if offset > last + 1 {
                            let lost = offset - last - 1;
                            intake.metrics().broker_dropped.inc_by(lost);
                            tracing::error!(lost, "the embedded broker evicted messages before the agent read them");
                        }
                    }
                    self.last_offset = Some(offset);
                }
                if self.marker.as_ref().is_some_and(|m| *m == forward.publish.topic) {
                    return Ok(true);
                }
                intake.take(&forward.publish.topic, &forward.publish.payload);
                intake.try_flush()?;
            }
            // The router pauses a local link after a full buffer until the link says it is ready.
            Notification::Unschedule => {
                self.link_rx.wake().await.map_err(|e| BrokerError::Stopped(format!("local link: {e}")))?
            }
            _ => {}
        }
        Ok(false)
    }
}

impl LinkReader {
    /// Called every [`BACKLOG_SETTLE`] while the agent is ready to read and something counts as
    /// unread: if since the last call the link gave nothing and no connection handed anything
    /// over, either the counts parted (see [`Backlog`]) or rumqttd holds messages it will only
    /// forward once something new arrives (its router wakes a link on new data). Either way the
    /// connections may hand over one more segment: the unread stays a segment short of the log
    /// even in the second case, and in the first, settles one after the other mend the counts.
    /// (Declaring everything read at once let rumqttd evict unread messages in the second case.)
    fn settle(&mut self) {
        let handed = self.backlog.handed.load(Ordering::SeqCst);
        if std::mem::take(&mut self.read_since_settle) == 0 && handed == self.settle_handed {
            let mut floor = handed.saturating_sub(self.backlog.limit.saturating_sub(self.backlog.slack));
            if self.backlog.read.load(Ordering::SeqCst) >= floor {
                // A segment's room did not get things going (a message larger than a segment
                // waits, or the counts parted): nothing counts as unread any more.
                floor = handed;
            }
            self.backlog.read.fetch_max(floor, Ordering::SeqCst);
            self.backlog.waiting.store(false, Ordering::SeqCst);
            self.backlog.room.notify_waiters();
        }
        self.settle_handed = handed;
    }
}

fn router_config(segment_bytes: usize) -> RouterConfig {
    RouterConfig {
        max_connections: MAX_CONNECTIONS + 1,
        max_outgoing_packet_count: 200,
        max_segment_size: segment_bytes,
        max_segment_count: SEGMENT_COUNT,
        ..RouterConfig::default()
    }
}
