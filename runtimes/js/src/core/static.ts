/** Static-shape artifacts (a target with static_shapes: NNAPI, Core ML, QNN), exactly as Python's
 * StaticLayout.pad / row_groups / chunks / prefill / step and its decoding
 * (edgepeft/runtime/static.py; the greedy loop is edgepeft/runtime/decode.py).
 *
 * One session per sequence bucket S, every shape fixed: batch B, ranks padded to max_rank, and a
 * KV window of C = static.context slots per layer, newest last, with a 0/1 mask of which slots
 * hold a token. A call of bucket S takes the window's last C - S slots as past and appends S new
 * ones; a prompt chunk shorter than its bucket is left-padded with masked slots. */
import type { InferenceSession, Tensor } from 'onnxruntime-common';
import { EdgepeftError } from './errors.js';
import type { Array32 } from './safetensors.js';
import type { Sampler } from './sampling.js';

/** Greedy next token of every row from the last position of logits (B, S, V), appended to `out`;
 * with EOS ids, a finished row repeats `fill` and `done` marks rows that produced an EOS. */
export function pickNext(data: Float32Array, dims: number[], out: number[][], done: boolean[],
                         eos: number[], fill: number, sampler: Sampler | null = null, rowOffset = 0,
                         onStep: ((next: number[]) => boolean | void) | null = null): number[] {
  const [B, S, V] = dims;
  const next: number[] = [];
  for (let r = 0; r < B; r++) {
    const base = (r * S + S - 1) * V;
    let tok = 0;
    if (sampler) tok = sampler.next(data.subarray(base, base + V), rowOffset + r);
    else for (let v = 1; v < V; v++) if (data[base + v] > data[base + tok]) tok = v;  // first max, as argmax
    if (eos.length) {
      if (done[r]) tok = fill;
      if (eos.includes(tok)) done[r] = true;
    }
    next.push(tok);
    out[r].push(tok);
  }
  if (onStep?.(next) === false) done.fill(true);  // the caller wants no more tokens
  return next;
}

export interface StaticSpec { batch: number; max_rank: number; context: number }
type Rows = number[][];
type Prefix = [Array32, Array32][] | null;
type TensorCtor = typeof Tensor;
interface Window { kv: Map<string, Float32Array>; mask: Rows }

/** Python's repr of a shape tuple: (12, 64), (5,). */
export const pyShape = (d: number[]) => `(${d.join(', ')}${d.length === 1 ? ',' : ''})`;

/** Zero-pad every feed to its fixed shape (ranks to max_rank): zero rows of A / columns of B add
 * nothing, so the result is exact. `names`: the adapters of the choice, for the refusal. */
export function padFeeds(feeds: Map<string, Array32>, fixed: Record<string, number[]>, names: string[],
                         maxRank: number): Map<string, Array32> {
  const out = new Map<string, Array32>();
  for (const [k, v] of feeds) {
    const shape = fixed[k];
    if (v.dims.length === shape.length && v.dims.every((d, i) => d === shape[i])) {
      out.set(k, v);
      continue;
    }
    if (v.dims.length !== shape.length || v.dims.some((d, i) => d > shape[i])) {
      throw new EdgepeftError(`${names.join(' + ')}: input ${k} needs shape ${pyShape(v.dims)}, above the fixed ` +
        `${pyShape(shape)} of this static-shape artifact (ranks of a mix add up; max_rank ${maxRank}). Mix fewer ` +
        'adapters, or export with a profile with a larger max_rank.');
    }
    const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
    const n = v.dims.length;
    const strides = shape.map((_, i) => shape.slice(i + 1).reduce((a, b) => a * b, 1));
    const last = v.dims[n - 1];
    const rows = v.data.length / Math.max(last, 1);
    for (let r = 0; r < rows; r++) {  // each innermost row of v to its place in the padded array
      let rem = r, at = 0;
      for (let i = n - 2; i >= 0; i--) {
        at += (rem % v.dims[i]) * strides[i];
        rem = Math.floor(rem / v.dims[i]);
      }
      data.set(v.data.subarray(r * last, (r + 1) * last), at);
    }
    out.set(k, { data, dims: shape.slice() });
  }
  return out;
}

/** transformers' positions: count of real tokens before; padded slots get 1. */
const positions = (mask: Rows) => mask.map((r) => {
  let c = -1;
  return r.map((v) => { c += v; return v === 0 ? 1 : c; });
});

export class StaticRunner {
  constructor(private readonly Tensor: TensorCtor, private readonly spec: StaticSpec,
              private readonly buckets: Map<number, InferenceSession>, private readonly cache: [number, number][],
              private readonly where: string) {}

  /** (ids, mask) in groups of the fixed batch; the last group is filled up with copies of its last row. */
  rowGroups(ids: Rows, mask: Rows): [Rows, Rows][] {
    const b = this.spec.batch, out: [Rows, Rows][] = [];
    for (let g = 0; g < ids.length; g += b) {
      const i = ids.slice(g, g + b), m = mask.slice(g, g + b);
      while (i.length < b) { i.push(i[i.length - 1]); m.push(m[m.length - 1]); }
      out.push([i, m]);
    }
    return out;
  }

  /** Bucket sizes that cover `length` prompt tokens: the longest bucket while it fits, then the
   * shortest one that holds the rest (left-padded). */
  chunks(length: number): number[] {
    const buckets = [...this.buckets.keys()].sort((a, b) => a - b);
    const top = buckets[buckets.length - 1];
    const out: number[] = [];
    let left = length;
    while (left > 0) {
      const s = left >= top ? top : buckets.find((x) => x >= left)!;
      out.push(s);
      left -= Math.min(s, left);
    }
    return out;
  }

  private int64(rows: Rows): Tensor {
    const b = rows.length, s = rows[0].length;
    const data = new BigInt64Array(b * s);
    rows.forEach((r, i) => r.forEach((v, j) => { data[i * s + j] = BigInt(v); }));
    return new this.Tensor('int64', data, [b, s]);
  }

  /** A prompt through the bucket graphs: logits (B, L, V) of the real positions and the window. */
  async prefill(feeds: Record<string, Tensor>, ids: Rows, mask: Rows, prefix: Prefix, newTokens = 0):
      Promise<{ data: Float32Array; dims: number[]; window: Window }> {
    const c = this.spec.context, b = ids.length, L = ids[0].length;
    const chunks = this.chunks(L);
    const p = prefix ? prefix[0][0].dims[2] : 0;
    const need = p + chunks.reduce((a, x) => a + x, 0) + newTokens * Math.min(...this.buckets.keys());
    if (need > c) {
      throw new EdgepeftError(`${this.where}: a prompt of ${L} tokens (run as bucket(s) [${chunks.join(', ')}])` +
        (p ? `, a prefix of ${p}` : '') + (newTokens ? ` and ${newTokens} new tokens` : '') +
        ` take ${need} slots of the fixed KV cache, which has context_length ${c}. Shorten the prompt, generate ` +
        'fewer tokens, or export with a profile with a larger context_length.');
    }
    const kv = new Map<string, Float32Array>();
    this.cache.forEach(([h, d], i) => {
      ['key', 'value'].forEach((n, j) => {
        const a = new Float32Array(b * h * c * d);
        if (p) {
          const src = prefix![i][j].data;  // (1, h, p, d), the same for every row
          for (let r = 0; r < b; r++) {
            for (let x = 0; x < h; x++) a.set(src.subarray(x * p * d, (x + 1) * p * d), ((r * h + x) * c + c - p) * d);
          }
        }
        kv.set(`past.${i}.${n}`, a);
      });
    });
    const window: Window = { kv, mask: ids.map(() => Array.from({ length: c }, (_, k) => (p && k >= c - p ? 1 : 0))) };
    let data: Float32Array | null = null, V = 0, at = 0;
    for (const s of chunks) {
      const real = Math.min(s, L - at), pad = s - real;
      const zeros = new Array(pad).fill(0);
      const out = await this.step(feeds, ids.map((r) => [...zeros, ...r.slice(at, at + real)]),
        mask.map((r) => [...zeros, ...r.slice(at, at + real)]), window);
      V = out.dims[2];
      data ??= new Float32Array(b * L * V);
      const src = out.data as Float32Array;
      for (let r = 0; r < b; r++) data.set(src.subarray((r * s + pad) * V, (r + 1) * s * V), (r * L + at) * V);
      at += real;
    }
    return { data: data!, dims: [b, L, V], window };
  }

  /** One call of the graph of bucket S = ids[0].length; slides `window` in place. */
  async step(feeds: Record<string, Tensor>, ids: Rows, mask: Rows, window: Window): Promise<Tensor> {
    const s = ids[0].length, c = this.spec.context, b = ids.length;
    const full = window.mask.map((r, i) => [...r.slice(s), ...mask[i]]);  // (B, C): the slots the past keeps + new
    const past: Record<string, Tensor> = {};
    this.cache.forEach(([h, d], i) => {
      for (const n of ['key', 'value']) {
        const name = `past.${i}.${n}`, v = window.kv.get(name)!;
        const a = new Float32Array(b * h * (c - s) * d);  // v[:, :, s:]: (B, H, C - S, D)
        for (let x = 0; x < b * h; x++) a.set(v.subarray((x * c + s) * d, (x + 1) * c * d), x * (c - s) * d);
        past[name] = new this.Tensor('float32', a, [b, h, c - s, d]);
      }
    });
    const res = await this.buckets.get(s)!.run({
      input_ids: this.int64(ids), attention_mask: this.int64(full),
      position_ids: this.int64(positions(full).map((r) => r.slice(-s))), ...past, ...feeds });
    this.cache.forEach((_, i) => {
      for (const n of ['key', 'value']) window.kv.set(`past.${i}.${n}`, res[`present.${i}.${n}`].data as Float32Array);
    });
    window.mask = full;
    return res.logits;
  }

  async logits(feeds: Record<string, Tensor>, ids: Rows, mask: Rows, prefix: Prefix): Promise<{ data: Float32Array; dims: number[] }> {
    const parts = [];
    for (const [i, m] of this.rowGroups(ids, mask)) parts.push(await this.prefill(feeds, i, m, prefix));
    const [, L, V] = parts[0].dims, B = ids.length;
    const data = new Float32Array(B * L * V);
    parts.forEach((x, g) => {
      const rows = Math.min(this.spec.batch, B - g * this.spec.batch);
      data.set(x.data.subarray(0, rows * L * V), g * this.spec.batch * L * V);
    });
    return { data, dims: [B, L, V] };
  }

  /** Greedy decoding on the bucket graphs, one group of the fixed batch at a time. */
  async generate(feeds: Record<string, Tensor>, ids: Rows, mask: Rows, prefix: Prefix, maxNew: number,
                 eos: number[], fill: number, sampler: Sampler | null = null,
                 onStep: ((next: number[]) => boolean | void) | null = null): Promise<{ out: Rows; newTokens: number }> {
    const groups: Rows[] = [];
    const first = Math.min(...this.buckets.keys());
    let newTokens = 0;
    let offset = 0;
    for (const [gi, gm] of this.rowGroups(ids, mask)) {
      const pre = await this.prefill(feeds, gi, gm, prefix, maxNew);
      let data = pre.data, dims = pre.dims;
      const out = gi.map((r) => r.slice()), done = gi.map(() => false);
      for (let step = 0; step < maxNew; step++) {
        const next = pickNext(data, dims, out, done, eos, fill, sampler, offset, onStep);
        newTokens = Math.max(newTokens, step + 1);
        if (done.every(Boolean) || step === maxNew - 1) break;
        const pad = new Array(first - 1).fill(0);
        const lg = await this.step(feeds, next.map((t) => [...pad, t]), next.map(() => [...pad, 1]),
          pre.window);
        data = lg.data as Float32Array;
        dims = [...lg.dims];
      }
      groups.push(out);
      offset += gi.length;
    }
    const width = Math.max(...groups.map((g) => g[0].length));
    return { out: groups.flat().slice(0, ids.length).map((r) => [...r, ...new Array(width - r.length).fill(fill)]),
             newTokens };
  }
}
