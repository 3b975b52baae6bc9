/** Adapter choices -> graph feeds, exactly as Python's mix.combine (edgepeft/runtime/mix.py).
 *
 * A mix follows each input's rule (manifest `inputs`): LoRA A / B concatenate along the rank axis,
 * [A_1; A_2] and [w_1 B_1 | w_2 B_2] (B already carries the scale); bottleneck adapters concatenate
 * their hidden units the same way; inputs that do not mix linearly (IA3, DoRA, heads, prompts,
 * prefixes) take one adapter at weight 1. Adapters are combined in name order (Python sorts the key). */
import { EdgepeftError } from './errors.js';
import type { MixRule } from './manifest.js';
import type { Array32 } from './safetensors.js';

export interface LoadedAdapter {
  name: string;
  entry: { prefix?: { length: number; from_prompt: boolean } | null; defaults?: string[] };
  graph: Map<string, Array32>;
  /** Per layer [key, value], each (1, kv_heads, p, head_dim); null: no KV-cache seed. */
  prefix: [Array32, Array32][] | null;
}

export type Mix = Record<string, number>;

/** Concatenate same-rank arrays along `axis`. */
export function concat(arrays: Array32[], axis: number): Array32 {
  const first = arrays[0].dims;
  const outer = first.slice(0, axis).reduce((a, b) => a * b, 1);
  const inner = first.slice(axis + 1).reduce((a, b) => a * b, 1);
  const dims = first.slice();
  dims[axis] = arrays.reduce((a, x) => a + x.dims[axis], 0);
  const data = new Float32Array(dims.reduce((a, b) => a * b, 1));
  let at = 0;
  for (let o = 0; o < outer; o++) {
    for (const x of arrays) {
      const n = x.dims[axis] * inner;
      data.set(x.data.subarray(o * n, (o + 1) * n), at);
      at += n;
    }
  }
  return { data, dims };
}

/** np.float32(w) * v: one float32 rounding per element (the double product of two float32 is exact). */
export function scale(x: Array32, w: number): Array32 {
  const f = Math.fround(w);
  const data = new Float32Array(x.data.length);
  for (let i = 0; i < data.length; i++) data[i] = f * x.data[i];
  return { data, dims: x.dims.slice() };
}

/** The sorted key Python uses: [(name, weight)] by name. */
export function mixKey(mix: Mix): [string, number][] {
  return Object.entries(mix).map(([n, w]) => [n, Number(w)] as [string, number])
    .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] - b[1]));
}

export function combine(key: [string, number][], loaded: Map<string, LoadedAdapter>,
                        rules: Record<string, { mix: MixRule }>, where: string):
    { feeds: Map<string, Array32>; prefix: [Array32, Array32][] | null } {
  for (const [n] of key) {  // a shared input one adapter leaves to the graph's default, another replaces
    for (const k of loaded.get(n)!.entry.defaults ?? []) {
      const other = key.find(([m]) => loaded.get(m)!.graph.has(k));
      if (other) {
        throw new EdgepeftError(`adapter '${other[0]}' sets ${k}, a part shared by the layers of one shape, and ` +
          `adapter '${n}' uses the graph's default for it; combine them in separate calls.`);
      }
    }
  }
  const parts = new Map<string, [string, number, Array32][]>();
  for (const [n, w] of key) {
    for (const [k, v] of loaded.get(n)!.graph) {
      if (!parts.has(k)) parts.set(k, []);
      parts.get(k)!.push([n, w, v]);
    }
  }
  const feeds = new Map<string, Array32>();
  for (const [k, group] of parts) {
    const rule = rules[k].mix;
    if (rule === 'one') {
      if (group.length > 1) {
        throw new EdgepeftError(`adapters '${group[0][0]}' and '${group[1][0]}' both set ${k}, which does not ` +
          'mix (IA3 / DoRA / head / prompt); combine at most one of them per call.');
      }
      if (group[0][1] !== 1.0) {
        throw new EdgepeftError(`adapter '${group[0][0]}' sets ${k}, which does not scale linearly; give it weight 1.`);
      }
      feeds.set(k, group[0][2]);
    } else if (rule === 'cat0') feeds.set(k, concat(group.map((g) => g[2]), 0));
    else if (rule === 'cat1') feeds.set(k, concat(group.map((g) => g[2]), 1));
    else if (rule === 'cat0w') feeds.set(k, concat(group.map((g) => scale(g[2], g[1])), 0));
    else if (rule === 'cat1w') feeds.set(k, concat(group.map((g) => scale(g[2], g[1])), 1));
    else if (rule === 'sumw') {
      const acc = scale(group[0][2], group[0][1]);
      for (const g of group.slice(1)) {
        const s = scale(g[2], g[1]);
        for (let i = 0; i < acc.data.length; i++) acc.data[i] = acc.data[i] + s.data[i];
      }
      feeds.set(k, acc);
    } else {
      throw new EdgepeftError(`${where}: input ${k} has unknown mix rule '${rule}'.`);
    }
  }
  const seeded = key.filter(([n]) => loaded.get(n)!.prefix !== null);
  let prefix: [Array32, Array32][] | null = null;
  if (seeded.length) {
    if (seeded.length > 1) {
      throw new EdgepeftError(`adapters '${seeded[0][0]}' and '${seeded[1][0]}' are both prefixes (prefix / ` +
        'prompt tuning); combine at most one per call.');
    }
    const [n, w] = seeded[0];
    if (w !== 1.0) throw new EdgepeftError(`adapter '${n}' is a prefix (prefix / prompt tuning); give it weight 1.`);
    const others = key.map(([m]) => m).filter((m) => m !== n && loaded.get(m)!.graph.size);
    if (loaded.get(n)!.entry.prefix?.from_prompt && others.length) {
      throw new EdgepeftError(`adapter '${n}' is prompt tuning on a decoder: its virtual tokens were run through ` +
        `the base weights at export, so it cannot be combined with '${others[0]}', which changes those weights ` +
        '(PEFT would run the prompt through them too).');
    }
    prefix = loaded.get(n)!.prefix;
  }
  return { feeds, prefix };
}
