// fsledger dashboard: plain JS, no build step. Every value from the server is put into the
// page with textContent (file names are data, never markup). The change stream is read
// with fetch() rather than EventSource so that the bearer token travels in a header.
"use strict";

const MAX_CHANGES = 200;
const state = { token: sessionStorage.getItem("fsledger-token") || "", repos: new Map(), lastEventId: null };

function headers(extra) {
  const h = Object.assign({ Accept: "application/json" }, extra || {});
  if (state.token) h.Authorization = "Bearer " + state.token;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  if (response.status === 401) {
    askToken();
    throw new Error("unauthorized");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || ("HTTP " + response.status));
  return body;
}

function askToken() {
  document.getElementById("token-form").hidden = false;
  setConnection("token needed", "down");
}

function setConnection(text, cls) {
  const el = document.getElementById("connection");
  el.textContent = text;
  el.className = "pill " + (cls || "");
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "never";
}

function seconds(ms) {
  return ms === null || ms === undefined ? "" : (ms / 1000).toFixed(1) + " s";
}

function repoName(id) {
  const repo = state.repos.get(id);
  return repo ? repo.name : id;
}

function scheduleCell(sched) {
  // The running manager's schedule: when the next scheduled run comes and why it waits.
  if (!sched) return el("td", "");
  const cell = el("td", sched.next_run ? "next " + when(sched.next_run) : "none scheduled", "schedule");
  const why = [];
  if (sched.waiting_reason) why.push("waiting: " + sched.waiting_reason);
  if (sched.interval_reason) why.push("interval: " + sched.interval_reason);
  if (sched.daily_at) why.push("daily at " + sched.daily_at + " (" + sched.daily_reason + ")");
  cell.title = why.join("\n");
  if (sched.waiting_reason) {
    cell.classList.add("waiting");
    cell.append(el("div", "waiting: " + sched.waiting_reason, "reason"));
  }
  return cell;
}

async function loadRepositories() {
  const repos = await api("/api/v1/repositories");
  state.repos = new Map(repos.map((r) => [r.id, r]));
  const tbody = document.querySelector("#repos tbody");
  const rows = repos.map((r) => {
    const s = r.status || {};
    const tr = el("tr");
    tr.dataset.repoId = r.id;
    tr.append(el("td", r.name, "name"), el("td", r.path, "path"),
      el("td", r.state, "state-" + r.state), el("td", s.total_files, "files"),
      el("td", s.is_watching ? "yes" : "no"), el("td", when(s.last_scan_time)));
    const op = s.last_sync_operation;
    tr.append(el("td", op ? op.operation_type + " " + op.status + " " + seconds(op.duration_ms) : "none",
      op ? "status-" + op.status : ""));
    tr.append(scheduleCell(s.schedule));
    const button = el("button", "Reconcile", "reconcile");
    button.type = "button";
    button.addEventListener("click", () => reconcile(r.id, button));
    const cell = el("td");
    cell.append(button);
    tr.append(cell);
    return tr;
  });
  tbody.replaceChildren(...rows);
  return repos;
}

async function loadOperations(repos) {
  const lists = await Promise.all(repos.map((r) =>
    api("/api/v1/repositories/" + encodeURIComponent(r.id) + "/operations?limit=10").catch(() => [])));
  const ops = lists.flat().sort((a, b) => (a.start_time < b.start_time ? 1 : -1)).slice(0, 20);
  const rows = ops.map((o) => {
    const tr = el("tr");
    tr.append(el("td", when(o.start_time)), el("td", repoName(o.repository_id)),
      el("td", o.operation_type), el("td", o.status, "status-" + o.status),
      el("td", seconds(o.duration_ms)), el("td", o.files_scanned), el("td", o.files_added),
      el("td", o.files_updated), el("td", o.files_removed), el("td", o.error_message || ""));
    return tr;
  });
  document.querySelector("#operations tbody").replaceChildren(...rows);
}

async function refresh() {
  try {
    const repos = await loadRepositories();
    await loadOperations(repos);
  } catch (err) {
    if (err.message !== "unauthorized") showMessage("Cannot load: " + err.message);
  }
}

let refreshTimer = null;
function refreshSoon() {
  if (refreshTimer === null) refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 500);
}

function showMessage(text) {
  document.getElementById("message").textContent = text;
}

async function reconcile(id, button) {
  button.disabled = true;
  try {
    const answer = await api("/api/v1/repositories/" + encodeURIComponent(id) + "/reconcile", { method: "POST" });
    showMessage("Reconciliation of " + repoName(id) + " queued (request " + answer.request_id + ")");
  } catch (err) {
    showMessage("Reconciliation of " + repoName(id) + " refused: " + err.message);
  } finally {
    button.disabled = false;
    refreshSoon();
  }
}

function addChange(change) {
  const li = el("li");
  li.dataset.kind = change.kind;
  li.append(el("span", new Date(change.recorded_at).toLocaleTimeString(), "time"),
    el("span", change.kind, "kind kind-" + change.kind),
    el("span", repoName(change.repository_id) + ": ", "repo"),
    el("span", change.path, "path"));
  if (change.old_path !== undefined && change.old_path !== null) {
    li.append(el("span", " (from " + change.old_path + ")", "from"));
  }
  const list = document.getElementById("changes");
  list.prepend(li);
  while (list.children.length > MAX_CHANGES) list.lastChild.remove();
}

function handleEvent(event) {
  if (event.id) state.lastEventId = event.id;
  if (event.type === "change") {
    addChange(JSON.parse(event.data));
    refreshSoon();
  } else if (event.type === "resync") {
    // The feed no longer reaches back to our position: start again from the present.
    state.lastEventId = null;
    showMessage("The change stream was too far behind and restarted from now.");
  }
}

// A small Server-Sent Events reader over fetch(), resumable with Last-Event-ID.
async function stream() {
  for (;;) {
    try {
      const extra = { Accept: "text/event-stream" };
      if (state.lastEventId) extra["Last-Event-ID"] = state.lastEventId;
      const response = await fetch("/api/v1/events", { headers: headers(extra), cache: "no-store" });
      if (response.status === 401) { askToken(); return; }
      if (response.status === 410) { state.lastEventId = null; continue; }
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

document.getElementById("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.token = document.getElementById("token").value;
  sessionStorage.setItem("fsledger-token", state.token);
  document.getElementById("token-form").hidden = true;
  refresh();
  stream();
});

refresh();
setInterval(refresh, 5000);
stream();
