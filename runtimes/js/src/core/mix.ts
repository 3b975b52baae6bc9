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
/** Sorted `[name, weight]` pairs: a mix and its cache key (`[]`: the base model). */
export type Key = [string, number][];
type Prefix = [Array32, Array32][] | null;

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
export function mixKey(mix: Mix): Key {
  return Object.entries(mix).map(([n, w]) => [n, Number(w)] as [string, number])
    .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] - b[1]));
}

/** Python's `f"{w:g}"` of a weight (how errors name a row's mix: `sql*0.5`). */
export function pyG(x: number): string {
  if (!Number.isFinite(x)) return Number.isNaN(x) ? 'nan' : x > 0 ? 'inf' : '-inf';
  if (x === 0) return Object.is(x, -0) ? '-0' : '0';
  const exp = Number(x.toExponential(5).split('e')[1]);  // the exponent after rounding to 6 digits
  if (exp < -4 || exp >= 6) {
    const [m, e] = x.toExponential(5).split('e');
    const mant = m.includes('.') ? m.replace(/0+$/, '').replace(/\.$/, '') : m;
    const n = Number(e);
    return `${mant}e${n < 0 ? '-' : '+'}${String(Math.abs(n)).padStart(2, '0')}`;
  }
  const s = x.toPrecision(6);
  return s.includes('.') ? s.replace(/0+$/, '').replace(/\.$/, '') : s;
}

/** The feeds and KV-cache seed of the mix `key` (Python's `mix.combine`): each input by its
 * manifest rule, at most one prefix. `skip`: inputs left out (the per-row path builds its
 * row-weighted inputs itself). */
export function combine(key: Key, loaded: Map<string, LoadedAdapter>,
                        rules: Record<string, { mix: MixRule }>, where: string,
                        skip: ReadonlySet<string> = new Set()):
    { feeds: Map<string, Array32>; prefix: Prefix } {
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
      if (skip.has(k)) continue;
      if (!parts.has(k)) parts.set(k, []);
      parts.get(k)!.push([n, w, v]);
    }
  }
  const feeds = new Map<string, Array32>();
  for (const [k, group] of parts) feeds.set(k, mixInput(k, rules[k].mix, group, where));
  return { feeds, prefix: mixPrefix(key, loaded) };
}

/** One input's feed from `[adapter, weight, array]` of each adapter that sets it (Python's `_mix`). */
function mixInput(k: string, rule: MixRule, group: [string, number, Array32][], where: string): Array32 {
  if (rule === 'one') {
    if (group.length > 1) {
      throw new EdgepeftError(`adapters '${group[0][0]}' and '${group[1][0]}' both set ${k}, which does not ` +
        'mix (IA3 / DoRA / head / prompt); combine at most one of them per call.');
    }
    if (group[0][1] !== 1.0) {
      throw new EdgepeftError(`adapter '${group[0][0]}' sets ${k}, which does not scale linearly; give it weight 1.`);
    }
    return group[0][2];
  }
  if (rule === 'cat0') return concat(group.map((g) => g[2]), 0);
  if (rule === 'cat1') return concat(group.map((g) => g[2]), 1);
  if (rule === 'cat0w') return concat(group.map((g) => scale(g[2], g[1])), 0);
  if (rule === 'cat1w') return concat(group.map((g) => scale(g[2], g[1])), 1);
  if (rule === 'sumw') {
    const acc = scale(group[0][2], group[0][1]);
    for (const g of group.slice(1)) {
      const s = scale(g[2], g[1]);
      for (let i = 0; i < acc.data.length; i++) acc.data[i] = acc.data[i] + s.data[i];
    }
    return acc;
  }
  throw new EdgepeftError(`${where}: input ${k} has unknown mix rule '${rule}'.`);
}

/** The one KV-cache seed of the mix (a prefix is taken whole, at weight 1), or null. */
function mixPrefix(key: Key, loaded: Map<string, LoadedAdapter>): Prefix {
  const seeded = key.filter(([n]) => loaded.get(n)!.prefix !== null);
  if (!seeded.length) return null;
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
  return loaded.get(n)!.prefix;
}

// ------------------------------------------------------------------ per-row batches
/** The manifest's `rows`: each per-row weights input `{slot}.rows (N, 1, R)` -> the adapter inputs
 * whose rank columns it weights and the first one's rank axis. */
export type RowsSpec = Record<string, { inputs: string[]; axis: number }>;
/** The manifest's `row_values`: each per-row offsets input `{input}.rows` -> the input it offsets
 * and that input's identity: a scale (IA3, DoRA; offsets `(N, 1, width)`), or a classification
 * head's parameter (`head.*`, offsets `(N, out, in)` of a weight, `(N, 1, out)` of a bias) with
 * `fed`: a per-row call feeds the input its identity, as its graph default is the base's head. */
export type RowValuesSpec = Record<string, { input: string; identity: number; fed?: boolean }>;

/** The inputs whose rank columns a per-row weights input weights (the manifest's `rows`). */
export function weightedInputs(rows: RowsSpec): Set<string> {
  return new Set(Object.values(rows).flatMap((spec) => spec.inputs));
}

const sameArray = (a: Array32, b: Array32): boolean => a === b || (a.dims.length === b.dims.length &&
  a.dims.every((d, i) => d === b.dims[i]) && a.data.every((x, i) => x === b.data[i]));

/** The feeds a call applies to every row of a per-row batch (row `b` runs the mix `keys[b]`, `[]`:
 * the base) and its KV-cache seed: every input but the per-row ones, which `unionFeeds` and
 * `rowWeights` build (Python's `mix.shared_by_rows`).
 *
 * A per-row batch concatenates its adapters along each row-weighted slot's rank axis at weight 1
 * (as in a mix) and the slot's per-row weights input gives row `b` its weight on each adapter's
 * columns, zero on the others: `y_b = x_b W^T + sum_a w_{b,a} (x_b A_a^T) B_a^T`. A scale with
 * per-row offsets (the manifest's `row_values`: IA3 and DoRA) is left at its identity and its
 * offsets give row `b` its own value; a classification head likewise, with the head input fed
 * zeros (its default is the base's head). Every other input (prompts; scales and heads of a graph
 * without offsets) and the KV-cache seed apply to all rows alike, so the rows must agree on them.
 *
 * Refuses a graph without per-row inputs, a row whose mix does not mix (as in a call of its own),
 * or rows that need different values of an input that applies to every row (naming both rows,
 * their adapters and the input). */
export function sharedByRows(keys: Key[], loaded: Map<string, LoadedAdapter>, rules: Record<string, { mix: MixRule }>,
                             rows: RowsSpec, where: string, rowValues: RowValuesSpec = {}):
    { feeds: Map<string, Array32>; prefix: Prefix } {
  const offsets = Object.values(rowValues);
  if (!Object.keys(rows).length && !offsets.length) {
    throw new EdgepeftError(`${where}: this graph has no per-row weights (exported by an earlier edgepeft, or for ` +
      'adapters with no LoRA-type branch); run rows with different adapters in separate calls, or export the ' +
      'artifact again.');
  }
  const valued = new Set(offsets.map((v) => v.input));
  const weighted = weightedInputs(rows);
  // each row's own feeds, checked as in a call of its own (a scale of a row: its adapter's, at weight 1)
  const alone = keys.map((key) => {
    const { feeds, prefix } = key.length ? combine(key, loaded, rules, where, weighted) : { feeds: new Map(), prefix: null };
    for (const k of valued) feeds.delete(k);
    return { feeds, prefix };
  });
  const name = (b: number) => keys[b].map(([n, w]) => (w === 1 ? n : `${n}*${pyG(w)}`)).join('+') || 'the base';
  const first = alone[0];
  alone.slice(1).forEach(({ feeds, prefix }, i) => {
    const b = i + 1;
    for (const k of [...new Set([...feeds.keys(), ...first.feeds.keys()])].sort()) {
      const x = feeds.get(k), x0 = first.feeds.get(k);
      if (!x || !x0 || !sameArray(x, x0)) {
        throw new EdgepeftError(`row 0 (${name(0)}) and row ${b} (${name(b)}) need different values of ${k}, which ` +
          'the graph applies to every row of a call (prompts do not vary per row' +
          (offsets.length ? '' : '; nor do IA3 and DoRA scales or heads in a graph exported before edgepeft ' +
            'offset them per row') + '); run them in separate calls.');
      }
    }
    const same = (prefix === null) === (first.prefix === null) &&
      (prefix === null || prefix.every(([k, v], j) => k === first.prefix![j][0] && v === first.prefix![j][1]));
    if (!same) {
      throw new EdgepeftError(`row 0 (${name(0)}) and row ${b} (${name(b)}) start from different KV-cache prefixes ` +
        '(prefix / prompt tuning), which a call shares; run them in separate calls.');
    }
  });
  return first;
}

/** `[adapter, rank]` of the adapters in `names` that feed a row-weighted slot, in order. */
function columns(names: string[], loaded: Map<string, LoadedAdapter>, spec: { inputs: string[]; axis: number }):
    [string, number][] {
  const first = spec.inputs[0];
  return names.filter((n) => loaded.get(n)!.graph.has(first))
    .map((n) => [n, loaded.get(n)!.graph.get(first)!.dims[spec.axis]] as [string, number]);
}

/** The row-weighted inputs of a per-row batch over the adapters `names`: each slot's adapters
 * concatenated along its rank axis at weight 1 (`rowWeights` gives each row its columns). Depends
 * only on `names`, so a batch whose rows change keeps it. */
export function unionFeeds(names: string[], loaded: Map<string, LoadedAdapter>, rules: Record<string, { mix: MixRule }>,
                           rows: RowsSpec, where: string): Map<string, Array32> {
  const feeds = new Map<string, Array32>();
  for (const spec of Object.values(rows)) {
    const cols = columns(names, loaded, spec);
    if (!cols.length) continue;
    for (const k of spec.inputs) {
      feeds.set(k, mixInput(k, rules[k].mix, cols.map(([n]) => [n, 1.0, loaded.get(n)!.graph.get(k)!]), where));
    }
  }
  return feeds;
}

/** Each per-row weights input `(B, 1, R)`: row `b`'s weight on each adapter's columns of
 * `unionFeeds` over `names` (its mix weight, zero for adapters it does not run); and each per-row
 * offsets input an input of `names` feeds, `(B, 1, width)` of a vector (a scale, a head's bias),
 * `(B, ...shape)` of a matrix (a head's weight): row `b`'s adapter's value minus the identity
 * (zeros when its adapters leave the input alone). An input with `fed` (a classification head,
 * whose default is the base's head) is fed its identity and every row's offsets carry its
 * adapter's value: a row whose adapters do not set it is refused (Python's `mix.row_weights`). */
export function rowWeights(keys: Key[], names: string[], loaded: Map<string, LoadedAdapter>, rows: RowsSpec,
                           rowValues: RowValuesSpec = {}): Map<string, Array32> {
  const feeds = new Map<string, Array32>();
  const B = keys.length;
  for (const [nameRows, spec] of Object.entries(rowValues)) {
    const k = spec.input;
    const setting = names.filter((n) => loaded.get(n)!.graph.has(k));
    if (!setting.length) continue;
    const shape = loaded.get(setting[0])!.graph.get(k)!.dims;
    const rowShape = shape.length > 1 ? shape.slice() : [1, ...shape];  // a vector (1, width), a matrix as it is
    const size = shape.reduce((a, d) => a * d, 1);
    const data = new Float32Array(B * size);  // (B, 1, width) / (B, out, in)
    const identity = Math.fround(spec.identity);
    keys.forEach((key, b) => {
      const own = key.find(([n]) => loaded.get(n)!.graph.has(k));  // at most one, at weight 1 (sharedByRows)
      if (own) {
        const v = loaded.get(own[0])!.graph.get(k)!.data;
        for (let i = 0; i < size; i++) data[b * size + i] = v[i] - identity;  // float32 as numpy's
      } else if (spec.fed) {  // the input's default is a value (the base's head), not the identity
        const row = key.map(([n]) => n).join('+') || 'the base';
        throw new EdgepeftError(`row ${b} (${row}) runs the base model's ${k}, and other rows run their adapters' ` +
          "own: in one call a row's head comes from its adapter. Give that row an adapter with a head, or run it " +
          'in a separate call.');
      }
    });
    if (spec.fed) feeds.set(k, { data: new Float32Array(size).fill(identity), dims: shape.slice() });  // the offsets carry every row's value
    feeds.set(nameRows, { data, dims: [B, ...rowShape] });
  }
  for (const [nameRows, spec] of Object.entries(rows)) {
    const cols = columns(names, loaded, spec);
    if (!cols.length) continue;
    const R = cols.reduce((a, [, r]) => a + r, 0);
    const data = new Float32Array(B * R);  // (B, 1, R)
    keys.forEach((key, b) => {
      const ofRow = new Map(key);
      let start = 0;
      for (const [n, r] of cols) {
        data.fill(Math.fround(ofRow.get(n) ?? 0), b * R + start, b * R + start + r);
        start += r;
      }
    });
    feeds.set(nameRows, { data, dims: [B, 1, R] });
  }
  return feeds;
}
