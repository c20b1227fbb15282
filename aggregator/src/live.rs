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
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use serde::Deserialize;
use tokio::sync::watch;

use crate::api::{ApiError, AppState};
use crate::config::parse_glob;

/// Bytes of event data the ring keeps for reconnecting and slow clients.
pub const RING_BYTES: usize = 16 << 20;
/// Readings one `reading` event carries at most; a commit of more (a catch-up after downtime)
/// says how many it left out. Its windows are still sent.
pub const MAX_EVENT_READINGS: usize = 20_000;
/// Most clients at once; one more gets 503 (each holds a connection and a task).
pub const MAX_CLIENTS: usize = 1_000;
/// How long recording goes on after the last client left.
pub const LINGER: Duration = Duration::from_secs(60);

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
    /// The data for a client without a filter, built once for all of them.
    all: OnceLock<String>,
}

impl Event {
    fn bytes(&self) -> usize {
        self.items.iter().map(|(_, j)| j.len() + 8).sum::<usize>()
            + self.sensors.iter().map(|s| s.len() + 24).sum::<usize>()
    }

    fn data(&self, keep: Option<&[bool]>) -> Option<String> {
        let join = |items: &mut dyn Iterator<Item = &str>| {
            let mut out = String::from("[");
            for (i, item) in items.enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(item);
            }
            out.push(']');
            out
        };
        let list = match keep {
            None => self.all.get_or_init(|| join(&mut self.items.iter().map(|(_, j)| j.as_str()))).clone(),
            Some(keep) => {
                let mut matching =
                    self.items.iter().filter(|(s, _)| keep.get(*s).copied().unwrap_or(true)).map(|(_, j)| j.as_str());
                let list = join(&mut matching);
                if list == "[]" {
                    return None;
                }
                list
            }
        };
        Some(match self.kind {
            Kind::Reading => format!("{{\"readings\":{list},\"omitted\":{}}}", self.omitted),
            _ => list,
        })
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
    /// When the last client left (Unix ms); 0 if never.
    left_at: Arc<AtomicI64>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

impl Hub {
    pub fn new() -> Hub {
        // Ids start from the clock, so a client's id from before a restart is older than the
        // ring and gets `reset` rather than events that are not the ones after it.
        let first = (crate::unix_ms().max(0) as u64) * 1_000;
        Hub {
            ring: Arc::new(Mutex::new(Ring { events: VecDeque::new(), bytes: 0, next_id: first })),
            latest: watch::channel(first.saturating_sub(1)).0,
            clients: Arc::new(AtomicUsize::new(0)),
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
    queue: VecDeque<SseEvent>,
    _guard: ClientGuard,
}

impl Client {
    async fn next_event(&mut self) -> Option<SseEvent> {
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
                        let data = match (&keep, event.kind) {
                            (Some(_), Kind::Agent) | (None, _) => event.data(None),
                            (Some(keep), _) => event.data(Some(keep)),
                        };
                        if let Some(data) = data {
                            self.queue.push_back(
                                SseEvent::default().id(event.id.to_string()).event(event.kind.name()).data(data),
                            );
                        }
                    }
                }
                Err(()) => {
                    let latest = *self.latest.borrow();
                    self.next = latest + 1;
                    let data = format!("{{\"next\":{}}}", self.next);
                    self.queue.push_back(SseEvent::default().id(latest.to_string()).event("reset").data(data));
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
    if hub.clients.fetch_add(1, Ordering::Relaxed) >= MAX_CLIENTS {
        hub.clients.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::Unavailable(format!(
            "{MAX_CLIENTS} clients are following the stream already (the limit); try again later"
        )));
    }
    let client =
        Client { hub: hub.clone(), latest, next, glob, kinds, queue: VecDeque::new(), _guard: ClientGuard(hub) };
    let events = futures_util::stream::unfold(client, |mut client| async move {
        client.next_event().await.map(|event| (Ok::<_, Infallible>(event), client))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}
