//! The embedded MQTT broker: sensors publish to the agent itself, no broker to install.
//!
//! The agent owns the listening socket and every client connection, and parses MQTT itself. A
//! connection hands the publishes it reads, a batch at a time in arrival order, straight to the
//! broker's run loop (the single owner of the [`Intake`]) over a channel, and acknowledges them
//! (PUBACK; PUBREC for QoS 2) once the channel has taken them. rumqttd's router (on its own
//! thread) only does what a broker does for the gateway's other MQTT clients: their
//! subscriptions, retained messages, persistent sessions, wills delivered to subscribers. A
//! publish goes to the router as well only when another client could want it: while any client
//! holds a subscription ([`Shared::subscribers`]), or when it is retained. In the common case (the
//! sensors publish, nobody subscribes) the router never sees a publish.
//!
//! rumqttd's server cannot be stopped, and stopping is the reason the agent serves connections
//! itself: a clean stop must stop taking publishes, then take everything acknowledged, then end,
//! in bounded time whatever the clients do. In order:
//! 1. the listener closes and every connection stops reading its socket;
//! 2. the channel closes: what a connection hands over afterwards is refused and goes
//!    unacknowledged (the client sends it again), so everything acknowledged is in the channel;
//! 3. the run loop takes everything the channel holds into the spool;
//! 4. connections close (their acks were written as soon as the channel took the publishes; a
//!    client that does not read its socket delays the stop by [`ACK_FLUSH`] at most).
//!
//! A publish is acknowledged once it is in the agent's memory, before the spool has it, as
//! rumqttd itself acknowledges on receipt into its log: the spool's group commit follows within
//! `spool.gather_interval` under load, within `spool.max_commit_interval` on a quiet gateway.
//! That interval is the only window in which a crash can lose an acknowledged reading (a power
//! cut also loses the commits of the last `spool.sync_interval`). QoS 2 gets the same guarantee:
//! PUBREC is written once the channel has taken the publish, and a publish sent again with the same
//! packet id before the client's PUBREL is answered PUBREC again without being taken twice.
//!
//! The agent takes every publish whose topic does not start with `$` (what a subscription to `#`
//! would get) and matches topics against its own filters. What connections have handed over and
//! the agent has not taken yet is bounded by half of `mqtt.broker_buffer_bytes` (in rumqttd's
//! measure of a message: 4 bytes + topic + payload): past that a connection waits before handing
//! more over, and stops reading its socket, which slows the client down instead of losing its
//! messages (counted as `tributary_agent_broker_backlog_waits_total`). The same setting sizes
//! rumqttd's in-memory log for other subscribers, which evicts its oldest messages when full (a
//! slow subscriber misses them; the agent does not read that log, so
//! `tributary_agent_broker_dropped_total` stays 0).
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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::v4::{self, V4};
use rumqttd::protocol::{
    self, ConnAck, ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill, Login, Packet, PingResp, Protocol,
    PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, Publish,
};
use rumqttd::{Notification, Router, RouterConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, watch};
use tokio_rustls::TlsAcceptor;

use super::Intake;
use crate::config::{MqttConfig, MqttTls};
use crate::metrics::Metrics;

/// rumqttd's in-memory log per filter (for other subscribers) is `mqtt.broker_buffer_bytes` in
/// this many segments, evicted oldest first.
const SEGMENT_COUNT: usize = 4;
/// rumqttd refuses smaller segments.
const MIN_SEGMENT_BYTES: usize = 1024;

/// Client connections at once (rumqttd's router refuses more anyway).
const MAX_CONNECTIONS: usize = 10_000;
/// A client that opened a connection must send CONNECT within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A client of `tls_listen` must finish its TLS handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection may take to say so (a TLS close_notify, a TCP FIN).
const CLOSE_TIMEOUT: Duration = Duration::from_millis(200);
/// Stop step 4: how long connections may take to end (write what they are writing, close).
const ACK_FLUSH: Duration = Duration::from_secs(1);
/// The run loop takes at most this many batches from connections at a wake-up.
const DRAIN_BATCHES: usize = 64;
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

/// A running embedded broker.
pub struct EmbeddedBroker {
    listener: TcpListener,
    /// `tls_listen`'s listener, and the handshakes it makes.
    tls_listener: Option<(TcpListener, TlsAcceptor)>,
    new_link: NewLink,
    /// The link subscribed to `#`, unread, held while the broker runs.
    catch_all: (LinkTx, LinkRx),
    max_packet: usize,
    /// Username → password; empty: every client is let in.
    users: HashMap<String, String>,
    /// What connections may hand over ahead of the agent, in rumqttd's measure (see the module doc).
    budget: u32,
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
        // rumqttd drops a client whose publish matches no subscription: with a link subscribed to
        // `#` every publish the router gets matches one (as when the agent read through it). The
        // agent never reads it; the router stops forwarding to it once its buffer is full.
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
        // Half the log, as when the agent read through it; a message larger than that goes alone.
        let budget = (config.broker_buffer_bytes / 2).clamp(MIN_SEGMENT_BYTES, u32::MAX as usize) as u32;
        Ok(EmbeddedBroker {
            listener,
            tls_listener,
            new_link,
            catch_all: (link_tx, link_rx),
            // Payloads above max_payload_bytes still reach the agent, to be counted as rejected;
            // only far larger packets make the broker drop the client.
            max_packet: config.max_payload_bytes.saturating_mul(8),
            users,
            budget,
        })
    }

    /// Reads messages until shutdown, then stops as the module doc describes.
    pub async fn run(self, mut intake: Intake, mut shutdown: watch::Receiver<bool>) -> Result<(), BrokerError> {
        let EmbeddedBroker { listener, tls_listener, new_link, catch_all, max_packet, users, budget } = self;
        let metrics = intake.metrics().clone();
        let (inbox_tx, mut inbox) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            new_link,
            inbox: inbox_tx,
            room: Arc::new(Semaphore::new(budget as usize)),
            budget,
            subscribers: AtomicUsize::new(0),
            max_packet,
            metrics,
            users,
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
        let mut ticker = intake.ticker();
        // A batch the intake had no room for all of, and how much of it was taken.
        let mut held: Option<(Handed, usize)> = None;
        let result = loop {
            if let Some((handed, from)) = &mut held {
                match take(&mut intake, handed, from) {
                    Ok(true) => held = None,
                    Ok(false) => {}
                    Err(e) => break Err(e.into()),
                }
            }
            tokio::select! {
                // What the pre-filters held long enough goes out even when no message comes.
                _ = ticker.tick() => if let Err(e) = intake.tick(&mut ticker) { break Err(e.into()) },
                // The writer has room again: hand over what piled up meanwhile.
                permit = spool.reserve(), if intake.has_pending() => match permit {
                    Ok(permit) => intake.send_with(permit),
                    Err(_) => break Err(BrokerError::Spool(crate::spool::SpoolError::Closed)),
                },
                handed = inbox.recv(), if held.is_none() && !intake.is_full() => {
                    let Some(mut handed) = handed else {
                        break Err(BrokerError::Stopped("its connections ended".into()));
                    };
                    // What else connections handed over meanwhile (a bounded number of batches,
                    // so that the other events get their turn), then into the writer's queue.
                    let (mut from, mut more) = (0, DRAIN_BATCHES);
                    let taken = loop {
                        match take(&mut intake, &mut handed, &mut from) {
                            Ok(true) => {}
                            Ok(false) => break Ok(Some((handed, from))),
                            Err(e) => break Err(e),
                        }
                        more -= 1;
                        match inbox.try_recv() {
                            Ok(next) if more > 0 => (handed, from) = (next, 0),
                            Ok(next) => break Ok(Some((next, 0))),
                            Err(_) => break Ok(None),
                        }
                    };
                    match taken.and_then(|h| intake.try_flush().map(|()| h)) {
                        Ok(h) => held = h,
                        Err(e) => break Err(e.into()),
                    }
                },
                _ = shutdown.changed() => break Ok(()),
            }
        };

        // 1. Stop accepting connections and reading sockets. 2. Close the channel.
        let _ = phase_tx.send(Phase::Stopping);
        inbox.close();
        shared.room.close();
        if result.is_ok() {
            // 3. Everything acknowledged into the spool, with what the pre-filters still hold.
            let mut next = held.take();
            loop {
                let (mut handed, mut from) = match next.take() {
                    Some(held) => held,
                    None => match inbox.recv().await {
                        Some(handed) => (handed, 0),
                        None => break,
                    },
                };
                while !take(&mut intake, &mut handed, &mut from)? {
                    intake.flush().await?;
                }
            }
            intake.finish().await?;
        }
        // 4. Connections close.
        let _ = phase_tx.send(Phase::Closing);
        let _ = tokio::time::timeout(ACK_FLUSH + Duration::from_secs(1), ended.recv()).await;
        drop(catch_all);
        result
    }
}

/// Takes `handed`'s publishes from `from` on into the intake while it has room; `true` once all
/// are taken.
fn take(intake: &mut Intake, handed: &mut Handed, from: &mut usize) -> Result<bool, crate::spool::SpoolError> {
    while let Some(publish) = handed.publishes.get(*from) {
        if intake.is_full() {
            intake.try_flush()?;
            if intake.is_full() {
                return Ok(false);
            }
        }
        *from += 1;
        intake.take(&publish.topic, &publish.payload);
    }
    Ok(true)
}

/// Where the broker is in its life; connections and the acceptor watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// No new connections, no more reading from sockets, nothing more handed over.
    Stopping,
    /// Close.
    Closing,
}

/// Publishes a connection handed over in one go, in arrival order, holding their room in the
/// budget until the agent has taken them all.
struct Handed {
    publishes: Vec<Publish>,
    _room: OwnedSemaphorePermit,
}

/// What every connection task shares.
struct Shared {
    new_link: NewLink,
    /// To the run loop; closed once the broker stops taking publishes.
    inbox: mpsc::UnboundedSender<Handed>,
    /// The budget of what may be handed over and not taken yet (see the module doc).
    room: Arc<Semaphore>,
    budget: u32,
    /// Connections whose client subscribed to something: while there are any, publishes go to the
    /// router too. A persistent session's subscriptions outlive its connection, so a client that
    /// subscribed with `clean_session = false` counts until the agent restarts.
    subscribers: AtomicUsize,
    max_packet: usize,
    metrics: Arc<Metrics>,
    /// Username → password; empty: every client is let in.
    users: HashMap<String, String>,
}

impl Shared {
    /// Whether `publish` must go to the router too: another client could want it (someone
    /// subscribes), it changes rumqttd's retained messages (a retained publish; any empty one
    /// forgets the topic's), or the router refuses it (a `$` topic no one subscribed to: rumqttd
    /// drops the client, as it did when the agent read through it).
    fn wants(&self, publish: &Publish) -> bool {
        publish.retain
            || publish.payload.is_empty()
            || publish.topic.first() == Some(&b'$')
            || self.subscribers.load(Ordering::SeqCst) > 0
    }

    /// Hands publishes to the agent, waiting while the budget is spent; `false` if the broker
    /// stopped taking publishes (then they go unacknowledged, and the client sends them again).
    async fn hand_in(&self, publishes: Vec<Publish>, phase: &watch::Receiver<Phase>) -> bool {
        if publishes.is_empty() {
            return !self.inbox.is_closed();
        }
        let bytes: usize = publishes.iter().map(|p| 4 + p.topic.len() + p.payload.len()).sum();
        let bytes = bytes.min(self.budget as usize) as u32;
        let room = match self.room.clone().try_acquire_many_owned(bytes) {
            Ok(room) => room,
            Err(TryAcquireError::Closed) => return false,
            Err(TryAcquireError::NoPermits) => {
                self.metrics.broker_backlog_waits.inc();
                let mut phase = phase.clone();
                tokio::select! {
                    room = self.room.clone().acquire_many_owned(bytes) => match room {
                        Ok(room) => room,
                        Err(_) => return false,
                    },
                    _ = phase.wait_for(|p| *p != Phase::Open) => return false,
                }
            }
        };
        self.inbox.send(Handed { publishes, _room: room }).is_ok()
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
    // The client vanished without DISCONNECT: its will is due (to the agent, and to the router
    // for other subscribers), and the router must forget it.
    if matches!(end, End::Closed(_) | End::KeepAlive | End::Protocol(_)) {
        let mut packets = Vec::new();
        if let Some(will) = will {
            let publish = Publish::new(will.topic, will.message, false);
            if shared.wants(&publish) {
                packets.push(Packet::Publish(publish.clone(), None));
            }
            let ours = if publish.topic.first() == Some(&b'$') { vec![] } else { vec![publish] };
            if !shared.hand_in(ours, &phase).await {
                packets.clear();
            }
        }
        let disconnect = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
        packets.push(Packet::Disconnect(disconnect, None));
        let _ = to_router(&mut link_tx, packets).await;
    }
    // A clean session's subscriptions end with its connection (see `Shared::subscribers`).
    if session.subscribed && connect.clean_session {
        shared.subscribers.fetch_sub(1, Ordering::SeqCst);
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

/// Hands packets to the router, in one wake-up.
async fn to_router(link_tx: &mut LinkTx, mut packets: Vec<Packet>) -> Result<(), LinkError> {
    let Some(last) = packets.pop() else { return Ok(()) };
    link_tx.buffer().extend(packets);
    // Pushes `last` and wakes the router (a blocking send: the router only ever waits on its own queue).
    link_tx.send(last).await.map(drop)
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

    /// Moves packets between the socket, the agent and the router until either side ends or the
    /// broker stops.
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
        loop {
            let reading = *phase.borrow() == Phase::Open;
            tokio::select! {
                biased;
                changed = phase.changed() => {
                    // Acks are written as soon as the agent has the publishes: none is due.
                    if changed.is_err() || *phase.borrow_and_update() == Phase::Closing {
                        return End::Stopped;
                    }
                }
                n = link_rx.next() => {
                    let first = match n {
                        Ok(first) => first,
                        Err(_) => return End::Router,
                    };
                    if let Err(end) = self.deliver(first, shared, link_rx).await {
                        return end;
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

    /// Hands the publishes read so far to the agent (and to the router if others could want
    /// them), the other packets to the router, and writes the acks and answers due.
    async fn take_input(
        &mut self,
        shared: &Shared,
        link_tx: &mut LinkTx,
        session: &mut Session,
        phase: &watch::Receiver<Phase>,
    ) -> Result<(), End> {
        let Batch { ours, router, mut replies, goodbye } = self.frame(shared, session).map_err(End::Protocol)?;
        if shared.hand_in(ours, phase).await {
            to_router(link_tx, router).await.map_err(|_| End::Router)?;
        } else {
            // The broker is stopping: these go unacknowledged, the client sends them again.
            replies.retain(|(ack, _)| !ack);
        }
        self.write_packets(replies.into_iter().map(|(_, packet)| packet).collect())
            .await
            .map_err(|e| End::Closed(Some(e)))?;
        match goodbye {
            true => Err(End::Goodbye),
            false => Ok(()),
        }
    }

    /// Frames every complete packet in the read buffer; reserves room for the rest of a partial one.
    fn frame(&mut self, shared: &Shared, session: &mut Session) -> Result<Batch, protocol::Error> {
        // Frames share their buffer's allocation until dropped, and rumqttd's log holds what goes
        // to the router until evicted, which takes minutes when traffic is light: a lone 60-byte
        // publish would pin a whole read buffer. A small read is framed from an exact-size copy;
        // busy connections frame in place.
        let (batch, wanted) = if self.read.len() < SMALL_READ {
            let mut copy = BytesMut::from(&self.read[..]);
            self.read.clear();
            let framed = frame(&mut copy, self.max_packet, shared, session)?;
            self.read.extend_from_slice(&copy);
            framed
        } else {
            frame(&mut self.read, self.max_packet, shared, session)?
        };
        if self.read.capacity() - self.read.len() < wanted.max(READ_CHUNK / 2) {
            self.read.reserve(wanted.max(READ_CHUNK));
        }
        Ok(batch)
    }

    /// Writes `first` and every other notification the router has queued for this client.
    async fn deliver(&mut self, first: Option<Notification>, shared: &Shared, link_rx: &mut LinkRx) -> Result<(), End> {
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
                Some(n) => match Option::<Packet>::from(n) {
                    // The router's acks of the publishes it was handed: the connection wrote its
                    // own when the agent took them.
                    Some(Packet::PubAck(..)) | None => {}
                    Some(packet) => packets.push(packet),
                },
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
fn frame(
    buf: &mut BytesMut,
    max_packet: usize,
    shared: &Shared,
    session: &mut Session,
) -> Result<(Batch, usize), protocol::Error> {
    let mut batch = Batch::default();
    loop {
        let header = match v4::check(buf.iter(), max_packet) {
            Ok(header) => header,
            Err(protocol::Error::InsufficientBytes(n)) => return Ok((batch, n)),
            Err(e) => return Err(e),
        };
        let is_publish = header.byte1 >> 4 == 3;
        let qos = (header.byte1 >> 1) & 0b11;
        let mut pkid = 0;
        if is_publish && qos > 0 {
            pkid = packet_id(buf, header.fixed_header_len).ok_or(protocol::Error::MalformedPacket)?;
        }
        if is_publish && qos == 2 {
            if session.qos2_received.contains(&pkid) {
                // Sent again before our PUBREC arrived: taken already.
                let _ = V4.read_mut(buf, max_packet)?;
                batch.replies.push((false, pubrec(pkid)));
                continue;
            }
            // The router (for other subscribers) takes it as QoS 1; the connection answers PUBREC.
            buf[0] = (header.byte1 & !0b0110) | 0b0010;
        }
        match V4.read_mut(buf, max_packet)? {
            Packet::PubRel(pubrel, _) => {
                session.qos2_received.remove(&pubrel.pkid);
                let pubcomp = PubComp { pkid: pubrel.pkid, reason: PubCompReason::Success };
                batch.replies.push((false, Packet::PubComp(pubcomp, None)));
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
            Packet::Publish(publish, _) => {
                match qos {
                    0 => {}
                    1 => batch.replies.push((true, puback(pkid))),
                    _ => {
                        session.qos2_received.insert(pkid);
                        batch.replies.push((true, pubrec(pkid)));
                    }
                }
                if shared.wants(&publish) {
                    batch.router.push(Packet::Publish(publish.clone(), None));
                }
                // `#` (what the agent read before) does not match topics starting with `$`.
                if publish.topic.first() != Some(&b'$') {
                    batch.ours.push(publish);
                }
            }
            Packet::PingReq(_) => batch.replies.push((false, Packet::PingResp(PingResp))),
            packet => {
                if matches!(packet, Packet::Subscribe(..)) && !session.subscribed {
                    // Before the router hears of it: publishes read once the client has its
                    // SUBACK go to the router.
                    session.subscribed = true;
                    shared.subscribers.fetch_add(1, Ordering::SeqCst);
                }
                batch.goodbye = matches!(packet, Packet::Disconnect(..));
                batch.router.push(packet);
                if batch.goodbye {
                    return Ok((batch, 0));
                }
            }
        }
    }
}

/// A connection's QoS and subscription bookkeeping.
#[derive(Default)]
struct Session {
    /// QoS-2 publishes answered with PUBREC, awaiting the client's PUBREL.
    qos2_received: HashSet<u16>,
    /// The client subscribed to something (counted in [`Shared::subscribers`]).
    subscribed: bool,
}

/// Packets read from the socket in one go.
#[derive(Default)]
struct Batch {
    /// Publishes for the agent, in arrival order.
    ours: Vec<Publish>,
    /// For the router: the other packets, and publishes other clients could want.
    router: Vec<Packet>,
    /// Answers the connection gives itself, in order; `true`: an ack, due only once the agent has
    /// the publish (PUBACK, PUBREC), else PUBCOMP, a repeated PUBREC, PINGRESP.
    replies: Vec<(bool, Packet)>,
    goodbye: bool,
}

fn puback(pkid: u16) -> Packet {
    Packet::PubAck(PubAck { pkid, reason: PubAckReason::Success }, None)
}

fn pubrec(pkid: u16) -> Packet {
    Packet::PubRec(PubRec { pkid, reason: PubRecReason::Success }, None)
}

/// The packet id of a complete QoS-1/2 PUBLISH frame: after the fixed header and the topic.
fn packet_id(frame: &[u8], fixed_header_len: usize) -> Option<u16> {
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

fn router_config(segment_bytes: usize) -> RouterConfig {
    RouterConfig {
        max_connections: MAX_CONNECTIONS + 1,
        max_outgoing_packet_count: 200,
        max_segment_size: segment_bytes,
        max_segment_count: SEGMENT_COUNT,
        ..RouterConfig::default()
    }
}
