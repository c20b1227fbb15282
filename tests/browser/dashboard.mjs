// Drives headless Chromium through the dashboard of a running aggregator, fed by the simulator
// through an agent's MQTT broker. Run by tests/tests/dashboard_browser.rs:
//   node tests/browser/dashboard.mjs <aggregator url> <agent's mqtt port> <screenshot dir>
// Exits non-zero, saying what it did not see, on the first failed check. Screenshots are saved
// for a person to look at.
import { execFileSync } from "node:child_process";
import { mkdirSync } from "node:fs";
import { failureShot, launch, newPage } from "./chromium.mjs";

const [url, mqttPort, out] = process.argv.slice(2);
mkdirSync(out, { recursive: true });
const TOPIC = "sensors/probe";  // a device the simulator does not play: the test's own readings
const PROBE = "probe";          // its sensor ids: the agent drops the topic's first level
const publish = (payload) =>
  execFileSync("mosquitto_pub", ["-h", "127.0.0.1", "-p", mqttPort, "-q", "1", "-t", TOPIC, "-m", JSON.stringify(payload)]);
const step = (text) => console.log(`- ${text}`);

const browser = await launch();
const errors = [];
let failed = false;
try {
  const page = await newPage(browser, errors);

  step("the fleet view lists the agent as online");
  await page.goto(`${url}/#/fleet`);
  await page.locator("#agents tr", { hasText: "gw-1" }).locator(".badge.online").waitFor();
  await page.locator("#pipeline", { hasText: "processed" }).waitFor();
  await page.screenshot({ path: `${out}/fleet.png`, fullPage: true });

  step("the sensor list shows the simulated sensors");
  publish({ temperature: 20 });
  // The list is read when the view opens: wait until the agent has forwarded the probe's reading
  // (seconds on a busy machine), so that the check is of the page, not of the agent's timing.
  for (let i = 0; ; i++) {
    const latest = await fetch(`${url}/api/v1/latest?sensor=${PROBE}/*`).then((r) => r.json()).catch(() => []);
    if (Array.isArray(latest) && latest.length > 0) break;
    if (i > 300) throw new Error("the probe's reading never reached the aggregator");
    await new Promise((done) => setTimeout(done, 100));
  }
  await page.goto(`${url}/#/sensors`);
  await page.locator("#sensors tr", { hasText: "dev-1/temperature" }).waitFor();
  const probeRow = page.locator("#sensors tr", { hasText: `${PROBE}/temperature` });
  await probeRow.waitFor();
  await page.screenshot({ path: `${out}/sensors.png`, fullPage: true });

  step("a live reading appears without a reload");
  await page.evaluate(() => { window.notReloaded = true; });
  publish({ temperature: 77.77 });
  await probeRow.locator("td", { hasText: "77.77" }).waitFor();
  if (!(await page.evaluate(() => window.notReloaded === true))) throw new Error("the page reloaded to show the reading");

  step("a sensor chart renders with data");
  await page.locator("#sensors a", { hasText: "dev-1/temperature" }).click();
  await page.waitForFunction(() => location.hash.startsWith("#/sensor/"));
  await page.locator("#chart canvas").waitFor();
  await page.locator("#chart-note", { hasText: "points of" }).waitFor();
  const note = await page.locator("#chart-note").textContent();
  if (note.includes("no readings")) throw new Error(`the chart has no data: ${note}`);
  await page.locator("#ranges button", { hasText: "15m" }).click();
  await page.waitForFunction(() => location.hash.includes("range=15m"));
  await page.locator("#chart canvas").waitFor();
  await page.screenshot({ path: `${out}/chart.png`, fullPage: true });

  step("back goes back to the list");
  await page.goBack();
  await page.goBack();
  await page.locator("#view-sensors:not([hidden])").waitFor();

  step("an unknown sensor says so, not that the aggregator is unreachable");
  await page.goto(`${url}/#/sensor/nope%2Fnothing`);
  await page.locator("#error", { hasText: "no sensor" }).waitFor();

  step("a firing alert appears live when a spike arrives");
  await page.goto(`${url}/#/alerts`);
  await page.locator("#alerts").waitFor();
  publish({ temperature: 500 });
  await page.locator("#alerts tr", { hasText: `${PROBE}/temperature` }).locator(".badge.firing").waitFor();
  await page.screenshot({ path: `${out}/alerts.png`, fullPage: true });

  step("a 390 px screen does not scroll sideways");
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(`${url}/#/sensors`);
  await page.locator("#sensors tr", { hasText: "dev-1/temperature" }).waitFor();
  const width = await page.evaluate(() => document.documentElement.scrollWidth);
  await page.screenshot({ path: `${out}/narrow.png`, fullPage: true });
  if (width > 390) throw new Error(`the page is ${width} px wide on a 390 px screen`);

  // The "no sensor" step's 404 is the one error the page itself asked for.
  const unexpected = errors.filter((e) => !e.includes("404"));
  if (unexpected.length) throw new Error(`console errors: ${unexpected.join(" | ")}`);
  step("no console errors");
} catch (e) {
  failed = true;
  console.error(`FAILED: ${e.message}`);
  await failureShot(browser, `${out}/failure.png`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
