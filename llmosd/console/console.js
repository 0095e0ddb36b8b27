// The llmosd console: polls /api/stats once a second and draws it with uPlot; reads /api/status and the
// manifests for the tables; runs the playground against /v1. No framework, no other origin (the CSP
// forbids one). Everything a server or client sent is put in the page as text, never as markup.
"use strict";
(() => {
  const TOKEN_KEY = "llmosd.token"; // session storage: gone when the tab closes
  const WINDOW_S = 120; // the charts' span
  const QUANTILE_S = 10; // latency quantiles are over this many seconds of samples
  const COLORS = ["#2f6fde", "#d9480f", "#2b8a3e", "#9c36b5", "#e67700", "#0b7285", "#c2255c", "#5f3dc4"];
  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let generation = 0; // the polling loops of an older start stop when this moves on
  let polling = false;

  class NeedToken extends Error {
    constructor(message, status) {
      super(message);
      this.status = status; // 401: no valid token; 403: a token without the read scope
    }
  }

  async function call(path, init = {}) {
    const headers = new Headers(init.headers || {});
    if (token) headers.set("Authorization", "Bearer " + token);
    const response = await fetch(path, { ...init, headers, cache: "no-store" });
    if (response.status === 401) throw new NeedToken(token ? "the box refused this token" : "", 401);
    return response;
  }

  async function errorOf(response) {
    const body = await response.json().catch(() => null);
    const message = body && body.error && body.error.message ? body.error.message : response.statusText;
    return new Error(response.status + ": " + message);
  }

  async function getJson(path) {
    const response = await call(path);
    if (response.status === 403) throw new NeedToken((await errorOf(response)).message, 403); // no read scope
    if (!response.ok) throw await errorOf(response);
    return response.json();
  }

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  // ---- Rates and quantiles from two cumulative samples (Prometheus' rate() and histogram_quantile()).
  function quantile(q, bounds, before, after) {
    const counts = after.map((c, i) => c - (before ? before[i] : 0));
    const total = counts[counts.length - 1];
    if (!(total > 0) || counts.some((c) => c < 0)) return null;
    const rank = q * total;
    for (let i = 0; i < bounds.length; i++) {
      if (counts[i] >= rank) {
        const lower = i === 0 ? 0 : bounds[i - 1];
        const below = i === 0 ? 0 : counts[i - 1];
        const inBucket = counts[i] - below;
        return lower + (bounds[i] - lower) * (inBucket > 0 ? (rank - below) / inBucket : 1);
      }
    }
    return bounds[bounds.length - 1]; // in the +Inf bucket: the largest finite bound, as Prometheus says
  }

  function rate(now, before, field, dt) {
    if (!before || !(dt > 0)) return null;
    const d = now[field] - before[field];
    return d >= 0 ? d / dt : null; // a reloaded model restarts its counters: a gap, not a negative rate
  }

  // ---- Charts: one uPlot per figure, series made again when the set of models or devices changes.
  class Chart {
    constructor(id, unit) {
      this.node = $(id);
      this.unit = unit;
      this.keys = [];
      this.xs = [];
      this.ys = new Map();
      this.plot = null;
      this.hovered = false; // while the pointer is over it the legend follows the cursor, else the latest
      this.node.addEventListener("mouseenter", () => (this.hovered = true));
      this.node.addEventListener("mouseleave", () => (this.hovered = false));
    }

    push(x, values) {
      // values: Map of series label -> number or null
      const keys = [...values.keys()];
      if (keys.join("\u0000") !== this.keys.join("\u0000")) this.reset(keys);
      this.xs.push(x);
      for (const k of this.keys) this.ys.get(k).push(values.get(k) ?? null);
      while (this.xs.length && this.xs[0] < x - WINDOW_S) {
        this.xs.shift();
        for (const k of this.keys) this.ys.get(k).shift();
      }
      this.draw();
    }

    reset(keys) {
      const old = this.ys;
      this.ys = new Map(keys.map((k) => [k, old.has(k) ? old.get(k) : this.xs.map(() => null)]));
      this.keys = keys;
      if (this.plot) this.plot.destroy();
      this.plot = null;
      this.node.querySelector(".empty")?.remove();
      if (!keys.length) {
        this.node.append(el("div", "no work since this page opened", "empty"));
        return;
      }
      const series = [{}].concat(
        keys.map((k, i) => ({
          label: k,
          stroke: COLORS[i % COLORS.length],
          width: 1.5,
          dash: k.endsWith(" p99") ? [5, 4] : undefined,
          spanGaps: false,
          value: (u, v) => (v == null ? "–" : fmt(v) + this.unit),
        })),
      );
      const options = {
        width: this.width(),
        height: 170,
        series,
        scales: { x: { time: true, range: (u, min, max) => [max - WINDOW_S, max] }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
        axes: [{}, { size: 52, values: (u, ticks) => ticks.map(fmt) }],
        legend: { live: true },
        cursor: { drag: { x: false, y: false } },
      };
      this.plot = new uPlot(options, this.data(), this.node);
    }

    width() {
      return Math.max(200, this.node.clientWidth - 16);
    }

    data() {
      return [this.xs, ...this.keys.map((k) => this.ys.get(k))];
    }

    draw() {
      if (this.plot) {
        this.plot.setData(this.data());
        if (!this.hovered && this.xs.length) this.plot.setLegend({ idx: this.xs.length - 1 });
      }
      // What the page shows, for people reading the DOM and for the browser test: samples and the peak.
      let peak = 0;
      for (const k of this.keys) for (const v of this.ys.get(k)) if (v != null && v > peak) peak = v;
      this.node.dataset.samples = String(this.xs.length);
      this.node.dataset.peak = String(peak);
    }

    resize() {
      if (this.plot) this.plot.setSize({ width: this.width(), height: 170 });
    }
  }

  function fmt(v) {
    if (v == null) return "–";
    const a = Math.abs(v);
    if (a >= 100 || a === 0) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    if (a >= 0.01) return v.toFixed(2);
    return v.toExponential(1);
  }

  const charts = {
    requests: new Chart("chart-requests", "/s"),
    latency: new Chart("chart-latency", " ms"),
    tokens: new Chart("chart-tokens", "/s"),
    queue: new Chart("chart-queue", ""),
    batch: new Chart("chart-batch", ""),
    memory: new Chart("chart-memory", " GiB"),
  };
  window.addEventListener("resize", () => Object.values(charts).forEach((c) => c.resize()));

  const samples = []; // the last QUANTILE_S + 1 samples of /api/stats
  const used = new Set(); // models that have had work since the page opened: the others stay off the charts

  function byName(sample) {
    return new Map(sample ? sample.models.map((m) => [m.name + "@" + m.version, m]) : []);
  }

  function plotSample(now) {
    const prev = samples[samples.length - 1];
    const old = samples.find((s) => s.t >= now.t - QUANTILE_S - 0.5) || prev;
    samples.push(now);
    while (samples.length > QUANTILE_S + 2) samples.shift();
    const before = byName(prev);
    const earlier = byName(old);
    const dt = prev ? now.t - prev.t : 0;
    const x = Date.now() / 1000;
    const requests = new Map(), latency = new Map(), tokens = new Map(), queue = new Map(), batch = new Map();
    for (const m of now.models) {
      const key = m.name + "@" + m.version;
      const work = m.latency.cumulative[m.latency.cumulative.length - 1] + m.generated_tokens + m.batches + m.queue_depth;
      if (work > 0) used.add(m.name);
      if (!used.has(m.name)) continue;
      const p = before.get(key);
      const count = (s) => s && { requests: s.latency.cumulative[s.latency.cumulative.length - 1] };
      requests.set(m.name, rate(count(m), count(p), "requests", dt));
      const e = earlier.get(key);
      for (const [q, label] of [[0.5, " p50"], [0.99, " p99"]]) {
        const v = e ? quantile(q, m.latency.bounds, e.latency.cumulative, m.latency.cumulative) : null;
        latency.set(m.name + label, v == null ? null : v * 1000);
      }
      if (m.task === "text-generation") {
        tokens.set(m.name, rate(m, p, "generated_tokens", dt));
        queue.set(m.name + " running", m.running);
      }
      queue.set(m.name + " queued", m.queue_depth);
      if (m.max_batch != null) {
        const runs = p ? m.batches - p.batches : 0;
        batch.set(m.name, runs > 0 ? (m.batch_items - p.batch_items) / runs : null);
      }
    }
    const memory = new Map();
    for (const d of now.devices) {
      memory.set(d.device, d.used / 2 ** 30); // the whole device
      memory.set(d.device + " models", d.models / 2 ** 30); // what the memory ledger placed there
    }
    memory.set("llmosd RSS", now.rss_bytes / 2 ** 30);
    charts.requests.push(x, requests);
    charts.latency.push(x, latency);
    charts.tokens.push(x, tokens);
    charts.queue.push(x, queue);
    charts.batch.push(x, batch);
    charts.memory.push(x, memory);
    showPeers(now.peers);
  }

  // ---- Tables: models (with their manifests' validation), pulls, sync, peers.
  const manifests = new Map(); // name@version -> its manifest's validation, fetched once

  async function validation(name, version) {
    const key = name + "@" + version;
    if (!manifests.has(key)) {
      const m = await getJson("/api/models/" + encodeURIComponent(name) + "?version=" + encodeURIComponent(version));
      manifests.set(key, m.validation || {});
    }
    return manifests.get(key);
  }

  function figures(v) {
    const entries = Object.entries(v.figures || {}).filter(([, n]) => typeof n === "number");
    const text = entries.map(([k, n]) => k + " " + (Number.isInteger(n) ? n : n.toPrecision(4)));
    const verdict = v.passed === true ? "passed" : v.passed === false ? "failed" : "not validated";
    return { verdict, text: text.slice(0, 4).join(", "), all: text.join("\n") + (v.reference ? "\nreference: " + v.reference : "") };
  }

  async function showModels(status) {
    const rows = [];
    for (const m of status.models) {
      const tr = document.createElement("tr");
      const instance = (m.instances || [])[0] || {};
      const v = figures(await validation(m.name, m.version));
      const fig = el("td", "", "figures");
      fig.append(el("span", v.verdict, v.verdict === "passed" ? "ok" : "bad"));
      if (v.text) fig.append(document.createTextNode(": " + v.text));
      fig.title = v.all;
      const healthy = (m.instances || []).every((i) => i.healthy);
      tr.append(
        el("td", m.name), el("td", m.version), el("td", m.task), el("td", m.precision),
        el("td", (m.devices || []).join(", ")), el("td", instance.max_batch ?? "–"), fig,
        el("td", (healthy ? "serving" : "restarting") + (m.queued ? `, ${m.queued} queued` : ""), healthy ? "ok" : "bad"),
      );
      rows.push(tr);
    }
    $("model-rows").replaceChildren(...rows);
    const failed = Object.entries(status.failed_models || {});
    $("failed").textContent = failed.map(([n, why]) => `${n}: ${why}`).join("; ");
    pickModels(status.models);
  }

  function showActivity(status, pulls) {
    const items = [...(pulls.running || []), ...(pulls.finished || []).slice(-5).reverse()].map((p) => {
      const pct = p.bytes_total > 0 ? Math.floor((100 * p.bytes_done) / p.bytes_total) + " %" : "";
      const stage = p.status === "running" && p.stage ? p.stage : "";
      return el("li", [p.ref, p.status, stage, pct, p.error || ""].filter(Boolean).join(" · "), p.error ? "bad" : "");
    });
    $("pulls").replaceChildren(...items);
    const subs = (status.sync || []).map((s) => {
      const when = s.last_success ? "synced " + new Date(s.last_success * 1000).toLocaleTimeString() : "not synced yet";
      return el("li", [s.ref, when, s.digest ? s.digest.slice(0, 19) : "", s.error || s.refused || ""].filter(Boolean).join(" · "), s.error ? "bad" : "");
    });
    $("sync").replaceChildren(...subs);
  }

  function showPeers(peers) {
    $("peer-list").replaceChildren(
      ...(peers || []).map((p) => el("li", `${p.name} · ${p.url} · ${(p.devices || []).join(", ")} · ${(p.models || []).join(", ")}`)),
    );
  }

  function showBox(status) {
    const tls = status.tls ? " · TLS sha256 " + status.tls.fingerprint.slice(0, 16) + "…" : "";
    $("box").textContent = `${status.mdns || status.id.slice(0, 8)} · v${status.version}${tls}`;
    $("state").textContent = status.status;
  }

  // ---- The playground.
  const TASKS = { chat: "text-generation", embed: "feature-extraction", rerank: "text-ranking" };

  function pickModels(models) {
    for (const [tab, task] of Object.entries(TASKS)) {
      const select = $(tab + "-model");
      const names = models.filter((m) => m.task === task).map((m) => m.name);
      const have = [...select.options].map((o) => o.value);
      if (names.join() !== have.join()) {
        const chosen = select.value;
        select.replaceChildren(...names.map((n) => el("option", n)));
        if (names.includes(chosen)) select.value = chosen;
      }
      document.querySelector(`.tabs [data-tab="${tab}"]`).disabled = names.length === 0;
    }
  }

  function showTab(tab) {
    for (const b of document.querySelectorAll(".tabs button")) b.setAttribute("aria-selected", String(b.dataset.tab === tab));
    for (const t of Object.keys(TASKS)) $(t).hidden = t !== tab;
    $("play-error").textContent = "";
  }
  for (const b of document.querySelectorAll(".tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));

  function playError(err) {
    if (err instanceof NeedToken) return askToken(err.message);
    if (err.name !== "AbortError") $("play-error").textContent = String(err.message || err);
  }

  const history = [];
  let streaming = null;

  function bubble(role, text) {
    const div = el("div", "", "msg");
    div.append(el("b", role), el("span", text));
    $("chat-log").append(div);
    return div.lastChild;
  }

  // Server-sent events from a POST: EventSource cannot send a body or the token, so read the stream.
  // Yields [event, n]: n counts the network reads so far, so the page can tell a stream from one body.
  async function* events(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (let reads = 1; ; reads++) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (data === "[DONE]") return;
        if (data) yield [JSON.parse(data), reads];
      }
    }
  }

  $("chat").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text || streaming) return;
    $("play-error").textContent = "";
    history.push({ role: "user", content: text });
    bubble("you", text);
    $("chat-input").value = "";
    const out = bubble($("chat-model").value, "");
    out.parentNode.dataset.streaming = "true";
    streaming = new AbortController();
    $("chat-send").disabled = true;
    $("chat-stop").disabled = false;
    const started = performance.now();
    let pieces = 0;
    const reads = new Set(); // the reads that brought text: more than one means it arrived as it was made
    try {
      const response = await call("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ model: $("chat-model").value, messages: history, stream: true, max_tokens: 256 }),
        signal: streaming.signal,
      });
      if (!response.ok) throw await errorOf(response);
      for await (const [chunk, read] of events(response)) {
        if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.reasoning_content) { // a model that thinks: its thinking, apart and muted
          let thought = out.parentNode.querySelector(".thinking");
          if (!thought) {
            thought = el("i", "", "thinking muted");
            out.before(thought);
          }
          thought.textContent += delta.reasoning_content;
        }
        if (delta && delta.content) {
          out.textContent += delta.content;
          pieces += 1;
          reads.add(read);
          out.parentNode.dataset.pieces = String(pieces);
          out.parentNode.dataset.reads = String(reads.size);
          $("chat-log").scrollTop = $("chat-log").scrollHeight;
        }
      }
      const s = (performance.now() - started) / 1000;
      $("chat-stats").textContent = `${pieces} pieces in ${s.toFixed(1)} s`;
    } catch (err) {
      playError(err);
    } finally {
      history.push({ role: "assistant", content: out.textContent });
      out.parentNode.dataset.streaming = "false";
      streaming = null;
      $("chat-send").disabled = false;
      $("chat-stop").disabled = true;
    }
  });
  $("chat-stop").addEventListener("click", () => streaming && streaming.abort());
  $("chat-clear").addEventListener("click", () => {
    history.length = 0;
    $("chat-log").replaceChildren();
    $("chat-stats").textContent = "";
  });

  async function post(path, body) {
    const response = await call(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!response.ok) throw await errorOf(response);
    return response.json();
  }

  // A pull runs for as long as its download and export take: the list below shows its progress meanwhile.
  $("pull").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const ref = $("pull-ref").value.trim();
    if (!ref) return;
    $("pull-start").disabled = true;
    $("pull-state").textContent = "pulling " + ref + "…";
    try {
      const r = await post("/api/models/pull", { ref });
      $("pull-state").textContent = `pulled ${ref} as ${r.name}:${r.version} (${r.precision})`;
    } catch (err) {
      $("pull-state").textContent = String(err.message || err);
    } finally {
      $("pull-start").disabled = false;
    }
  });

  $("embed").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("play-error").textContent = "";
    try {
      const r = await post("/v1/embeddings", { model: $("embed-model").value, input: $("embed-input").value });
      const v = r.data[0].embedding;
      const norm = Math.sqrt(v.reduce((a, x) => a + x * x, 0));
      $("embed-output").textContent =
        `${v.length} dimensions, norm ${norm.toFixed(4)}, ${r.usage.prompt_tokens} tokens\n[` +
        v.slice(0, 8).map((x) => x.toFixed(4)).join(", ") + (v.length > 8 ? ", …]" : "]");
    } catch (err) {
      playError(err);
    }
  });

  $("rerank").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("play-error").textContent = "";
    const documents = $("rerank-docs").value.split("\n").map((l) => l.trim()).filter(Boolean);
    try {
      const r = await post("/v1/rerank", { model: $("rerank-model").value, query: $("rerank-query").value, documents });
      $("rerank-output").replaceChildren(
        ...r.results.map((x) => el("li", `${x.relevance_score.toFixed(4)}  ${documents[x.index]}`)),
      );
    } catch (err) {
      playError(err);
    }
  });

  // ---- The token: asked for when the box answers 401 (a LAN viewer), never on loopback.
  function askToken(message) {
    polling = false;
    $("main").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message;
    $("token").focus();
  }

  $("login").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    token = $("token").value.trim();
    try {
      await getJson("/api/stats");
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token").value = "";
      start();
    } catch (err) {
      token = "";
      sessionStorage.removeItem(TOKEN_KEY);
      askToken(err instanceof NeedToken && err.status === 401 ? "that token is not valid here" : String(err.message || err));
    }
  });

  // ---- The loops: stats every second, the tables every five.
  async function tick(gen) {
    if (!polling || gen !== generation) return;
    const started = performance.now();
    try {
      plotSample(await getJson("/api/stats"));
    } catch (err) {
      if (err instanceof NeedToken) return askToken(err.message);
      $("state").textContent = "unreachable: " + (err.message || err);
    }
    setTimeout(() => tick(gen), Math.max(50, 1000 - (performance.now() - started)));
  }

  async function slowTick(gen) {
    if (!polling || gen !== generation) return;
    try {
      const [status, pulls] = await Promise.all([getJson("/api/status"), getJson("/api/models/pulls")]);
      showBox(status);
      showActivity(status, pulls);
      await showModels(status);
    } catch (err) {
      if (err instanceof NeedToken) return askToken(err.message);
      $("failed").textContent = String(err.message || err);
    }
    setTimeout(() => slowTick(gen), 5000);
  }

  function start() {
    $("login").hidden = true;
    $("main").hidden = false;
    if (polling) return;
    polling = true;
    generation += 1;
    tick(generation);
    slowTick(generation);
  }

  window.llmosdConsole = { quantile }; // for the browser test of the arithmetic
  start();
})();
