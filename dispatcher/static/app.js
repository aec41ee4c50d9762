// dispatcher dashboard: plain JavaScript over the hub's admin API and its event streams.
//
// Rules kept throughout: text from agents (ids, meta, results, event data) only ever
// goes into the page through textContent (see el()); the admin token lives in
// sessionStorage and travels only in the Authorization header; every stream is read
// with fetch() (EventSource cannot send that header) and reconnects by itself.
"use strict";

(() => {
  const TOKEN_KEY = "dispatcher.adminToken";
  const PAGE_SIZE = 200; // agents rows on one page
  const MAX_ACTIVITY = 300; // activity entries kept
  const MAX_COMMAND_ROWS = 200; // live rows kept in the commands list
  const RENDER_EVERY_MS = 150; // live updates are applied at most this often
  const POLL_MS = 2000; // agents refresh when the hub has no cluster stream
  const REFRESH_MS = 20000; // agents snapshot refresh (last seen)
  const SETTLE_MS = 2500; // a second read of the agents after a stream opens

  // What a browser test (and anyone curious) can read: render timings, long tasks.
  const metrics = { agentsRender: [], firstFullRender: null, longTasks: [], streamOpens: 0,
    streamItems: 0 };
  window.dashboardMetrics = metrics;
  try {
    new PerformanceObserver((list) => {
      for (const entry of list.getEntries()) metrics.longTasks.push(entry.duration);
    }).observe({ type: "longtask", buffered: true });
  } catch { /* no long-task timing in this browser */ }

  const $ = (id) => document.getElementById(id);

  // An element; string and number children become text nodes, never HTML.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const [name, value] of Object.entries(attrs)) {
        if (value === undefined || value === null || value === false) continue;
        if (name === "class") node.className = value;
        else if (name === "dataset") Object.assign(node.dataset, value);
        else node.setAttribute(name, value === true ? "" : String(value));
      }
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function ago(ms) {
    if (!ms) return "";
    const s = Math.round((Date.now() - ms) / 1000);
    if (s < 5) return "just now";
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return new Date(ms).toLocaleString();
  }

  // A cell whose relative time is refreshed by the ticker below.
  function timeCell(tag, ms) {
    return el(tag, { dataset: { ts: String(ms || 0) }, title: ms ? new Date(ms).toISOString() : "" },
      ago(ms));
  }

  // A row that opens something: by click, or Enter when focused (keyboard users).
  function onActivate(row, open) {
    row.tabIndex = 0;
    row.addEventListener("click", open);
    row.addEventListener("keydown", (event) => {
      if (event.key === "Enter") open();
    });
  }

  function copyable(text) {
    return el("code", { class: "copy", title: "click to copy" }, text);
  }

  const pretty = (value) => JSON.stringify(value === undefined ? null : value, null, 2);

  function short(value, max = 160) {
    const text = typeof value === "string" ? value : JSON.stringify(value);
    return text === undefined ? "" : text.length > max ? text.slice(0, max) + "…" : text;
  }

  // ------------------------------------------------------------------ banner
  const problems = new Map(); // reason -> message
  function setProblem(reason, message) {
    if (message) problems.set(reason, message);
    else problems.delete(reason);
    const banner = $("banner");
    banner.textContent = [...problems.values()].join(" · ");
    banner.hidden = problems.size === 0;
  }

  // ------------------------------------------------------------------ HTTP
  class AuthError extends Error {}
  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    live: false, // signed in and showing the hub
    generation: 0, // bumped on sign-out: loops of an older generation stop
    view: "agents",
    agents: new Map(), // id -> {info, search}
    sorted: null, // agents sorted by id (null: to rebuild)
    agentPage: 0,
    inflight: new Map(), // command id -> agent id, commands not COMPLETE
    inflightCount: new Map(), // agent id -> number
    hasStream: true,
    hasHistory: true,
    commandQuery: {},
    commandNext: null,
    commandRows: new Map(), // command id -> row
    openCommand: null,
    openJob: null,
    jobRows: new Map(),
    aborts: new Set(), // AbortControllers of open streams
  };

  function headers(extra) {
    const out = { ...extra };
    if (state.token) out.Authorization = `Bearer ${state.token}`;
    return out;
  }

  async function api(path, { method = "GET", body } = {}) {
    let response;
    try {
      response = await fetch(path, {
        method, cache: "no-store",
        headers: headers(body === undefined ? { Accept: "application/json" }
          : { Accept: "application/json", "Content-Type": "application/json" }),
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch {
      setProblem("hub", "The hub cannot be reached; retrying by itself.");
      throw new ApiError(0, "unreachable", "the hub cannot be reached");
    }
    setProblem("hub", null);
    if (response.status === 401) {
      toLogin(state.token ? "The hub refused the token (wrong or changed). Sign in again."
        : "This hub needs its admin token.");
      throw new AuthError("unauthorized");
    }
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = null; }
    if (!response.ok) {
      const err = (data && data.error) || {};
      throw new ApiError(response.status, err.code || `http_${response.status}`,
        err.message || response.statusText);
    }
    return data;
  }

  // Read a Server-Sent Events stream with fetch(): `event:` and `data:` lines, a
  // blank line ends an event, `:` lines are keep-alive comments. Resolves when the
  // hub closes the stream; rejects on a network error or a refused request.
  async function readStream(path, onEvent, { onOpen, signal } = {}) {
    let response;
    try {
      response = await fetch(path, { headers: headers({ Accept: "text/event-stream" }),
        cache: "no-store", signal });
    } catch (exc) {
      if (signal && signal.aborted) throw exc;
      throw new ApiError(0, "unreachable", "the hub cannot be reached");
    }
    if (response.status === 401) {
      toLogin("The hub refused the token (wrong or changed). Sign in again.");
      throw new AuthError("unauthorized");
    }
    if (!response.ok) {
      let message = response.statusText;
      try { message = (await response.json()).error.message; } catch { /* not JSON */ }
      throw new ApiError(response.status, `http_${response.status}`, message);
    }
    metrics.streamOpens += 1;
    if (onOpen) await onOpen();
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let rest = "";
    let event = "message";
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      const lines = (rest + value).split("\n");
      rest = lines.pop();
      for (let line of lines) {
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length) {
            let parsed;
            try { parsed = JSON.parse(data.join("\n")); } catch { parsed = data.join("\n"); }
            onEvent(event, parsed);
          }
          event = "message";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "event") event = text;
          else if (field === "data") data.push(text);
        }
      }
    }
  }

  function openStream() {
    const controller = new AbortController();
    state.aborts.add(controller);
    return controller;
  }

  function closeStream(controller) {
    controller.abort();
    state.aborts.delete(controller);
  }

  const swallow = (exc) => {
    if (exc instanceof AuthError || (exc && exc.name === "AbortError")) return;
    if (exc instanceof ApiError && exc.status === 0) return; // the banner says it
    console.warn("dashboard:", exc && exc.message);
  };

  // ------------------------------------------------------------------ sign in
  function toLogin(message) {
    state.live = false;
    state.generation += 1;
    for (const controller of state.aborts) controller.abort();
    state.aborts.clear();
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    problems.clear();
    setProblem("none", null);
    for (const view of document.querySelectorAll(".view")) view.hidden = true;
    $("tabs").hidden = true;
    $("logout").hidden = true;
    $("login-view").hidden = false;
    $("login-message").textContent = message || "";
    const field = $("login").elements.token;
    field.value = "";
    field.focus();
  }

  $("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = $("login").elements.token.value.trim();
    if (!token) return;
    state.token = token;
    try {
      await api("agents");
    } catch (exc) {
      if (!(exc instanceof AuthError)) {
        state.token = null;
        $("login-message").textContent = `Cannot check the token: ${exc.message}`;
      }
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    enter();
  });

  $("logout").addEventListener("click", () => toLogin("Signed out."));

  async function needsToken() {
    // The API description says which routes need the token, without a 401 to get.
    for (let delay = 500; ; delay = Math.min(delay * 2, 10000)) {
      try {
        const response = await fetch("openapi.json", { cache: "no-store" });
        const doc = await response.json();
        setProblem("hub", null);
        const op = doc.paths && doc.paths["/agents"] && doc.paths["/agents"].get;
        return Boolean(op && op.security && op.security.length);
      } catch {
        setProblem("hub", "The hub cannot be reached; retrying by itself.");
        await sleep(delay);
      }
    }
  }

  async function start() {
    if (await needsToken() && !state.token) {
      toLogin("");
      return;
    }
    enter();
  }

  function enter() {
    state.live = true;
    state.generation += 1;
    $("login-view").hidden = true;
    $("tabs").hidden = false;
    $("logout").hidden = !state.token;
    show(state.view);
    const generation = state.generation;
    clusterLoop(generation).catch(swallow);
    refreshLoop(generation).catch(swallow);
    loadHubInfo().catch(swallow);
  }

  const current = (generation) => state.live && state.generation === generation;

  // ------------------------------------------------------------------ views
  for (const button of document.querySelectorAll("#tabs button")) {
    button.addEventListener("click", () => show(button.dataset.view));
  }

  function show(view) {
    state.view = view;
    for (const button of document.querySelectorAll("#tabs button")) {
      button.classList.toggle("active", button.dataset.view === view);
    }
    for (const section of document.querySelectorAll(".view")) {
      section.hidden = section.id !== `view-${view}`;
    }
    if (view === "agents") renderAgents();
    if (view === "commands") loadCommands().catch(swallow);
    if (view === "jobs") loadJobs().catch(swallow);
    tick();
  }

  // Relative times of the visible view, refreshed every few seconds.
  function tick() {
    const section = $(`view-${state.view}`);
    if (!section) return;
    for (const cell of section.querySelectorAll("[data-ts]")) {
      cell.textContent = ago(Number(cell.dataset.ts));
    }
  }
  setInterval(tick, 5000);

  // Click an id to copy it.
  document.addEventListener("click", (event) => {
    const target = event.target.closest && event.target.closest(".copy");
    if (!target) return;
    event.stopPropagation();
    const done = () => {
      target.classList.add("copied");
      setTimeout(() => target.classList.remove("copied"), 1200);
    };
    const selectIt = () => {
      const range = document.createRange();
      range.selectNodeContents(target);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(target.textContent).then(done, selectIt);
    } else {
      selectIt();
    }
  }, true);

  let health = null;

  async function loadHubInfo() {
    health = await api("healthz").catch(() => null);
    showHubInfo();
  }

  // The engine, and this hub or how many hubs the connected agents are spread over.
  function showHubInfo() {
    if (!health) return;
    const hubs = new Set([...state.agents.values()].map((a) => a.info.hub_id));
    hubs.add(health.hub);
    $("hub-info").textContent = `${health.engine} engine · ` + (hubs.size > 1
      ? `cluster of ${hubs.size} hubs (this one: ${health.hub})` : `hub ${health.hub}`)
      + (state.hasStream ? "" : " · no live stream on this hub: refreshing every 2 s");
  }

  // ------------------------------------------------------------------ live updates
  // Stream items are queued and applied in batches: a job on thousands of agents
  // sends thousands of items a second, and the page must stay responsive.
  let queue = [];
  let flushTimer = null;
  let agentsDirty = false;

  function enqueue(kind, data) {
    metrics.streamItems += 1;
    queue.push([kind, data]);
    if (flushTimer === null) flushTimer = setTimeout(flush, RENDER_EVERY_MS);
  }

  function flush() {
    flushTimer = null;
    const items = queue;
    queue = [];
    const activity = [];
    const commands = new Map(); // the latest state of each command in this batch
    const jobs = new Map();
    for (const [kind, data] of items) {
      if (kind === "agent-connected") {
        addAgent(data);
        activity.push([kind, data]);
      } else if (kind === "agent-disconnected") {
        removeAgent(data.id);
        activity.push([kind, data]);
      } else if (kind === "command") {
        trackCommand(data);
        commands.delete(data.id);
        commands.set(data.id, data);
      } else if (kind === "job") {
        jobs.set(data.id, data);
      } else if (kind === "event") {
        activity.push([kind, data]);
      }
    }
    if (state.view === "commands") {
      for (const cmd of [...commands.values()].slice(-MAX_COMMAND_ROWS)) liveCommand(cmd);
    } else if (state.openCommand !== null && commands.has(state.openCommand)) {
      renderCommand(commands.get(state.openCommand));
    }
    if (state.view === "jobs") for (const job of jobs.values()) liveJob(job);
    if (activity.length) addActivity(activity.slice(-MAX_ACTIVITY));
    if (agentsDirty) {
      agentsDirty = false;
      $("agent-count").textContent = String(state.agents.size);
      if (state.view === "agents") renderAgents();
    }
  }

  async function clusterLoop(generation) {
    let delay = 500;
    while (current(generation)) {
      const controller = openStream();
      try {
        await readStream("stream", enqueue, {
          signal: controller.signal,
          onOpen: async () => {
            setProblem("stream", null);
            delay = 500;
            await loadAgents();
            await seedInflight();
            // Other hubs of a cluster start publishing to a new watcher within about a
            // second (they poll for watchers): read the agents once more after that.
            setTimeout(() => {
              if (current(generation)) loadAgents().catch(swallow);
            }, SETTLE_MS);
          },
        });
        if (!current(generation)) return;
        setProblem("stream", "The live stream ended; reconnecting…");
      } catch (exc) {
        if (exc instanceof AuthError || !current(generation)) return;
        if (exc instanceof ApiError && exc.status === 404) {
          // A hub without the cluster stream: the agents list is refreshed instead.
          state.hasStream = false;
          return pollLoop(generation);
        }
        setProblem("stream", `Live updates lost (${exc.message}); reconnecting in `
          + `${Math.max(1, Math.round(delay / 1000))} s…`);
      } finally {
        closeStream(controller);
      }
      await sleep(delay * (1 + Math.random() * 0.2));
      delay = Math.min(delay * 2, 15000);
    }
  }

  async function pollLoop(generation) {
    loadHubInfo().catch(swallow);
    while (current(generation)) {
      await loadAgents({ announce: true }).catch(swallow);
      await sleep(POLL_MS);
    }
  }

  async function refreshLoop(generation) {
    for (;;) {
      await sleep(REFRESH_MS);
      if (!current(generation)) return;
      if (state.hasStream) {
        await loadAgents().catch(swallow);
        await seedInflight().catch(swallow);
      }
    }
  }

  // ------------------------------------------------------------------ agents
  function addAgent(info) {
    const meta = info.meta && typeof info.meta === "object" ? info.meta : {};
    const search = [info.id, info.hub_id, ...Object.entries(meta).map(([k, v]) =>
      `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`)].join(" ").toLowerCase();
    if (!state.agents.has(info.id)) state.sorted = null;
    state.agents.set(info.id, { info, search });
    agentsDirty = true;
  }

  function removeAgent(id) {
    if (state.agents.delete(id)) {
      state.sorted = null;
      agentsDirty = true;
    }
  }

  async function loadAgents({ announce = false } = {}) {
    const list = await api("agents");
    const seen = new Set();
    const activity = [];
    for (const info of list) {
      seen.add(info.id);
      if (announce && !state.agents.has(info.id)) activity.push(["agent-connected", info]);
      addAgent(info);
    }
    for (const [id, agent] of [...state.agents]) {
      if (!seen.has(id)) {
        if (announce) activity.push(["agent-disconnected", { ...agent.info, reason: "" }]);
        removeAgent(id);
      }
    }
    if (activity.length) addActivity(activity);
    showHubInfo();
    agentsDirty = false;
    $("agent-count").textContent = String(state.agents.size);
    if (state.view === "agents") renderAgents();
  }

  // Commands not finished, read from the history when the stream opens and every
  // refresh (at most 1,000 of each status); the stream keeps the counts live between.
  async function seedInflight() {
    if (!state.hasHistory) return;
    const fresh = new Map();
    for (const status of ["PENDING", "ACTIVE"]) {
      let page;
      try {
        page = await api(`commands?status=${status}&limit=1000`);
      } catch (exc) {
        if (exc instanceof ApiError && exc.status === 404) {
          state.hasHistory = false;
          return;
        }
        throw exc;
      }
      for (const cmd of page.commands) fresh.set(cmd.id, cmd.agent_id);
    }
    state.inflight = fresh;
    state.inflightCount = new Map();
    for (const agentId of fresh.values()) {
      state.inflightCount.set(agentId, (state.inflightCount.get(agentId) || 0) + 1);
    }
    $("agent-count").textContent = String(state.agents.size);
    if (state.view === "agents") renderAgents();
  }

  function trackCommand(cmd) {
    const was = state.inflight.get(cmd.id);
    if (cmd.status === "COMPLETE") {
      if (was === undefined) return;
      state.inflight.delete(cmd.id);
      state.inflightCount.set(was, (state.inflightCount.get(was) || 1) - 1);
    } else if (was === undefined) {
      state.inflight.set(cmd.id, cmd.agent_id);
      state.inflightCount.set(cmd.agent_id, (state.inflightCount.get(cmd.agent_id) || 0) + 1);
    } else {
      return;
    }
    if (state.agents.has(cmd.agent_id)) agentsDirty = true;
  }

  function metaCell(meta) {
    const cell = el("td", { class: "meta" });
    if (meta && typeof meta === "object") {
      for (const [key, value] of Object.entries(meta)) {
        cell.append(el("span", null, el("span", { class: "k" }, `${key}=`),
          typeof value === "string" ? value : JSON.stringify(value)));
      }
    }
    return cell;
  }

  function renderAgents() {
    const started = performance.now();
    if (state.sorted === null) {
      state.sorted = [...state.agents.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    }
    const query = $("agent-filter").value.trim().toLowerCase();
    const ids = query
      ? state.sorted.filter((id) => state.agents.get(id).search.includes(query))
      : state.sorted;
    const pages = Math.max(1, Math.ceil(ids.length / PAGE_SIZE));
    state.agentPage = Math.min(state.agentPage, pages - 1);
    const first = state.agentPage * PAGE_SIZE;
    const rows = document.createDocumentFragment();
    for (const id of ids.slice(first, first + PAGE_SIZE)) {
      const { info } = state.agents.get(id);
      rows.append(el("tr", { dataset: { agentId: id } },
        el("td", null, copyable(id)),
        metaCell(info.meta),
        el("td", { class: "mono" }, info.hub_id),
        timeCell("td", info.connected_at),
        timeCell("td", info.last_seen),
        el("td", null, String(state.inflightCount.get(id) || 0))));
    }
    $("agents-body").replaceChildren(rows);
    $("agent-shown").textContent = query
      ? `${ids.length} of ${state.agents.size} agents match` : `${state.agents.size} agents`;
    $("agents-page").textContent = `page ${state.agentPage + 1} of ${pages}`;
    $("agents-prev").disabled = state.agentPage === 0;
    $("agents-next").disabled = state.agentPage >= pages - 1;
    const took = performance.now() - started;
    metrics.agentsRender.push(took);
    if (metrics.firstFullRender === null && state.agents.size > 0) {
      metrics.firstFullRender = { ms: took, at: performance.now(), agents: state.agents.size,
        rows: $("agents-body").children.length };
    }
  }

  $("agent-filter").addEventListener("input", () => {
    state.agentPage = 0;
    renderAgents();
  });
  $("agents-prev").addEventListener("click", () => {
    state.agentPage = Math.max(0, state.agentPage - 1);
    renderAgents();
  });
  $("agents-next").addEventListener("click", () => {
    state.agentPage += 1;
    renderAgents();
  });

  // ------------------------------------------------------------------ activity
  function addActivity(items) {
    const list = $("activity");
    const fresh = document.createDocumentFragment();
    for (const [kind, data] of items.reverse()) {
      const now = Date.now();
      if (kind === "event") {
        fresh.append(el("li", { dataset: { eventKey: String(data.key) } },
          timeCell("span", now), el("span", { class: "kind" }, "event"),
          el("span", null, copyable(String(data.from))),
          el("strong", null, String(data.key)),
          el("span", { class: "data" }, short(data.data))));
      } else {
        const connected = kind === "agent-connected";
        fresh.append(el("li", { dataset: { activity: connected ? "connected" : "disconnected" } },
          timeCell("span", now), el("span", { class: "kind" }, connected ? "connected" : "disconnected"),
          el("span", null, copyable(String(data.id))),
          el("span", { class: "data" }, connected ? `hub ${data.hub_id}` : data.reason || "")));
      }
    }
    list.prepend(fresh);
    while (list.children.length > MAX_ACTIVITY) list.lastElementChild.remove();
  }

  // ------------------------------------------------------------------ commands
  function commandRow(cmd) {
    const row = el("tr", { class: "clickable", dataset: { commandId: cmd.id, outcome: cmd.outcome || "" } },
      el("td", null, copyable(cmd.id)),
      el("td", null, cmd.agent_id),
      el("td", null, cmd.key),
      el("td", null, cmd.status),
      el("td", { class: `outcome outcome-${cmd.outcome || "none"}` }, cmd.outcome || ""),
      timeCell("td", cmd.ts));
    onActivate(row, () => openCommand(cmd.id).catch(swallow));
    if (state.openCommand === cmd.id) row.classList.add("selected");
    return row;
  }

  function commandQueryString(extra) {
    const params = new URLSearchParams();
    for (const [name, value] of Object.entries({ ...state.commandQuery, ...extra })) {
      if (value) params.set(name, value);
    }
    return params.toString();
  }

  async function loadCommands({ more = false } = {}) {
    const body = $("commands-body");
    let page;
    try {
      page = await api(`commands?${commandQueryString({ limit: "50",
        cursor: more ? state.commandNext : "" })}`);
    } catch (exc) {
      if (exc instanceof ApiError && exc.status === 404) {
        $("commands-note").textContent = "This hub keeps no command history; "
          + "open a command by its id.";
        return;
      }
      if (exc instanceof ApiError && exc.status === 400) {
        $("commands-note").textContent = exc.message;
        return;
      }
      throw exc;
    }
    $("commands-note").textContent = "";
    if (!more) {
      body.replaceChildren();
      state.commandRows.clear();
    }
    for (const cmd of page.commands) {
      const row = commandRow(cmd);
      state.commandRows.set(cmd.id, row);
      body.append(row);
    }
    state.commandNext = page.next;
    $("commands-more").hidden = !page.next;
  }

  function matchesQuery(cmd) {
    const q = state.commandQuery;
    return (!q.agent || q.agent === cmd.agent_id) && (!q.key || q.key === cmd.key)
      && (!q.status || q.status === cmd.status) && (!q.outcome || q.outcome === cmd.outcome)
      && (!q.job || q.job === cmd.job);
  }

  function liveCommand(cmd) {
    const old = state.commandRows.get(cmd.id);
    if (old) {
      const row = commandRow(cmd);
      old.replaceWith(row);
      state.commandRows.set(cmd.id, row);
    } else if (matchesQuery(cmd)) {
      const row = commandRow(cmd);
      state.commandRows.set(cmd.id, row);
      const body = $("commands-body");
      body.prepend(row);
      while (body.children.length > MAX_COMMAND_ROWS) {
        state.commandRows.delete(body.lastElementChild.dataset.commandId);
        body.lastElementChild.remove();
        state.commandNext = state.commandNext || null;
      }
    }
    if (state.openCommand === cmd.id) renderCommand(cmd);
  }

  $("command-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = $("command-filters").elements;
    state.commandQuery = {};
    for (const name of ["agent", "key", "status", "outcome", "job"]) {
      state.commandQuery[name] = form[name].value.trim();
    }
    const wanted = $("command-open").value.trim();
    if (wanted) openCommand(wanted).catch(swallow);
    loadCommands().catch(swallow);
  });
  $("commands-more").addEventListener("click", () => loadCommands({ more: true }).catch(swallow));

  let commandStream = null;

  function renderCommand(cmd) {
    $("command-detail").hidden = false;
    $("cd-id").textContent = cmd.id;
    const fields = [["agent", cmd.agent_id], ["key", cmd.key], ["status", cmd.status],
      ["outcome", cmd.outcome || "—"], ["job", cmd.job], ["group", cmd.group],
      ["submitted", cmd.ts ? `${ago(cmd.ts)} (${new Date(cmd.ts).toISOString()})` : ""],
      ["updated", cmd.updated ? ago(cmd.updated) : ""], ["origin hub", cmd.origin]];
    $("cd-fields").replaceChildren(...fields.filter(([, v]) => v)
      .flatMap(([name, value]) => [el("dt", null, name), el("dd", null, String(value))]));
    $("cd-payload").textContent = pretty(cmd.payload);
    const failed = cmd.error !== null && cmd.error !== undefined;
    $("cd-answer-title").textContent = failed ? "Error" : "Result";
    $("cd-answer").textContent = cmd.status === "COMPLETE"
      ? pretty(failed ? cmd.error : cmd.result) : "(not finished)";
    $("cd-cancel").hidden = cmd.status === "COMPLETE";
    for (const row of document.querySelectorAll("#commands-body tr.selected")) {
      row.classList.remove("selected");
    }
    const row = state.commandRows.get(cmd.id);
    if (row) row.classList.add("selected");
  }

  async function openCommand(id) {
    if (commandStream) closeStream(commandStream);
    commandStream = null;
    state.openCommand = id;
    $("cd-message").textContent = "";
    $("cd-progress").replaceChildren();
    let cmd;
    try {
      cmd = await api(`commands/${encodeURIComponent(id)}`);
    } catch (exc) {
      if (exc instanceof ApiError && exc.status !== 0) {
        $("command-detail").hidden = false;
        $("cd-id").textContent = id;
        $("cd-message").textContent = exc.message;
        return;
      }
      throw exc;
    }
    if (state.openCommand !== id) return;
    renderCommand(cmd);
    if (cmd.status === "COMPLETE") return;
    const controller = openStream();
    commandStream = controller;
    try {
      await readStream(`commands/${encodeURIComponent(id)}/stream`, (event, data) => {
        if (state.openCommand !== id) return;
        if (event === "progress") {
          $("cd-progress").append(el("li", null, short(data.data !== undefined ? data.data : data, 400)));
        } else if (event === "end") {
          renderCommand(data);
        }
      }, { signal: controller.signal });
    } catch (exc) {
      if (!(exc instanceof ApiError && exc.status === 404)) throw exc;
    } finally {
      closeStream(controller);
    }
  }

  $("cd-cancel").addEventListener("click", async () => {
    const id = state.openCommand;
    if (!id) return;
    try {
      renderCommand(await api(`commands/${encodeURIComponent(id)}`, { method: "DELETE" }));
      $("cd-message").textContent = "Cancelled.";
    } catch (exc) {
      if (exc instanceof ApiError && exc.status !== 0) $("cd-message").textContent = exc.message;
      else swallow(exc);
    }
  });

  // ------------------------------------------------------------------ jobs
  function countsText(target, counts) {
    target.replaceChildren(...Object.entries(counts || {})
      .filter(([, n]) => n > 0)
      .map(([name, n]) => el("span", { class: `outcome-${name}` }, `${name} ${n}`)));
  }

  function jobRow(job) {
    const counts = el("td", { class: "counts" });
    countsText(counts, job.counts);
    const row = el("tr", { class: "clickable", dataset: { jobId: job.id, status: job.status } },
      el("td", null, copyable(job.id)), el("td", null, job.key),
      el("td", null, short(job.target, 60)), el("td", null, job.status), counts,
      timeCell("td", job.ts));
    onActivate(row, () => openJob(job.id).catch(swallow));
    if (state.openJob === job.id) row.classList.add("selected");
    return row;
  }

  async function loadJobs() {
    const jobs = await api("jobs?limit=100");
    state.jobRows.clear();
    $("jobs-body").replaceChildren(...jobs.map((job) => {
      const row = jobRow(job);
      state.jobRows.set(job.id, row);
      return row;
    }));
  }

  function liveJob(job) {
    const row = jobRow(job);
    const old = state.jobRows.get(job.id);
    if (old) old.replaceWith(row);
    else $("jobs-body").prepend(row);
    state.jobRows.set(job.id, row);
  }

  // One agent's part of a job as a table row, filled in as it ends.
  class Parts {
    constructor(body, countsEl, attribute) {
      this.body = body;
      this.countsEl = countsEl;
      this.attribute = attribute;
      this.rows = new Map();
      this.states = new Map();
      this.counts = {};
      this.dirty = false;
    }

    reset(agents) {
      this.rows.clear();
      this.states.clear();
      this.counts = {};
      const fragment = document.createDocumentFragment();
      for (const id of agents) {
        const row = el("tr", { [this.attribute]: id, "data-outcome": "pending" },
          el("td", null, copyable(id)), el("td", { class: "outcome" }, "pending"),
          el("td", { class: "progress" }), el("td", { class: "answer mono" }));
        this.rows.set(id, row);
        this.states.set(id, "pending");
        this.counts.pending = (this.counts.pending || 0) + 1;
        fragment.append(row);
      }
      this.body.replaceChildren(fragment);
      this.showCounts();
    }

    set(id, outcome, answer) {
      const row = this.rows.get(id);
      if (!row) return;
      const old = this.states.get(id);
      if (old !== outcome) {
        this.counts[old] -= 1;
        this.counts[outcome] = (this.counts[outcome] || 0) + 1;
        this.states.set(id, outcome);
      }
      row.dataset.outcome = outcome;
      row.querySelector(".outcome").textContent = outcome;
      if (answer !== undefined) row.querySelector(".answer").textContent = answer;
      this.scheduleCounts();
    }

    command(cmd) {
      if (cmd.outcome) {
        const failed = cmd.error !== null && cmd.error !== undefined;
        this.set(cmd.agent_id, cmd.outcome, short(failed
          ? `${cmd.error.code}: ${cmd.error.message}` : cmd.result, 300));
      } else if (cmd.status === "ACTIVE" || cmd.status === "PENDING") {
        this.set(cmd.agent_id, cmd.status === "ACTIVE" ? "active" : "pending");
      }
    }

    progress(id, data) {
      const row = this.rows.get(id);
      if (row) row.querySelector(".progress").textContent = short(data, 120);
    }

    scheduleCounts() {
      if (this.dirty) return;
      this.dirty = true;
      setTimeout(() => {
        this.dirty = false;
        this.showCounts();
      }, RENDER_EVERY_MS);
    }

    showCounts() {
      countsText(this.countsEl, this.counts);
    }
  }

  // Follow a job until it ends: its stored parts first, then its stream; after a
  // drop, read the stored parts again and go on.
  async function followJob(jobId, parts, isCurrent, onEnd) {
    let delay = 500;
    while (isCurrent()) {
      let job;
      try {
        job = await api(`jobs/${encodeURIComponent(jobId)}`);
      } catch (exc) {
        if (exc instanceof AuthError || !(exc instanceof ApiError) || exc.status !== 0) throw exc;
        await sleep(delay);
        delay = Math.min(delay * 2, 15000);
        continue;
      }
      if (!isCurrent()) return;
      for (const cmd of job.commands || []) parts.command(cmd);
      if (job.status === "COMPLETE") {
        onEnd(job);
        return;
      }
      const controller = openStream();
      let ended = false;
      try {
        await readStream(`jobs/${encodeURIComponent(jobId)}/stream`, (event, data) => {
          if (!isCurrent()) return;
          if (event === "result") parts.command(data);
          else if (event === "progress") parts.progress(data.agent_id, data.data);
          else if (event === "end") {
            ended = true;
            onEnd(data);
          }
        }, { signal: controller.signal, onOpen: () => setProblem("job", null) });
      } catch (exc) {
        if (exc instanceof AuthError || (exc && exc.name === "AbortError")) return;
        setProblem("job", `The job's stream dropped (${exc.message}); reconnecting…`);
      } finally {
        closeStream(controller);
      }
      if (ended) return;
      await sleep(delay);
      delay = Math.min(delay * 2, 15000);
    }
  }

  const jobParts = new Parts($("jd-parts"), $("jd-counts"), "data-part-agent");

  function jobSummary(job) {
    $("jd-summary").textContent = `${job.key} on ${short(job.target, 80)} · ${job.status}`
      + (job.batch ? ` · batch ${job.batch}` : "")
      + (job.max_failures !== null && job.max_failures !== undefined
        ? ` · max failures ${job.max_failures}` : "");
    $("jd-cancel").hidden = job.status === "COMPLETE";
  }

  async function openJob(id) {
    state.openJob = id;
    for (const row of document.querySelectorAll("#jobs-body tr.selected")) row.classList.remove("selected");
    const row = state.jobRows.get(id);
    if (row) row.classList.add("selected");
    $("job-detail").hidden = false;
    $("jd-id").textContent = id;
    $("jd-message").textContent = "";
    const job = await api(`jobs/${encodeURIComponent(id)}`);
    if (state.openJob !== id) return;
    jobSummary(job);
    jobParts.reset(job.agents);
    const generation = state.generation;
    await followJob(id, jobParts, () => state.openJob === id && current(generation), (end) => {
      jobSummary(end);
      countsText($("jd-counts"), end.counts);
      if (state.view === "jobs") liveJob(end);
    });
  }

  $("jd-cancel").addEventListener("click", async () => {
    const id = state.openJob;
    if (!id) return;
    try {
      jobSummary(await api(`jobs/${encodeURIComponent(id)}`, { method: "DELETE" }));
      $("jd-message").textContent = "Cancelled.";
    } catch (exc) {
      if (exc instanceof ApiError && exc.status !== 0) $("jd-message").textContent = exc.message;
      else swallow(exc);
    }
  });

  // ------------------------------------------------------------------ run
  const runParts = new Parts($("run-results"), $("run-counts"), "data-result-agent");
  let runJob = null;

  function numberOrPercent(text, name) {
    const value = text.trim();
    if (!value) return undefined;
    if (/^\d+$/.test(value)) return Number(value);
    if (/^\d+(\.\d+)?%$/.test(value)) return value;
    throw new Error(`${name} must be a number or a percentage such as 25%`);
  }

  $("run").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = $("run").elements;
    const error = $("run-error");
    error.textContent = "";
    const body = { target: form.target.value.trim(), key: form.key.value.trim() };
    try {
      if (!body.target) throw new Error("target is required");
      if (!body.key) throw new Error("key is required");
      const text = form.payload.value.trim();
      if (text) {
        try {
          body.payload = JSON.parse(text);
        } catch (exc) {
          throw new Error(`payload is not JSON: ${exc.message}`);
        }
      }
      const batch = numberOrPercent(form.batch.value, "batch");
      if (batch !== undefined) body.batch = batch;
      const failures = numberOrPercent(form.max_failures.value, "max failures");
      if (failures !== undefined) body.max_failures = failures;
      if (form.timeout.value.trim()) body.timeout = Number(form.timeout.value);
    } catch (exc) {
      error.textContent = exc.message;
      return;
    }
    const button = $("run").querySelector("button[type=submit]");
    button.disabled = true;
    let job;
    try {
      job = await api("jobs", { method: "POST", body });
    } catch (exc) {
      if (exc instanceof ApiError) error.textContent = exc.status ? exc.message : "The hub cannot be reached.";
      else swallow(exc);
      return;
    } finally {
      button.disabled = false;
    }
    runJob = job.id;
    $("run-output").hidden = false;
    $("run-job").textContent = job.id;
    runParts.reset(job.agents);
    const generation = state.generation;
    followJob(job.id, runParts, () => runJob === job.id && current(generation), (end) => {
      countsText($("run-counts"), end.counts);
    }).catch(swallow);
  });

  start().catch(swallow);
})();
