// The dashboard with a large fleet, in headless Chromium: what the page shows, not how fast (that is
// tests/bench/page.sh). Run by tests/tests/dashboard_browser.rs:
//   node tests/browser/large_fleet.mjs <aggregator url> <agents> <screenshot dir>
// The aggregator must know agents gw-001... (fleet.mjs); this posts 100 sensors per agent. Exits
// non-zero, saying what it did not see, on the first failed check.
import { mkdirSync } from "node:fs";
import { failureShot, launch, newPage } from "./chromium.mjs";
import { Fleet, agentId, waitProcessed } from "./fleet.mjs";

const [url, agentsArg, out] = process.argv.slice(2);
const agents = Number(agentsArg);
const sensors = agents * 100;
mkdirSync(out, { recursive: true });
const step = (text) => console.log(`- ${text}`);
const check = (ok, message) => { if (!ok) throw new Error(message); };

const fleet = new Fleet(url, agents);
await fleet.seed(2);
await waitProcessed(url, sensors * 2);
step(`${sensors} sensors of ${agents} agents posted`);

const browser = await launch();
const errors = [];
let failed = false;
try {
  const page = await newPage(browser, errors);
  // What the page's event stream brings: it should carry the sensors shown, not the whole fleet.
  const streamed = [];
  const cdp = await page.context().newCDPSession(page);
  await cdp.send("Network.enable");
  cdp.on("Network.eventSourceMessageReceived", (e) => streamed.push(e.data));
  const ids = (selector) => page.locator(selector).evaluateAll((tds) => tds.map((td) => td.textContent));

  step(`the fleet view lists all ${agents} agents`);
  await page.goto(`${url}/#/fleet`);
  await page.locator("#agents tr", { hasText: agentId(agents) }).waitFor();
  const listed = await ids("#agents tr td:first-child");
  check(listed.length === agents && listed[0] === agentId(1) && listed[agents - 1] === agentId(agents),
    `the fleet view lists ${listed.length} agents (${listed[0]} ... ${listed.at(-1)}), not ${agents}`);
  await page.screenshot({ path: `${out}/large-fleet.png`, fullPage: true });

  step("the sensor list shows one page of 100, and the next");
  await page.goto(`${url}/#/sensors`);
  await page.locator("#sensors tr", { hasText: `${agentId(1)}/dev-01/battery` }).waitFor();
  let shown = await ids("#sensors tr td:first-child");
  check(shown.length === 100, `the first page shows ${shown.length} sensors, not 100`);
  check(shown.every((id) => id.startsWith(`${agentId(1)}/`)), `the first page is not gw-001's sensors: ${shown.slice(0, 3)} ...`);
  await page.screenshot({ path: `${out}/large-sensors.png`, fullPage: true });
  await page.locator("#next").click();
  await page.locator("#sensors tr", { hasText: `${agentId(2)}/dev-01/battery` }).waitFor();
  shown = await ids("#sensors tr td:first-child");
  check(shown.length === 100 && shown.every((id) => id.startsWith(`${agentId(2)}/`)), `the second page is not gw-002's 100 sensors`);
  await page.locator("#prev").click();
  await page.locator("#sensors tr", { hasText: `${agentId(1)}/dev-01/battery` }).waitFor();

  step("a live reading of a sensor on the page shows without a reload; one of another page is not sent");
  await page.evaluate(() => { window.notReloaded = true; });
  const elsewhere = `${agentId(agents)}/dev-01/pressure`, live = `${agentId(1)}/dev-07/pressure`;
  await fleet.postReading(elsewhere, 1111.5);
  await fleet.postReading(live, 4321.5);
  await page.locator("#sensors tr", { hasText: live }).locator("td", { hasText: "4321.50" }).waitFor();
  check(await page.evaluate(() => window.notReloaded === true), "the page reloaded to show the reading");
  check(streamed.some((data) => data.includes(live)), `the event stream did not carry ${live}`);
  check(!streamed.some((data) => data.includes(elsewhere)), `the event stream carried ${elsewhere}, a sensor the page does not show`);

  step("the search finds a sensor of the last page");
  const last = `${agentId(agents)}/dev-25/`;
  await page.locator("#prefix").fill(last);
  await page.waitForFunction((p) => location.hash === `#/sensors?prefix=${encodeURIComponent(p)}`, last);
  await page.locator("#sensors tr", { hasText: `${last}temperature` }).waitFor();
  shown = await ids("#sensors tr td:first-child");
  check(shown.length === 4 && shown.every((id) => id.startsWith(last)), `searching ${last} shows ${shown.join(", ")}`);
  check(await page.locator("#next").isDisabled(), "one page of results has a next page");
  await page.screenshot({ path: `${out}/large-search.png`, fullPage: true });

  step("a live reading of a searched sensor shows, and a new sensor joins the list");
  await fleet.postReading(`${last}humidity`, 55.25);
  await page.locator("#sensors tr", { hasText: `${last}humidity` }).locator("td", { hasText: "55.25" }).waitFor();
  await fleet.postReading(`${last}extra`, 1.5);
  await page.locator("#sensors tr", { hasText: `${last}extra` }).locator("td", { hasText: "1.50" }).waitFor();

  const unexpected = errors;
  if (unexpected.length) throw new Error(`console errors: ${unexpected.join(" | ")}`);
  step("no console errors");
} catch (e) {
  failed = true;
  console.error(`FAILED: ${e.message}`);
  await failureShot(browser, `${out}/large-failure.png`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
