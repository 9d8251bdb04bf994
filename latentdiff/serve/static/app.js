// The latentdiff web page: a text-to-image form over the AUTOMATIC1111 API (/sdapi/v1/...), nothing else.
// Plain modern JavaScript, no build step, no external files: it must work offline. URLs are relative to the page,
// so that it also works behind a proxy that serves the app under a path prefix.
"use strict";

const KEY_STORAGE = "latentdiff.apiKey";
const POLL_MS = 300;

const $ = (id) => document.getElementById(id);

const state = {
  samplers: [],       // [{name, aliases, options}] from GET /sdapi/v1/samplers
  models: [],         // [{title, model_name, hash, sha256, filename, config}] from GET /sdapi/v1/sd-models
  serverModel: null,  // the server's sd_model_checkpoint (a model title), as last read or set
  busy: false,
  interrupted: false,  // Interrupt was pressed during the current run
  resultCount: 0,
};

// ---------------------------------------------------------------------------------------------------------------
// HTTP

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// One readable line from an error body: FastAPI's {"detail": "..."} or its validation list
// {"detail": [{"loc": [...], "msg": "..."}]}, AUTOMATIC1111's {"error": ..., "errors": ...}, or plain text.
function errorText(status, body) {
  let detail = body;
  if (body && typeof body === "object") {
    detail = body.detail ?? body.errors ?? body.error ?? body.message ?? body;
  }
  if (Array.isArray(detail)) {
    detail = detail.map((item) => {
      if (item && typeof item === "object" && "msg" in item) {
        const loc = (item.loc || []).filter((part) => part !== "body").join(".");
        return loc ? `${loc}: ${item.msg}` : item.msg;
      }
      return typeof item === "string" ? item : JSON.stringify(item);
    }).join("; ");
  } else if (detail && typeof detail === "object") {
    detail = JSON.stringify(detail);
  }
  const text = String(detail || "").trim();
  return `Error ${status}${text ? ": " + text : ""}`;
}

async function api(method, path, body) {
  const headers = {Accept: "application/json"};
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    // credentials "omit": the key travels in the Authorization header above; the browser neither adds its own
    // credentials nor prompts for them when the server answers 401 with a Basic challenge.
    response = await fetch(path, {
      method, headers, credentials: "omit", body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, `Cannot reach the server (${err.message})`);
  }
  const text = await response.text();
  let data = text;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (err) {
    // not JSON: keep the text
  }
  if (!response.ok) {
    let message = errorText(response.status, data);
    if (response.status === 401 || response.status === 403) {
      message += " (set the API key at the top of the page)";
      $("settings").open = true;
    }
    throw new ApiError(response.status, message);
  }
  return data;
}

// ---------------------------------------------------------------------------------------------------------------
// Messages

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").textContent = "";
  $("error").hidden = true;
}

function setStatus(message) {
  $("status").textContent = message;
}

// ---------------------------------------------------------------------------------------------------------------
// Samplers and models

function fillSelect(select, items, valueOf, labelOf, selected) {
  select.replaceChildren();
  for (const item of items) {
    const option = document.createElement("option");
    option.value = valueOf(item);
    option.textContent = labelOf(item);
    select.append(option);
  }
  if (selected !== undefined && [...select.options].some((o) => o.value === selected)) select.value = selected;
}

async function loadLists() {
  const results = await Promise.allSettled([
    api("GET", "sdapi/v1/samplers"),
    api("GET", "sdapi/v1/sd-models"),
    api("GET", "sdapi/v1/options"),
  ]);
  const failed = results.find((r) => r.status === "rejected");
  if (failed) showError(failed.reason.message);
  const [samplers, models, options] = results.map((r) => (r.status === "fulfilled" ? r.value : null));
  if (Array.isArray(samplers)) {
    state.samplers = samplers;
    const select = $("sampler_name");
    const current = select.value;
    fillSelect(select, [{name: ""}, ...samplers], (s) => s.name, (s) => s.name || "Model's default", current);
  }
  if (options && typeof options === "object") state.serverModel = options.sd_model_checkpoint ?? null;
  if (Array.isArray(models)) {
    state.models = models;
    fillSelect($("model"), models, (m) => m.title, (m) => m.model_name || m.title, state.serverModel ?? undefined);
  }
  if (!failed) clearError();
  document.body.dataset.loads = String(Number(document.body.dataset.loads || 0) + 1);  // tests wait on it
}

// Switch the server's model to the one chosen (POST /sdapi/v1/options); on failure the choice goes back.
async function switchModel() {
  const wanted = $("model").value;
  if (!wanted || wanted === state.serverModel) return;
  clearError();
  setStatus(`Switching to ${wanted}…`);
  try {
    await api("POST", "sdapi/v1/options", {sd_model_checkpoint: wanted});
    state.serverModel = wanted;
    setStatus(`Model: ${wanted}`);
  } catch (err) {
    if (state.serverModel) $("model").value = state.serverModel;
    setStatus("");
    showError(err.message);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The form

// A number field's value; an empty optional field gives undefined (the field is left out of the request, so
// the server uses the model's own value).
function readNumber(id, integer, optional) {
  const input = $(id);
  const label = document.querySelector(`label[for="${id}"]`).textContent;
  const raw = input.value.trim();
  if (input.validity.badInput) throw new Error(`${label}: enter a number`);  // text the number field cannot read
  if (raw === "" && optional) return undefined;
  const value = Number(raw);
  if (raw === "" || !Number.isFinite(value)) throw new Error(`${label}: enter a number`);
  if (integer && !Number.isInteger(value)) throw new Error(`${label}: enter a whole number`);
  return value;
}

// The txt2img request body (AUTOMATIC1111's fields); fields left empty on the page are left out.
function readForm() {
  const request = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler_name").value || undefined,
    steps: readNumber("steps", true, true),
    cfg_scale: readNumber("cfg_scale", false, true),
    seed: readNumber("seed", true, false),
    width: readNumber("width", true, true),
    height: readNumber("height", true, true),
    batch_size: readNumber("batch_size", true, false),
    n_iter: readNumber("n_iter", true, false),
    do_not_save_grid: true,  // the gallery shows each image: no grid image of them all
  };
  // The model shown, for this request only (the server's current model may have been changed by another client).
  if ($("model").value) request.override_settings = {sd_model_checkpoint: $("model").value};
  for (const key of Object.keys(request)) if (request[key] === undefined) delete request[key];
  return request;
}

// AUTOMATIC1111's infotext: the prompt, optionally "Negative prompt: ...", then one line of "Key: value" fields
// ("Steps: 10, Sampler: Euler a, CFG scale: 5, Seed: 1234, Size: 32x32, ..."; a value may be a quoted string).
const FIELD_RE = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;

function parseInfotext(text) {
  const lines = String(text || "").trim().split("\n");
  const fields = {};
  const last = lines.length ? lines[lines.length - 1] : "";
  const matches = [...last.matchAll(FIELD_RE)].filter((m) => m[0].trim() !== "");
  if (matches.length >= 3) {
    for (const m of matches) {
      let value = m[2].trim();
      if (value.startsWith('"')) {
        try {
          value = JSON.parse(value);
        } catch (err) {
          // keep it quoted
        }
      }
      fields[m[1].trim()] = value;
    }
    lines.pop();
  }
  const prompt = [];
  const negative = [];
  let inNegative = false;
  for (let line of lines) {
    if (line.startsWith("Negative prompt:")) {
      inNegative = true;
      line = line.slice("Negative prompt:".length).trim();
    }
    (inNegative ? negative : prompt).push(line);
  }
  return {prompt: prompt.join("\n"), negative_prompt: negative.join("\n"), fields};
}

function findSampler(name) {
  const lower = String(name).toLowerCase();
  return state.samplers.find((s) => s.name.toLowerCase() === lower
    || (s.aliases || []).some((a) => String(a).toLowerCase() === lower));
}

function findModel(fields) {
  const hash = (fields["Model hash"] || "").toLowerCase();
  if (hash) {
    const byHash = state.models.find((m) => (m.hash || "").toLowerCase() === hash
      || (m.sha256 || "").toLowerCase().startsWith(hash));
    if (byHash) return byHash;
  }
  const name = fields.Model;
  return name ? state.models.find((m) => m.model_name === name || m.title === name) : undefined;
}

// Refill the form from one image's parameters (its infotext; `fallback` holds what info said for that image).
function reuseParameters(infotext, fallback) {
  const parsed = parseInfotext(infotext);
  const f = parsed.fields;
  $("prompt").value = parsed.prompt || fallback.prompt || "";
  $("negative_prompt").value = parsed.negative_prompt || fallback.negative_prompt || "";
  const set = (id, value) => {
    if (value !== undefined && value !== null && value !== "") $(id).value = value;
  };
  set("steps", f.Steps ?? fallback.steps);
  set("cfg_scale", f["CFG scale"] ?? fallback.cfg_scale);
  set("seed", f.Seed ?? fallback.seed);
  const size = /^(\d+)x(\d+)$/.exec(f.Size || "");
  set("width", size ? size[1] : fallback.width);
  set("height", size ? size[2] : fallback.height);
  const sampler = findSampler(f.Sampler ?? fallback.sampler_name ?? "");
  if (sampler) $("sampler_name").value = sampler.name;
  const model = findModel(f);
  if (model) $("model").value = model.title;
  clearError();
  setStatus("Parameters reused: press Generate to run them again.");
  $("prompt").focus();
}

// ---------------------------------------------------------------------------------------------------------------
// Results

function parseInfo(info) {
  if (info && typeof info === "object") return info;
  try {
    return JSON.parse(info || "{}");
  } catch (err) {
    return {};
  }
}

function addResults(data, request) {
  const info = parseInfo(data.info);
  const images = Array.isArray(data.images) ? data.images : [];
  const infotexts = Array.isArray(info.infotexts) ? info.infotexts : [];
  const first = Number.isInteger(info.index_of_first_image) ? info.index_of_first_image : 0;
  const template = $("result-template");
  const figures = [];
  images.forEach((b64, i) => {
    if (i < first) return;  // a grid of the images that follow
    const j = i - first;  // index into the per-image lists
    const fallback = {
      prompt: (info.all_prompts || [])[j] ?? info.prompt ?? request.prompt,
      negative_prompt: (info.all_negative_prompts || [])[j] ?? info.negative_prompt ?? request.negative_prompt,
      seed: (info.all_seeds || [])[j] ?? info.seed,
      steps: info.steps ?? request.steps,
      cfg_scale: info.cfg_scale ?? request.cfg_scale,
      sampler_name: info.sampler_name ?? request.sampler_name,
      width: info.width ?? request.width,
      height: info.height ?? request.height,
    };
    const infotext = infotexts[i] ?? "";
    const n = state.resultCount++;
    const figure = template.content.firstElementChild.cloneNode(true);
    figure.id = `result-${n}`;
    const src = `data:image/png;base64,${b64}`;
    const img = figure.querySelector("img");
    img.src = src;
    img.alt = `Generated image ${n + 1}: ${fallback.prompt || "(no prompt)"}`;
    const link = figure.querySelector("a.download");
    link.href = src;
    link.download = `latentdiff-${fallback.seed ?? n}.png`;
    figure.querySelector(".infotext").textContent = infotext;
    const button = figure.querySelector("button.reuse");
    button.setAttribute("aria-label", `Reuse the parameters of image ${n + 1}`);
    button.addEventListener("click", () => reuseParameters(infotext, fallback));
    figures.push(figure);
  });
  $("gallery").prepend(...figures);
  return figures.length;
}

// ---------------------------------------------------------------------------------------------------------------
// Generation and progress

function setBusy(busy) {
  state.busy = busy;
  $("generate").disabled = busy;
  $("interrupt").disabled = !busy;
  $("progress-box").hidden = !busy;
  if (busy) {
    $("preview").hidden = true;
    $("preview").removeAttribute("src");
    $("progress").value = 0;
    $("progress-text").textContent = "Starting…";
  }
}

async function pollProgress() {
  while (state.busy) {
    try {
      const p = await api("GET", "sdapi/v1/progress");
      if (!state.busy) break;
      if (p.current_image) {  // the running image decoded from its latest prediction (base64 PNG)
        $("preview").src = `data:image/png;base64,${p.current_image}`;
        $("preview").hidden = false;
      }
      const fraction = Math.min(Math.max(Number(p.progress) || 0, 0), 1);
      $("progress").value = fraction;
      const parts = [`${Math.round(fraction * 100)} %`];
      const s = p.state || {};
      if (s.sampling_steps) parts.push(`step ${s.sampling_step ?? 0}/${s.sampling_steps}`);
      if (s.job_count > 1) parts.push(`job ${(s.job_no ?? 0) + 1}/${s.job_count}`);
      if (p.eta_relative > 0) parts.push(`ETA ${Number(p.eta_relative).toFixed(1)} s`);
      $("progress-text").textContent = parts.join(" · ");
    } catch (err) {
      $("progress-text").textContent = err.message;
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function generate(event) {
  event.preventDefault();
  if (state.busy) return;
  clearError();
  let request;
  try {
    request = readForm();
  } catch (err) {
    setStatus("");
    showError(err.message);
    return;
  }
  setBusy(true);
  state.interrupted = false;
  setStatus("Generating…");
  const started = performance.now();
  const polling = pollProgress();
  try {
    const data = await api("POST", "sdapi/v1/txt2img", request);
    const count = addResults(data, request);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const images = `${count} image${count === 1 ? "" : "s"}`;
    setStatus(state.interrupted ? `Interrupted after ${seconds} s: ${images} from the last step.`
      : `${images} in ${seconds} s.`);
  } catch (err) {
    showError(err.message);
    setStatus("");
  } finally {
    setBusy(false);
    await polling;
  }
}

async function interrupt() {
  state.interrupted = true;  // before the answer: the generation may finish first
  setStatus("Interrupting…");
  try {
    await api("POST", "sdapi/v1/interrupt");
  } catch (err) {
    state.interrupted = false;
    showError(err.message);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Start

function init() {
  const keyInput = $("api-key");
  keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
  // A new key is stored and the samplers and models are asked for again with it (on Enter or leaving the field).
  const applyKey = () => {
    const key = keyInput.value.trim();
    if (key === (localStorage.getItem(KEY_STORAGE) || "")) return;
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    loadLists();
  };
  keyInput.addEventListener("change", applyKey);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    applyKey();
  });
  $("txt2img-form").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", interrupt);
  $("model").addEventListener("change", switchModel);
  $("seed-random").addEventListener("click", () => {
    $("seed").value = -1;
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("txt2img-form").requestSubmit();
  });
  document.body.dataset.ready = "loading";
  loadLists().finally(() => {
    document.body.dataset.ready = "true";
  });
}

init();
