// The dashboard's load times with a large fleet, in headless Chromium. Run by tests/bench/page.sh:
//   node tests/browser/page_bench.mjs <aggregator url> <agents> <loads>
// The aggregator must know agents gw-001... (fleet.mjs); this posts 100 sensors per agent with a
// few readings each over the last hour, keeps readings coming (each sensor every 10 s), then
// measures `loads` cold loads (a new browser context each: empty cache) of the fleet view and of
// the sensor list. Times are from navigation start (performance.now()) to the first animation
// frame after the DOM shows what is measured:
//   fleet    every agent listed            sensors  the first page of sensors, with values
//   quiet    the last request (not the event stream) finished; nothing else for 500 ms
// and bytes transferred until quiet (not counting the event stream), JS heap after a GC, DOM
// nodes. Then, on one open page of each view, 10 s of live updates: the event stream's bytes
// and main-thread time per second. Prints a table; timings only, nothing passes or fails.
import { launch } from "./chromium.mjs";
import { Fleet, waitProcessed } from "./fleet.mjs";

const [url, agentsArg, loadsArg] = process.argv.slice(2);
const agents = Number(agentsArg || 100), loads = Number(loadsArg || 10);
const sensors = agents * 100;
const PER_SENSOR = 6;  // readings of each sensor over the last hour
const LIVE_S = 10;

const fleet = new Fleet(url, agents);
let t = Date.now();
await fleet.seed(PER_SENSOR);
await waitProcessed(url, sensors * PER_SENSOR);
console.log(`${sensors.toLocaleString("en")} sensors of ${agents} agents seeded (${(sensors * PER_SENSOR).toLocaleString("en")} readings, ` +
  `${((Date.now() - t) / 1000).toFixed(1)} s to post and process); readings keep coming, each sensor every 10 s`);
const stopLive = fleet.live();

const browser = await launch();

// Installed before the page's own script: records when what is measured is first on screen.
function marker({ agents, firstPage }) {
  const marks = (window.__marks = {});
  const at = (name) => requestAnimationFrame(() => { marks[name] ??= performance.now(); });
  let pending = {};
  const check = () => {
    if (!pending.fleet && document.querySelectorAll("#agents tr td:nth-child(3)").length >= agents) {
      pending.fleet = true; at("fleet");
    }
    const values = document.querySelectorAll("#sensors tr td:nth-child(2)");
    if (!pending.sensors && values.length >= firstPage && [...values].every((td) => td.textContent !== "—")) {
      pending.sensors = true; at("sensors");
    }
  };
  new MutationObserver(check).observe(document, { subtree: true, childList: true, characterData: true });
}

async function open(view) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  await context.addInitScript(marker, { agents, firstPage: Math.min(100, sensors) });
  const page = await context.newPage();
  const cdp = await context.newCDPSession(page);
  await cdp.send("Network.enable");
  await cdp.send("Performance.enable");
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  let inflight = 0, last = Date.now();
  const busy = (r, d) => { if (r.resourceType() !== "eventsource") { inflight += d; last = Date.now(); } };
  page.on("request", (r) => busy(r, 1));
  page.on("requestfinished", (r) => busy(r, -1));
  page.on("requestfailed", (r) => busy(r, -1));
  await page.goto(`${url}/#/${view}`, { waitUntil: "load" });
  const mark = view === "fleet" ? "fleet" : "sensors";
  await page.waitForFunction((m) => window.__marks[m] != null, mark, { timeout: 30_000 });
  while (inflight > 0 || Date.now() - last < 500) await new Promise((r) => setTimeout(r, 50));
  const figures = await page.evaluate((m) => {
    const nav = performance.getEntriesByType("navigation")[0];
    const resources = performance.getEntriesByType("resource");
    return {
      shown: window.__marks[m],
      quiet: Math.max(nav.loadEventEnd, ...resources.map((r) => r.responseEnd)),
      bytes: nav.transferSize + resources.reduce((sum, r) => sum + r.transferSize, 0),
      requests: 1 + resources.length,
      nodes: document.getElementsByTagName("*").length,
    };
  }, mark);
  await cdp.send("HeapProfiler.collectGarbage");
  figures.heap = (await cdp.send("Runtime.getHeapUsage")).usedSize;
  if (errors.length) throw new Error(`page errors: ${errors.join(" | ")}`);
  return { context, page, cdp, figures };
}

// Main-thread time and event-stream bytes per second while the page follows the live readings.
async function live(view) {
  const { context, page, cdp } = await open(view);
  let sse = 0;
  cdp.on("Network.eventSourceMessageReceived", (e) => { sse += e.data.length + e.eventName.length; });
  const busy = async () => Object.fromEntries((await cdp.send("Performance.getMetrics")).metrics.map((m) => [m.name, m.value])).TaskDuration;
  const [b0, s0] = [await busy(), sse];
  await page.waitForTimeout(LIVE_S * 1000);
  const [b1, s1] = [await busy(), sse];
  await context.close();
  return { cpu: ((b1 - b0) * 1000) / LIVE_S, sse: (s1 - s0) / LIVE_S };
}

const runs = { fleet: [], sensors: [] };
try {
  for (let i = 0; i < loads; i++) {
    for (const view of ["fleet", "sensors"]) {
      const { context, figures } = await open(view);
      runs[view].push(figures);
      await context.close();
    }
  }
  const liveFleet = await live("fleet");
  const liveSensors = await live("sensors");

  const p50 = (xs) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];
  const max = (xs) => Math.max(...xs);
  const ms = (x) => `${Math.round(x)} ms`;
  const kib = (x) => `${(x / 1024).toFixed(0)} KiB`;
  const mib = (x) => `${(x / 2 ** 20).toFixed(1)} MiB`;
  const rows = [];
  const row = (what, xs, fmt, bar = "") => rows.push([what, fmt(p50(xs)), fmt(max(xs)), bar]);
  for (const view of ["fleet", "sensors"]) {
    const f = runs[view];
    row(view === "fleet" ? `fleet: all ${agents} agents listed` : `sensors: first page (${Math.min(100, sensors)}) with values`,
      f.map((x) => x.shown), ms, "< 1000 ms");
    row(`${view}: network quiet`, f.map((x) => x.quiet), ms);
    row(`${view}: bytes (${f[0].requests} requests)`, f.map((x) => x.bytes), kib);
    row(`${view}: JS heap after GC`, f.map((x) => x.heap), mib);
    row(`${view}: DOM nodes`, f.map((x) => x.nodes), String);
  }
  const width = Math.max(...rows.map((r) => r[0].length));
  console.log(`\n${sensors.toLocaleString("en")} sensors, ${agents} agents, ${loads} cold loads of each view:`);
  console.log(`${"".padEnd(width)}  ${"p50".padStart(9)}  ${"max".padStart(9)}  bar`);
  for (const [what, a, b, bar] of rows) console.log(`${what.padEnd(width)}  ${a.padStart(9)}  ${b.padStart(9)}  ${bar}`);
  for (const [view, l] of [["fleet", liveFleet], ["sensors", liveSensors]]) {
    console.log(`live, ${view} view open: main thread busy ${l.cpu.toFixed(0)} ms/s, event stream ${(l.sse / 1024).toFixed(1)} KiB/s`);
  }
} finally {
  stopLive();
  await browser.close();
}
