// Worker of benchmarks/bench_js.py: decode speed of the JS runtime (onnxruntime-node) on one artifact.
// Usage: node benchmarks/js_decode.mjs SPEC_JSON   (prints one JSON line)
import { performance } from 'node:perf_hooks';
import { Model } from '../runtimes/js/dist/node.js';

const spec = JSON.parse(process.argv[2]);
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };
let t = performance.now();
const m = await Model.load(spec.artifact, { sessionOptions: { intraOpNumThreads: spec.threads, interOpNumThreads: 1 } });
const loadS = (performance.now() - t) / 1e3;
const ids = [spec.prompt];
const kw = { adapter: spec.adapter, stopAtEos: false };
await m.generate(ids, { ...kw, maxNewTokens: 8 });  // warm-up
const rates = [], prefill = [];
let tokens = null;
for (let i = 0; i < spec.runs; i++) {
  const out = await m.generate(ids, { ...kw, maxNewTokens: spec.new_tokens });
  const s = m.stats;
  rates.push((s.newTokens - 1) / (s.decodeMs / 1e3));
  prefill.push(s.prefillMs);
  tokens = out[0].slice(spec.prompt.length);
}
// swap: the adapter feeds of a choice, first use (tensors built) and again (cached)
const other = m.adapters.find((a) => a !== spec.adapter);
await m.logits([[1, 2]], { adapter: other });
const first = m.stats.feedsMs;
const again = [];
for (let i = 0; i < spec.swap_pairs; i++) {
  await m.logits([[1, 2]], { adapter: i % 2 ? spec.adapter : other });
  again.push(m.stats.feedsMs);
}
console.log(JSON.stringify({
  load_s: loadS, decode_tok_s: median(rates), prefill_ms: median(prefill), tokens,
  swap_first_ms: first, swap_ms: median(again), peak_rss_mb: process.resourceUsage().maxRSS / 1024,
}));
