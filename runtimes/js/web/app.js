// edgepeft web demo: load an artifact with @edgepeft/runtime (dist/web.js, onnxruntime-web),
// choose the base model, one adapter or a weighted mix, generate, and show the timings.
//
// Query parameters:
//   artifact  URL of the artifact directory (default /artifact/, what serve.mjs serves)
//   prompt, max, adapter   initial values of the form (adapter: a name, "base", or "mix")
//   runtime   URL of the runtime module (default ../dist/web.js; same origin only)

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

const ui = {
  status: $('status'),
  error: $('error'),
  choiceBox: $('adapter-choice'),
  promptBox: $('prompt-box'),
  select: $('adapter-select'),
  mix: $('mix-weights'),
  prompt: $('prompt'),
  maxNew: $('max-new-tokens'),
  generate: $('generate'),
  output: $('output'),
  choiceShown: $('choice-shown'),
  swap: $('swap-ms'),
  tokS: $('tok-s'),
  prefill: $('prefill-ms'),
  newTokens: $('new-tokens'),
  total: $('total-ms'),
  info: $('info'),
};

let model = null;
let runs = 0;

function setState(state, text) {
  document.body.dataset.state = state;
  if (text !== undefined) ui.status.textContent = text;
}

function describe(err) {
  if (err == null) return 'unknown error';
  if (typeof err === 'string') return err;
  let text = err.message || String(err);
  if (err.cause && err.cause.message && !text.includes(err.cause.message)) text += `\n  caused by: ${err.cause.message}`;
  return text;
}

function showError(what, err) {
  const text = `${what}: ${describe(err)}`;
  ui.error.hidden = false;
  ui.error.textContent = ui.error.textContent ? `${ui.error.textContent}\n${text}` : text;
  console.error(text, err);
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = '';
}

window.addEventListener('error', (e) => showError('Uncaught error', e.error || e.message));
window.addEventListener('unhandledrejection', (e) => showError('Unhandled rejection', e.reason));

/** Same-origin URL from a query parameter, else the default (never loads code from elsewhere). */
function sameOrigin(value, fallback) {
  if (!value) return new URL(fallback, location.href).href;
  const url = new URL(value, location.href);
  if (url.origin !== location.origin) throw new Error(`${value}: only same-origin URLs are accepted here`);
  return url.href;
}

function fmt(x, digits = 1) {
  if (typeof x !== 'number' || !Number.isFinite(x)) return '–';
  if (x !== 0 && Math.abs(x) < 10 ** -digits) return x.toPrecision(2);
  return x.toFixed(digits);
}

/** The runtime's stats of the last call, whatever it names them. */
function lastStats(m) {
  const s = m.stats ?? m.lastStats ?? (typeof m.getStats === 'function' ? m.getStats() : null) ?? {};
  const pick = (...names) => {
    for (const n of names) if (typeof s[n] === 'number') return s[n];
    return undefined;
  };
  const prefillMs = pick('prefillMs', 'prefill_ms');
  const decodeMs = pick('decodeMs', 'decode_ms');
  const newTokens = pick('newTokens', 'new_tokens', 'tokens');
  const swapMs = pick('feedsMs', 'swapMs', 'adapterMs', 'feeds_ms', 'swap_ms');
  let tokS = pick('decodeTokensPerSecond', 'tokensPerSecond', 'tokS');
  if (tokS === undefined && decodeMs > 0 && newTokens > 1) tokS = (newTokens - 1) / (decodeMs / 1000);
  return { prefillMs, decodeMs, newTokens, swapMs, tokS };
}

function currentChoice() {
  const mode = document.querySelector('input[name=mode]:checked')?.value;
  if (mode === 'base') return { adapter: null, label: 'base model' };
  if (mode === 'adapter') {
    const name = ui.select.value;
    if (!name) throw new Error('the artifact has no adapters; choose the base model');
    return { adapter: name, label: name };
  }
  const mix = {};
  for (const input of ui.mix.querySelectorAll('input[data-adapter]')) {
    const w = Number(input.value);
    if (input.value.trim() === '' || !Number.isFinite(w)) throw new Error(`weight of ${input.dataset.adapter}: not a number`);
    if (w !== 0) mix[input.dataset.adapter] = w;
  }
  if (!Object.keys(mix).length) throw new Error('a mix needs at least one adapter with a non-zero weight');
  const label = 'mix(' + Object.entries(mix).map(([k, v]) => `${k}=${v}`).join(',') + ')';
  return { adapter: mix, label };
}

function fillAdapters(names) {
  ui.select.replaceChildren(...names.map((n) => new Option(n, n)));
  ui.mix.replaceChildren();
  names.forEach((n, i) => {
    const label = document.createElement('label');
    label.textContent = n;
    label.htmlFor = `mix-${i}`;
    const input = document.createElement('input');
    input.type = 'number';
    input.step = '0.05';
    input.id = `mix-${i}`;
    input.value = names.length ? (1 / names.length).toFixed(2) : '0';
    input.dataset.adapter = n;
    ui.mix.append(label, input);
  });
  if (!names.length) {
    $('mode-adapter').disabled = true;
    $('mode-mix').disabled = true;
    $('mode-base').checked = true;
  }
  const want = params.get('adapter');
  if (want === 'base') $('mode-base').checked = true;
  else if (want === 'mix') $('mode-mix').checked = true;
  else if (want && names.includes(want)) ui.select.value = want;
}

let wasmThreads = '–'; // onnxruntime-web's thread count, set before loading

function showInfo(m, artifactUrl, loadMs) {
  const man = m.manifest ?? {};
  const rows = [
    ['URL', artifactUrl],
    ['Base', [man.base?.model_type, man.base?.vocab_size && `vocab ${man.base.vocab_size}`].filter(Boolean).join(', ') || '–'],
    ['Mode', [man.mode, man.precision, man.graph?.layout].filter(Boolean).join(', ') || '–'],
    ['Adapters', m.adapters.length ? m.adapters.join(', ') : 'none'],
    ['Load time', `${fmt(loadMs)} ms`],
    ['Threads', String(wasmThreads)],
  ];
  ui.info.replaceChildren(...rows.flatMap(([k, v]) => {
    const dt = document.createElement('dt');
    dt.textContent = k;
    const dd = document.createElement('dd');
    dd.textContent = v;
    return [dt, dd];
  }));
}

async function load() {
  let artifactUrl;
  let runtimeUrl;
  try {
    artifactUrl = sameOrigin(params.get('artifact'), '/artifact/');
    if (!artifactUrl.endsWith('/')) artifactUrl += '/';
    runtimeUrl = sameOrigin(params.get('runtime'), '../dist/web.js');
  } catch (e) {
    setState('error', 'Bad query parameters.');
    showError('Query', e);
    return;
  }
  ui.prompt.value = params.get('prompt') ?? 'Hello';
  if (params.get('max')) ui.maxNew.value = params.get('max');
  setState('loading', `Loading the runtime (${runtimeUrl})…`);
  let runtime;
  try {
    runtime = await import(runtimeUrl);
  } catch (e) {
    setState('error', 'The runtime did not load.');
    showError(`Cannot import the runtime from ${runtimeUrl} (build it: cd runtimes/js && npm ci && npm run build)`, e);
    return;
  }
  const Model = runtime.Model ?? runtime.default?.Model;
  if (!Model || typeof Model.load !== 'function') {
    setState('error', 'The runtime did not load.');
    showError('Runtime', `${runtimeUrl} exports no Model with a static load()`);
    return;
  }
  // onnxruntime-web's default is half the cores (1 thread on a 2-core machine); use them all, up to
  // 4, when the page can (cross-origin isolated); ?threads=N overrides.
  if (runtime.ort?.env?.wasm) {
    const cores = navigator.hardwareConcurrency || 1;
    runtime.ort.env.wasm.numThreads = Number(params.get('threads')) || (self.crossOriginIsolated ? Math.min(4, cores) : 1);
    wasmThreads = runtime.ort.env.wasm.numThreads;
  }
  setState('loading', `Loading the artifact at ${artifactUrl}…`);
  const t0 = performance.now();
  try {
    model = await Model.load(artifactUrl);
  } catch (e) {
    setState('error', 'The artifact did not load.');
    showError(`Cannot load the artifact at ${artifactUrl}`, e);
    return;
  }
  const loadMs = performance.now() - t0;
  fillAdapters([...(model.adapters ?? [])]);
  showInfo(model, artifactUrl, loadMs);
  ui.choiceBox.disabled = false;
  ui.promptBox.disabled = false;
  setState('ready', `Ready: ${model.adapters.length} adapter(s), loaded in ${fmt(loadMs)} ms` +
    (self.crossOriginIsolated ? '' : ' (not cross-origin isolated: onnxruntime-web runs single-threaded)'));
}

async function generate(event) {
  event.preventDefault();
  if (!model || document.body.dataset.state === 'busy') return;
  clearError();
  let choice;
  const maxNewTokens = Number(ui.maxNew.value);
  try {
    choice = currentChoice();
    if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1) throw new Error('max new tokens: a whole number >= 1');
  } catch (e) {
    showError('Input', e);
    return;
  }
  setState('busy', `Generating with ${choice.label}…`);
  ui.generate.disabled = true;
  ui.choiceBox.disabled = true;
  ui.output.dataset.done = '';
  for (const el of [ui.swap, ui.tokS, ui.prefill, ui.newTokens, ui.total]) el.textContent = '–';
  const t0 = performance.now();
  try {
    const text = await model.generateText(ui.prompt.value, { maxNewTokens, adapter: choice.adapter });
    const totalMs = performance.now() - t0;
    const s = lastStats(model);
    ui.output.textContent = text;
    ui.choiceShown.textContent = `(${choice.label})`;
    ui.swap.textContent = fmt(s.swapMs, 2);
    ui.tokS.textContent = fmt(s.tokS, 1);
    ui.prefill.textContent = fmt(s.prefillMs, 2);
    ui.newTokens.textContent = s.newTokens ?? '–';
    ui.total.textContent = fmt(totalMs, 1);
    runs += 1;
    ui.output.dataset.choice = choice.label;
    ui.output.dataset.done = String(runs);
    setState('ready', `Done: ${choice.label}, ${s.newTokens ?? '?'} new token(s) in ${fmt(totalMs)} ms`);
  } catch (e) {
    showError(`Generation with ${choice.label} failed`, e);
    ui.output.dataset.done = 'error';
    setState('ready', 'Generation failed.');
  } finally {
    ui.generate.disabled = false;
    ui.choiceBox.disabled = false;
  }
}

$('controls').addEventListener('submit', generate);
load();
