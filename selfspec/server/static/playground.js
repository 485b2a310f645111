// selfspec playground: chat with the served model and watch speculative decoding work.
// Plain JavaScript, no libraries, nothing fetched from elsewhere. It streams answers from this
// server's /v1/chat/completions (stream: true) and reads the extension field `selfspec` of each
// chunk: {"tokens": [{"text", "drafted", "origin"}], "rounds": [{"round", "tokens", "accepted",
// "proposed"}], "tau", "acceptance_rate", "tokens_per_s", "new_tokens"} (README, "Playground").
"use strict";

const $ = (id) => document.getElementById(id);
const TITLES = {
  draft: "accepted draft token",
  target: "target token (a plain step)",
  bonus: "target token: the bonus after a fully accepted draft",
  correction: "target token where the draft was rejected",
};

const state = {
  key: sessionStorage.getItem("selfspec-api-key") || null, // this tab only, never localStorage
  model: null,
  messages: [], // the conversation sent with each request
  rounds: [], // chart data of the answer being shown: {tokens, accepted, tps}
  busy: null, // the AbortController of the answer being streamed
};

// ------------------------------------------------------------------------------- server calls
function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function failure(response) {
  let message = response.status + " " + response.statusText;
  try { message = (await response.json()).error.message || message; } catch (e) { /* not JSON */ }
  return new HttpError(response.status, message);
}

async function loadModel() {
  const r = await fetch("v1/models", { headers: headers() });
  if (!r.ok) throw await failure(r);
  const card = (await r.json()).data[0];
  state.model = card.id;
  $("model-info").textContent = `${card.id} · context ${card.context_length} tokens · server drafter ${card.draft}`;
  const select = $("draft");
  select.replaceChildren();
  for (const name of card.drafts || [card.draft]) {
    const opt = document.createElement("option");
    opt.value = name;
    opt.textContent = name === card.draft ? `${name} (default)` : name;
    select.append(opt);
  }
  select.value = card.draft;
  $("draft-hint").textContent = (card.drafts || []).length > 1
    ? "Sent as the request extension \"selfspec\": {\"draft\": ...}; greedy answers are the same with every drafter."
    : "This server offers only its own drafter.";
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("key-button").hidden = false;
  $("key-error").textContent = message || "";
  $("api-key").focus();
}

async function connect() {
  try {
    await loadModel();
    $("key-form").hidden = true;
    $("send").disabled = false;
  } catch (e) {
    $("send").disabled = true;
    if (e.status === 401) {
      $("model-info").textContent = "waiting for the API key";
      askForKey(state.key ? "That key was refused." : "");
    } else {
      $("model-info").textContent = "cannot reach the server: " + e.message;
    }
  }
}

// ------------------------------------------------------------------------------------- chat
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : state.model || "model";
  div.append(who);
  if (text) div.append(document.createTextNode(text));
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function appendTokens(div, delta, tokens) {
  if (!tokens) { // a chunk without the extension (another server): plain text
    div.append(document.createTextNode(delta));
    return;
  }
  for (const t of tokens) {
    const span = document.createElement("span");
    span.className = "tok " + t.origin + (t.drafted ? " drafted" : "");
    span.title = TITLES[t.origin] || "";
    span.textContent = t.text;
    div.append(span);
  }
}

function requestBody() {
  const body = {
    model: state.model,
    messages: state.messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
    selfspec: { draft: $("draft").value },
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  const system = $("system").value.trim();
  if (system) body.messages = [{ role: "system", content: system }, ...state.messages];
  return body;
}

// Server-sent events from a fetch body: yields each `data:` payload.
async function* events(response, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  while (!signal.aborted) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

async function send(prompt) {
  state.messages.push({ role: "user", content: prompt });
  addMessage("user", prompt);
  const div = addMessage("assistant");
  div.dataset.state = "streaming";
  resetSpeculation();
  const controller = new AbortController();
  state.busy = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  let answer = "";
  try {
    const r = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!r.ok) throw await failure(r);
    for await (const data of events(r, controller.signal)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = (chunk.choices || [])[0];
      if (!choice) continue; // the usage chunk
      if (choice.finish_reason) { // its `selfspec` is the generation's stats
        finish(div, chunk.selfspec, choice.finish_reason);
        continue;
      }
      const delta = choice.delta.content || "";
      const ext = chunk.selfspec;
      if (delta) {
        answer += delta;
        appendTokens(div, delta, ext && ext.tokens);
        div.scrollIntoView({ block: "end" });
      }
      if (ext) progress(ext);
    }
    div.dataset.state = "done";
  } catch (e) {
    div.dataset.state = controller.signal.aborted ? "stopped" : "error";
    if (!controller.signal.aborted) {
      div.classList.add("error");
      div.append(document.createTextNode((answer ? "\n" : "") + "error: " + e.message));
      if (e.status === 401) askForKey("The server refused the key.");
    }
  } finally {
    if (answer) state.messages.push({ role: "assistant", content: answer });
    else state.messages.pop(); // nothing came back: forget the question, it may be asked again
    state.busy = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function finish(div, stats, reason) {
  if (!stats) return;
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = `${stats.new_tokens} tokens · ${stats.tokens_per_s.toFixed(1)} tok/s · τ ${stats.mean_accepted_tokens.toFixed(2)}` +
    ` · ${stats.accepted}/${stats.drafted} drafts accepted · drafter ${stats.drafter} · ${reason}`;
  div.append(meta);
  showStats(stats.mean_accepted_tokens, stats.accepted, stats.drafted, stats.tokens_per_s, stats.new_tokens, stats.rounds);
}

// ----------------------------------------------------------------------- speculation panel
function resetSpeculation() {
  state.rounds = [];
  state.drafted = 0;
  state.accepted = 0;
  showStats(null);
  draw();
}

function progress(ext) {
  for (const r of ext.rounds || []) {
    state.rounds.push({ tokens: r.tokens, accepted: r.accepted, tps: ext.tokens_per_s });
    state.drafted += r.proposed;
    state.accepted += r.accepted;
  }
  const n = state.rounds.length;
  showStats(ext.tau, state.accepted, state.drafted, ext.tokens_per_s, ext.new_tokens, n);
  scheduleDraw();
}

function showStats(tau, accepted, drafted, tps, tokens, rounds) {
  const has = tau !== null && tau !== undefined;
  $("stat-tau").textContent = has ? tau.toFixed(2) : "–";
  $("stat-acc").textContent = has ? (drafted ? `${accepted}/${drafted} (${Math.round(100 * accepted / drafted)}%)` : "none drafted") : "–";
  $("stat-tps").textContent = has && tps !== null ? tps.toFixed(1) : "–";
  $("stat-rounds").textContent = has ? `${tokens} / ${rounds}` : "–";
}

let drawPending = false;
function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => { drawPending = false; draw(); });
}

// The chart, by hand on a canvas: a bar per verify round (tokens it produced: accepted drafts
// below, the target's token on top), the running tau as a line, tokens/s on the right axis.
function draw() {
  const canvas = $("chart");
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 560, h = canvas.clientHeight || 220;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const rounds = state.rounds;
  canvas.dataset.rounds = String(rounds.length);
  const pad = { l: 34, r: 44, t: 10, b: 24 };
  const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
  const maxTok = Math.max(2, ...rounds.map((r) => r.tokens));
  const maxTps = Math.max(1, ...rounds.map((r) => r.tps || 0)) * 1.1; // null: not measured yet
  const y = (v) => pad.t + ph - (v / maxTok) * ph;
  const y2 = (v) => pad.t + ph - (v / maxTps) * ph;

  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#666";
  g.strokeStyle = "#e3e3ea";
  g.lineWidth = 1;
  const step = maxTok <= 6 ? 1 : Math.ceil(maxTok / 6);
  g.textAlign = "right";
  for (let v = 0; v <= maxTok; v += step) {
    g.beginPath(); g.moveTo(pad.l, y(v) + 0.5); g.lineTo(pad.l + pw, y(v) + 0.5); g.stroke();
    g.fillText(String(v), pad.l - 5, y(v) + 4);
  }
  g.textAlign = "left";
  for (let i = 0; i <= 4; i++) {
    const v = (maxTps * i) / 4;
    g.fillText(v.toFixed(v >= 10 ? 0 : 1), pad.l + pw + 5, y2(v) + 4);
  }
  g.textAlign = "center";
  g.fillText(rounds.length ? `verify rounds (${rounds.length})` : "verify rounds: send a prompt", pad.l + pw / 2, h - 6);
  g.save();
  g.translate(10, pad.t + ph / 2); g.rotate(-Math.PI / 2);
  g.fillText("tokens / round", 0, 0);
  g.restore();
  if (!rounds.length) return;

  const bw = pw / rounds.length;
  const gap = bw > 4 ? 1 : 0;
  rounds.forEach((r, i) => {
    const x = pad.l + i * bw;
    g.fillStyle = color("--draft");
    g.fillRect(x + gap, y(r.accepted), Math.max(1, bw - 2 * gap), y(0) - y(r.accepted));
    g.fillStyle = color("--target");
    g.fillRect(x + gap, y(r.tokens), Math.max(1, bw - 2 * gap), y(r.accepted) - y(r.tokens));
  });
  // running tau
  g.strokeStyle = color("--tau");
  g.lineWidth = 2;
  g.beginPath();
  let total = 0;
  rounds.forEach((r, i) => {
    total += r.tokens;
    const px = pad.l + (i + 0.5) * bw, py = y(total / (i + 1));
    if (i) g.lineTo(px, py); else g.moveTo(px, py);
  });
  g.stroke();
  // tokens/s
  g.strokeStyle = color("--tps");
  g.setLineDash([5, 3]);
  g.beginPath();
  let started = false;
  rounds.forEach((r, i) => {
    if (r.tps === null || r.tps === undefined) return;
    const px = pad.l + (i + 0.5) * bw, py = y2(r.tps);
    if (started) g.lineTo(px, py); else g.moveTo(px, py);
    started = true;
  });
  g.stroke();
  g.setLineDash([]);
}

// ----------------------------------------------------------------------------------- wiring
$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("api-key").value.trim() || null;
  if (state.key) sessionStorage.setItem("selfspec-api-key", state.key);
  else sessionStorage.removeItem("selfspec-api-key");
  $("api-key").value = "";
  connect();
});
$("key-button").addEventListener("click", () => askForKey(""));
$("prompt-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || state.busy || !state.model) return;
  $("prompt").value = "";
  send(prompt);
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("prompt-form").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.busy && state.busy.abort());
$("clear").addEventListener("click", () => {
  if (state.busy) state.busy.abort();
  state.messages = [];
  $("log").replaceChildren();
  resetSpeculation();
});
window.addEventListener("resize", scheduleDraw);

window.selfspecPlayground = state; // for tests and the curious
$("send").disabled = true;
resetSpeculation();
connect();
