/** The traced layout, as Python's edgepeft/runtime/traced.py: one session that takes `input_ids`,
 * `attention_mask`, `position_ids` and (causal LMs) the past keys / values, and returns logits
 * and the present ones. Any padding; a prefix adapter's keys / values start the cache. */
import type { InferenceSession, Tensor } from 'onnxruntime-common';
import { lastPositions } from './decode.js';
import type { Decoding } from './decode.js';
import type { Opened, Slots } from './batching.js';
import type { Array32 } from './safetensors.js';

type Rows = number[][];
type Feeds = Record<string, Tensor>;
type TensorCtor = typeof Tensor;
type Prefix = [Array32, Array32][] | null;

/** transformers' positions: count of real tokens before; padded slots get 1. */
const positions = (mask: Rows) => mask.map((r) => {
  let c = -1;
  return r.map((v) => { c += v; return v === 0 ? 1 : c; });
});

export class TracedRunner {
  /** `cache`: [(kv_heads, head_dim)] per layer (empty for classifiers). */
  constructor(readonly T: TensorCtor, readonly cache: [number, number][]) {}

  int64(rows: Rows): Tensor {
    const b = rows.length, s = rows[0]?.length ?? 0;
    const data = new BigInt64Array(b * s);
    rows.forEach((r, i) => r.forEach((v, j) => { data[i * s + j] = BigInt(v); }));
    return new this.T('int64', data, [b, s]);
  }

  /** Initial past (empty, or the adapter's prefix for every row) and the mask it needs. */
  start(batch: number, mask: Rows, prefix: Prefix): { past: Feeds; mask: Rows } {
    const past: Feeds = {};
    this.cache.forEach(([h, d], i) => {
      if (!prefix) {
        past[`past.${i}.key`] = new this.T('float32', new Float32Array(0), [batch, h, 0, d]);
        past[`past.${i}.value`] = new this.T('float32', new Float32Array(0), [batch, h, 0, d]);
        return;
      }
      prefix[i].forEach((v, j) => {
        const data = new Float32Array(batch * v.data.length);
        for (let r = 0; r < batch; r++) data.set(v.data, r * v.data.length);
        past[`past.${i}.${j ? 'value' : 'key'}`] = new this.T('float32', data, [batch, ...v.dims.slice(1)]);
      });
    });
    if (prefix) {
      const p = prefix[0][0].dims[2];
      mask = mask.map((r) => [...new Array(p).fill(1), ...r]);
    }
    return { past, mask };
  }

  /** One call: `ids (B, S)` after `past`; `mask (B, P + S)` covers both. */
  async run(session: InferenceSession, feeds: Feeds, ids: Rows, mask: Rows, past: Feeds): Promise<InferenceSession.ReturnType> {
    const s = ids[0].length;
    const pos = positions(mask).map((r) => r.slice(-s));
    return session.run({ input_ids: this.int64(ids), attention_mask: this.int64(mask),
                         position_ids: this.int64(pos), ...past, ...feeds });
  }

  /** The past of the next call: the present keys / values of `run`'s outputs. */
  presents(out: InferenceSession.ReturnType): Feeds {
    const past: Feeds = {};
    this.cache.forEach((_, i) => {
      past[`past.${i}.key`] = out[`present.${i}.key`];
      past[`past.${i}.value`] = out[`present.${i}.value`];
    });
    return past;
  }

  /** A generation over the rows of `ids` (left-padded by `mask`): the past grows by one
   * position per step. */
  decoding(session: InferenceSession, feeds: Feeds, prefix: Prefix, ids: Rows, mask: Rows): Decoding {
    const start = this.start(ids.length, mask, prefix);
    let past = start.past, full = start.mask;
    const runOn = async (step: Rows) => {
      const out = await this.run(session, feeds, step, full, past);
      past = this.presents(out);
      return lastPositions(out.logits.data as Float32Array, out.logits.dims);
    };
    return {
      rows: ids.length,
      prefill: () => runOn(ids),
      step: (tokens) => {
        full = full.map((r) => [...r, 1]);
        return runOn(tokens.map((t) => [t]));
      },
    };
  }

  /** The live rows of a running batch (`TracedSlots`). */
  slots(session: InferenceSession, capacity: number, context: number): TracedSlots {
    return new TracedSlots(this, session, capacity, context);
  }
}

/** `(B, H, P, D)` past of every row left-padded with zeros to `W` positions. */
function leftPad(x: Array32, width: number): Array32 {
  const [B, H, P, D] = x.dims;
  if (P === width) return x;
  const data = new Float32Array(B * H * width * D);
  for (let bh = 0; bh < B * H; bh++) data.set(x.data.subarray(bh * P * D, (bh + 1) * P * D), (bh * width + width - P) * D);
  return { data, dims: [B, H, width, D] };
}

/** Rows that join and leave a running batch (`Batcher`, batching.ts) on the traced graph, as
 * Python's `traced.Slots`: the batch holds the live rows only, left-padded to one past length.
 *
 * A joining row's prompt runs alone (its adapter's prefix seeds its cache), then its past is
 * merged into the batch's; a leaving row's past is dropped, and the columns no row uses any more
 * with it. Positions follow each row's own mask, so rows at different lengths decode together. */
export class TracedSlots implements Slots {
  /** Slot of each batch row. */
  readonly order: number[] = [];
  private past = new Map<string, Array32>();  // name -> (B, H, P, D)
  private pastFeeds: Feeds | null = null;  // the same as tensors (the last step's presents)
  private mask: Rows = [];  // (B, P)

  constructor(private readonly runner: TracedRunner, private readonly session: InferenceSession,
              readonly capacity: number, readonly context: number) {}

  /** Run `ids` alone into the batch as `slot`'s row; the `(V,)` logits of its next token. */
  async prefill(slot: number, opened: Opened, ids: number[], newTokens: number): Promise<Float32Array> {
    const r = this.runner;
    const start = r.start(1, [ids.map(() => 1)], opened.prefix);
    const out = await r.run(this.session, opened.feeds, [ids], start.mask, start.past);
    this.sync();
    const width = Math.max(this.mask[0]?.length ?? 0, start.mask[0].length);
    const live = this.order.length > 0;
    for (const [name, t] of Object.entries(r.presents(out))) {
      const mine = leftPad({ data: t.data as Float32Array, dims: [...t.dims] }, width);
      if (!live) {
        this.past.set(name, mine);
        continue;
      }
      const theirs = leftPad(this.past.get(name)!, width);
      const data = new Float32Array(theirs.data.length + mine.data.length);
      data.set(theirs.data);
      data.set(mine.data, theirs.data.length);
      this.past.set(name, { data, dims: [theirs.dims[0] + 1, ...theirs.dims.slice(1)] });
    }
    const pad = (row: number[]) => [...new Array(width - row.length).fill(0), ...row];
    this.mask = [...(live ? this.mask.map(pad) : []), pad(start.mask[0])];
    this.pastFeeds = null;
    this.order.push(slot);
    const [, S, V] = out.logits.dims;
    return (out.logits.data as Float32Array).slice((S - 1) * V, S * V);
  }

  /** Append `tokens` to the live rows (`order`) in one call, with the adapter feeds `fixed` and
   * per-row `weights`; their `(n, V)` logits. */
  async step(fixed: Feeds, weights: Feeds, live: number[], tokens: number[]): Promise<Float32Array> {
    const r = this.runner;
    this.mask = this.mask.map((row) => [...row, 1]);  // (B, P + 1)
    const out = await r.run(this.session, { ...fixed, ...weights }, tokens.map((t) => [t]), this.mask, this.feeds());
    this.pastFeeds = r.presents(out);
    return out.logits.data as Float32Array;  // (n, 1, V)
  }

  /** Nothing is held between calls here. */
  release(): void {}

  free(slot: number): void {
    this.sync();
    const keep = this.order.map((s) => s !== slot);
    const width = this.mask[0]?.length ?? 0;
    const kept = this.mask.filter((_, b) => keep[b]);
    let first = 0;  // the first column a remaining row attends to
    while (first < width && !kept.some((row) => row[first])) first++;
    this.mask = kept.map((row) => row.slice(first));
    for (const [name, x] of this.past) {
      const [, H, P, D] = x.dims, n = kept.length, w = P - first;
      const data = new Float32Array(n * H * w * D);
      let at = 0;
      keep.forEach((k, b) => {
        if (!k) return;
        for (let h = 0; h < H; h++) {
          data.set(x.data.subarray(((b * H + h) * P + first) * D, (b * H + h + 1) * P * D), at);
          at += w * D;
        }
      });
      this.past.set(name, { data, dims: [n, H, w, D] });
    }
    this.pastFeeds = null;
    const i = this.order.indexOf(slot);
    if (i >= 0) this.order.splice(i, 1);
  }

  /** The past as arrays (after steps it is the last presents). */
  private sync(): void {
    if (!this.pastFeeds) return;
    for (const [name, t] of Object.entries(this.pastFeeds)) this.past.set(name, { data: t.data as Float32Array, dims: [...t.dims] });
    this.pastFeeds = null;
  }

  private feeds(): Feeds {
    if (!this.pastFeeds) {
      this.pastFeeds = {};
      for (const [name, x] of this.past) this.pastFeeds[name] = new this.runner.T('float32', x.data, x.dims);
    }
    return this.pastFeeds;
  }
}
