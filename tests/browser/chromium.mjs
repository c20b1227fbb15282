// Headless Chromium as the browser tests and the page bench start it: Debian's build (CHROMIUM
// overrides the path), no sandbox (containers, root), nothing that reaches beyond loopback.
import { chromium } from "playwright-core";

export const launch = () => chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});

// After a failure: a screenshot of the page open in `browser`, if any, for the test's output.
export async function failureShot(browser, path) {
  try {
    const [page] = browser.contexts()[0]?.pages() ?? [];
    if (page) await page.screenshot({ path, fullPage: true });
  } catch {}
}

// A page of `browser` whose console errors and uncaught exceptions land in `errors`.
export async function newPage(browser, errors, viewport = { width: 1280, height: 900 }) {
  const page = await browser.newPage({ viewport });
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("pageerror", (e) => errors.push(String(e)));
  page.setDefaultTimeout(20_000);
  return page;
}
