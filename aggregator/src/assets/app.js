// Tributary's dashboard: views over the JSON API, kept current by the Server-Sent Events of
// /api/v1/stream (no polling). Routes live in the URL hash, so back/forward and links work:
//   #/fleet   #/sensors?prefix=room1/   #/sensor/<id>?range=1h&overlay=<id>,<id>&at=<ms>   #/alerts
// Sensor ids come from outside: they only ever reach the page as text (textContent), never as HTML.
// Sized for fleets of 10,000 sensors and more: lists come a page at a time, each view's stream
// carries only what it shows, and live events change rows in place, drawn once per animation frame.
"use strict";

const $ = (id) => document.getElementById(id);
const RANGES = [["15m", 15 * 60e3], ["1h", 3600e3], ["6h", 6 * 3600e3], ["24h", 86400e3], ["7d", 7 * 86400e3], ["30d", 30 * 86400e3]];
const OFFLINE_MS = 60e3;  // an agent silent this long is offline
const PAGE = 100;         // sensors per page
const REFETCH_MS = 5e3;   // at most one chart reload per this, when live windows do not fit its step

// One format for every value and every time on the page.
function fmtValue(v) {
  if (v == null || Number.isNaN(v)) return "—";
  const a = Math.abs(v);
  return a !== 0 && (a >= 1e7 || a < 1e-3) ? v.toExponential(3) : v.toFixed(2);
}
function fmtTime(ms) {
  return ms == null ? "—" : new Date(ms).toISOString().slice(0, 19).replace("T", " ") + " UTC";
}
function fmtAgo(ms) {
  if (ms == null) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 120) return `${s} s ago`;
  if (s < 7200) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// Sets a property (textContent, className, title) only when it changes: an equal value would
// still cost the browser style and layout work, on every live event.
function set(node, prop, value) {
  if (node[prop] !== value) node[prop] = value;
}

// `fn` at most once per animation frame, however often it is asked for: a burst of live events
// is drawn once. Nothing is drawn while the tab is hidden; the next frame draws the latest state.
function perFrame(fn) {
  let pending = false;
  return () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; fn(); });
  };
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path) {
  let response;
  try {
    response = await fetch(path, { headers: { Accept: "application/json" } });
  } catch (e) {
    throw new ApiError(0, "cannot reach the aggregator");
  }
  if (response.status === 401) {
    location.href = "/";  // the read token's form
    throw new ApiError(401, "the read token is needed");
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, (body && body.detail) || response.statusText);
  return { body, link: response.headers.get("Link") };
}

function showError(error) {
  const box = $("error");
  box.hidden = !error;
  box.textContent = error ? error.message : "";
}

const sensorHref = (id, params) => "#/sensor/" + encodeURIComponent(id) + (params ? "?" + new URLSearchParams(params) : "");
// A literal sensor id as a glob (ids may hold glob characters).
const globOf = (id) => id.replace(/[*?[\]{}\\]/g, (c) => `[${c}]`);

// ---- Routing ----
function route() {
  const hash = location.hash;
  if (hash.startsWith("#sensor=")) {  // the old page's links
    location.replace(sensorHref(decodeURIComponent(hash.slice(8))));
    return null;
  }
  const [path, query] = hash.replace(/^#\/?/, "").split("?");
  const params = new URLSearchParams(query || "");
  if (path.startsWith("sensor/")) return { view: "sensor", id: decodeURIComponent(path.slice(7)), params };
  if (["sensors", "alerts", "fleet"].includes(path)) return { view: path, params };
  return { view: "fleet", params };
}

let current = null;  // what the shown view needs to update itself from events
function render() {
  const r = route();
  if (!r) return;
  showError(null);
  for (const name of ["fleet", "sensors", "sensor", "alerts"]) $("view-" + name).hidden = name !== r.view;
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.view === r.view || (r.view === "sensor" && a.dataset.view === "sensors"));
  }
  const views = { fleet: Fleet, sensors: Sensors, sensor: SensorChart, alerts: Alerts };
  if (current && current.close) current.close();
  current = views[r.view](r);
  stream.follow(current.subscription);
  current.load().catch(showError);
}

// ---- Live events ----
const stream = {
  source: null,
  url: null,
  // `url` null: no stream (a view that knows what to follow only once it has loaded).
  follow(url) {
    if (url === this.url) return;
    if (this.source) this.source.close();
    this.source = null;
    this.url = url;
    const conn = $("conn");
    if (!url) { conn.textContent = "connecting…"; conn.className = "conn"; return; }
    const source = new EventSource(url);
    this.source = source;
    source.onopen = () => { conn.textContent = "live"; conn.className = "conn live"; };
    source.onerror = () => { conn.textContent = "reconnecting…"; conn.className = "conn down"; };
    for (const kind of ["reading", "window", "alert", "agent"]) {
      source.addEventListener(kind, (e) => current && current.on && current.on(kind, JSON.parse(e.data)));
    }
    // Events were lost beyond the server's buffer: reload what is shown, then follow again.
    source.addEventListener("reset", () => current && current.load().catch(showError));
  },
};

// ---- Fleet ----
function Fleet() {
  const agents = new Map();   // id -> {readings, last_seen, rate, sample: [t, readings]}
  const rows = new Map();     // id -> its row's cells, made once and updated in place
  const changed = new Set();  // ids whose row the next frame redraws
  let closed = false;
  // The rows, in id order; made again only when the set of agents changes.
  let shown = null;  // the ids the rows are of
  const layout = () => {
    const ids = [...agents.keys()].sort();
    if (closed || ids.join("\n") === shown) return;
    shown = ids.join("\n");
    rows.clear();
    $("agents").replaceChildren(...(ids.length ? ids.map((id) => {
      const cells = { badge: el("span", {}), readings: el("td", { class: "num" }), backlog: el("td", { class: "num" }),
        rate: el("td", { class: "num wide" }), seen: el("td", {}) };
      rows.set(id, cells);
      return el("tr", {}, el("td", {}, id), el("td", {}, cells.badge), cells.readings, cells.backlog, cells.rate, cells.seen);
    }) : [el("tr", {}, el("td", { class: "empty", colSpan: 6 }, "no agents configured"))]));
  };
  const draw = () => {
    if (closed) return;
    for (const id of changed) {
      const a = agents.get(id), row = rows.get(id);
      if (!a || !row) continue;
      const heard = Math.max(a.last_seen || 0, a.last_contact || 0);
      // The server says whether an agent is catching up (its spool's backlog); silence is local.
      const state = !heard ? "never" : Date.now() - heard > OFFLINE_MS ? "offline" : a.state === "catching_up" ? "catching_up" : "online";
      set(row.badge, "className", "badge " + state);
      set(row.badge, "textContent", { never: "never seen", catching_up: "catching up" }[state] || state);
      set(row.readings, "textContent", a.readings.toLocaleString("en"));
      set(row.backlog, "textContent", a.backlog_readings == null ? "—" : a.backlog_readings.toLocaleString("en"));
      set(row.backlog, "title", a.backlog_bytes == null ? "" : `${a.backlog_bytes.toLocaleString("en")} bytes`);
      set(row.rate, "textContent", a.rate == null ? "—" : a.rate.toFixed(1));
      set(row.seen, "textContent", fmtAgo(a.last_seen));
      set(row.seen, "title", fmtTime(a.last_seen));
    }
    changed.clear();
  };
  const drawSoon = perFrame(draw);
  const drawAll = () => { for (const id of agents.keys()) changed.add(id); drawSoon(); };
  // State and backlog come with the agent list, not with the live events: refreshed with the pipeline.
  const refresh = async () => {
    const { body } = await api("/api/v1/agents").catch(() => ({ body: [] }));
    for (const a of body) {
      const known = agents.get(a.id);
      if (known) agents.set(a.id, { ...known, state: a.state, last_contact: a.last_contact, backlog_readings: a.backlog_readings, backlog_bytes: a.backlog_bytes });
    }
    drawAll();
  };
  const pipeline = async () => {
    const text = await fetch("/metrics").then((r) => r.text()).catch(() => "");
    const value = (name) => Number((text.match(new RegExp("^" + name + " (\\S+)", "m")) || [])[1]);
    const end = value("tributary_log_end_offset"), done = value("tributary_processor_offset");
    if (Number.isFinite(end) && Number.isFinite(done)) {
      const pct = end > 0 ? (100 * done) / end : 100;
      $("pipeline").textContent = `processed ${done.toLocaleString("en")} of ${end.toLocaleString("en")} readings in the log (${pct.toFixed(1)} %)`;
      $("pipeline-bar").style.width = pct.toFixed(1) + "%";
    }
    // Versions: which one serves, and a replay of a new one while it runs.
    const versions = await api("/api/v1/pipeline").then((r) => r.body).catch(() => null);
    if (!versions) return;
    const replay = versions.versions.find((v) => v.state === "replaying");
    $("versions").textContent = `version ${versions.serving} serves` + (replay
      ? `; version ${replay.version} is replaying the log: ${(replay.offset || 0).toLocaleString("en")} of ${replay.head.toLocaleString("en")}` +
        (replay.rate ? ` at ${Math.round(replay.rate).toLocaleString("en")} readings/s` : "") +
        (replay.eta_s != null ? `, about ${Math.ceil(replay.eta_s)} s to go` : "")
      : "");
    $("replay").hidden = !replay;
    if (replay) $("replay-bar").style.width = (replay.head > 0 ? (100 * (replay.offset || 0)) / replay.head : 100).toFixed(1) + "%";
  };
  let lastPipeline = 0;
  const tick = setInterval(drawAll, 1000);  // relative times only; no request
  return {
    subscription: "/api/v1/stream?types=agent",
    async load() {
      const { body } = await api("/api/v1/agents");
      agents.clear();
      for (const a of body) agents.set(a.id, { ...a, rate: null, sample: [Date.now(), a.readings] });
      layout();
      for (const id of agents.keys()) changed.add(id);
      draw();
      await pipeline();
    },
    on(kind, data) {
      if (kind !== "agent") return;
      const now = Date.now();
      for (const a of data) {
        const known = agents.get(a.id) || { id: a.id, sample: [now, a.readings], rate: null };
        const [t0, r0] = known.sample;
        if (now - t0 >= 5000) {
          known.rate = ((a.readings - r0) * 1000) / (now - t0);
          known.sample = [now, a.readings];
        }
        if (!agents.has(a.id)) { agents.set(a.id, known); layout(); }
        agents.set(a.id, { ...known, readings: a.readings, last_seen: a.last_seen });
        changed.add(a.id);
      }
      drawSoon();
      if (now - lastPipeline > 2000) { lastPipeline = now; pipeline(); refresh(); }
    },
    close() { closed = true; clearInterval(tick); },
  };
}

// ---- Sensors ----
function Sensors(r) {
  const prefix = r.params.get("prefix") || "";
  const rows = new Map();     // id -> {value, fresh, badge: its cells; sensor: what they show}
  const changed = new Set();  // ids whose row the next frame redraws
  let pages = [`/api/v1/sensors?limit=${PAGE}&prefix=${encodeURIComponent(prefix)}`];  // visited pages
  let next = null, closed = false;
  const input = $("prefix");
  if (document.activeElement !== input) input.value = prefix;
  const onePage = () => pages.length === 1 && !next;
  const draw = (list) => {
    rows.clear();
    changed.clear();
    const trs = list.map((s) => {
      const value = el("td", { class: "num" }, fmtValue(s.last_value));
      const fresh = el("td", { title: fmtTime(s.last_seen) }, fmtAgo(s.last_seen));
      const badge = el("span", { class: "badge " + s.status }, s.status);
      const tr = el("tr", { class: "link" }, el("td", {}, el("a", { href: sensorHref(s.id) }, s.id)), value, fresh, el("td", {}, badge));
      tr.addEventListener("click", (e) => { if (e.target.tagName !== "A") location.hash = sensorHref(s.id); });
      rows.set(s.id, { value, fresh, badge, sensor: s });
      return tr;
    });
    $("sensors").replaceChildren(...(trs.length ? trs : [el("tr", {}, el("td", { class: "empty", colSpan: 4 }, prefix ? `no sensor id starts with “${prefix}”` : "no sensors yet"))]));
  };
  const paint = perFrame(() => {
    if (closed) return;
    for (const id of changed) {
      const row = rows.get(id);
      if (!row) continue;
      set(row.value, "textContent", fmtValue(row.sensor.last_value));
      set(row.fresh, "textContent", fmtAgo(row.sensor.last_seen));
      set(row.fresh, "title", fmtTime(row.sensor.last_seen));
      set(row.badge, "className", "badge " + row.sensor.status);
      set(row.badge, "textContent", row.sensor.status);
    }
    changed.clear();
  });
  // What the stream carries is what the page shows, not the whole fleet: a list that fits one page
  // follows every sensor its prefix matches (a new one then appears), a page of a longer list
  // only its own rows (a new sensor shows when the page is loaded again).
  const subscription = (list) => {
    const base = "/api/v1/stream?types=window";
    if (onePage()) return base + (prefix ? "&sensor=" + encodeURIComponent(globOf(prefix) + "**") : "");
    if (!list.length) return null;
    return base + "&sensor=" + encodeURIComponent("{" + list.map((s) => globOf(s.id).replace(/,/g, "[,]")).join(",") + "}");
  };
  let reload = null, lastShow = 0;
  const reloadSoon = () => {
    if (reload) return;
    reload = setTimeout(() => { reload = null; show().catch(showError); }, Math.max(0, REFETCH_MS - (Date.now() - lastShow)));
  };
  const show = async () => {
    lastShow = Date.now();
    const { body, link } = await api(pages[pages.length - 1]);
    if (closed) return;
    next = link ? (link.match(/<([^>]+)>/) || [])[1] : null;
    $("prev").disabled = pages.length < 2;
    $("next").disabled = !next;
    draw(body);
    stream.follow(subscription(body));
  };
  const onInput = () => {
    clearTimeout(onInput.timer);
    onInput.timer = setTimeout(() => { location.hash = "#/sensors" + (input.value ? "?prefix=" + encodeURIComponent(input.value) : ""); }, 250);
  };
  const onPrev = () => { if (pages.length > 1) { pages.pop(); show().catch(showError); } };
  const onNext = () => { if (next) { pages.push(next); show().catch(showError); } };
  input.addEventListener("input", onInput);
  $("prev").addEventListener("click", onPrev);
  $("next").addEventListener("click", onNext);
  const tick = setInterval(() => {
    for (const id of rows.keys()) changed.add(id);
    paint();
  }, 1000);
  return {
    subscription: null,  // known once the page's rows are: show() follows them
    load: show,
    on(kind, data) {
      if (kind !== "window") return;
      for (const w of data) {
        const row = rows.get(w.sensor);
        if (!row) {
          // Only a one-page list hears of sensors it does not show: new ones, to be listed.
          if (onePage()) reloadSoon();
          continue;
        }
        const s = row.sensor;
        if (s.last_ts == null || w.last.ts >= s.last_ts) {
          s.last_ts = w.last.ts;
          s.last_value = w.last.value;
        }
        s.last_seen = Date.now();
        s.status = "online";
        changed.add(w.sensor);
      }
      paint();
    },
    close() {
      closed = true;
      clearInterval(tick);
      clearTimeout(reload);
      input.removeEventListener("input", onInput);
      $("prev").removeEventListener("click", onPrev);
      $("next").removeEventListener("click", onNext);
    },
  };
}

// ---- One sensor's chart ----
const COLORS = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed"];

function SensorChart(r) {
  const id = r.id;
  const rangeName = RANGES.some(([n]) => n === r.params.get("range")) ? r.params.get("range") : "1h";
  const span = RANGES.find(([n]) => n === rangeName)[1];
  const at = Number(r.params.get("at")) || null;  // an alert's time: centre the range on it
  const overlays = (r.params.get("overlay") || "").split(",").filter(Boolean);
  let plot = null, data = null, step = null, alerts = [], refetch = null, lastLoad = 0, closed = false;
  const redraw = perFrame(() => { if (!closed) plot.setData(data); });
  const link = (changes) => {
    const p = { range: rangeName, overlay: overlays.join(","), ...changes };
    for (const k of Object.keys(p)) if (!p[k]) delete p[k];
    return sensorHref(id, p);
  };
  $("sensor-title").textContent = id;
  $("ranges").replaceChildren(...RANGES.map(([name]) => el("a", { href: link({ range: name, at: "" }) },
    el("button", { class: name === rangeName && !at ? "on" : "" }, name))));
  $("overlays").replaceChildren(...overlays.map((o, i) => {
    const chip = el("span", { class: "chip", title: "remove", style: `border-color:${COLORS[(i + 1) % COLORS.length]}` }, o + " ×");
    chip.addEventListener("click", () => { location.hash = link({ overlay: overlays.filter((x) => x !== o).join(",") }); });
    return chip;
  }));
  const addOverlay = () => {
    const other = $("overlay").value.trim();
    if (other && other !== id && !overlays.includes(other)) location.hash = link({ overlay: [...overlays, other].join(",") });
  };
  $("overlay-add").addEventListener("click", addOverlay);

  const range = () => {
    const to = at ? at + span / 2 : Date.now();
    return [to - span, to];
  };

  async function load() {
    lastLoad = Date.now();
    const [from, to] = range();
    const points = Math.max(50, Math.min(2000, Math.floor(($("chart").clientWidth || 800) / 2)));
    let meta;
    try {
      meta = (await api("/api/v1/sensors/" + encodeURIComponent(id))).body;
    } catch (e) {
      if (e.status === 404) e.message = `no sensor “${id}” (yet): nothing from it has been processed`;
      throw e;
    }
    $("sensor-meta").textContent = `last ${fmtValue(meta.last_value)} at ${fmtTime(meta.last_ts)} · ${meta.status} · ${meta.count.toLocaleString("en")} readings`;
    const main = (await api(`/api/v1/sensors/${encodeURIComponent(id)}/series?from=${Math.floor(from)}&to=${Math.ceil(to)}&max_points=${points}&agg=mean,min,max,count`)).body;
    step = main.step;
    const stepParam = step === "day" ? "day" : `${step / 1000}s`;
    const others = await Promise.all(overlays.map((o) =>
      api(`/api/v1/sensors/${encodeURIComponent(o)}/series?from=${main.from}&to=${main.to}&step=${stepParam}&agg=mean`)
        .then((r) => r.body.mean).catch(() => main.time.map(() => null))));
    const anomalies = await api(`/api/v1/anomalies?sensor=${encodeURIComponent(id)}&from=${main.from}&to=${main.to}&limit=1000`)
      .then((r) => r.body).catch(() => []);
    alerts = await api("/api/v1/alerts?limit=1000").then((r) => r.body.filter((a) => a.sensor === id && a.kind === "reading")).catch(() => []);
    // Anomalies as points on the grid: the bucket each falls in.
    const marks = main.time.map(() => null);
    for (const a of anomalies) {
      const i = bucketOf(main.time, a.ts);
      if (i >= 0) marks[i] = a.value;
    }
    data = [main.time.map((t) => t / 1000), main.min, main.max, main.mean, marks, ...others];
    draw();
    const empty = main.count.every((c) => c === 0);
    $("chart-note").textContent = `${main.time.length} points of ${step === "day" ? "1 day" : fmtStep(step)} · band: min–max, line: mean` +
      (empty ? " · no readings in this range" : "") + (anomalies.length ? ` · ${anomalies.length} anomalies` : "") +
      (alerts.length ? " · alert periods shaded" : "");
  }

  function draw() {
    const width = $("chart").clientWidth || 800;
    const opts = {
      width, height: Math.max(220, Math.min(420, Math.round(width * 0.45))),
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
      scales: { x: { time: true } },
      series: [
        { label: "time (UTC)" },
        { label: "min", stroke: "rgba(37,99,235,.35)", width: 1, value: (u, v) => fmtValue(v) },
        { label: "max", stroke: "rgba(37,99,235,.35)", width: 1, value: (u, v) => fmtValue(v) },
        { label: "mean", stroke: COLORS[0], width: 2, value: (u, v) => fmtValue(v) },
        { label: "anomaly", stroke: "#dc2626", width: 0, points: { show: true, size: 8, fill: "#dc2626" }, paths: () => null, value: (u, v) => fmtValue(v) },
        ...overlays.map((o, i) => ({ label: o, stroke: COLORS[(i + 1) % COLORS.length], width: 2, value: (u, v) => fmtValue(v) })),
      ],
      bands: [{ series: [2, 1], fill: "rgba(37,99,235,.12)" }],
      axes: [{}, { values: (u, vals) => vals.map(fmtValue), size: 70 }],
      hooks: { drawClear: [shadeAlerts] },
    };
    if (plot) plot.destroy();
    plot = new uPlot(opts, data, $("chart"));
  }

  // Firing periods of this sensor's alerts, shaded behind the lines.
  function shadeAlerts(u) {
    const ctx = u.ctx;
    ctx.save();
    ctx.fillStyle = "rgba(220,38,38,.08)";
    for (const a of alerts) {
      const x0 = u.valToPos(a.fired_ts / 1000, "x", true);
      const x1 = u.valToPos((a.resolved_ts ?? Date.now()) / 1000, "x", true);
      const left = Math.max(x0, u.bbox.left), right = Math.min(x1, u.bbox.left + u.bbox.width);
      if (right > left) ctx.fillRect(left, u.bbox.top, right - left, u.bbox.height);
    }
    ctx.restore();
  }

  const onResize = () => { if (data) draw(); };
  window.addEventListener("resize", onResize);
  return {
    subscription: "/api/v1/stream?types=window,alert&sensor=" + encodeURIComponent(globOf(id)),
    load,
    on(kind, events) {
      if (!data || at) return;
      if (kind === "alert") { scheduleReload(); return; }
      for (const w of events) {
        if (w.sensor !== id) continue;
        const i = data[0].indexOf(w.start / 1000);
        if (w.size === step && i >= 0) {
          data[1][i] = w.min; data[2][i] = w.max; data[3][i] = w.mean;
          redraw();
        } else {
          scheduleReload();  // a new bucket, or windows of another size than the chart's step
        }
      }
    },
    close() {
      closed = true;
      clearTimeout(refetch);
      window.removeEventListener("resize", onResize);
      $("overlay-add").removeEventListener("click", addOverlay);
      if (plot) plot.destroy();
      $("chart").replaceChildren();
    },
  };

  function scheduleReload() {
    if (refetch) return;
    const wait = Math.max(0, REFETCH_MS - (Date.now() - lastLoad));
    refetch = setTimeout(() => { refetch = null; load().catch(showError); }, wait);
  }
}

function bucketOf(times, ts) {
  let lo = 0, hi = times.length - 1, found = -1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (times[mid] <= ts) { found = mid; lo = mid + 1; } else hi = mid - 1;
  }
  return found;
}

function fmtStep(ms) {
  if (ms % 86400e3 === 0) return `${ms / 86400e3} d`;
  if (ms % 3600e3 === 0) return `${ms / 3600e3} h`;
  if (ms % 60e3 === 0) return `${ms / 60e3} min`;
  return `${ms / 1e3} s`;
}

// ---- Alerts ----
function Alerts() {
  let list = [], closed = false;
  const draw = () => {
    if (closed) return;
    const rows = list.map((a) => {
      const sensor = a.sensor;
      const since = a.kind === "stale" ? a.fired_at : a.fired_ts;
      const tr = el("tr", { class: "link" },
        el("td", {}, el("span", { class: "badge " + a.state }, a.state)),
        el("td", { title: a.replayed ? "fired while a new pipeline version replayed the log's history: stored, not notified" : "" },
          a.rule, a.replayed ? " (replayed)" : ""),
        el("td", {}, el("a", { href: sensorHref(sensor, { range: "1h", at: since }) }, sensor)),
        el("td", { class: "wide" }, a.severity),
        el("td", {}, fmtTime(since)));
      tr.addEventListener("click", (e) => { if (e.target.tagName !== "A") location.hash = sensorHref(sensor, { range: "1h", at: since }); });
      return tr;
    });
    $("alerts").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colSpan: 5 }, "no alerts"))]));
  };
  const drawSoon = perFrame(draw);
  return {
    subscription: "/api/v1/stream?types=alert",
    async load() {
      list = (await api("/api/v1/alerts?limit=500")).body;
      draw();
    },
    on(kind, transitions) {
      if (kind !== "alert") return;
      for (const t of transitions) {
        const known = list.find((a) => a.kind === "reading" && a.id === t.id);
        if (known) {
          known.state = t.state;
        } else {
          list.unshift({ kind: "reading", id: t.id, rule: t.rule, sensor: t.sensor, severity: t.severity, state: t.state, fired_ts: t.ts });
        }
      }
      drawSoon();
    },
    close() { closed = true; },
  };
}

window.addEventListener("hashchange", render);
document.addEventListener("DOMContentLoaded", render);
