// Chats with cpm-router's web page (GET /) in Debian's headless Chromium, as a person
// would: waits for the model line, sets greedy sampling, sends a message, watches the
// answer arrive in pieces, then sends a long one and presses Stop. Prints one JSON
// object with what the page showed; tests/e2e/router_web.py checks it.
//   node chat_page.mjs URL SCREENSHOT.png MESSAGE
import puppeteer from "puppeteer-core";

const [url, shot, message] = process.argv.slice(2);
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const out = { console: [] };
try {
  const page = await browser.newPage();
  page.on("console", (m) => out.console.push(m.type() + ": " + m.text()));
  page.on("pageerror", (e) => out.console.push("pageerror: " + e.message));
  await page.setViewport({ width: 1100, height: 700 });
  await page.goto(url, { waitUntil: "load" });
  await page.waitForFunction(() => !document.getElementById("model").textContent.includes("…"), { timeout: 30000 });
  out.model = await page.$eval("#model", (e) => e.textContent);
  const set = async (id, v) => page.$eval("#" + id, (e, v) => { e.value = v; }, v);
  await set("temperature", "0");
  await set("max_tokens", "48");
  // the lengths the answer had as it changed: streamed text shows several
  await page.evaluate(() => {
    window.__lengths = new Set();
    window.__watch = new MutationObserver(() => {
      const els = document.querySelectorAll(".msg.assistant");
      if (els.length) window.__lengths.add(els[els.length - 1].childNodes.length > 0 ?
                                           [...els[els.length - 1].childNodes].filter((n) => n.nodeType === 3)
                                             .map((n) => n.textContent).join("").length : 0);
    });
    window.__watch.observe(document.getElementById("log"), { childList: true, subtree: true, characterData: true });
  });
  await page.type("#prompt", message);
  await page.click("#send");
  await page.waitForSelector(".msg.assistant[data-state=done]", { timeout: 60000 });
  const first = await page.$$eval(".msg.assistant", (els) => {
    const e = els[els.length - 1];
    const meta = e.querySelector(".meta");
    return { text: [...e.childNodes].filter((n) => n.nodeType === 3).map((n) => n.textContent).join(""),
             meta: meta ? meta.textContent : "", error: e.classList.contains("error") };
  });
  out.answer = first;
  // the watcher reads the whole answer per change: off before the long answer below
  out.updates = await page.evaluate(() => {
    window.__watch.disconnect();
    return [...window.__lengths].filter((n) => n > 0).length;
  });
  out.glance = await page.$eval("#g_rate", (e) => e.textContent);
  await page.screenshot({ path: shot, fullPage: true });
  // Stop: a long answer, stopped once it has begun. Long enough (tens of seconds on the
  // tiny model) that a browser slowed by a loaded host still clicks before it ends.
  await set("max_tokens", "12000");
  await page.type("#prompt", "Tell me a very long story.");
  await page.click("#send");
  await page.waitForFunction(() => {
    const els = document.querySelectorAll(".msg.assistant");
    return els.length === 2 && els[1].textContent.length > 0;
  }, { timeout: 60000 });
  await page.click("#stop");
  await page.waitForFunction(() => document.querySelectorAll(".msg.assistant[data-state=done]").length === 2,
                             { timeout: 30000 });
  out.stopped = await page.$$eval(".msg.assistant .meta", (els) => els[els.length - 1].textContent);
} catch (e) {
  out.failure = String(e && e.stack || e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
