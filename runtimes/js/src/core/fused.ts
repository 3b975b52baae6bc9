/** Fused-layout artifacts (`--graph fused`, edgepeft/export/fused.py), exactly as Python's
 * FusedLayout / Cache (edgepeft/runtime/fused.py); the greedy loop is edgepeft/runtime/decode.py.
 *
 * The graph is built from onnxruntime's fused kernels (GroupQueryAttention,
 * SkipSimplifiedLayerNormalization; MatMulNBits / GatherBlockQuantized when int4). It takes
 * `input_ids (B, S)`, `seqlens_k (B,)` int32 (each row's total length - 1) and
 * `total_sequence_length ()` int32 instead of a mask and positions, so rows are right-aligned
 * (moved to the left edge, padding after them). Its KV cache is one buffer of M slots per layer,
 * `past.{i}.key|value (B, H_kv, M, D)`, that is also `present`:
 *
 * - in place (`inPlace`, onnxruntime-node): the buffer is passed as the input and as the
 *   preallocated output of the same name, and each step's keys and values land in it (Python binds
 *   one OrtValue to both with I/O binding, so its decode step copies no cache). Measured on
 *   onnxruntime-node 1.30, this is no faster than feeding back: its decode speed falls with the
 *   buffer size M in both modes alike (Python's does not), so the binding copies the cache per
 *   call either way; kept because it allocates nothing per step;
 * - copying (onnxruntime-web: its wasm backend copies every input into its heap and every output
 *   out of it, and does not write preallocated CPU outputs): each step's `present` is fed back as
 *   the next `past`, the whole buffer crossing the JS / wasm boundary twice per step.
 *
 * Adapter inputs are `lora.{layer}.{group}.AT (in, r)` / `.BT (r, out)`; the Model's feeds carry
 * every one of them (unfed ones: the graph's rank-0 defaults, the identity), mixed by the
 * manifest's `cat1` / `cat0w` rules (mix.ts), so nothing of a previous choice stays bound. */
import type { InferenceSession, Tensor } from 'onnxruntime-common';
import { EdgepeftError } from './errors.js';
import { lastPositions } from './decode.js';
import type { Decoding } from './decode.js';
import type { Opened, Slots } from './batching.js';

type Rows = number[][];
type Feeds = Record<string, Tensor>;
type TensorCtor = typeof Tensor;

/** Rows moved to the left edge, padding (token 0) after them: `(ids (B, L), lengths (B,))` with
 * L = max(lengths). Refuses a row whose ones have a gap, or an empty row. */
export function rightAlign(ids: Rows, mask: Rows): { ids: Rows; lengths: number[] } {
  const lengths = mask.map((r) => r.reduce((a, v) => a + v, 0));
  const starts = mask.map((r) => Math.max(r.indexOf(1), 0));
  mask.forEach((r, b) => {
    if (!lengths[b] || r.slice(starts[b], starts[b] + lengths[b]).some((v) => v !== 1)) {
      throw new EdgepeftError(`attention_mask row ${b}: this artifact's fused graph needs each row's tokens in ` +
        'one run (left or right padding), with at least one token.');
    }
  });
  const width = Math.max(...lengths);
  const out = ids.map((r, b) => {
    const row = r.slice(starts[b], starts[b] + lengths[b]);
    return [...row, ...new Array(width - row.length).fill(0)];
  });
  return { ids: out, lengths };
}

/** `(B, L, V)` right-aligned logits back to the caller's `(B, S, V)` layout (padded positions hold
 * copies of real ones, as in Python: a causal LM's outputs there mean nothing either way). */
export function restore(data: Float32Array, dims: number[], mask: Rows): { data: Float32Array; dims: number[] } {
  const [B, L, V] = dims, S = mask[0].length;
  const out = new Float32Array(B * S * V);
  mask.forEach((r, b) => {
    const n = r.reduce((a, v) => a + v, 0), s = Math.max(r.indexOf(1), 0);
    for (let j = 0; j < S; j++) {
      const src = Math.min(Math.max(j - s, 0), n - 1);  // np.clip(j - start, 0, n - 1)
      out.set(data.subarray((b * L + src) * V, (b * L + src + 1) * V), (b * S + j) * V);
    }
  });
  return { data: out, dims: [B, S, V] };
}

/** The KV buffers of one generation (Python's fused.Cache): M slots per layer, written by each run.
 * Each layer's keys and values live in one array of `batch` rows; a run takes its first rows
 * (`useRows`: rows joining and leaving a running batch). */
export class KvBuffer {
  /** `${layer}.key|value` -> (batch, H_kv, M, D), the storage of the rows. */
  private readonly store = new Map<string, Float32Array>();
  /** What the next run takes as past: views over the storage's first rows, or (fed back) the
   * last run's present. */
  private readonly kv = new Map<string, Tensor>();
  private readonly heads = new Map<string, [number, number]>();
  private rows = 0;
  private stepLogits: Tensor | null = null;

  /** `cache`: [(kv_heads, head_dim)] per layer; `slots`: M, the prompt + new tokens at most. */
  constructor(private readonly T: TensorCtor, private readonly session: InferenceSession,
              cache: [number, number][], readonly batch: number, readonly slots: number, private readonly inPlace: boolean) {
    cache.forEach(([h, d], i) => {
      for (const n of ['key', 'value']) {
        this.store.set(`${i}.${n}`, new Float32Array(batch * h * slots * d));
        this.heads.set(`${i}.${n}`, [h, d]);
      }
    });
    this.useRows(batch);
  }

  /** Run on the first `n` rows of the buffers from now on (nothing is copied). */
  useRows(n: number): void {
    this.sync();
    for (const [k, a] of this.store) {
      const [h, d] = this.heads.get(k)!;
      this.kv.set(k, new this.T('float32', a.subarray(0, n * h * this.slots * d), [n, h, this.slots, d]));
    }
    this.rows = n;
    this.stepLogits = null;
  }

  /** Bring the storage up to date (fed back: the last present is copied into it). */
  private sync(): void {
    for (const [k, t] of this.kv) {
      const a = this.store.get(k)!;
      const data = t.data as Float32Array;
      if (data.buffer !== a.buffer) {
        a.set(data);
        const [h, d] = this.heads.get(k)!;
        this.kv.set(k, new this.T('float32', a.subarray(0, this.rows * h * this.slots * d), [this.rows, h, this.slots, d]));
      }
    }
  }

  /** Row `row`'s first `n` slots of every layer from row `from` of `other` (or of this buffer). */
  copyRow(row: number, n: number, other: KvBuffer = this, from = 0): void {
    this.sync();
    other.sync();
    for (const [k, a] of this.store) {
      const [h, d] = this.heads.get(k)!;
      const src = other.store.get(k)!, m = other.slots;
      for (let x = 0; x < h; x++) {
        const at = ((from * h + x) * m) * d;
        if (src === a) a.copyWithin(((row * h + x) * this.slots) * d, at, at + n * d);
        else a.set(src.subarray(at, at + n * d), ((row * h + x) * this.slots) * d);
      }
    }
  }

  /** Run `ids (B, S)` (right-padded) after each row's cached tokens with the adapter `feeds`;
   * `lengths`: each row's total length once they are added. Returns the `(B, S, V)` logits (a
   * decode step's may be a buffer the next step overwrites). */
  async run(feeds: Feeds, ids: Rows, lengths: number[]): Promise<Tensor> {
    const longest = Math.max(...lengths);
    if (longest > this.slots) {
      throw new EdgepeftError(`the KV buffer holds ${this.slots} tokens; this step needs ${longest}.`);
    }
    const b = ids.length, s = ids[0].length;
    const flat = new BigInt64Array(b * s);
    ids.forEach((r, i) => r.forEach((v, j) => { flat[i * s + j] = BigInt(v); }));
    const inputs: Feeds = {
      ...feeds,
      input_ids: new this.T('int64', flat, [b, s]),
      seqlens_k: new this.T('int32', Int32Array.from(lengths, (n) => n - 1), [b]),
      total_sequence_length: new this.T('int32', Int32Array.of(longest), []),
    };
    for (const [k, t] of this.kv) inputs[`past.${k}`] = t;
    if (!this.inPlace) {
      const out = await this.session.run(inputs);
      for (const k of this.kv.keys()) this.kv.set(k, out[`present.${k}`]);  // (B, H, M, D): next step's past
      return out.logits;
    }
    // the buffers are also the preallocated outputs: onnxruntime writes the new keys / values into
    // them (GroupQueryAttention sees past and present at one address: its shared-buffer mode)
    const fetches: Record<string, Tensor | null> = { logits: null };
    if (s === 1) {  // decode steps write their (B, 1, V) logits into one preallocated tensor too
      const v = this.vocab();
      if (this.stepLogits?.dims[0] !== b) this.stepLogits = new this.T('float32', new Float32Array(b * v), [b, 1, v]);
      fetches.logits = this.stepLogits;
    }
    for (const [k, t] of this.kv) fetches[`present.${k}`] = t;
    const out = await this.session.run(inputs, fetches as InferenceSession.FetchesType);
    return s === 1 ? this.stepLogits! : out.logits;
  }

  private vocab(): number {
    const meta = (this.session as any).outputMetadata as { name: string; shape?: unknown[] }[] | undefined;
    const v = meta?.find((m) => m.name === 'logits')?.shape?.at(-1);
    if (typeof v !== 'number') throw new EdgepeftError("the fused graph's logits output has no fixed vocabulary size.");
    return v;
  }
}

/** Runs a fused-layout graph (causal LMs): logits of every position, and decoding. */
export class FusedRunner {
  /** `positions`: rows of the graph's rotary tables (the manifest's `graph.positions`), the
   * longest prompt + generation it computes; null for artifacts that did not record it. */
  constructor(private readonly T: TensorCtor, private readonly cache: [number, number][],
              private readonly inPlace: boolean, readonly positions: number | null = null) {}

  /** Refuse a call whose longest row would pass the rotary tables (onnxruntime would fail with a
   * kernel error), as Python's `FusedLayout.fits`. */
  fits(tokens: number, newTokens = 0): void {
    if (this.positions != null && tokens + newTokens > this.positions) {
      const what = `${tokens} prompt tokens` + (newTokens ? ` + ${newTokens} new tokens` : '');
      throw new EdgepeftError(`${what} exceed the ${this.positions} positions this fused graph computes ` +
        "(the model's max_position_embeddings); shorten the prompt" + (newTokens ? ' or ask for fewer new tokens.' : '.'));
    }
  }

  /** A new KV buffer of `slots` tokens for `batch` rows on `session` (one generation). */
  buffer(session: InferenceSession, batch: number, slots: number): KvBuffer {
    return new KvBuffer(this.T, session, this.cache, batch, slots, this.inPlace);
  }

  /** `(B, S, V)` logits of every position of `ids (B, S)` in the caller's (left- or right-padded) layout. */
  async logits(session: InferenceSession, feeds: Feeds, ids: Rows, mask: Rows): Promise<{ data: Float32Array; dims: number[] }> {
    const right = rightAlign(ids, mask);
    this.fits(Math.max(...right.lengths));
    const out = await this.buffer(session, ids.length, right.ids[0].length).run(feeds, right.ids, right.lengths);
    return restore(out.data as Float32Array, [...out.dims], mask);
  }

  /** A generation on one KV buffer of prompt + `newTokens` slots, written in place (or fed back). */
  decoding(session: InferenceSession, feeds: Feeds, ids: Rows, mask: Rows, newTokens: number): Decoding {
    const right = rightAlign(ids, mask);
    let lengths = right.lengths;
    this.fits(Math.max(...lengths), newTokens);
    const kv = this.buffer(session, ids.length, right.ids[0].length + newTokens);
    return {
      rows: ids.length,
      prefill: async () => {
        const out = await kv.run(feeds, right.ids, lengths);  // each row's logits at its last real token
        return lastPositions(out.data as Float32Array, out.dims, lengths.map((n) => n - 1));
      },
      step: async (tokens) => {
        lengths = lengths.map((x) => x + 1);
        return (await kv.run(feeds, tokens.map((t) => [t]), lengths)).data as Float32Array;  // (B, 1, V)
      },
    };
  }

  /** KV slots for rows that join and leave a running batch (`FusedSlots`). */
  slots(session: InferenceSession, capacity: number, context: number): FusedSlots {
    return new FusedSlots(this, session, capacity, context);
  }
}

/** Rows that join and leave a running batch (`Batcher`, batching.ts), as Python's `fused.Slots`:
 * one KV buffer of `capacity` rows x `context` slots; the live rows are its first rows, in
 * `order`, each at its own length.
 *
 * A joining row's prompt runs alone on a KV buffer of its own length, then its keys and values
 * are copied into the next row of the batch buffer; each decode step runs the live rows in one
 * call. A leaving row's place is taken by the last row (one row's keys and values copied). */
export class FusedSlots implements Slots {
  /** Slot of each buffer row. */
  readonly order: number[] = [];
  private readonly lengths: number[];
  private readonly kv: KvBuffer;
  private rows = -1;  // rows the buffer runs

  constructor(private readonly runner: FusedRunner, private readonly session: InferenceSession,
              readonly capacity: number, readonly context: number) {
    runner.fits(context);
    this.kv = runner.buffer(session, capacity, context);
    this.lengths = new Array(capacity).fill(0);
  }

  /** Run `ids` into the next buffer row, `slot`'s from now on; the `(V,)` logits of its next token. */
  async prefill(slot: number, opened: Opened, ids: number[], newTokens: number): Promise<Float32Array> {
    const one = this.runner.buffer(this.session, 1, ids.length);
    const out = await one.run(opened.feeds, [ids], [ids.length]);  // (1, S, V)
    const row = this.order.length;
    this.kv.copyRow(row, ids.length, one, 0);
    this.lengths[row] = ids.length;
    this.order.push(slot);
    this.rows = -1;
    const [, S, V] = out.dims;
    return (out.data as Float32Array).slice((S - 1) * V, S * V);
  }

  /** Append `tokens` to the live rows (`order`) in one call; their `(n, V)` logits (a buffer the
   * next step overwrites). `fixed`: the adapter feeds; `weights`: per-row weights of the live rows. */
  async step(fixed: Feeds, weights: Feeds, live: number[], tokens: number[]): Promise<Float32Array> {
    const n = this.order.length;
    if (n !== this.rows) {
      this.kv.useRows(n);
      this.rows = n;
    }
    for (let r = 0; r < n; r++) this.lengths[r] += 1;
    const out = await this.kv.run({ ...fixed, ...weights }, tokens.map((t) => [t]), this.lengths.slice(0, n));
    return out.data as Float32Array;  // (n, 1, V)
  }

  /** Nothing is bound between calls here (the feeds go with each run). */
  release(): void {}

  free(slot: number): void {
    const row = this.order.indexOf(slot), last = this.order.length - 1;
    if (row < 0) return;
    if (row !== last) {  // the last row moves into the hole
      this.kv.copyRow(row, this.lengths[last], this.kv, last);
      this.lengths[row] = this.lengths[last];
      this.order[row] = this.order[last];
    }
    this.order.pop();
    this.lengths[last] = 0;
    this.rows = -1;
  }
}
