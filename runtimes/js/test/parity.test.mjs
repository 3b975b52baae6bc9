// Parity of the JS runtime with the Python runtime (tests/test_js_runtime.py writes the cases).
// Run: EDGEPEFT_JS_CASES=<dir with cases.json> node --test test/parity.test.mjs
import assert from 'node:assert/strict';
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { KvBuffer } from '../dist/core/fused.js';
import { rowWeights } from '../dist/core/mix.js';
import { KEY_PREFIX, MAX_PACK_BYTES, PACK_FORMAT, PACK_SUFFIX, PACK_VERSION } from '../dist/core/packs.js';
import { Sampler } from '../dist/core/sampling.js';
import { Model as Core } from '../dist/core/index.js';
import { EdgepeftError, Model, ort } from '../dist/node.js';
import { Model as RNModel } from '../dist/react-native.js';

const dir = process.env.EDGEPEFT_JS_CASES;
if (!dir) throw new Error('set EDGEPEFT_JS_CASES to the dir tests/test_js_runtime.py wrote (python tests/test_js_runtime.py DIR)');
const { artifacts, sampling, packs } = JSON.parse(readFileSync(join(dir, 'cases.json'), 'utf8'));

const f32 = (b64) => {
  const buf = Buffer.from(b64, 'base64');
  return new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
};
const name = (a) => (a == null ? 'base' : typeof a === 'string' ? a : Array.isArray(a) ? `[${a.map(name).join(' | ')}]`
  : `mix(${Object.entries(a).map(([k, v]) => `${k}=${v}`).join(',')})`);

function maxDiff(got, dims, want, wantDims) {
  assert.deepEqual(dims, wantDims, 'dims');
  assert.equal(got.length, want.length);
  let m = 0;
  for (let i = 0; i < got.length; i++) {
    const d = Math.abs(got[i] - want[i]);
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
  }
  return m;
}

/** Counts the session runs of `m` (every graph it has) until `restore()`. */
function countRuns(m) {
  const sessions = [...new Set([...m.sessions.values(), ...(m.buckets?.values() ?? [])])];
  const counter = { n: 0 };
  const undo = sessions.map((s) => {
    const own = Object.hasOwn(s, 'run'), real = s.run;
    s.run = function (...args) { counter.n++; return real.apply(this, args); };
    return () => { if (own) s.run = real; else delete s.run; };
  });
  counter.restore = () => undo.forEach((f) => f());
  return counter;
}

/** Python's batcher schedule (tests/test_js_runtime.py `_batcher_case`): each row joins as soon as
 * it fits (the batch steps while it does not), then one step; then steps until every row is done.
 * Each row's tokens must be Python's `generate` of that row alone, the decode runs Python's, and
 * every session run is a prefill (one per row) or a step (one for all live rows). */
async function runBatcher(t, m, c, tol) {
  const counter = countRuns(m);
  try {
    const b = m.batcher({ capacity: c.capacity, context: c.context });
    assert.equal(b.serial, c.serial);
    const rows = [];
    let steps = 0;
    for (let i = 0; i < c.prompts.length; i++) {
      while (!b.fits(c.choices[i])) { await b.step(); steps++; }
      rows.push(await b.join(c.prompts[i], { adapter: c.choices[i], maxNewTokens: c.news[i], stopAtEos: false }));
      assert.ok(b.rows.size <= b.capacity);
      await b.step();
      steps++;
    }
    while (b.rows.size) { await b.step(); steps++; }
    assert.equal(counter.n, rows.length + b.runs, 'one session run per prefill, one per step');
    assert.equal(b.runs, c.runs, "Python's number of decode runs");
    assert.ok(b.runs <= steps);
    let worst = 0;
    rows.forEach((r, i) => {
      assert.deepEqual(r.tokens, c.tokens[i], `row ${i} (${name(c.choices[i])}): its tokens alone`);
      assert.equal(r.finish, 'length');
      worst = Math.max(worst, maxDiff(r.logits, [r.logits.length], f32(c.logits[i]), [r.logits.length]));
    });
    t.diagnostic(`${rows.length} rows, ${b.runs} decode runs; last logits max|diff| ${worst.toExponential(2)}`);
    assert.ok(worst <= tol, `last logits: max |diff| ${worst} > ${tol}`);
  } finally {
    counter.restore();
  }
}

/** Python's per-row logits and greedy ids of `c`, each in as many session runs as one adapter for
 * every row takes (traced and fused graphs: one per step). */
async function checkPerRow(t, m, c, art) {
  const fixedShapes = m.manifest.static != null;
  const counter = countRuns(m);
  try {
    const got = await m.logits(c.ids, { adapter: c.adapter });
    const perRow = counter.n;
    counter.n = 0;
    await m.logits(c.ids, { adapter: c.adapter.find((a) => typeof a === 'string') });
    assert.equal(perRow, counter.n, 'as many runs as one adapter for every row');
    if (!fixedShapes) assert.equal(perRow, 1);
    const d = maxDiff(got.data, got.dims, f32(c.data), c.dims);
    t.diagnostic(`max|diff| ${d.toExponential(2)}`);
    assert.ok(d <= art.tol, `max |diff| ${d} > ${art.tol}`);
    counter.n = 0;
    assert.deepEqual(await m.generate(c.ids, { maxNewTokens: c.max_new_tokens, adapter: c.adapter, stopAtEos: false }), c.out);
    if (!fixedShapes) assert.equal(counter.n, c.max_new_tokens, 'prefill + one run per step');
  } finally {
    counter.restore();
  }
}

const models = new Map();
async function load(art) {
  if (!models.has(art.dir)) models.set(art.dir, await Model.load(art.dir));
  return models.get(art.dir);
}

for (const [key, art] of Object.entries(artifacts)) {
  describe(`${key} (${art.task}, tol ${art.tol})`, () => {
    test('adapters listed as in Python', async () => {
      assert.deepEqual((await load(art)).adapters, art.adapters);
    });
    for (const c of art.logits ?? []) {
      test(`logits ${name(c.adapter)} ids=${JSON.stringify(c.ids)}${c.mask ? ' mask' : ''}`, async (t) => {
        const m = await load(art);
        const got = await m.logits(c.ids, { adapter: c.adapter, attentionMask: c.mask });
        const d = maxDiff(got.data, got.dims, f32(c.data), c.dims);
        t.diagnostic(`max|diff| ${d.toExponential(2)}`);
        assert.ok(d <= art.tol, `max |diff| ${d} > ${art.tol}`);
      });
    }
    for (const c of art.generate ?? []) {
      test(`greedy ${name(c.adapter)}`, async () => {
        const m = await load(art);
        assert.deepEqual(await m.generate(c.ids, { maxNewTokens: c.max_new_tokens, adapter: c.adapter }), c.out);
        assert.ok(m.stats.newTokens >= 1 && m.stats.prefillMs >= 0 && m.stats.decodeMs >= 0 && m.stats.feedsMs >= 0);
      });
    }
    for (const c of art.per_row ?? []) {
      test(`per-row ${name(c.adapter)}: Python's logits and greedy ids, one run per step`, async (t) => {
        await checkPerRow(t, await load(art), c, art);
      });
    }
    if (art.batcher) {
      test(`batcher: rows ${name(art.batcher.choices)} joining at different steps`, async (t) => {
        await runBatcher(t, await load(art), art.batcher, art.tol);
      });
    }
    for (const c of art.generate_text ?? []) {
      test(`generateText ${name(c.adapter)}`, async () => {
        const m = await load(art);
        assert.equal(await m.generateText(c.prompt, { maxNewTokens: c.max_new_tokens, adapter: c.adapter }), c.out);
      });
    }
    for (const c of art.classify ?? []) {
      test(`classify ${name(c.adapter)} ${JSON.stringify(c.input)}`, async (t) => {
        const m = await load(art);
        const lg = await m.classifyLogits(c.input, { adapter: c.adapter });
        const d = maxDiff(lg.data, lg.dims, f32(c.logits), c.dims);
        const p = await m.classify(c.input, { adapter: c.adapter });
        const dp = maxDiff(p.data, p.dims, f32(c.probs), c.dims);
        t.diagnostic(`max|diff| logits ${d.toExponential(2)} probs ${dp.toExponential(2)}`);
        assert.ok(d <= art.tol && dp <= art.tol, `max |diff| ${d} / ${dp} > ${art.tol}`);
        assert.deepEqual(Model.argmax(lg), c.labels);
      });
    }
  });
}

describe('core with a plain Source (the browser path: weights passed as externalData bytes)', () => {
  test('side artifact, a mix and a prefix: same logits', async (t) => {
    const art = artifacts.side;
    const source = { read: async (rel) => new Uint8Array(readFileSync(join(art.dir, rel))), describe: (rel) => `mem:${rel}` };
    const m = await Core.open(source, ort);
    for (const c of art.logits.filter((c) => typeof c.adapter === 'object' && c.adapter !== null)) {
      const got = await m.logits(c.ids, { adapter: c.adapter, attentionMask: c.mask });
      const d = maxDiff(got.data, got.dims, f32(c.data), c.dims);
      t.diagnostic(`${name(c.adapter)} max|diff| ${d.toExponential(2)}`);
      assert.ok(d <= art.tol);
    }
  });
});

describe('fused artifacts with present fed back as past (the core with a plain ort: how onnxruntime-web runs them)', () => {
  for (const [key, art] of Object.entries(artifacts).filter(([, a]) => a.fused)) {
    test(`${key}: same logits and greedy ids as Python`, async (t) => {
      const source = { read: async (rel) => new Uint8Array(readFileSync(join(art.dir, rel))), describe: (rel) => `mem:${rel}` };
      const m = await Core.open(source, ort);
      let worst = 0;
      for (const c of art.logits) {
        const got = await m.logits(c.ids, { adapter: c.adapter, attentionMask: c.mask });
        worst = Math.max(worst, maxDiff(got.data, got.dims, f32(c.data), c.dims));
      }
      t.diagnostic(`max|diff| ${worst.toExponential(2)}`);
      assert.ok(worst <= art.tol, `max |diff| ${worst} > ${art.tol}`);
      for (const g of art.generate) {
        assert.deepEqual(await m.generate(g.ids, { maxNewTokens: g.max_new_tokens, adapter: g.adapter }), g.out, name(g.adapter));
      }
    });
  }
  test('fused: per-row adapters and the batcher, present fed back', async (t) => {
    const art = artifacts.fused;
    const source = { read: async (rel) => new Uint8Array(readFileSync(join(art.dir, rel))), describe: (rel) => `mem:${rel}` };
    const m = await Core.open(source, ort);
    for (const c of art.per_row) await checkPerRow(t, m, c, art);
    await runBatcher(t, m, art.batcher, art.tol);
  });
  const swap = artifacts.fused?.swap;
  for (const inPlace of [true, false]) {
    test(`adapter swapped on a running KV buffer (${inPlace ? 'written in place' : 'fed back'}): Python's next-step logits`, async (t) => {
      const m = await load(artifacts.fused);
      const kv = new KvBuffer(ort.Tensor, m.sessions.get(null), m.cache, 1, swap.slots, inPlace);
      await kv.run(m.feeds(swap.first).feeds, swap.ids, swap.lengths);
      for (const s of swap.steps) {
        const out = await kv.run(m.feeds(s.adapter).feeds, s.ids, s.lengths);
        const d = maxDiff(out.data, [...out.dims], f32(s.data), s.dims);
        t.diagnostic(`${name(s.adapter)} max|diff| ${d.toExponential(2)}`);
        assert.ok(d <= artifacts.fused.tol, `${name(s.adapter)}: max |diff| ${d}`);
      }
    });
  }
});

describe('react-native entry (onnxruntime-node standing in for onnxruntime-react-native: same onnxruntime-common API)', () => {
  test('Model.load(ort, {read, describe}): same greedy ids and mix logits', async (t) => {
    const art = artifacts.side;
    const source = { read: async (rel) => new Uint8Array(readFileSync(join(art.dir, rel))), describe: (rel) => `rn:${rel}` };
    const m = await RNModel.load(ort, source);
    const c = art.logits.find((c) => typeof c.adapter === 'object' && c.adapter !== null);
    const got = await m.logits(c.ids, { adapter: c.adapter, attentionMask: c.mask });
    const d = maxDiff(got.data, got.dims, f32(c.data), c.dims);
    t.diagnostic(`${name(c.adapter)} max|diff| ${d.toExponential(2)}`);
    assert.ok(d <= art.tol);
    const g = art.generate[0];
    assert.deepEqual(await m.generate(g.ids, { maxNewTokens: g.max_new_tokens, adapter: g.adapter }), g.out);
  });
});

describe("rowWeights: Python's mix.row_weights on the classifier's adapters", () => {
  for (const [key, art] of Object.entries(artifacts)) for (const c of art.row_weights ?? []) {
    test(`${key}: rows ${JSON.stringify(c.keys)}${c.drop_heads.length ? ` (no heads: ${c.drop_heads})` : ''}`, async () => {
      const m = await load(art);
      const loaded = new Map([...m.loaded].map(([n, a]) => [n, c.drop_heads.includes(n)
        ? { ...a, graph: new Map([...a.graph].filter(([k]) => !k.startsWith('head.'))) } : a]));
      const run = () => rowWeights(c.keys, c.names, loaded, m.rowsSpec, m.rowValues);
      if (c.message) {
        assert.throws(run, (e) => {
          assert.ok(e instanceof EdgepeftError, `not an EdgepeftError: ${e}`);
          assert.equal(e.message, c.message);
          return true;
        });
        return;
      }
      const feeds = run();
      assert.deepEqual([...feeds.keys()].sort(), Object.keys(c.feeds).sort());
      for (const [k, want] of Object.entries(c.feeds)) {
        assert.deepEqual(feeds.get(k).dims, want.dims, k);
        assert.deepEqual([...feeds.get(k).data], [...f32(want.data)], k);  // exact: float32 as numpy's
      }
    });
  }
});

describe('refusals', () => {
  const tmp = mkdtempSync(join(tmpdir(), 'edgepeft-js-'));
  after(() => rmSync(tmp, { recursive: true, force: true }));
  const side = artifacts.side.dir;
  const copy = (label, edit) => {
    const d = join(tmp, label);
    cpSync(side, d, { recursive: true });
    edit?.(d);
    return d;
  };
  const editManifest = (d, fn) => {
    const p = join(d, 'manifest.json');
    const m = JSON.parse(readFileSync(p, 'utf8'));
    fn(m);
    writeFileSync(p, JSON.stringify(m));
  };
  const refuses = async (d, re) => {
    await assert.rejects(Model.load(d), (e) => {
      assert.ok(e instanceof EdgepeftError, `not an EdgepeftError: ${e}`);
      assert.match(e.message, re);
      return true;
    });
  };

  test('tampered adapter file: sha256, naming the file', async () => {
    const d = copy('tampered', (d) => {
      const p = join(d, 'adapters', 'chat.safetensors');
      const b = readFileSync(p);
      b[b.length - 3] ^= 0xff;
      writeFileSync(p, b);
    });
    await refuses(d, /chat\.safetensors: sha256 does not match the manifest .*Export the artifact again/);
  });
  test('tampered graph: sha256', async () => {
    const d = copy('graph', (d) => {
      const p = join(d, 'model.onnx');
      const b = readFileSync(p);
      b[b.length - 1] ^= 0xff;
      writeFileSync(p, b);
    });
    await refuses(d, /model\.onnx: sha256 does not match the manifest/);
  });
  test('another format_version', async () => {
    await refuses(copy('v3', (d) => editManifest(d, (m) => { m.format_version = 3; })),
      /manifest\.json: format_version 3; this runtime reads version 2/);
  });
  test('a damaged manifest field', async () => {
    await refuses(copy('field', (d) => editManifest(d, (m) => { m.base.vocab_size = 'x'; })),
      /manifest\.json: base\.vocab_size = "x": expected an integer >= 1/);
  });
  test('adapter for another base (tag / fingerprint)', async () => {
    await refuses(copy('otherbase', (d) => editManifest(d, (m) => { m.adapters.chat.base_fingerprint = 'sha256:00'; })),
      /chat\.safetensors: made for base sha256:00/);
  });
  test('fused layout on a graph that is not fused (and the reverse): the manifest was edited', async () => {
    await refuses(copy('fused', (d) => editManifest(d, (m) => { m.graph.layout = 'fused'; })),
      /graph layout "fused", but .*model\.onnx has no 'seqlens_k' input \(not a fused graph\); the manifest was edited/);
    const fused = artifacts.fused.dir;
    const d = join(tmp, 'unfused');
    cpSync(fused, d, { recursive: true });
    editManifest(d, (m) => { delete m.graph.layout; });
    await refuses(d, /no graph layout given, but .*model\.onnx is a fused graph \(it takes 'seqlens_k'\)/);
  });
  for (const [key, art] of Object.entries(artifacts)) for (const c of art.refusals ?? []) {
    test(`${key}: ${c.method} ${name(c.adapter)} refused with Python's message`, async () => {
      const m = await load(art);
      const call = c.method === 'generate' ? m.generate(c.ids, { maxNewTokens: c.max_new_tokens, adapter: c.adapter })
        : c.method === 'classify' ? m.classifyLogits(c.ids, { adapter: c.adapter })
          : m.logits(c.ids, { adapter: c.adapter });
      await assert.rejects(call, (e) => {
        assert.ok(e instanceof EdgepeftError, `not an EdgepeftError: ${e}`);
        // Which overflowing input is named follows the order of the adapter's arrays: onnxruntime's
        // (hash) order in Python, the file's in JS; the rest of the message is the same.
        const norm = (s) => s.replace(/input \S+ needs shape \(\d+, \d+\), above the fixed \(\d+, \d+\)/,
          'input <k> needs shape (r, n), above the fixed (max_rank, n)');
        assert.equal(norm(e.message.replaceAll(art.dir, '<dir>')), norm(c.message));
        return true;
      });
    });
  }
  test('unknown adapter lists the adapters; bad mixes are refused as in Python', async () => {
    const m = await load(artifacts.side);
    await assert.rejects(m.logits([[5, 6]], { adapter: 'nope' }),
      (e) => e instanceof EdgepeftError && /adapter 'nope' is not in .*it has: chat, sql, prefix, houlsby, ia3\./.test(e.message));
    await assert.rejects(m.logits([[5, 6]], { adapter: { chat: 1, nope: 1 } }), /adapter 'nope' is not in/);
    await assert.rejects(m.logits([[5, 6]], { adapter: { ia3: 0.5 } }), /does not scale linearly; give it weight 1/);
    await assert.rejects(m.logits([[5, 6]], { adapter: { prefix: 0.5 } }), /is a prefix .*give it weight 1/);
    await assert.rejects(m.logits([[5, 600]]), /input_ids must lie in \[0, 96\)/);
    await assert.rejects(m.classify(['w5']), /causal-lm artifact: classify\(\) needs a classification artifact/);
    const merged = await load(artifacts.merged);
    await assert.rejects(merged.logits([[5, 6]], { adapter: { chat: 1 } }), /merged artifact: one graph per adapter/);
  });
  test('a graph without per-row weights refuses per-row lists, with the reason (one choice still works)', async () => {
    const d = join(tmp, 'no-rows');
    cpSync(artifacts.fused.dir, d, { recursive: true });
    editManifest(d, (m) => { delete m.rows; delete m.row_values; });
    const m = await Model.load(d);
    await assert.rejects(m.logits([[5, 6], [7, 8]], { adapter: ['chat', 'sql'] }), (e) => e instanceof EdgepeftError &&
      /manifest\.json: this graph has no per-row weights .*export the artifact again\.$/.test(e.message));
    const one = await m.logits([[5, 6], [7, 8]], { adapter: ['chat', 'chat'] });
    assert.deepEqual(one.dims.slice(0, 2), [2, 2]);
    const b = m.batcher({ capacity: 2, context: 16 });  // rows of one adapter still share a call there
    const rows = [await b.join([5, 6], { adapter: 'chat', maxNewTokens: 3 })];
    assert.ok(!b.fits('sql') && b.fits('chat'));
    rows.push(await b.join([7, 8, 9], { adapter: 'chat', maxNewTokens: 2 }));
    while (b.rows.size) await b.step();
    assert.equal(b.runs, 2);
    assert.deepEqual(rows.map((r) => r.tokens.length), [3, 2]);
  });
  test('merged artifact: a per-row list runs one call per distinct adapter, rows back in order', async () => {
    const art = artifacts.merged;
    const d = join(tmp, 'merged-alias');
    cpSync(art.dir, d, { recursive: true });
    editManifest(d, (m) => { m.adapters.again = m.adapters.chat; });  // a second adapter: the same graph
    const m = await Model.load(d);
    const c = art.logits.find((x) => x.adapter === 'chat' && !x.mask && x.ids.length === 2 && x.ids[0].length !== x.ids[1].length);
    const counter = countRuns(m);
    const got = await m.logits(c.ids, { adapter: ['again', 'chat'] });
    assert.equal(counter.n, 2);
    counter.restore();
    assert.ok(maxDiff(got.data, got.dims, f32(c.data), c.dims) <= art.tol);
    const g = art.generate.find((x) => x.adapter === 'chat');
    assert.deepEqual(await m.generate(g.ids, { maxNewTokens: g.max_new_tokens, adapter: ['chat', 'again'] }), g.out);
    await assert.rejects(m.logits(c.ids, { adapter: ['chat', null] }), /merged artifact: one graph per adapter/);
  });
  test('bad per-row lists and batcher calls are refused', async () => {
    const m = await load(artifacts.side);
    await assert.rejects(m.logits([[5, 6], [7, 8]], { adapter: ['chat', 'nope'] }), /adapter 'nope' is not in/);
    await assert.rejects(m.logits([[5, 6], [7, 8]], { adapter: ['chat', [1]] }), /adapter=row 1: \[1\]: pass null, a name/);
    await assert.rejects(m.logits([[5, 6], [7, 8]], { adapter: ['chat', { sql: 'x' }] }), /adapter=row 1: .*finite numeric/);
    assert.throws(() => m.batcher({ capacity: 0 }), /capacity=0: an integer >= 1/);
    assert.throws(() => m.batcher({ context: 1 }), /context=1: an integer >= 2/);
    const b = m.batcher({ capacity: 2, context: 16 });
    assert.throws(() => b.fits('nope'), /adapter 'nope' is not in/);
    await assert.rejects(b.join([], { adapter: 'chat' }), /a prompt is a non-empty list of token ids in \[0, 96\)/);
    await assert.rejects(b.join([3, 400]), /token ids in \[0, 96\)/);
    await assert.rejects(b.join([3, 4], { maxNewTokens: 0 }), /maxNewTokens=0: an integer >= 1/);
    await assert.rejects(b.join(Array.from({ length: 12 }, (_, i) => 3 + i), { maxNewTokens: 8 }),
      /12 prompt tokens \+ 8 new tokens exceed the 16 tokens a row holds/);
    await assert.rejects(b.join([3, 4], { maxNewTokens: 3, temperature: -1 }), /temperature=-1: must be >= 0/);
    const first = b.join([5, 6, 7], { adapter: 'chat', maxNewTokens: 3 });
    await assert.rejects(b.step(), /a Batcher runs one call at a time/);
    await first;
    assert.ok(!b.fits('prefix'), 'a prefix cannot share a call with a LoRA row');
    await assert.rejects(b.join([3, 4], { adapter: 'prefix', maxNewTokens: 3 }), /cannot share a call with the live rows; wait/);
    const other = await b.join([8, 9], { adapter: 'sql', maxNewTokens: 5 });
    assert.ok(!b.fits('chat'), 'full');
    const stepping = b.step();
    b.leave(other);  // during a step: it leaves when the step ends
    assert.equal(b.rows.size, 2);
    await stepping;
    assert.ok(!b.rows.has(other.slot) && other.finish === null && b.fits('chat'));
    while (b.rows.size) await b.step();
    assert.deepEqual(await b.step(), []);
    const cls = await load(artifacts.cls);
    assert.throws(() => cls.batcher(), /classification artifact: a Batcher needs a causal-lm artifact/);
  });
  test('sampled rows in a batch: a seed reproduces each row', async () => {
    const m = await load(artifacts.fused);
    const run = async () => {
      const b = m.batcher({ capacity: 2, context: 20 });
      const r1 = await b.join([5, 9, 11], { adapter: 'chat', maxNewTokens: 6, temperature: 1.5, seed: 3, stopAtEos: false });
      const r2 = await b.join([30, 31], { adapter: 'sql', maxNewTokens: 6, temperature: 1.5, seed: 4, stopAtEos: false });
      while (b.rows.size) await b.step();
      return [r1.tokens, r2.tokens];
    };
    const a = await run();
    assert.deepEqual(await run(), a);
    assert.equal(a[0].length, 6);
  });
  test('swapping adapters reuses the cached feeds (no rebuild)', async () => {
    const m = await load(artifacts.side);
    await m.logits([[5, 6]], { adapter: { chat: 0.7, sql: 0.3 } });
    const first = m.feeds({ chat: 0.7, sql: 0.3 });
    await m.logits([[5, 6]], { adapter: 'chat' });
    assert.equal(m.feeds({ sql: 0.3, chat: 0.7 }), first);
    assert.equal(m.feeds('chat'), m.feeds('chat'));
  });
});

// Python's option names -> JS's
const jsOpts = (o) => ({ temperature: o.temperature, topK: o.top_k, topP: o.top_p,
  repetitionPenalty: o.repetition_penalty, seed: o.seed });

describe('decoding options (issue 21): as the Python runtime', () => {
  for (const c of sampling.rules) {
    test(`rules ${JSON.stringify(c.opts)}: Python's processed logits`, () => {
      const [B, V] = c.dims, x = f32(c.logits), want = f32(c.want);
      const s = new Sampler(jsOpts(c.opts));
      for (let b = 0; b < B; b++) {
        const got = s.processed(x.subarray(b * V, (b + 1) * V), c.seen[b]);
        for (let v = 0; v < V; v++) {
          const w = want[b * V + v];
          if (w <= -1e29) assert.equal(got[v], -Infinity, `row ${b} token ${v} kept`);
          else assert.ok(Math.abs(got[v] - w) <= 1e-5 * Math.max(1, Math.abs(w)), `row ${b} token ${v}: ${got[v]} vs ${w}`);
        }
      }
    });
  }
  for (const c of sampling.refusals) {
    test(`refuses ${JSON.stringify(c.opts)} with Python's message`, () => {
      assert.throws(() => new Sampler(jsOpts(c.opts)), (e) => e instanceof EdgepeftError && e.message === c.message);
    });
  }
  for (const c of sampling.texts) {
    test(`${c.dir.split('/').pop()}: stop strings, stop token ids and streaming as in Python`, async () => {
      const m = await Model.load(c.dir);
      const o = { maxNewTokens: c.max_new_tokens, adapter: c.adapter };
      assert.equal(await m.generateText(c.prompt, o), c.full);
      assert.equal(await m.generateText(c.prompt, { ...o, stop: c.stop }), c.stopped);
      const pieces = [];
      for await (const p of m.streamText(c.prompt, o)) pieces.push(p);
      assert.equal(pieces.join(''), c.full);
      assert.ok(pieces.length > 1, 'streamed in pieces');
      pieces.length = 0;
      for await (const p of m.streamText(c.prompt, { ...o, stop: c.stop })) pieces.push(p);
      assert.equal(pieces.join(''), c.stopped);
      assert.deepEqual(await m.generate(c.ids, { ...o, stopTokenIds: c.stop_token_ids }), c.cut);
      // sampling: a seed reproduces a generation; top-k 1 is greedy; temperature 0 is greedy
      const greedy = await m.generate(c.ids, o);
      assert.deepEqual(await m.generate(c.ids, { ...o, temperature: 1, topK: 1, seed: 3 }), greedy);
      const a = await m.generate(c.ids, { ...o, temperature: 1.5, seed: 11 });
      assert.deepEqual(await m.generate(c.ids, { ...o, temperature: 1.5, seed: 11 }), a);
      const others = [];
      for (const seed of [12, 13, 14]) others.push(await m.generate(c.ids, { ...o, temperature: 1.5, seed }));
      assert.ok(others.some((x) => JSON.stringify(x) !== JSON.stringify(a)), 'other seeds, other tokens');
      await assert.rejects(m.generateText(c.prompt, { ...o, topP: 0 }), /top_p=0: must be in \(0, 1\]/);
    });
  }
});

describe("adapter packs (tests/test_js_runtime.py _pack_cases): Python's logits and refusals", () => {
  const P = packs;
  const trusted = { trustedKeys: [P.keys.good] };
  const bytes = (path) => new Uint8Array(readFileSync(path));
  const close = (t, got, want, tol, what) => {
    const d = maxDiff(got.data, got.dims, f32(want.data), want.dims);
    t.diagnostic(`${what} max|diff| ${d.toExponential(2)}`);
    assert.ok(d <= tol, `${what}: max |diff| ${d} > ${tol}`);
  };
  const refusedWith = (promise, message) => assert.rejects(promise, (e) => {
    assert.ok(e instanceof EdgepeftError, `not an EdgepeftError: ${e}`);
    if (message instanceof RegExp) assert.match(e.message, message);
    else assert.equal(e.message, message);
    return true;
  });
  const tmp = mkdtempSync(join(tmpdir(), 'edgepeft-packs-'));
  after(() => rmSync(tmp, { recursive: true, force: true }));

  test("the pack format's constants are Python's", () => {
    assert.deepEqual({ format: PACK_FORMAT, version: PACK_VERSION, suffix: PACK_SUFFIX, max_bytes: MAX_PACK_BYTES,
      key_prefix: KEY_PREFIX }, P.constants);
  });

  test('signed packs load with Python\'s logits; every refusal leaves the model as it was; a newer version ' +
       'replaces the loaded one (a running call keeps the old); removeAdapter', async (t) => {
    const m = await Model.load(P.shipped, trusted);
    const shipped = P.shipped_adapters;
    assert.deepEqual(m.adapters, shipped);
    assert.equal(await m.addAdapter(P.files.v1), 'sql');
    assert.deepEqual(m.adapters, [...shipped, 'sql']);
    assert.deepEqual(m.manifest.adapters.sql.pack, { file: P.files.v1, version: 1 });
    const v1 = await m.logits(P.ids, { adapter: 'sql' });
    close(t, v1, P.want.v1, P.tol, 'sql v1');
    close(t, await m.logits(P.ids, { adapter: P.mix }), P.want.v1_mix, P.tol, 'mix with sql v1');
    for (const [c, path] of Object.entries(P.refused)) {
      await refusedWith(m.addAdapter(path), P.messages[c]);
      assert.deepEqual(m.adapters, [...shipped, 'sql'], c);
      assert.equal(m.manifest.adapters.sql.pack.version, 1, c);
    }
    await refusedWith(m.addAdapter(P.files.junk), /junk\.edgepeft-pack: not a readable adapter pack \(.+\)\.$/);
    assert.deepEqual(m.adapters, [...shipped, 'sql']);
    assert.deepEqual((await m.logits(P.ids, { adapter: 'sql' })).data, v1.data, 'the same adapter after the refusals');
    const running = m.logits(P.ids, { adapter: 'sql' });  // its feeds are chosen now
    assert.equal(await m.addAdapter(P.files.v2), 'sql');
    assert.deepEqual((await running).data, v1.data, 'a call started before the replacement finishes with version 1');
    assert.deepEqual(m.adapters, [...shipped, 'sql']);
    const v2 = await m.logits(P.ids, { adapter: 'sql' });
    close(t, v2, P.want.v2, P.tol, 'sql v2');
    assert.ok(maxDiff(v2.data, v2.dims, v1.data, v1.dims) > 1e-3, 'version 2 computes other outputs');
    close(t, await m.logits(P.ids, { adapter: P.mix }), P.want.v2_mix, P.tol, 'mix with sql v2');
    await refusedWith(m.addAdapter(P.files.v1), P.messages['older version']);
    assert.equal(m.manifest.adapters.sql.pack.version, 2);
    assert.equal(await m.addAdapter(P.files.chat_v1), 'chat');  // the shipped chat counts as version 0
    close(t, await m.logits(P.ids, { adapter: 'chat' }), P.want.chat, P.tol, 'chat v1');
    assert.deepEqual(m.adapters, [...shipped, 'sql']);
    m.removeAdapter('sql');
    assert.deepEqual(m.adapters, shipped);
    await refusedWith(m.logits(P.ids, { adapter: 'sql' }), /^adapter 'sql' is not in .*; it has: chat, code\.$/);
    await refusedWith(m.logits(P.ids, { adapter: P.mix }), /adapter 'sql' is not in/);
    await refusedWith(m.logits(P.ids, { adapter: ['chat', 'sql'] }), /adapter 'sql' is not in/);
    assert.throws(() => m.removeAdapter('sql'), (e) => e instanceof EdgepeftError && /adapter 'sql' is not in/.test(e.message));
    close(t, await m.logits(P.ids, { adapter: 'chat' }), P.want.chat, P.tol, 'chat after the removal');
    assert.equal(await m.addAdapter(P.files.v1), 'sql');  // removed: any version loads again
    assert.deepEqual((await m.logits(P.ids, { adapter: 'sql' })).data, v1.data);
  });

  test('revoked keys (by id and by key), a bad key, key files, no pinned keys', async () => {
    for (const r of [P.good_id, P.keys.good]) {
      const m = await Model.load(P.shipped, { ...trusted, revoked: [r] });
      await refusedWith(m.addAdapter(P.files.v1), P.messages[`revoked ${r.slice(0, 7)}`]);
      assert.deepEqual(m.adapters, P.shipped_adapters);
    }
    await refusedWith(Model.load(P.shipped, { trustedKeys: ['ed25519:AAAA'] }), P.messages['bad key']);
    const byFile = await Model.load(P.shipped, { trustedKeys: [P.key_files.good], revoked: [P.key_files.other] });
    assert.equal(await byFile.addAdapter(P.files.v1), 'sql');
    await refusedWith(byFile.addAdapter(P.refused['untrusted key']), /sql-other-key\.edgepeft-pack: signed by key sha256:\w{16}, which is revoked\./);
    const open = await Model.load(P.shipped);  // development: unsigned packs load, checksums are still checked
    await refusedWith(open.addAdapter(P.refused['array byte']), P.messages['array byte']);
    assert.equal(await open.addAdapter(P.files.unsigned), 'sql');
    assert.equal(await open.addAdapter(P.refused['untrusted key'], { asName: 'sql2' }), 'sql2');
  });

  test('bytes (fp16 arrays: checksums over the stored bytes), labels, a manifest without slot_schema, paths, ' +
       'a merged artifact', async (t) => {
    const m8 = await Model.load(P.shipped_int8, trusted);
    assert.equal(await m8.addAdapter(bytes(P.files.int8), { label: P.files.int8 }), 'sql');
    close(t, await m8.logits(P.ids, { adapter: 'sql' }), P.want.int8, P.int8_tol, 'sql from fp16 arrays');
    const m = await Model.load(P.shipped, trusted);
    const b = readFileSync(P.files.v1);
    assert.equal(await m.addAdapter(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength)), 'sql');  // an ArrayBuffer
    assert.equal(m.manifest.adapters.sql.pack.file, 'adapter pack');
    await refusedWith(m.addAdapter(bytes(P.refused['header text'])),
      /^adapter pack: the signature does not verify with key sha256:\w{16}: the pack was altered after signing/);
    await refusedWith(m.addAdapter(join(tmp, 'x.bin')), /x\.bin: not an adapter pack .*adds adapters from packs only\./);
    await refusedWith(m.addAdapter(join(tmp, 'none.edgepeft-pack')), /none\.edgepeft-pack: no such adapter pack \(/);
    await refusedWith(m.addAdapter(42), /pass an adapter pack's bytes/);
    const d = join(tmp, 'no-schema');
    cpSync(P.shipped, d, { recursive: true });
    const mp = join(d, 'manifest.json');
    const man = JSON.parse(readFileSync(mp, 'utf8'));
    delete man.slot_schema;
    writeFileSync(mp, JSON.stringify(man));
    const old = await Model.load(d, trusted);
    await refusedWith(old.addAdapter(P.files.v1), /sql-v1\.edgepeft-pack: .*manifest\.json records no slot_schema .*Export the artifact again/);
    assert.deepEqual(old.adapters, P.shipped_adapters);
    const merged = await Model.load(P.merged, trusted);
    await refusedWith(merged.addAdapter(P.files.v1), /is a merged artifact \(one graph per adapter\); addAdapter needs a side-branch/);
    merged.removeAdapter('chat');  // a merged artifact's adapters are graphs: removed all the same
    assert.deepEqual(merged.adapters, []);
    await refusedWith(merged.logits(P.ids, { adapter: 'chat' }), /adapter 'chat' is not in .*; it has: \(none\)\./);
    const plain = await Core.open({ read: async (rel) => bytes(join(P.shipped, rel)), describe: (rel) => `mem:${rel}` }, ort);
    await refusedWith(plain.addAdapter(P.files.v1), /reads no files by path \(no readFile\); pass the pack's bytes/);
  });

  test('where WebCrypto has no Ed25519: @noble/ed25519 (react-native entry; core) or the verifier passed', async (t) => {
    const source = { read: async (rel) => bytes(join(P.shipped, rel)), describe: (rel) => `rn:${rel}` };
    const seen = [];
    const spy = { ...trusted, verifyEd25519: async (key, sig) => { seen.push([key.length, sig.length]); return false; } };
    const webcrypto = await Core.open(source, ort, spy);  // WebCrypto has Ed25519 here: the verifier passed is not asked
    assert.equal(await webcrypto.addAdapter(bytes(P.files.v1)), 'sql');
    assert.deepEqual(seen, []);
    const subtle = globalThis.crypto.subtle;
    const own = Object.hasOwn(subtle, 'importKey'), real = subtle.importKey;
    subtle.importKey = function (format, key, alg, ...rest) {
      if ((alg?.name ?? alg) === 'Ed25519') return Promise.reject(new DOMException('Unrecognized algorithm name', 'NotSupportedError'));
      return real.call(this, format, key, alg, ...rest);
    };
    try {
      const rn = await RNModel.load(ort, source, trusted);
      assert.equal(await rn.addAdapter(bytes(P.files.v1)), 'sql');
      close(t, await rn.logits(P.ids, { adapter: 'sql' }), P.want.v1, P.tol, 'react-native entry, sql v1');
      await refusedWith(rn.addAdapter(bytes(P.refused['header text']), { label: P.refused['header text'] }),
        P.messages['header text']);
      await refusedWith(rn.addAdapter(bytes(P.refused['untrusted key'])), /which is not among the trusted keys/);
      const core = await Core.open(source, ort, trusted);  // @noble/ed25519 imported on first use
      assert.equal(await core.addAdapter(bytes(P.files.v2)), 'sql');
      await refusedWith(core.addAdapter(bytes(P.refused['header text'])), /does not verify/);
      const injected = await Core.open(source, ort, spy);
      await refusedWith(injected.addAdapter(bytes(P.files.v1)), /adapter pack: the signature does not verify/);
      assert.deepEqual(seen, [[32, 64]]);
      assert.deepEqual(injected.adapters, P.shipped_adapters);
    } finally {
      if (own) subtle.importKey = real; else delete subtle.importKey;
    }
  });
});
