// A simulated fleet for the dashboard's page tests and bench: `agents` agents (`gw-001`, token
// `secret-gw-001`, ...) of 100 sensors each (`gw-001/dev-01/temperature` ... `gw-001/dev-25/battery`),
// posted to the aggregator's ingest API as JSON batches, one per agent, as an agent would.
// The aggregator's config must list the agents: `agentsToml(n)` writes that part.

export const QUANTITIES = ["temperature", "humidity", "pressure", "battery"];
export const DEVICES = 25;  // per agent: 25 devices of 4 quantities, 100 sensors
const BASE = { temperature: 21, humidity: 45, pressure: 1013, battery: 3.7 };

export const agentId = (n) => `gw-${String(n).padStart(3, "0")}`;
export const sensorIds = (n) => {
  const ids = [];
  for (let d = 1; d <= DEVICES; d++) {
    for (const q of QUANTITIES) ids.push(`${agentId(n)}/dev-${String(d).padStart(2, "0")}/${q}`);
  }
  return ids;
};

export function agentsToml(count) {
  let toml = "";
  for (let n = 1; n <= count; n++) toml += `[[agents]]\nid = "${agentId(n)}"\ntoken = "secret-${agentId(n)}"\n`;
  return toml;
}

export class Fleet {
  constructor(url, agents) {
    this.url = url;
    this.agents = agents;
    // One epoch per agent and run (the aggregator deduplicates by agent, epoch and sequence).
    this.epoch = Math.floor(Math.random() * 2 ** 40);
    this.nextSeq = new Array(agents + 1).fill(0);
  }

  // One batch from agent `n`: a reading of each of its sensors at each of `times`.
  post(n, times) {
    const readings = [];
    for (const ts of times) {
      sensorIds(n).forEach((sensor, i) => {
        const base = BASE[QUANTITIES[i % QUANTITIES.length]];
        readings.push({ sensor, ts, value: Math.round((base + Math.sin(ts / 6e5 + i + n) * base * 0.05) * 100) / 100 });
      });
    }
    return this.send(n, readings);
  }

  // One reading of `sensor` (`gw-<n>/...`: agent n's), now.
  postReading(sensor, value) {
    return this.send(Number(sensor.slice(3, 6)), [{ sensor, ts: Date.now(), value }]);
  }

  async send(n, readings) {
    const body = JSON.stringify({ agent_id: agentId(n), epoch: this.epoch, blocks: [{ first_seq: this.nextSeq[n], readings }] });
    this.nextSeq[n] += readings.length;
    const response = await fetch(`${this.url}/api/v1/ingest`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer secret-${agentId(n)}` },
      body,
    });
    if (!response.ok) throw new Error(`ingest as ${agentId(n)}: ${response.status} ${await response.text()}`);
  }

  // `perSensor` readings of every sensor, spread over the last hour; resolves once all are acked.
  async seed(perSensor) {
    const now = Date.now();
    const times = Array.from({ length: perSensor }, (_, k) => now - 3600e3 + ((k + 1) * 3600e3) / perSensor - 1000);
    for (let n = 1; n <= this.agents; n += 10) {
      await Promise.all(Array.from({ length: Math.min(10, this.agents - n + 1) }, (_, k) => this.post(n + k, times)));
    }
  }

  // Keeps readings coming: every second a tenth of the agents post one reading of each of their
  // sensors (each sensor every 10 s). Returns a function that stops it.
  live() {
    let next = 1, stopped = false, timer = null;
    const tick = async () => {
      const batch = Math.max(1, Math.ceil(this.agents / 10));
      const posts = [];
      for (let k = 0; k < batch; k++) {
        posts.push(this.post(next, [Date.now()]).catch(() => {}));
        next = next % this.agents + 1;
      }
      await Promise.all(posts);
      if (!stopped) timer = setTimeout(tick, 1000);
    };
    tick();
    return () => { stopped = true; clearTimeout(timer); };
  }
}

// Resolves once the aggregator's processor has made `readings` readings visible.
export async function waitProcessed(url, readings, timeoutMs = 120_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const text = await fetch(`${url}/metrics`).then((r) => r.text()).catch(() => "");
    const done = Number((text.match(/^tributary_processor_offset (\S+)/m) || [])[1]);
    if (done >= readings) return;
    if (Date.now() > deadline) throw new Error(`the aggregator processed ${done} of ${readings} readings in ${timeoutMs / 1000} s`);
    await new Promise((r) => setTimeout(r, 200));
  }
}
