// rproxy's dashboard: polls /api/v1/dashboard (one snapshot per interval,
// the same for every viewer) and drives the runtime API's buttons.  The
// admin key, when the proxy has one, is asked once and kept in this tab's
// sessionStorage; it travels only in the Authorization header.
"use strict";

const KEY = "rproxy-admin-key";
const SVG = "http://www.w3.org/2000/svg";
let needKey = false;
let interval = 1000;
let lastOk = 0;
let timer = null;

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = sessionStorage.getItem(KEY);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}), cache: "no-store" };
  if (body) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (response.status === 401) askKey("the key was refused");
  return { status: response.status, data };
}

function say(text, error) {
  const m = $("message");
  m.textContent = text;
  m.className = error ? "error" : "";
  m.hidden = !text;
}

function askKey(why) {
  sessionStorage.removeItem(KEY);
  $("keyform").hidden = false;
  $("forget").hidden = true;
  if (why) say(why, true);
  $("key").focus();
}

// -- formatting ------------------------------------------------------------

function num(v, digits) {
  if (v === null || v === undefined) return "–";
  return Number(v).toFixed(digits === undefined ? 0 : digits);
}
function pct(v) { return v === null || v === undefined ? "–" : (100 * v).toFixed(v && v < 0.01 ? 2 : 1) + "%"; }
function ms(v) { return v === null || v === undefined ? "–" : (v < 10 ? v.toFixed(2) : v.toFixed(0)) + " ms"; }
function ago(s) {
  if (s === null || s === undefined) return "never";
  if (s < 120) return Math.round(s) + "s ago";
  if (s < 7200) return Math.round(s / 60) + "m ago";
  return Math.round(s / 3600) + "h ago";
}
function duration(s) {
  if (s < 120) return Math.round(s) + "s";
  if (s < 7200) return Math.round(s / 60) + "m";
  if (s < 172800) return (s / 3600).toFixed(1) + "h";
  return (s / 86400).toFixed(1) + "d";
}
function when(at) { return new Date(at * 1000).toLocaleString(); }

// keep one child per key: create it once, update it in place after
function keyed(parent, key, make) {
  for (const child of parent.children) if (child.dataset.key === key) return child;
  const node = make();
  node.dataset.key = key;
  parent.append(node);
  return node;
}
function prune(parent, keys) {
  for (const child of [...parent.children]) if (!keys.has(child.dataset.key)) child.remove();
}
function cells(tr, values) {
  while (tr.children.length < values.length) tr.append(el("td"));
  values.forEach((v, i) => { const td = tr.children[i]; if (td.textContent !== String(v)) td.textContent = v; });
}

// -- frontends -------------------------------------------------------------

function line(points, index, scale, cls, span, start) {
  const path = document.createElementNS(SVG, "polyline");
  const coords = [];
  for (const p of points) {
    const v = index.reduce((sum, i) => sum + (p[i] || 0), 0);
    const x = ((p[0] - start) / span) * 300;
    coords.push(x.toFixed(1) + "," + (68 - (v / scale) * 64).toFixed(1));
  }
  path.setAttribute("points", coords.join(" "));
  path.setAttribute("class", cls);
  return path;
}

function chart(svg, points, at) {
  while (svg.firstChild) svg.firstChild.remove();
  if (points.length < 2) return;
  // the last 5 minutes, or less while there is less to show
  const span = Math.min(300, Math.max(60, at - points[0][0])), start = at - span;
  const rps = Math.max(1, ...points.map((p) => p[1] || 0));
  const p99 = Math.max(1, ...points.map((p) => p[5] || 0));
  svg.append(line(points, [1], rps, "rps", span, start));
  svg.append(line(points, [5], p99, "p99", span, start));
  svg.append(line(points.map((p) => { const q = p.slice(); q[2] = (p[2] + p[3]); return q; }), [2],
                  rps, "err", span, start));
}

function figure(label, cls) {
  return el("div", {}, el("b", { class: cls, text: "–" }), el("small", { text: label }));
}

function renderFrontends(snapshot) {
  const box = $("frontends");
  const keys = new Set();
  for (const f of snapshot.frontends) {
    keys.add(f.name);
    const card = keyed(box, f.name, () => {
      const svg = document.createElementNS(SVG, "svg");
      svg.setAttribute("class", "chart");
      svg.setAttribute("viewBox", "0 0 300 70");
      svg.setAttribute("preserveAspectRatio", "none");
      return el("div", { class: "card" },
        el("h3", { class: "title" }), el("div", { class: "muted where" }),
        el("div", { class: "figures" }, figure("requests/s", "rps"), figure("4xx", "e4"), figure("5xx", "e5"),
           figure("p50", "p50"), figure("p99", "p99"), figure("open connections", "open")),
        svg,
        el("div", { class: "legend" }, el("span", { class: "rps", text: "— requests/s" }),
           el("span", { class: "err", text: "— errors/s" }), el("span", { class: "p99", text: "— p99" }),
           el("span", { text: "last 5 min" })));
    });
    card.querySelector(".title").textContent = f.name;
    card.querySelector(".where").textContent = `${f.protocol} on ${f.address || f.listen} → backend ${f.backend}`;
    const now = f.now;
    const http = f.protocol === "http";
    card.querySelector(".rps").textContent = http ? num(now.requests_per_s, 1) : "–";
    card.querySelector(".e4").textContent = http ? pct(now.error_rate["4xx"]) : "–";
    card.querySelector(".e5").textContent = http ? pct(now.error_rate["5xx"]) : "–";
    card.querySelector(".p50").textContent = ms(now.p50_ms);
    card.querySelector(".p99").textContent = ms(now.p99_ms);
    card.querySelector(".open").textContent = num(f.open_connections);
    chart(card.querySelector("svg"), f.history, snapshot.at);
  }
  prune(box, keys);
  if (!snapshot.frontends.length && !box.querySelector(".empty")) box.append(el("div", { class: "empty", text: "no frontend" }));
}

// -- backends --------------------------------------------------------------

async function setServer(backend, server, change) {
  const what = Object.entries(change).map(([k, v]) => `${k} ${v}`).join(", ");
  const { status, data } = await api("PATCH", `/api/v1/servers/${encodeURIComponent(backend)}/${encodeURIComponent(server)}`, change);
  if (status === 200) {
    say(`${backend}/${server}: ${what}`);
    refresh();
  } else if (status !== 401) {
    say(`${backend}/${server}: ${(data && data.error) || "HTTP " + status}`, true);
  }
}

const COLUMNS = ["Server", "State", "Weight", "Active", "Total", "Errors", "Last check", "Reason", "Actions"];

function serverRow(backend, server) {
  const weight = el("input", { class: "weight", type: "number", min: "0", max: "1000", "aria-label": "weight" });
  const tr = el("tr", { "data-backend": backend, "data-server": server });
  for (const label of COLUMNS.slice(0, 8)) tr.append(el("td", { "data-label": label }));
  tr.children[1].className = "state";
  tr.children[7].className = "reason";
  const ops = el("td", { class: "actions" }, el("div", { class: "ops" },
    el("button", { type: "button", class: "drain", text: "Drain", title: "no new connections; open ones finish",
                   onclick: () => setServer(backend, server, { state: "drain" }) }),
    el("button", { type: "button", class: "maint", text: "Maint", title: "maintenance: out of rotation",
                   onclick: () => setServer(backend, server, { state: "maint" }) }),
    el("button", { type: "button", class: "ready", text: "Ready", title: "back in rotation",
                   onclick: () => setServer(backend, server, { state: "ready" }) }),
    weight,
    el("button", { type: "button", class: "setweight", text: "Set weight",
                   onclick: () => setServer(backend, server, { weight: parseInt(weight.value, 10) }) })));
  tr.append(ops);
  return tr;
}

function renderBackends(snapshot) {
  const box = $("backends");
  const keys = new Set();
  for (const b of snapshot.backends) {
    keys.add(b.name);
    const wrap = keyed(box, b.name, () => el("div", { class: "scroll" },
      el("div", { class: "backend-head" }, el("h3", { class: "title" }), el("span", { class: "muted summary" })),
      el("table", { class: "servers" }, el("thead", {}, el("tr", {}, ...COLUMNS.map((t) => el("th", { text: t })))),
         el("tbody"))));
    wrap.querySelector(".title").textContent = b.name;
    wrap.querySelector(".summary").textContent =
      `${b.algorithm} · ${b.servers_up}/${b.servers_total} taking connections` + (b.waiting ? ` · ${b.waiting} waiting` : "");
    const tbody = wrap.querySelector("tbody");
    const rows = new Set();
    for (const s of b.servers) {
      rows.add(s.name);
      const tr = keyed(tbody, s.name, () => serverRow(b.name, s.name));
      const check = s.last_check;
      const reason = s.reason || (check ? check.reason : "");
      cells(tr, [s.name + (s.backup ? " (backup)" : "") + " · " + s.address, s.state,
                 s.weight + (s.weight !== s.configured_weight ? ` (file: ${s.configured_weight})` : ""),
                 s.active_connections, s.total_connections, s.connect_failures,
                 check ? (check.ok ? "ok" : "failed") + ", " + ago(check.ago) : "–", reason]);
      tr.children[1].className = "state " + s.state;
      const input = tr.querySelector("input.weight");
      if (document.activeElement !== input && input.dataset.shown !== String(s.weight)) {
        input.value = s.weight;
        input.dataset.shown = String(s.weight);
      }
    }
    prune(tbody, rows);
  }
  prune(box, keys);
}

// -- tunnels, token pools, reload -------------------------------------------

function renderTable(id, rows, none) {
  const tbody = $(id).querySelector("tbody");
  const keys = new Set();
  if (!rows.length) {
    rows = [["", []]];
    const tr = keyed(tbody, "", () => el("tr", {}, el("td", { class: "empty", colspan: "9", text: none })));
    tr.firstChild.textContent = none;
  }
  for (const [key, values] of rows) {
    keys.add(key);
    if (key) cells(keyed(tbody, key, () => el("tr")), values);
  }
  prune(tbody, keys);
}

function renderRest(snapshot) {
  const agents = [];
  for (const t of snapshot.tunnels) {
    for (const a of t.agents) {
      agents.push([t.name + "/" + a.id, [t.name, a.id, `${a.key || "-"} (level ${a.level})`,
        (a.models || []).join(", ") || "–", pct(a.cpu === null ? null : a.cpu / 100),
        pct(a.memory === null ? null : a.memory / 100), pct(a.disk === null ? null : a.disk / 100),
        a.active_streams, ago(a.last_heartbeat_ago)]]);
    }
  }
  renderTable("agents", agents, snapshot.tunnels.length ? "no agent logged in" : "no tunnel configured");
  renderTable("tokens", snapshot.token_pools.map((p) => [p.name,
    [p.name, p.total, p.in_use, p.available, p.waiting, p.credentials_out.join(", ") || "none"]]),
    "no token pool configured");
  const r = snapshot.reload;
  $("lastreload").textContent = r
    ? `${when(r.at)}: ${r.result}` + (r.errors.length ? " — " + r.errors.join("; ") : "") + ` (reload #${r.count})`
    : "none since start";
  const p = snapshot.process;
  $("version").textContent = "v" + p.version;
  $("process").textContent = `${p.host} · pid ${p.pid} · ${p.config_path || "no file"} · up ${duration(p.up_for)}`;
  const problems = $("problems");
  problems.textContent = p.problems.length ? "Not ready: " + p.problems.join("; ") : "";
  problems.hidden = !p.problems.length;
}

// -- polling ---------------------------------------------------------------

async function refresh() {
  clearTimeout(timer);
  timer = null;
  if (needKey && !sessionStorage.getItem(KEY)) return;
  try {
    const { status, data } = await api("GET", "/api/v1/dashboard");
    if (status === 200 && data) {
      interval = Math.max(500, data.interval * 1000);
      lastOk = Date.now();
      renderFrontends(data);
      renderBackends(data);
      renderRest(data);
    }
  } catch (e) {
    // unreachable: the "live" pill turns stale below; the next poll retries
  }
  const live = $("live");
  const fresh = Date.now() - lastOk < 3 * interval;
  live.textContent = fresh ? "live" : "stale";
  live.className = "pill " + (fresh ? "ok" : "stale");
  if (!timer && !document.hidden) timer = setTimeout(refresh, interval);
}

async function reload() {
  const button = $("reload");
  button.disabled = true;
  say("reloading…");
  try {
    const { status, data } = await api("POST", "/api/v1/reload");
    if (data && data.reload) {
      const r = data.reload;
      say(`reload ${r.result}` + (r.errors.length ? ": " + r.errors.join("; ") : ""), r.result !== "ok");
    } else if (status !== 401) {
      say((data && data.error) || "HTTP " + status, true);
    }
  } finally {
    button.disabled = false;
    refresh();
  }
}

async function start() {
  $("reload").addEventListener("click", reload);
  $("forget").addEventListener("click", () => askKey(""));
  $("keyform").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key").value);
    $("key").value = "";
    $("keyform").hidden = true;
    $("forget").hidden = false;
    say("");
    refresh();
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  try {
    const { data } = await api("GET", "/api/v1");
    needKey = !!(data && data.key_required);
  } catch (e) {
    needKey = false;
  }
  if (needKey && !sessionStorage.getItem(KEY)) askKey("");
  else if (needKey) $("forget").hidden = false;
  refresh();
}

start();
