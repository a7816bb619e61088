// fsledger dashboard: plain JS, no build step, nothing from a CDN. Every value from the
// server is put into the page with textContent or as a numeric SVG attribute (file names
// are data, never markup). The event stream is read with fetch() rather than EventSource so
// that the bearer token travels in a header. Every list is bounded: nothing loads all records.
"use strict";

const MAX_CHANGES = 200;
const RECENT = 100;
const DUP_PAGE = 20;
const DUP_FILES = 5;
const KINDS = ["created", "modified", "deleted", "moved", "dir_moved",
  "repository_offline", "repository_online", "repository_added", "repository_removed"];
const CHART_KINDS = ["created", "modified", "deleted", "moved", "dir_moved"];
const state = {
  token: sessionStorage.getItem("fsledger-token") || "",
  repos: new Map(),
  progress: new Map(),
  lastEventId: null,
  seqs: new Set(),
  window: "hour",
  dupOffset: 0,
  streaming: false,
  loaded: false,
};

// --- plumbing ------------------------------------------------------------------------
function headers(extra) {
  const h = Object.assign({ Accept: "application/json" }, extra || {});
  if (state.token) h.Authorization = "Bearer " + state.token;
  return h;
}

class Unauthorized extends Error {}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  if (response.status === 401) {
    askToken();
    throw new Unauthorized("unauthorized");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || ("HTTP " + response.status));
  return body;
}

function askToken() {
  const form = document.getElementById("token-form");
  if (form.hidden) {
    form.hidden = false;
    document.getElementById("token").focus();
  }
  setConnection("token needed", "down");
}

function setConnection(text, cls) {
  const node = document.getElementById("connection");
  node.textContent = text;
  node.className = "pill " + (cls || "");
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function showMessage(text) {
  document.getElementById("message").textContent = text;
}

// --- formatting ----------------------------------------------------------------------
const NUM = new Intl.NumberFormat();

function count(n) {
  return n === null || n === undefined ? "–" : NUM.format(n);
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "kB", "MB", "GB", "TB", "PB"];
  let v = n;
  let i = 0;
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
  return (i === 0 ? String(v) : v.toFixed(v < 10 ? 1 : 0)) + " " + units[i];
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.round(seconds);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
}

function clock(iso) {
  return iso ? new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "";
}

function when(iso) {
  if (!iso) return "never";
  const d = new Date(iso);
  const today = new Date();
  if (d.toDateString() === today.toDateString()) return clock(iso);
  return d.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + clock(iso);
}

function ago(iso) {
  if (!iso) return "never";
  const s = (Date.now() - new Date(iso).getTime()) / 1000;
  if (s < 60) return "just now";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  if (s < 86400) return Math.floor(s / 3600) + " h ago";
  return when(iso);
}

function ahead(iso) {
  if (!iso) return "none";
  const s = (new Date(iso).getTime() - Date.now()) / 1000;
  if (s < 60) return "now";
  if (s < 3600) return "in " + Math.round(s / 60) + " min";
  if (s < 86400) return "in " + Math.round(s / 3600) + " h";
  return when(iso);
}

function repoName(id) {
  const repo = state.repos.get(id);
  return repo ? repo.name : String(id).slice(0, 8);
}

// --- repository cards ----------------------------------------------------------------
function stat(label, value, cls) {
  const box = el("div", null, "stat " + (cls || ""));
  box.append(el("span", label, "label"), el("span", value, "value"));
  return box;
}

function conditionOf(repo) {
  const s = repo.status || {};
  return s.condition || { state: repo.state, reason: null, since: null };
}

function reasonText(cond) {
  if (!cond.reason) return "";
  return cond.reason + (cond.since ? " since " + when(cond.since) : "");
}

function card(repo) {
  const s = repo.status || {};
  const cond = conditionOf(repo);
  const node = el("article", null, "card state-" + cond.state);
  node.dataset.repoId = repo.id;
  const head = el("div", null, "card-head");
  head.append(el("h3", repo.name, "name"), el("span", cond.state, "badge state"));
  node.append(head, el("div", repo.path, "root path"));
  const reason = el("div", reasonText(cond), "reason");
  reason.hidden = !cond.reason;
  node.append(reason);

  const grid = el("div", null, "stats");
  grid.append(
    stat("Files", count(s.total_files), "files"),
    stat("Size", bytes(s.total_bytes), "bytes"),
    stat("Watching", s.is_watching ? "yes" : "no", "watching"),
    stat("Last scan", ago(s.last_scan_time), "last-scan"),
  );
  const sched = s.schedule;
  const next = stat("Next scan", sched && sched.next_run ? ahead(sched.next_run) : "none", "next-scan");
  if (sched) {
    const why = sched.next_run ? [new Date(sched.next_run).toLocaleString()] : [];
    if (sched.waiting_reason) why.push("waiting: " + sched.waiting_reason);
    if (sched.interval_reason) why.push("interval: " + sched.interval_reason);
    next.title = why.join("\n");
  }
  grid.append(next);
  const last = s.last_scan || { error_count: 0, corrupt_count: 0, errors: [], corrupt: [] };
  const problems = stat("Errors / corrupt", count(last.error_count) + " / " + count(last.corrupt_count),
    "problems" + (last.error_count || last.corrupt_count ? " bad" : ""));
  problems.title = [...last.errors, ...last.corrupt.map((c) => "corrupt: " + c)].join("\n");
  grid.append(problems);
  node.append(grid);

  const progress = el("div", null, "progress");
  progress.hidden = true;
  const bar = el("div", null, "bar");
  bar.setAttribute("role", "progressbar");
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", "100");
  bar.append(el("div", null, "fill"));
  const line = el("div", null, "progress-line");
  line.append(el("span", null, "progress-phase"), el("span", null, "progress-eta"));
  progress.append(line, bar, el("div", null, "progress-text"));
  node.append(progress);

  const actions = el("div", null, "actions");
  const scan = el("button", "Scan now", "reconcile");
  scan.type = "button";
  scan.addEventListener("click", () => reconcile(repo.id, false, scan));
  const verify = el("button", "Verify", "verify secondary");
  verify.type = "button";
  verify.title = "rehash every file: finds content that changed while size and time did not";
  verify.addEventListener("click", () => reconcile(repo.id, true, verify));
  actions.append(scan, verify);
  node.append(actions);
  const p = state.progress.get(repo.id) || s.progress;
  if (p) paintProgress(node, p);
  return node;
}

function paintProgress(node, p) {
  const box = node.querySelector(".progress");
  if (!box) return;
  box.hidden = !p.running;
  if (!p.running) return;
  const fill = box.querySelector(".fill");
  const bar = box.querySelector(".bar");
  const text = box.querySelector(".progress-text");
  const pct = p.fraction === null || p.fraction === undefined ? null : Math.round(p.fraction * 1000) / 10;
  bar.classList.toggle("indeterminate", pct === null);
  fill.style.width = (pct === null ? 100 : pct) + "%";
  if (pct !== null) bar.setAttribute("aria-valuenow", String(pct));
  else bar.removeAttribute("aria-valuenow");
  const what = (p.verify ? "Verifying" : p.operation === "startup" ? "Startup scan" : "Scanning") +
    (p.phase === "scanning" ? "" : " (" + p.phase + ")");
  box.querySelector(".progress-phase").textContent = what + (pct === null ? "" : " · " + pct.toFixed(0) + "%");
  const eta = p.eta_s !== null && p.eta_s !== undefined && p.phase === "scanning" ? "about " + duration(p.eta_s) + " left" : "";
  box.querySelector(".progress-eta").textContent = eta;
  const parts = [count(p.files_done) + (p.files_expected ? " of " + count(p.files_expected) : "") + " files"];
  if (p.bytes_done) parts.push(bytes(p.bytes_done) + (p.bytes_expected ? " of " + bytes(p.bytes_expected) : "") + " hashed");
  const rate = [];
  if (p.files_per_s) rate.push(count(Math.round(p.files_per_s)) + " files/s");
  if (p.bytes_per_s) rate.push(bytes(p.bytes_per_s) + "/s");
  if (rate.length) parts.push(rate.join(", "));
  text.textContent = parts.join(" · ");
}

function onProgress(p) {
  const previous = state.progress.get(p.repository_id);
  state.progress.set(p.repository_id, p);
  const node = document.querySelector(`.card[data-repo-id="${CSS.escape(p.repository_id)}"]`);
  if (node) paintProgress(node, p);
  if (!p.running && (!previous || previous.running)) refreshSoon();
}

function paintBanner(repos) {
  const offline = repos.filter((r) => conditionOf(r).state === "offline");
  const banner = document.getElementById("banner");
  banner.hidden = offline.length === 0;
  banner.replaceChildren();
  for (const r of offline) {
    const line = el("div", null, "offline");
    line.append(el("strong", r.name), el("span", " is offline: " + (reasonText(conditionOf(r)) || "root unavailable") +
      ". Its records are kept; syncing resumes when the root is back."));
    banner.append(line);
  }
}

function fillRepoSelect(id, repos) {
  const select = document.getElementById(id);
  const current = select.value;
  const options = [el("option", select.options[0].textContent)];
  options[0].value = "";
  for (const r of repos) {
    const o = el("option", r.name);
    o.value = r.id;
    options.push(o);
  }
  select.replaceChildren(...options);
  select.value = state.repos.has(current) ? current : "";
}

async function loadRepositories() {
  const repos = await api("/api/v1/repositories");
  const known = [...state.repos.keys()].join();
  state.repos = new Map(repos.map((r) => [r.id, r]));
  for (const r of repos) {
    const p = r.status && r.status.progress;
    const mine = state.progress.get(r.id);
    if (p && (!mine || p.updated_at >= mine.updated_at)) state.progress.set(r.id, p);
  }
  document.getElementById("cards").replaceChildren(...repos.map(card));
  if (!repos.length) document.getElementById("cards").append(el("p", "No repository yet: add one with 'fsledger repo add PATH'.", "empty"));
  paintBanner(repos);
  if (known !== [...state.repos.keys()].join()) {
    for (const id of ["changes-repo", "ops-repo", "dups-repo"]) fillRepoSelect(id, repos);
  }
  return repos;
}

async function reconcile(id, verify, button) {
  button.disabled = true;
  try {
    const answer = await api("/api/v1/repositories/" + encodeURIComponent(id) + "/reconcile" + (verify ? "?verify=true" : ""), { method: "POST" });
    showMessage((verify ? "Verification" : "Scan") + " of " + repoName(id) + " queued (request " + answer.request_id + ")");
  } catch (err) {
    if (!(err instanceof Unauthorized)) showMessage((verify ? "Verification" : "Scan") + " of " + repoName(id) + " refused: " + err.message);
  } finally {
    button.disabled = false;
    refreshSoon();
  }
}

// --- recent changes ------------------------------------------------------------------
function changeFilter() {
  return { repo: document.getElementById("changes-repo").value, kind: document.getElementById("changes-kind").value };
}

function changeRow(change) {
  const tr = el("tr");
  tr.dataset.kind = change.kind;
  tr.dataset.seq = String(change.seq);
  const t = el("td", clock(change.recorded_at), "time");
  t.title = new Date(change.recorded_at).toLocaleString();
  const kind = el("td");
  kind.append(el("span", change.kind.replace("repository_", "repo "), "kind kind-" + change.kind));
  const path = el("td", null, "path");
  if (change.old_path !== undefined && change.old_path !== null) {
    path.append(el("span", change.old_path, "old"), el("span", " → ", "arrow"), el("span", change.path, "new"));
  } else {
    path.append(el("span", change.path || "(root)", change.path ? "new" : "new muted"));
  }
  tr.append(t, el("td", repoName(change.repository_id), "repo"), kind, path);
  return tr;
}

function addChange(change, atTop) {
  if (state.seqs.has(change.seq)) return;
  const f = changeFilter();
  if ((f.repo && change.repository_id !== f.repo) || (f.kind && change.kind !== f.kind)) return;
  state.seqs.add(change.seq);
  const body = document.querySelector("#changes tbody");
  const row = changeRow(change);
  if (atTop) {
    body.prepend(row);
    row.classList.add("fresh");
  } else {
    body.append(row);
  }
  while (body.children.length > MAX_CHANGES) {
    state.seqs.delete(Number(body.lastChild.dataset.seq));
    body.lastChild.remove();
  }
  document.getElementById("changes-empty").hidden = body.children.length > 0;
}

async function loadRecentChanges() {
  const f = changeFilter();
  const q = new URLSearchParams({ limit: String(RECENT) });
  if (f.repo) q.set("repository", f.repo);
  if (f.kind) q.set("kind", f.kind);
  const page = await api("/api/v1/changes/recent?" + q);
  state.seqs.clear();
  document.querySelector("#changes tbody").replaceChildren();
  for (const c of page.changes) addChange(c, false);
  document.getElementById("changes-empty").hidden = page.changes.length > 0;
  return page.cursor;
}

// --- mirrors to buckets ----------------------------------------------------------------
function mirrorRow(m) {
  const c = m.counters || {};
  const tr = el("tr", null, "mirror state-" + m.state);
  tr.dataset.mirrorId = m.id;
  const bucket = el("td", m.url, "path bucket");
  if (m.endpoint_url) bucket.title = m.endpoint_url;
  const stateCell = el("td", null, "mirror-state");
  const live = m.live ? m.live.state : null;
  stateCell.append(el("span", m.state, "badge state"));
  if (live && live !== m.state) stateCell.append(" ", el("span", live, "live"));
  const reason = el("div", m.reason || "", "reason");
  reason.hidden = !m.reason;
  stateCell.append(reason);
  const lag = el("td", m.synced ? count(m.backlog) : "not synced", "num lag");
  lag.title = m.cursor_seq === null ? "no cursor yet" : "cursor at #" + m.cursor_seq;
  const uploaded = el("td", count(c.uploaded), "num uploaded");
  uploaded.title = bytes(c.uploaded_bytes);
  const error = el("td", m.last_error || "", "message last-error");
  if (m.last_error_at) error.title = new Date(m.last_error_at).toLocaleString();
  tr.append(el("td", m.repository, "repo"), bucket, stateCell, lag, uploaded,
    el("td", count(c.copied), "num copied"), el("td", count(c.deleted), "num deleted"),
    el("td", count(c.errors), "num errors" + (c.errors ? " bad" : "")), error);
  return tr;
}

async function loadMirrors() {
  const answer = await api("/api/v1/mirrors");
  const mirrors = answer.mirrors || [];
  document.getElementById("mirrors-section").hidden = mirrors.length === 0;
  document.querySelector("#mirrors tbody").replaceChildren(...mirrors.map(mirrorRow));
}

// --- operations ----------------------------------------------------------------------
async function loadOperations() {
  const q = new URLSearchParams({ limit: "50" });
  for (const [key, id] of [["repository", "ops-repo"], ["type", "ops-type"], ["status", "ops-status"]]) {
    const v = document.getElementById(id).value;
    if (v) q.set(key, v);
  }
  const ops = await api("/api/v1/operations?" + q);
  const rows = ops.map((o) => {
    const tr = el("tr");
    tr.dataset.type = o.operation_type;
    tr.dataset.status = o.status;
    const started = el("td", when(o.start_time), "time");
    started.title = new Date(o.start_time).toLocaleString();
    const status = el("td");
    status.append(el("span", o.status, "badge status-" + o.status));
    tr.append(started, el("td", repoName(o.repository_id)), el("td", o.operation_type), status,
      el("td", o.duration_ms === null ? "–" : duration(o.duration_ms / 1000), "num"),
      el("td", count(o.files_scanned), "num"), el("td", count(o.files_added), "num"),
      el("td", count(o.files_updated), "num"), el("td", count(o.files_removed), "num"),
      el("td", o.error_message || "", "message"));
    return tr;
  });
  document.querySelector("#operations tbody").replaceChildren(...rows);
}

// --- activity chart (plain SVG) ------------------------------------------------------
const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

async function loadActivity() {
  const data = await api("/api/v1/activity?window=" + state.window);
  const since = new Date(data.since).getTime();
  const slots = Math.round((new Date(data.until).getTime() - since) / (data.step_s * 1000));
  const width = 720;
  const height = 160;
  const per = new Array(slots).fill(null);
  let max = 0;
  for (const b of data.buckets) {
    const i = Math.round((new Date(b.t).getTime() - since) / (data.step_s * 1000));
    if (i < 0 || i >= slots) continue;
    per[i] = b;
    const total = CHART_KINDS.reduce((sum, k) => sum + (b[k] || 0), 0);
    max = Math.max(max, total);
  }
  const chart = document.getElementById("chart");
  const parts = [];
  const w = width / slots;
  for (let y = 1; y <= 3; y += 1) {
    parts.push(svg("line", { x1: 0, x2: width, y1: height - (y * height) / 3.2, y2: height - (y * height) / 3.2, class: "grid" }));
  }
  per.forEach((b, i) => {
    if (!b) return;
    let y = height;
    for (const k of CHART_KINDS) {
      const n = b[k] || 0;
      if (!n) continue;
      const h = Math.max((n / max) * (height - 8), 1.5);
      y -= h;
      const rect = svg("rect", { x: (i * w).toFixed(2), y: y.toFixed(2), width: Math.max(w - (slots > 100 ? 0 : 1), 0.8).toFixed(2), height: h.toFixed(2), class: "k-" + k });
      const title = svg("title");
      title.textContent = clock(b.t) + " " + k + ": " + count(n);
      rect.append(title);
      parts.push(rect);
    }
  });
  chart.replaceChildren(...parts);
  chart.dataset.max = String(max);
  chart.dataset.bars = String(per.filter(Boolean).length);
  const axis = document.getElementById("chart-axis");
  const marks = [el("span", state.window === "day" ? when(data.since) : clock(data.since)), el("span", max ? "peak " + count(max) + "/min" : "no changes", "peak"), el("span", "now")];
  axis.replaceChildren(...marks);
  const legend = document.getElementById("legend");
  if (!legend.children.length) {
    legend.append(...CHART_KINDS.map((k) => {
      const item = el("span", k.replace("_", " "), "item");
      item.prepend(el("i", null, "swatch k-" + k));
      return item;
    }));
  }
}

// --- duplicates ----------------------------------------------------------------------
async function loadDuplicates() {
  const q = new URLSearchParams({ limit: String(DUP_PAGE), offset: String(state.dupOffset), files_limit: String(DUP_FILES) });
  const repo = document.getElementById("dups-repo").value;
  if (repo) q.set("repository", repo);
  const page = await api("/api/v1/duplicates?" + q);
  const items = page.groups.map((g, i) => {
    const li = el("li", null, "group");
    li.value = state.dupOffset + i + 1;
    const head = el("div", null, "group-head");
    head.append(el("span", bytes(g.wasted_bytes) + " wasted", "wasted"),
      el("span", count(g.count) + " copies of " + bytes(g.size), "copies"),
      el("span", g.hash_algo + " " + g.hash.slice(0, 12) + "…", "hash"));
    const files = el("ul", null, "files");
    for (const f of g.files) {
      const item = el("li", null, "path");
      item.append(el("span", repoName(f.repository_id) + ": ", "repo"), el("span", f.path));
      files.append(item);
    }
    if (g.count > g.files.length) files.append(el("li", "and " + count(g.count - g.files.length) + " more", "more"));
    li.append(head, files);
    return li;
  });
  const list = document.getElementById("dup-groups");
  list.replaceChildren(...items);
  list.start = state.dupOffset + 1;
  const first = state.dupOffset + 1;
  document.getElementById("dups-summary").textContent = page.groups.length
    ? "Groups " + count(first) + "–" + count(state.dupOffset + page.groups.length) + ", largest waste first. Keeping one copy of each of these would free " + bytes(page.wasted_bytes) + "."
    : (state.dupOffset ? "No more groups." : "No duplicates: every file's content is unique.");
  document.getElementById("dups-page").textContent = "page " + (Math.floor(state.dupOffset / DUP_PAGE) + 1);
  document.getElementById("dups-prev").disabled = state.dupOffset === 0;
  document.getElementById("dups-next").disabled = page.next_offset === null || page.next_offset === undefined;
  state.dupNext = page.next_offset;
}

// --- views and refresh ---------------------------------------------------------------
function view() {
  return location.hash === "#duplicates" ? "duplicates" : "overview";
}

function showView() {
  const v = view();
  document.getElementById("overview").hidden = v !== "overview";
  document.getElementById("duplicates").hidden = v !== "duplicates";
  document.getElementById("nav-overview").classList.toggle("active", v === "overview");
  document.getElementById("nav-duplicates").classList.toggle("active", v === "duplicates");
  if (v === "duplicates" && state.loaded) guard(loadDuplicates());
}

async function guard(promise) {
  try {
    await promise;
  } catch (err) {
    if (!(err instanceof Unauthorized)) showMessage("Cannot load: " + err.message);
  }
}

async function refresh() {
  await guard((async () => {
    await loadRepositories();
    if (view() === "overview") {
      await loadMirrors();
      await loadOperations();
    }
  })());
}

let refreshTimer = null;
function refreshSoon() {
  // At most one reload of the cards per second and a half while changes stream in.
  if (refreshTimer === null) refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 1500);
}

let activityTimer = null;
function activitySoon() {
  if (activityTimer === null) activityTimer = setTimeout(() => { activityTimer = null; guard(loadActivity()); }, 3000);
}

// --- the event stream ----------------------------------------------------------------
function handleEvent(event) {
  if (event.id) state.lastEventId = event.id;
  if (event.type === "change") {
    addChange(JSON.parse(event.data), true);
    refreshSoon();
    activitySoon();
  } else if (event.type === "progress") {
    onProgress(JSON.parse(event.data));
  } else if (event.type === "resync") {
    // The feed no longer reaches back to our position: start again from the present.
    state.lastEventId = null;
    showMessage("The change stream was too far behind and restarted from now.");
  }
}

// A small Server-Sent Events reader over fetch(), resumable with Last-Event-ID.
async function stream(since) {
  if (state.streaming) return;
  state.streaming = true;
  let from = since;
  for (;;) {
    try {
      const extra = { Accept: "text/event-stream" };
      if (state.lastEventId) extra["Last-Event-ID"] = state.lastEventId;
      const q = new URLSearchParams({ progress: "true" });
      if (from && !state.lastEventId) q.set("since", from);
      const response = await fetch("/api/v1/events?" + q, { headers: headers(extra), cache: "no-store" });
      if (response.status === 401) { askToken(); state.streaming = false; return; }
      if (response.status === 410) { state.lastEventId = null; from = null; continue; }
      if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
      setConnection("live", "live");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let event = { type: "message", data: [], id: null };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let nl;
        while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
          const line = buffer.slice(0, nl);
          buffer = buffer.slice(nl + (buffer.startsWith("\r\n", nl) ? 2 : 1));
          if (line === "") {
            if (event.data.length) handleEvent({ type: event.type, data: event.data.join("\n"), id: event.id });
            event = { type: "message", data: [], id: null };
          } else if (!line.startsWith(":")) {
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            let val = colon < 0 ? "" : line.slice(colon + 1);
            if (val.startsWith(" ")) val = val.slice(1);
            if (field === "data") event.data.push(val);
            else if (field === "event") event.type = val;
            else if (field === "id") event.id = val;
          }
        }
      }
    } catch (err) {
      // fall through to the reconnect below
    }
    setConnection("reconnecting…", "down");
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

async function start() {
  try {
    await loadRepositories();
    const cursor = await loadRecentChanges();
    stream(cursor);
    await loadMirrors();
    await loadOperations();
    await loadActivity();
  } catch (err) {
    if (!(err instanceof Unauthorized)) showMessage("Cannot load: " + err.message);
    return;
  }
  showMessage("");
  state.loaded = true;
  showView();
}

// --- wiring --------------------------------------------------------------------------
for (const k of KINDS) {
  const o = el("option", k.replace("_", " "));
  o.value = k;
  document.getElementById("changes-kind").append(o);
}
document.getElementById("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.token = document.getElementById("token").value;
  sessionStorage.setItem("fsledger-token", state.token);
  document.getElementById("token-form").hidden = true;
  start();
});
for (const id of ["changes-repo", "changes-kind"]) {
  document.getElementById(id).addEventListener("change", () => guard(loadRecentChanges()));
}
for (const id of ["ops-repo", "ops-type", "ops-status"]) {
  document.getElementById(id).addEventListener("change", () => guard(loadOperations()));
}
document.getElementById("dups-repo").addEventListener("change", () => { state.dupOffset = 0; guard(loadDuplicates()); });
document.getElementById("dups-prev").addEventListener("click", () => { state.dupOffset = Math.max(0, state.dupOffset - DUP_PAGE); guard(loadDuplicates()); });
document.getElementById("dups-next").addEventListener("click", () => { if (state.dupNext) { state.dupOffset = state.dupNext; guard(loadDuplicates()); } });
for (const b of document.querySelectorAll(".tabs button")) {
  b.addEventListener("click", () => {
    state.window = b.dataset.window;
    for (const other of document.querySelectorAll(".tabs button")) other.classList.toggle("active", other === b);
    guard(loadActivity());
  });
}
window.addEventListener("hashchange", showView);

showView();
start();
setInterval(() => { if (!document.hidden && document.getElementById("token-form").hidden) refresh(); }, 5000);
setInterval(() => { if (!document.hidden && view() === "overview" && document.getElementById("token-form").hidden) guard(loadActivity()); }, 60000);
