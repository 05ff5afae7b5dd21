// seekformer playground: streams from this server's OpenAI API, then asks POST /v1/inspect for the
// routing and attention of the whole text and draws them on canvases (no DOM node per token, so 1,024
// tokens stay responsive). No external resources: everything is served by `seekformer serve`.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], record: null, attn: [], T: 0, cellW: 4, cellH: 4, rows: [],
                controller: null, hover: -1 };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

async function apiError(resp) {
  try { const body = await resp.json(); return body.error ? body.error.message : JSON.stringify(body); }
  catch (e) { return resp.status + " " + resp.statusText; }
}

async function loadModel() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (!resp.ok) { setStatus(await apiError(resp), true); return false; }
  const body = await resp.json();
  state.model = body.data[0].id;
  $("model-name").textContent = state.model + " (context " + body.data[0].max_model_len + ")";
  return true;
}

async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
      for (const line of block.split(/\r?\n/)) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function samplingBody() {
  const body = { model: state.model, stream: true, temperature: parseFloat($("temperature").value),
                 top_p: parseFloat($("top-p").value), max_tokens: parseInt($("max-tokens").value, 10),
                 stream_options: { include_usage: true } };
  // MTP self-speculation (greedy: the box sets temperature 0); the server answers 400 where it has none
  if ($("speculative").checked) { body.speculative = true; body.temperature = 0; }
  return body;
}

async function send() {
  const prompt = $("prompt").value;
  if (!prompt) { setStatus("type a prompt first", true); return; }
  if (!state.model && !(await loadModel())) return;
  const chat = $("mode").value === "chat";
  const out = $("output");
  const body = samplingBody();
  let url;
  if (chat) {
    state.history.push({ role: "user", content: prompt });
    body.messages = state.history.slice();
    url = "/v1/chat/completions";
    out.textContent = state.history.map((m) => m.role + ": " + m.content).join("\n") + "\nassistant: ";
  } else {
    body.prompt = prompt;
    url = "/v1/completions";
    out.textContent = "";
    const span = document.createElement("span");
    span.className = "prompt";
    span.textContent = prompt;
    out.appendChild(span);
  }
  const gen = document.createTextNode("");
  out.appendChild(gen);
  $("send").disabled = true; $("stop").disabled = false;
  state.controller = new AbortController();
  setStatus("generating...");
  let text = "", generated = 0;
  const started = performance.now();
  try {
    const resp = await fetch(url, { method: "POST", headers: headers(), body: JSON.stringify(body),
                                    signal: state.controller.signal });
    if (!resp.ok) { setStatus(await apiError(resp), true); if (chat) state.history.pop(); return; }
    for await (const ev of sseEvents(resp)) {
      if (ev.usage) generated = ev.usage.completion_tokens;
      const c = ev.choices && ev.choices[0];
      if (!c) continue;
      const piece = chat ? (c.delta && c.delta.content) || "" : c.text || "";
      text += piece;
      gen.data = text;
      out.scrollTop = out.scrollHeight;
    }
  } catch (e) {
    if (e.name !== "AbortError") { setStatus(String(e), true); return; }
  } finally {
    $("send").disabled = false; $("stop").disabled = true;
  }
  out.dataset.done = "1";
  const secs = (performance.now() - started) / 1000;
  state.speed = generated + " tokens in " + secs.toFixed(2) + " s (" + (generated / secs).toFixed(1) + " tok/s" +
                (body.speculative ? ", speculative" : "") + ")";
  $("speed").textContent = state.speed;
  if (chat) state.history.push({ role: "assistant", content: text });
  setStatus("inspecting routing and attention...");
  const req = chat ? { messages: state.history } : { prompt: prompt + text };
  await inspect(req);
}

async function inspect(req) {
  req.attention = "mean_u8";
  const resp = await fetch("/v1/inspect", { method: "POST", headers: headers(), body: JSON.stringify(req) });
  if (!resp.ok) { setStatus("inspect: " + (await apiError(resp)), true); return; }
  const rec = await resp.json();
  state.record = rec;
  state.T = rec.tokens.length;
  state.attn = (rec.attention_u8 || []).map((b64) => Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0)));
  const sel = $("attn-layer");
  sel.innerHTML = "";
  rec.attention_layers.forEach((l, j) => sel.add(new Option("layer " + l, String(j))));
  if (rec.attention_layers.length > 1) sel.add(new Option("mean of layers", "mean"));
  drawRouting();
  drawAttention();
  setStatus(rec.tokens.length + " tokens" + (rec.note ? " - " + rec.note : ", " + rec.layers.length +
            " MoE layers x " + rec.num_experts + " experts (top-" + rec.top_k + ")"));
}

function color(v) {  // 0..1 -> light grey .. deep blue/purple
  const t = Math.max(0, Math.min(1, v));
  return [Math.round(240 - 200 * t), Math.round(242 - 190 * t), Math.round(245 - 90 * t)];
}
const LUT = Array.from({ length: 256 }, (_, i) => color(Math.sqrt(i / 255)));

function drawRouting() {
  const rec = state.record, T = state.T, E = rec.num_experts || 0, L = rec.layers.length;
  const cv = $("routing-map");
  state.cellW = T <= 96 ? 8 : T <= 384 ? 3 : 2;
  state.cellH = E && L ? Math.max(1, Math.min(8, Math.floor(360 / (L * E)))) : 0;
  const gap = 3, height = L ? L * (E * state.cellH + gap) : 24;
  cv.width = Math.max(1, T * state.cellW);
  cv.height = height;
  const ctx = cv.getContext("2d");
  ctx.fillStyle = "#f0f2f5";
  ctx.fillRect(0, 0, cv.width, cv.height);
  if (!L) {
    ctx.fillStyle = "#6b7280";
    ctx.font = "12px system-ui";
    ctx.fillText(rec.note || "no routing", 4, 16);
  }
  let wmax = 1e-9;
  for (const layer of rec.layers) for (const ws of layer.weights) for (const w of ws) wmax = Math.max(wmax, w);
  rec.layers.forEach((layer, li) => {
    const y0 = li * (E * state.cellH + gap);
    layer.experts.forEach((ex, t) => {
      ex.forEach((e, k) => {
        const c = color(layer.weights[t][k] / wmax);
        ctx.fillStyle = "rgb(" + c.join(",") + ")";
        ctx.fillRect(t * state.cellW, y0 + e * state.cellH, state.cellW, state.cellH);
      });
    });
  });
  cv.dataset.tokens = String(T);
  const strip = $("attends-strip");
  strip.width = cv.width;
  strip.height = 10;
}

function attentionMatrix() {  // the selected layer's head-mean (or the mean over layers) as bytes [T*T]
  const v = $("attn-layer").value;
  if (v !== "mean") return state.attn[parseInt(v, 10)] || null;
  const T = state.T, out = new Uint8Array(T * T), n = state.attn.length;
  for (let i = 0; i < T * T; i++) { let s = 0; for (const a of state.attn) s += a[i]; out[i] = Math.round(s / n); }
  return out;
}

function drawAttention() {
  const T = state.T, m = attentionMatrix(), cv = $("attention-map");
  if (!m || !T) return;
  const img = new ImageData(T, T);
  for (let i = 0; i < T * T; i++) {
    const c = LUT[m[i]];
    img.data[4 * i] = c[0]; img.data[4 * i + 1] = c[1]; img.data[4 * i + 2] = c[2]; img.data[4 * i + 3] = 255;
  }
  const off = document.createElement("canvas");
  off.width = T; off.height = T;
  off.getContext("2d").putImageData(img, 0, 0);
  const size = Math.min(512, Math.max(T, 256));
  cv.width = size; cv.height = size;
  const ctx = cv.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, 0, 0, size, size);
  cv.dataset.rendered = "1";
  if (state.hover >= 0) showToken(state.hover);
}

function label(tok) { return JSON.stringify(tok); }

function showToken(i) {
  const rec = state.record;
  if (!rec || i < 0 || i >= state.T) return;
  state.hover = i;
  const lines = ["token " + i + ": " + label(rec.tokens[i]) + " (id " + rec.token_ids[i] + ")"];
  for (const layer of rec.layers) {
    const parts = layer.experts[i].map((e, k) => "e" + e + " " + layer.weights[i][k].toFixed(3));
    const sh = layer.shared_share ? "  shared " + (100 * layer.shared_share[i]).toFixed(0) + "%" : "";
    lines.push("layer " + layer.layer + ": " + parts.join(", ") + sh);
  }
  if (!rec.layers.length && rec.note) lines.push(rec.note);
  const m = attentionMatrix(), T = state.T;
  if (m) {
    const row = m.subarray(i * T, (i + 1) * T);
    const top = Array.from(row.keys()).sort((a, b) => row[b] - row[a]).slice(0, 5).filter((j) => row[j] > 0);
    lines.push("attends to: " + top.map((j) => label(rec.tokens[j]) + "@" + j + " " + (row[j] / 255).toFixed(2))
      .join(", "));
    const strip = $("attends-strip"), ctx = strip.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, strip.width, strip.height);
    for (let j = 0; j <= i; j++) {
      const c = LUT[row[j]];
      ctx.fillStyle = "rgb(" + c.join(",") + ")";
      ctx.fillRect(j * state.cellW, 0, state.cellW, strip.height);
    }
    ctx.fillStyle = "#b91c1c";
    ctx.fillRect(i * state.cellW, 0, Math.max(1, state.cellW), strip.height);
  }
  $("detail").textContent = lines.join("\n");
}

function hoverRouting(ev) {
  if (state.record) showToken(Math.floor(ev.offsetX / state.cellW));
}

function hoverAttention(ev) {
  const cv = $("attention-map");
  if (state.record && state.T) showToken(Math.floor(ev.offsetY / (cv.clientHeight / state.T)));
}

$("send").addEventListener("click", send);
$("prompt").addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) send(); });
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("speculative").addEventListener("change", () => {  // speculation is greedy: show it on the temperature
  $("temperature").disabled = $("speculative").checked;
});
$("reset").addEventListener("click", () => { state.history = []; $("output").textContent = ""; setStatus(""); });
$("routing-map").addEventListener("mousemove", hoverRouting);
$("attention-map").addEventListener("mousemove", hoverAttention);
$("attn-layer").addEventListener("change", drawAttention);
$("api-key").addEventListener("change", () => { state.model = null; loadModel(); });
loadModel();
window.seekPlayground = { state, inspect, showToken };
