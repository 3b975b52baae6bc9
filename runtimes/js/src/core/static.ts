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
import { lastPositions, pickNext } from './decode.js';
import type { Decoding } from './decode.js';

export { pickNext };  // (it lived here)

export interface StaticSpec { batch: number; max_rank: number; context: number }
type Rows = number[][];
type Prefix = [Array32, Array32][] | null;
type TensorCtor = typeof Tensor;
interface Window { kv: Map<string, Float32Array>; mask: Rows }

/** Python's repr of a shape tuple: (12, 64), (5,). */
export const pyShape = (d: number[]) => `(${d.join(', ')}${d.length === 1 ? ',' : ''})`;

/** Zero-pad every feed to its fixed shape (ranks to max_rank): zero rows of A / columns of B add
 * nothing, so the result is exact. `names`: the adapters of the choice, for the refusal. Per-row
 * inputs (`rows`: the manifest's per-row weights and offsets, `(batch, 1, width)`) are filled up
 * to the fixed batch with copies of their last row, as `rowGroups` fills the ids. */
export function padFeeds(feeds: Map<string, Array32>, fixed: Record<string, number[]>, names: string[],
                         maxRank: number, perRow: ReadonlySet<string> = new Set()): Map<string, Array32> {
  const out = new Map<string, Array32>();
  for (let [k, v] of feeds) {
    const shape = fixed[k];
    if (perRow.has(k) && v.dims[0] !== shape[0]) {
      if (v.dims[0] > shape[0]) {
        throw new EdgepeftError(`${v.dims[0]} rows with different adapters: this static-shape artifact runs ` +
          `${shape[0]} rows per call (its fixed batch). Pass at most that many rows per call, or export with a ` +
          'profile with a larger batch.');
      }
      const row = v.data.length / v.dims[0];
      const data = new Float32Array(shape[0] * row);
      data.set(v.data);
      for (let r = v.dims[0]; r < shape[0]; r++) data.set(v.data.subarray(v.data.length - row), r * row);
      v = { data, dims: [shape[0], ...v.dims.slice(1)] };
    }
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

  /** `chunks` of a prompt of `length` tokens, once it fits the KV window with the prefix and
   * `newTokens` decode steps (refused otherwise). */
  windowChunks(length: number, prefix: Prefix, newTokens: number): number[] {
    const c = this.spec.context;
    const chunks = this.chunks(length);
    const p = prefix ? prefix[0][0].dims[2] : 0;
    const need = p + chunks.reduce((a, x) => a + x, 0) + newTokens * Math.min(...this.buckets.keys());
    if (need > c) {
      throw new EdgepeftError(`${this.where}: a prompt of ${length} tokens (run as bucket(s) [${chunks.join(', ')}])` +
        (p ? `, a prefix of ${p}` : '') + (newTokens ? ` and ${newTokens} new tokens` : '') +
        ` take ${need} slots of the fixed KV cache, which has context_length ${c}. Shorten the prompt, generate ` +
        'fewer tokens, or export with a profile with a larger context_length.');
    }
    return chunks;
  }

  /** A prompt through the bucket graphs: logits (B, L, V) of the real positions and the window. */
  async prefill(feeds: Record<string, Tensor>, ids: Rows, mask: Rows, prefix: Prefix, newTokens = 0):
      Promise<{ data: Float32Array; dims: number[]; window: Window }> {
    const c = this.spec.context, b = ids.length, L = ids[0].length;
    const chunks = this.windowChunks(L, prefix, newTokens);
    const p = prefix ? prefix[0][0].dims[2] : 0;
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

  /** One generation per group of the fixed batch (the last group filled up with copies of its
   * last row): each step is a call of the shortest bucket with the new token last. */
  decodings(feeds: Record<string, Tensor>, ids: Rows, mask: Rows, prefix: Prefix, newTokens: number): Decoding[] {
    this.windowChunks(ids[0].length, prefix, newTokens);
    const first = Math.min(...this.buckets.keys());
    const pad = new Array(first - 1).fill(0);
    return this.rowGroups(ids, mask).map(([gi, gm]) => {
      let window: Window | null = null;
      return {
        rows: gi.length,
        prefill: async () => {
          const pre = await this.prefill(feeds, gi, gm, prefix, newTokens);
          window = pre.window;
          return lastPositions(pre.data, pre.dims);
        },
        step: async (tokens: number[]) => {
          const lg = await this.step(feeds, tokens.map((t) => [...pad, t]), tokens.map(() => [...pad, 1]), window!);
          return lastPositions(lg.data as Float32Array, lg.dims);
        },
      };
    });
  }
}
