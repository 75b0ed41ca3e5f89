// Drives the modu dashboard in headless Chromium: enter a service key, send a chat in the
// playground, wait for streamed text, and check that the service's token count and cost on
// the page went up. Usage: node dashboard.mjs BASE_URL KEY SERVICE OUT_DIR
// Prints one JSON line with what it saw; exits non-zero on any failure.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [base, key, service, outDir] = process.argv.slice(2);
if (!base || !key || !service || !outDir) {
  console.error("usage: node dashboard.mjs BASE_URL KEY SERVICE OUT_DIR");
  process.exit(2);
}

const profile = mkdtempSync(join(tmpdir(), "modu-chromium-"));
// A persistent context on a fresh profile directory is Playwright's form of --user-data-dir.
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1280, height: 900 },
  deviceScaleFactor: 1,
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
let failed = false;
try {
  const page = browser.pages()[0] || (await browser.newPage());
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  // Failed fetches are expected (401 before the key is entered, /v1/modules may list nothing).
  page.on("console", (m) => { if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) errors.push(m.text()); });
  await page.goto(base + "/", { waitUntil: "load" });
  // Keys are on: the page asks for one.
  await page.waitForSelector("#error:not([hidden])", { timeout: 15000 });
  await page.fill("#key", key);
  await page.click("#save-key");
  const row = `#services-table tbody tr[data-service="${service}"]`;
  await page.waitForSelector(row, { timeout: 15000 });
  const read = async () => page.$eval(row, (tr) => ({
    tokens: Number(tr.querySelector(".tokens").dataset.value),
    cost: Number(tr.querySelector(".cost").dataset.value),
  }));
  const before = await read();
  await page.screenshot({ path: join(outDir, "before.png") });

  await page.fill("#prompt", "안녕하세요! 한 문장으로 자기소개를 해 주세요.");
  await page.fill("#max-tokens", "24");
  await page.click("#send");
  // Streamed text appears, then the stream ends.
  await page.waitForFunction(() => document.getElementById("output").textContent.trim().length > 0, null, { timeout: 60000 });
  await page.waitForFunction(() => document.getElementById("chat-status").textContent.startsWith("done"), null, { timeout: 60000 });
  const output = await page.textContent("#output");
  const status = await page.textContent("#chat-status");
  // The page refreshes usage after the chat (and every 5 s).
  await page.waitForFunction(
    ([sel, t0, c0]) => {
      const tr = document.querySelector(sel);
      return tr && Number(tr.querySelector(".tokens").dataset.value) > t0 && Number(tr.querySelector(".cost").dataset.value) > c0;
    },
    [row, before.tokens, before.cost],
    { timeout: 20000 },
  );
  const after = await read();
  const shown = await page.$eval(row, (tr) => ({ tokens: tr.querySelector(".tokens").textContent, cost: tr.querySelector(".cost").textContent }));
  const modules = await page.textContent("#modules-state");
  // Let a chart redraw include the new minute.
  await page.waitForSelector("#tokens-chart polyline", { timeout: 15000 });
  await page.screenshot({ path: join(outDir, "after.png") });
  console.log(JSON.stringify({ before, after, shown, output, status, modules, errors }));
  if (errors.length) { console.error("page errors: " + errors.join("; ")); failed = true; }
} catch (e) {
  console.error("dashboard check failed: " + (e && e.stack || e));
  failed = true;
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
