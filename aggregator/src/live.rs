//! `GET /api/v1/stream`: what each commit of the processor changed, as Server-Sent Events.
//!
//! The processor publishes one event per kind and commit (`reading`, `window`, `alert`, `agent`)
//! into a ring bounded in bytes, shared by every client. Each event has an id; a client that
//! reconnects with `Last-Event-ID` gets the events after it while the ring still holds them, and
//! a `reset` event (reload what you show) when it does not. A slow client falls behind in the
//! ring, never holds memory of its own beyond one event, and gets `reset` when it is lapped.
//!
//! Recording costs the fold a push per reading, so it runs only while someone listens, or
//! listened in the last [`LINGER`] (a client reconnecting must find what it missed).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::Write as _;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::IntoResponse;
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::watch;

use crate::api::{ApiError, AppState};
use crate::config::parse_glob;

/// Bytes of event data the ring keeps for reconnecting and slow clients.
pub const RING_BYTES: usize = 16 << 20;
/// Readings one `reading` event carries at most; a commit of more (a catch-up after downtime)
/// says how many it left out. Its windows are still sent.
pub const MAX_EVENT_READINGS: usize = 20_000;
/// Most clients at once by default (`[http] max_stream_clients`); one more gets 503 (each holds
/// a connection and a task).
pub const DEFAULT_MAX_CLIENTS: usize = 1_000;
/// How long recording goes on after the last client left.
pub const LINGER: Duration = Duration::from_secs(60);
/// A comment line goes out after this long without an event, so proxies keep the connection.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The kinds of events, as the SSE `event:` field names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Reading,
    Window,
    Alert,
    Agent,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Reading, Kind::Window, Kind::Alert, Kind::Agent];

    fn name(self) -> &'static str {
        match self {
            Kind::Reading => "reading",
            Kind::Window => "window",
            Kind::Alert => "alert",
            Kind::Agent => "agent",
        }
    }
}

/// One event: items, each a JSON value about one sensor (agents: about no sensor).
pub struct Event {
    pub id: u64,
    pub kind: Kind,
    /// The distinct sensors of the items (what a client's glob is matched against).
    sensors: Vec<String>,
    /// (index into `sensors`, or `usize::MAX` for none; the item as JSON).
    items: Vec<(usize, String)>,
    omitted: u64,
    /// The whole SSE frame for a client without a filter, built once and shared by all of them:
    /// each such client writes the same bytes, without a copy of its own.
    all: OnceLock<Bytes>,
}

impl Event {
    fn bytes(&self) -> usize {
        self.items.iter().map(|(_, j)| j.len() + 8).sum::<usize>()
            + self.sensors.iter().map(|s| s.len() + 24).sum::<usize>()
    }

    /// The SSE frame for a client with `keep` (which of `sensors` it follows), or without a
    /// filter; `None` when nothing in the event is for it.
    fn frame(&self, keep: Option<&[bool]>) -> Option<Bytes> {
        let Some(keep) = keep else {
            return Some(
                self.all.get_or_init(|| self.frame_of(&mut self.items.iter().map(|(_, j)| j.as_str()))).clone(),
            );
        };
        let mut matching = self.items.iter().filter(|(s, _)| keep.get(*s).copied().unwrap_or(true)).peekable();
        matching.peek()?;
        Some(self.frame_of(&mut matching.map(|(_, j)| j.as_str())))
    }

    /// `id: …`, `event: …` and the items as one JSON list (`{"readings": […], "omitted": n}` for
    /// readings) on a `data:` line. The items are JSON, which has no raw line break.
    fn frame_of(&self, items: &mut dyn Iterator<Item = &str>) -> Bytes {
        let mut out = Vec::with_capacity(64 + self.items.iter().map(|(_, j)| j.len() + 1).sum::<usize>());
        let _ = write!(out, "id: {}\nevent: {}\ndata: ", self.id, self.kind.name());
        if self.kind == Kind::Reading {
            out.extend_from_slice(b"{\"readings\":");
        }
        out.push(b'[');
        for (i, item) in items.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(item.as_bytes());
        }
        out.push(b']');
        if self.kind == Kind::Reading {
            let _ = write!(out, ",\"omitted\":{}}}", self.omitted);
        }
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
}

/// What one commit publishes, built by the processor.
#[derive(Default)]
pub struct Batch {
    pub sensors: Vec<String>,
    pub readings: Vec<(usize, String)>,
    pub omitted: u64,
    pub windows: Vec<(usize, String)>,
    pub alerts: Vec<(usize, String)>,
    pub agents: Vec<String>,
}

struct Ring {
    events: VecDeque<Arc<Event>>,
    bytes: usize,
    next_id: u64,
}

/// The shared ring and its subscribers; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    ring: Arc<Mutex<Ring>>,
    latest: watch::Sender<u64>,
    clients: Arc<AtomicUsize>,
    max_clients: usize,
    /// When the last client left (Unix ms); 0 if never.
    left_at: Arc<AtomicI64>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new(DEFAULT_MAX_CLIENTS)
    }
}

impl Hub {
    pub fn new(max_clients: usize) -> Hub {
        // Ids start from the clock, so a client's id from before a restart is older than the
        // ring and gets `reset` rather than events that are not the ones after it.
        let first = (crate::unix_ms().max(0) as u64) * 1_000;
        Hub {
            ring: Arc::new(Mutex::new(Ring { events: VecDeque::new(), bytes: 0, next_id: first })),
            latest: watch::channel(first.saturating_sub(1)).0,
            clients: Arc::new(AtomicUsize::new(0)),
            max_clients,
            left_at: Arc::new(AtomicI64::new(0)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the processor should record what it folds.
    pub fn wanted(&self) -> bool {
        self.clients.load(Ordering::Relaxed) > 0
            || crate::unix_ms().saturating_sub(self.left_at.load(Ordering::Relaxed)) < LINGER.as_millis() as i64
    }

    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    pub fn publish(&self, batch: Batch) {
        let Batch { sensors, readings, omitted, windows, alerts, agents } = batch;
        let mut ring = self.lock();
        let parts = [
            (Kind::Reading, readings, omitted),
            (Kind::Window, windows, 0),
            (Kind::Alert, alerts, 0),
            (Kind::Agent, agents.into_iter().map(|a| (usize::MAX, a)).collect(), 0),
        ];
        for (kind, items, omitted) in parts {
            if items.is_empty() && omitted == 0 {
                continue;
            }
            let event =
                Event { id: ring.next_id, kind, sensors: sensors.clone(), items, omitted, all: OnceLock::new() };
            ring.next_id += 1;
            ring.bytes += event.bytes();
            ring.events.push_back(Arc::new(event));
        }
        while ring.bytes > RING_BYTES && ring.events.len() > 1 {
            if let Some(old) = ring.events.pop_front() {
                ring.bytes -= old.bytes();
            }
        }
        let last = ring.next_id - 1;
        drop(ring);
        self.latest.send_replace(last);
    }

    /// Events with id >= `from`, or `Err(())` when some of them have left the ring.
    fn since(&self, from: u64) -> Result<Vec<Arc<Event>>, ()> {
        let ring = self.lock();
        match ring.events.front() {
            Some(first) if from < first.id => Err(()),
            None if from < ring.next_id => Err(()),
            _ if from > ring.next_id => Err(()),
            _ => {
                let skip = ring.events.partition_point(|e| e.id < from);
                Ok(ring.events.iter().skip(skip).cloned().collect())
            }
        }
    }
}

/// Counts a client for as long as its stream lives.
struct ClientGuard(Hub);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.left_at.store(crate::unix_ms(), Ordering::Relaxed);
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    sensor: Option<String>,
    types: Option<String>,
}

struct Client {
    hub: Hub,
    latest: watch::Receiver<u64>,
    next: u64,
    glob: Option<globset::GlobMatcher>,
    kinds: Vec<Kind>,
    queue: VecDeque<Bytes>,
    _guard: ClientGuard,
}

impl Client {
    async fn next_event(&mut self) -> Option<Bytes> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some(event);
            }
            if *self.latest.borrow_and_update() < self.next && self.latest.changed().await.is_err() {
                return None;
            }
            match self.hub.since(self.next) {
                Ok(events) => {
                    for event in events {
                        self.next = event.id + 1;
                        if !self.kinds.contains(&event.kind) {
                            continue;
                        }
                        let keep =
                            self.glob.as_ref().map(|g| event.sensors.iter().map(|s| g.is_match(s)).collect::<Vec<_>>());
                        // An agent event is about no sensor: every client gets it.
                        let frame = match (&keep, event.kind) {
                            (Some(_), Kind::Agent) | (None, _) => event.frame(None),
                            (Some(keep), _) => event.frame(Some(keep)),
                        };
                        self.queue.extend(frame);
                    }
                }
                Err(()) => {
                    let latest = *self.latest.borrow();
                    self.next = latest + 1;
                    let frame = format!("id: {latest}\nevent: reset\ndata: {{\"next\":{}}}\n\n", self.next);
                    self.queue.push_back(Bytes::from(frame));
                }
            }
        }
    }
}

/// `GET /api/v1/stream?sensor=<glob>&types=reading,window,alert,agent`
pub async fn stream(
    State(app): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let glob = match q.sensor.as_deref().filter(|s| !s.is_empty()) {
        Some(pattern) => Some(parse_glob(pattern).map_err(ApiError::BadRequest)?),
        None => None,
    };
    let kinds = match q.types.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        None => Kind::ALL.to_vec(),
        Some(text) => text
            .split(',')
            .map(|name| {
                Kind::ALL.into_iter().find(|k| k.name() == name.trim()).ok_or_else(|| {
                    ApiError::BadRequest(format!("types: {name:?} is not one of reading, window, alert, agent"))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let hub = app.live.clone();
    let latest = hub.latest.subscribe();
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty());
    let next = match resume {
        None => *latest.borrow() + 1,
        Some(text) => match text.parse::<u64>() {
            Ok(id) => id.saturating_add(1),
            // Not one of ours: the client cannot know what it missed.
            Err(_) => 0,
        },
    };
    if hub.clients.fetch_add(1, Ordering::Relaxed) >= hub.max_clients {
        hub.clients.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::Unavailable(format!(
            "{} clients are following the stream already (the limit, [http] max_stream_clients); try again later",
            hub.max_clients
        )));
    }
    let client =
        Client { hub: hub.clone(), latest, next, glob, kinds, queue: VecDeque::new(), _guard: ClientGuard(hub) };
    let frames = frames(client, KEEP_ALIVE);
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    Ok((headers, Body::from_stream(frames)).into_response())
}

/// The client's frames as the response body, with a comment line after `keep_alive` without one.
/// They are written as they are (not through axum's `Sse`, which copies each event's data into a
/// buffer of its own per client): a hundred clients without a filter write the same shared bytes.
/// `next_event` can be dropped at its await (it keeps its place in `next`), so a keep-alive may go
/// out in between.
fn frames(client: Client, keep_alive: Duration) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    futures_util::stream::unfold(client, move |mut client| async move {
        let frame = match tokio::time::timeout(keep_alive, client.next_event()).await {
            Ok(frame) => frame?,
            Err(_) => Bytes::from_static(b":\n\n"),
        };
        Some((Ok(frame), client))
    })
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    fn client(hub: &Hub, glob: Option<&str>) -> Client {
        hub.clients.fetch_add(1, Ordering::Relaxed);
        let latest = hub.latest.subscribe();
        let next = *latest.borrow() + 1;
        Client {
            hub: hub.clone(),
            latest,
            next,
            glob: glob.map(|g| parse_glob(g).unwrap()),
            kinds: Kind::ALL.to_vec(),
            queue: VecDeque::new(),
            _guard: ClientGuard(hub.clone()),
        }
    }

    /// The next frame (time is paused: a minute passes at once when nothing else can happen).
    async fn next(stream: &mut (impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Unpin)) -> String {
        let frame =
            tokio::time::timeout(Duration::from_secs(60), stream.next()).await.expect("a frame within a minute");
        match frame {
            Some(Ok(bytes)) => String::from_utf8(bytes.to_vec()).unwrap(),
            None => "(end)".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_clients_get_keep_alives_and_each_the_events_of_its_sensors() {
        let hub = Hub::default();
        let mut all = Box::pin(frames(client(&hub, None), KEEP_ALIVE));
        let mut other = Box::pin(frames(client(&hub, Some("b/*")), KEEP_ALIVE));
        // Nothing published: a comment after the keep-alive interval, for proxies.
        assert_eq!(next(&mut all).await, ":\n\n");

        let batch = || Batch {
            sensors: vec!["a/x".into()],
            readings: vec![(0, r#"["a/x",1000,2.5]"#.into()), (0, r#"["a/x",2000,3.5]"#.into())],
            ..Batch::default()
        };
        hub.publish(batch());
        let frame = next(&mut all).await;
        let id = frame.strip_prefix("id: ").and_then(|rest| rest.split('\n').next()).unwrap();
        assert!(id.parse::<u64>().is_ok(), "{frame:?}");
        assert!(
            frame.ends_with(
                "\nevent: reading\ndata: {\"readings\":[[\"a/x\",1000,2.5],[\"a/x\",2000,3.5]],\"omitted\":0}\n\n"
            ),
            "{frame:?}"
        );
        // A client following other sensors gets none of it, only the keep-alive.
        assert_eq!(next(&mut other).await, ":\n\n");

        // A client whose glob matches every item gets the bytes an unfiltered client gets.
        let mut again = Box::pin(frames(client(&hub, Some("a/*")), KEEP_ALIVE));
        hub.publish(batch());
        let (one, two) = (next(&mut all).await, next(&mut again).await);
        assert_eq!(one, two);
        assert_ne!(one, frame, "a new event has a new id");
        assert_eq!(hub.clients(), 3);
        drop((all, other, again));
        assert_eq!(hub.clients(), 0);
    }
}
