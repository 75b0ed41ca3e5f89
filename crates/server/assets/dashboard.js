// modu dashboard: plain JS, no dependencies (the page must work offline). Polls /v1/services,
// /v1/usage and /metrics; charts are drawn as SVG and on a canvas by hand.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#2e6be6", "#e6732e", "#2ea36b", "#b83ec4", "#c4a23e", "#3eb8c4", "#c43e5b", "#6b6b6b"];
const state = { key: localStorage.getItem("modu-key") || "", services: [], colors: {}, tps: [], lastTokens: null, lastT: null };

function headers(json) {
  const h = {};
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function api(path) {
  const r = await fetch(path, { headers: headers(false) });
  const text = await r.text();
  let body = null;
  try { body = JSON.parse(text); } catch (_) { body = text; }
  if (!r.ok) {
    const msg = body && body.error ? body.error.message : String(text).slice(0, 200);
    const e = new Error(msg);
    e.status = r.status;
    throw e;
  }
  return body;
}

function showError(msg) {
  const el = $("error");
  el.hidden = !msg;
  el.textContent = msg || "";
}

function fmt(n, digits) {
  if (n === null || n === undefined || isNaN(n)) return "–";
  return Number(n).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function fmtCost(c) {
  if (!c) return "0";
  return c < 0.01 ? c.toPrecision(3) : fmt(c, 4);
}

function colorOf(name) {
  if (!(name in state.colors)) state.colors[name] = COLORS[Object.keys(state.colors).length % COLORS.length];
  return state.colors[name];
}

function text(tag, content, cls) {
  const e = document.createElement(tag);
  if (content !== undefined) e.textContent = content;
  if (cls) e.className = cls;
  return e;
}

function limitsText(l) {
  const parts = [];
  if (l.requests_per_minute != null) parts.push(l.requests_per_minute + " req/min");
  if (l.tokens_per_minute != null) parts.push(l.tokens_per_minute + " tok/min");
  if (l.max_concurrent != null) parts.push(l.max_concurrent + " concurrent");
  if (l.max_tokens_per_request != null) parts.push("≤" + l.max_tokens_per_request + " tok/req");
  return parts.length ? parts.join(", ") : "unlimited";
}

async function refreshServices() {
  try {
    const s = await api("/v1/services");
    state.services = s.data;
    $("base-model").textContent = "base model: " + s.base_model;
    $("auth-state").textContent = !s.auth ? "open server (no keys)" : s.admin ? "admin" : "service: " + s.data.map((x) => x.name).join(", ");
    const sel = $("module");
    const current = sel.value;
    const modules = [...new Set(s.data.flatMap((x) => x.allowed_modules))];
    sel.replaceChildren(...modules.map((m) => { const o = text("option", m); o.value = m; return o; }));
    if (modules.includes(current)) sel.value = current;
    else if (s.data.length) sel.value = s.data[0].default_module;
    showError("");
    return true;
  } catch (e) {
    state.services = [];
    showError(e.status === 401 ? "This server needs an API key: enter a service key (or the admin key) above." : "Loading services: " + e.message);
    $("auth-state").textContent = "";
    return false;
  }
}

async function refreshUsage() {
  if (!state.services.length) return;
  let totals;
  try { totals = (await api("/v1/usage?group_by=service")).data; } catch (e) { showError("Loading usage: " + e.message); return; }
  const by = {};
  for (const r of totals) by[r.service] = r;
  const tbody = document.querySelector("#services-table tbody");
  const rows = state.services.map((s) => {
    const u = by[s.name] || { requests: 0, prompt_tokens: 0, completion_tokens: 0, cpu_s: 0, energy_j: 0, cost: 0 };
    const tr = document.createElement("tr");
    tr.dataset.service = s.name;
    const name = text("td");
    const sw = text("span", "", "swatch");
    sw.style.background = colorOf(s.name);
    name.append(sw, s.name);
    tr.append(name, text("td", String(s.priority)), text("td", s.allowed_modules.join(", ")), text("td", limitsText(s.limits)),
      text("td", fmt(u.requests, 0), "num requests"),
      text("td", fmt(u.prompt_tokens + u.completion_tokens, 0), "num tokens"),
      text("td", fmt(u.cpu_s, 2), "num cpu"),
      text("td", fmt(u.energy_j, 1), "num energy"),
      text("td", fmtCost(u.cost), "num cost"));
    tr.querySelector(".tokens").dataset.value = String(u.prompt_tokens + u.completion_tokens);
    tr.querySelector(".cost").dataset.value = String(u.cost);
    return tr;
  });
  tbody.replaceChildren(...rows);
  $("total-requests").textContent = fmt(totals.reduce((a, r) => a + r.requests, 0), 0);
  $("total-cost").textContent = fmtCost(totals.reduce((a, r) => a + r.cost, 0));

  const from = Math.floor(Date.now() / 1000) - 30 * 60;
  try {
    const series = (await api("/v1/usage?group_by=service,minute&from=" + from)).data;
    drawChart($("tokens-chart"), series, (r) => r.prompt_tokens + r.completion_tokens, (v) => fmt(v, 0));
    drawChart($("cost-chart"), series, (r) => r.cost, fmtCost);
  } catch (e) { showError("Loading usage history: " + e.message); }
}

/// A line chart per service over the last 30 minutes, one point per minute.
function drawChart(svg, rows, value, label) {
  const W = 560, H = 220, L = 58, R = 10, T = 12, B = 26;
  const now = Math.floor(Date.now() / 60000) * 60000;
  const minutes = [];
  for (let i = 29; i >= 0; i--) minutes.push(now - i * 60000);
  const services = [...new Set(rows.map((r) => r.service))];
  const data = {};
  for (const s of services) data[s] = minutes.map(() => 0);
  for (const r of rows) {
    const t = Date.parse(r.period);
    const i = minutes.indexOf(t);
    if (i >= 0) data[r.service][i] += value(r);
  }
  const max = Math.max(1e-12, ...services.flatMap((s) => data[s]));
  const x = (i) => L + (i * (W - L - R)) / (minutes.length - 1);
  const y = (v) => H - B - (v / max) * (H - T - B);
  const ns = "http://www.w3.org/2000/svg";
  const el = (tag, attrs, content) => {
    const e = document.createElementNS(ns, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (content !== undefined) e.textContent = content;
    return e;
  };
  const parts = [];
  for (let k = 0; k <= 4; k++) {
    const v = (max * k) / 4;
    parts.push(el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#e4e7eb" }));
    parts.push(el("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", "font-size": 10, fill: "#6a7380" }, label(v)));
  }
  for (const i of [0, 10, 20, 29]) {
    const d = new Date(minutes[i]);
    const hh = String(d.getHours()).padStart(2, "0"), mm = String(d.getMinutes()).padStart(2, "0");
    const anchor = i === 0 ? "start" : i === 29 ? "end" : "middle";
    parts.push(el("text", { x: x(i), y: H - 8, "text-anchor": anchor, "font-size": 10, fill: "#6a7380" }, hh + ":" + mm));
  }
  services.forEach((s, k) => {
    const pts = data[s].map((v, i) => x(i).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
    parts.push(el("polyline", { points: pts, fill: "none", stroke: colorOf(s), "stroke-width": 2 }));
    data[s].forEach((v, i) => { if (v > 0) parts.push(el("circle", { cx: x(i), cy: y(v), r: 3, fill: colorOf(s) })); });
    parts.push(el("rect", { x: L + 8 + k * 110, y: T, width: 10, height: 10, fill: colorOf(s) }));
    parts.push(el("text", { x: L + 22 + k * 110, y: T + 9, "font-size": 11, fill: "#1d232b" }, s));
  });
  if (!services.length) parts.push(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#6a7380" }, "no requests yet"));
  svg.replaceChildren(...parts);
}

function metricValue(text, name) {
  for (const line of text.split("\n")) {
    if (line.startsWith(name + " ")) return parseFloat(line.slice(name.length + 1));
  }
  return null;
}

async function refreshMetrics() {
  let text;
  try {
    const r = await fetch("/metrics", { headers: headers(false) });
    text = await r.text();
  } catch (_) { return; }
  const tokens = metricValue(text, "modu_generation_tokens_total");
  $("running").textContent = fmt(metricValue(text, "modu_running_sequences"), 0);
  $("queued").textContent = fmt(metricValue(text, "modu_queue_depth"), 0);
  const t = performance.now();
  if (state.lastTokens !== null && tokens !== null && t > state.lastT) {
    const tps = ((tokens - state.lastTokens) * 1000) / (t - state.lastT);
    state.tps.push(tps);
    if (state.tps.length > 60) state.tps.shift();
    $("tps").textContent = fmt(tps, 1);
    drawSparkline();
  }
  state.lastTokens = tokens;
  state.lastT = t;
}

function drawSparkline() {
  const c = $("tps-chart"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const max = Math.max(1, ...state.tps);
  g.strokeStyle = "#2e6be6";
  g.lineWidth = 2;
  g.beginPath();
  state.tps.forEach((v, i) => {
    const px = (i / 59) * (c.width - 2) + 1, py = c.height - 2 - (v / max) * (c.height - 6);
    if (i === 0) g.moveTo(px, py); else g.lineTo(px, py);
  });
  g.stroke();
}

async function refreshModules() {
  const list = $("modules-list");
  try {
    const r = await fetch("/v1/modules", { headers: headers(false) });
    if (r.status === 404 || r.status === 405) throw Object.assign(new Error("absent"), { absent: true });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.status);
    const mods = body.data || [];
    $("modules-state").textContent = mods.length
      ? mods.length + " module(s), " + (body.resident_bytes / 1048576).toFixed(1) + " MiB resident"
      : "no modules registered";
    list.replaceChildren(...mods.map((m) => {
      const li = text("li", m.name + " ");
      li.dataset.module = m.name;
      const info = "rank " + m.rank + ", " + (m.resident ? "resident" : "evicted") + ", " + m.requests + " requests ";
      const b = text("button", "Unload");
      b.onclick = async () => {
        b.disabled = true;
        const r = await fetch("/v1/modules/" + encodeURIComponent(m.name), { method: "DELETE", headers: headers(false) });
        if (!r.ok) { const e = await r.json().catch(() => ({})); $("modules-state").textContent = "Unload: " + ((e.error && e.error.message) || r.status); }
        refreshModules();
      };
      li.append(text("span", info, "muted"), b);
      return li;
    }));
    // Registered modules can be picked in the playground too.
    const sel = $("module");
    for (const m of mods) {
      if (![...sel.options].some((o) => o.value === m.name)) {
        const o = text("option", m.name); o.value = m.name; sel.append(o);
      }
    }
  } catch (e) {
    $("modules-state").textContent = e.absent
      ? "Module load/unload is not available on this server (no /v1/modules endpoint). The base model is always loaded."
      : "Modules: " + e.message;
  }
}

async function loadModule() {
  const name = $("module-name").value.trim(), path = $("module-path").value.trim();
  if (!name || !path) { $("modules-state").textContent = "Load: name and path are needed"; return; }
  $("module-load").disabled = true;
  try {
    const r = await fetch("/v1/modules", { method: "POST", headers: headers(true), body: JSON.stringify({ name, path }) });
    const body = await r.json().catch(() => ({}));
    $("modules-state").textContent = r.ok
      ? "loaded " + body.name + " in " + body.load_ms.toFixed(0) + " ms"
      : "Load: " + ((body.error && body.error.message) || r.status);
  } finally {
    $("module-load").disabled = false;
    refreshModules();
  }
}

async function send() {
  const prompt = $("prompt").value.trim();
  if (!prompt) return;
  const out = $("output"), status = $("chat-status"), btn = $("send");
  out.textContent = "";
  btn.disabled = true;
  status.textContent = "sending…";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(true),
      body: JSON.stringify({
        model: $("module").value || undefined,
        messages: [{ role: "user", content: prompt }],
        max_tokens: parseInt($("max-tokens").value, 10) || 64,
        stream: true,
        stream_options: { include_usage: true },
      }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || "HTTP " + r.status);
    }
    status.textContent = "streaming…";
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "", usage = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const ev = buf.slice(0, i);
        buf = buf.slice(i + 2);
        const data = ev.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (!data || data === "[DONE]") continue;
        const j = JSON.parse(data);
        if (j.error) throw new Error(j.error.message);
        if (j.usage) usage = j.usage;
        const delta = j.choices && j.choices[0] && j.choices[0].delta;
        if (delta && delta.content) out.textContent += delta.content;
      }
    }
    status.textContent = usage ? "done: " + usage.prompt_tokens + " prompt + " + usage.completion_tokens + " completion tokens" : "done";
  } catch (e) {
    status.textContent = "error: " + e.message;
  } finally {
    btn.disabled = false;
    refreshUsage();
  }
}

async function refreshAll() {
  if (await refreshServices()) await refreshUsage();
  refreshModules();
}

$("key").value = state.key;
$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("key").value.trim();
  localStorage.setItem("modu-key", state.key);
  refreshAll();
});
$("send").addEventListener("click", send);
$("module-load").addEventListener("click", loadModule);
$("prompt").addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) send(); });
refreshAll();
refreshMetrics();
setInterval(refreshMetrics, 2000);
setInterval(refreshUsage, 5000);
