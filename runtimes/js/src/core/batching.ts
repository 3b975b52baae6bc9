/** Continuous batching, as Python's edgepeft/runtime/batching.py: generations that join and leave
 * one running batch between decode steps, each with its own adapter (or mix), sampling, stop
 * tokens and length, one session run per step for all of them.
 *
 * A row joins with its prompt: the prompt runs alone into the row's KV slots (its first new token
 * is picked at once), then every `Batcher.step` runs all live rows in one call, with per-row
 * adapter weights (mix.ts) when their adapters differ, and picks each row's next token by its own
 * rules. A row leaves when it ends (EOS or one of its stop tokens, or its length) or when the
 * caller drops it (`Batcher.leave`: a stop string, a client gone).
 *
 * The layouts that keep rows apart offer it (fused.ts `FusedSlots`: the live rows are the first
 * rows of one KV buffer, a leaving row replaced by the last; traced.ts `TracedSlots`: the live
 * rows' pasts, left-padded to one length). Merged artifacts (one graph per adapter) and
 * fixed-shape targets (a fixed batch on a sliding window) run one row at a time (`serial`). */
import type { InferenceSession, Tensor } from 'onnxruntime-common';
import type { Decoding } from './decode.js';
import { EdgepeftError } from './errors.js';
import type { AdapterChoice } from './model.js';
import { Sampler } from './sampling.js';
import type { SamplingOptions } from './sampling.js';
import type { Array32 } from './safetensors.js';

type Feeds = Record<string, Tensor>;
type Prefix = [Array32, Array32][] | null;
type Choice = AdapterChoice;

/** Options of `Model.batcher`. */
export interface BatcherOptions {
  /** Rows decoded together at most (default 8; a serial batcher has 1). */
  capacity?: number;
  /** KV slots per row: a row's prompt + new tokens at most (default: the model's `max_length` or
   * the positions its fused graph computes, at most 1024; a fused graph keeps capacity x context
   * slots per layer). */
  context?: number | null;
}

/** Options of `Batcher.join`: the row's adapter, length, stop tokens and sampling (Python's
 * keyword options in camelCase; temperature 0, the default, is greedy). */
export interface JoinOptions extends SamplingOptions {
  /** null / undefined: the base model; a name; or a `{name: weight}` mix. */
  adapter?: Choice;
  /** Tokens to add at most (default 32). */
  maxNewTokens?: number;
  /** More tokens that end the row, as EOS does. */
  stopTokenIds?: number[];
  /** End the row at the base model's EOS (default true). */
  stopAtEos?: boolean;
}

/** What a row's prefill takes: its session, adapter feeds and KV-cache seed. */
export interface Opened { session: InferenceSession; feeds: Feeds; prefix: Prefix }

/** The KV slots of a running batch (fused.ts `FusedSlots`, traced.ts `TracedSlots`, `Serial`). */
export interface Slots {
  /** Slot of each graph batch row, in order. */
  readonly order: number[];
  /** Run `ids` alone into the batch as `slot`'s row; the `(V,)` logits of its next token. */
  prefill(slot: number, opened: Opened, ids: number[], newTokens: number): Promise<Float32Array>;
  /** One call for the live rows (`order`); their `(n, V)` logits. */
  step(fixed: Feeds, weights: Feeds, live: number[], tokens: number[]): Promise<Float32Array>;
  /** Let go of the adapter feeds (a new set of adapters is about to be built). */
  release(): void;
  free(slot: number): void;
}

/** What a Batcher needs of its Model (`Model.batcher` builds it over the model's private parts). */
export interface BatchHost {
  vocab: number;
  /** The default context before the 1024 cap (`max_length`, the fused graph's positions, 1024). */
  longest: number;
  /** The tokens that end a row. */
  eos(stopAtEos: boolean, stopTokenIds: number[]): number[];
  /** KV slots of a side-branch graph; null: one row at a time (merged graphs, fixed shapes). */
  slots: ((capacity: number, context: number) => Slots) | null;
  /** The session, feeds and KV-cache seed of one choice (unknown names and bad mixes throw). */
  open(adapter: Choice): Opened;
  /** The feeds of one choice for every row. */
  feeds(adapter: Choice): Feeds;
  /** Throws unless rows with `choices` can share one call. */
  rowsAgree(choices: Choice[]): void;
  /** Concatenated adapters (`union` too) and the rows' weights, the last set kept outside the mix cache. */
  rowsParts(choices: Choice[], union: string[]): { fixed: Feeds; weights: Feeds };
  /** A one-row generation of `ids` (serial batchers). */
  decoding(opened: Opened, ids: number[], newTokens: number): Decoding;
}

/** One generation in the batch: its prompt, choices, the tokens so far and how it ended. */
export class Row {
  /** New tokens so far (the ending token, EOS or a stop token, is not included). */
  readonly tokens: number[] = [];
  /** null while it runs; 'stop' at EOS or a stop token; 'length' at maxNewTokens. */
  finish: 'stop' | 'length' | null = null;
  /** `(V,)` the logits the last token was picked from. */
  logits: Float32Array | null = null;
  /** Its next-token rules (greedy, or sampled with the row's own seeded draws). */
  readonly sampler: Sampler;

  constructor(readonly slot: number, readonly prompt: readonly number[], readonly adapter: Choice,
              readonly maxNewTokens: number, readonly stop: ReadonlySet<number>, sampler: Sampler) {
    this.sampler = sampler;
  }
}

const key = (c: Choice): string => (c == null ? 'null' : typeof c === 'string' ? JSON.stringify(c)
  : 'mix:' + JSON.stringify(Object.entries(c).sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))));

const repr = (v: unknown): string => (v == null ? 'None' : typeof v === 'string' ? `'${v}'` : JSON.stringify(v) ?? String(v));

/** A running batch of up to `capacity` generations (see the module doc; Python's `Batcher`).
 * Made by `Model.batcher({capacity, context})`.
 *
 * Merged artifacts (one graph per adapter) and fixed-shape targets cannot run rows of different
 * lengths side by side: their Batcher has `serial` set and a capacity of 1 (one generation at a
 * time; the others wait). A Batcher runs one call at a time: await `join` / `step` before the
 * next (a call made meanwhile is refused). */
export class Batcher {
  readonly capacity: number;
  readonly context: number;
  /** One row at a time (merged graphs, fixed shapes). */
  readonly serial: boolean;
  /** The live rows by slot. */
  readonly rows = new Map<number, Row>();
  /** Decode calls so far (one per step, whatever the rows' adapters; prefills not counted). */
  runs = 0;
  private readonly host: BatchHost;
  private readonly slots: Slots;
  private readonly union = new Set<string>();  // adapters of this busy spell's rows (see feedsOf)
  private last: { key: string; union: string; feeds: { fixed: Feeds; weights: Feeds } } | null = null;
  private busy = false;
  private leaving: Row[] = [];  // rows dropped during a call: they leave when it ends

  /** Made by `Model.batcher`, which passes its host (the model's parts a batcher runs). */
  constructor(host: BatchHost, opts: BatcherOptions = {}) {
    const capacity = opts.capacity ?? 8;
    if (!Number.isInteger(capacity) || capacity < 1) throw new EdgepeftError(`capacity=${repr(capacity)}: an integer >= 1.`);
    const context = opts.context || Math.min(Math.floor(host.longest), 1024);
    if (!Number.isInteger(context) || context < 2) {
      throw new EdgepeftError(`context=${repr(context)}: an integer >= 2 (prompt + new tokens per row).`);
    }
    this.host = host;
    this.serial = host.slots === null;
    this.capacity = this.serial ? 1 : capacity;
    this.context = context;
    this.slots = this.serial ? new Serial(host) : host.slots!(capacity, context);
  }

  /** Whether a row with `adapter` can join now: a free row, and its adapter can share a call with
   * the live rows' (prompts and prefixes must agree, and IA3 / DoRA scales and heads in a graph
   * without per-row offsets). A row that does not fit waits for rows to leave; an unknown adapter throws. */
  fits(adapter: Choice = null): boolean {
    this.host.open(adapter);  // names checked: unknown adapters throw
    if (this.rows.size >= this.capacity) return false;
    if (this.serial) return true;
    try {
      this.host.rowsAgree([...[...this.rows.values()].map((r) => r.adapter), adapter]);
    } catch (e) {
      if (e instanceof EdgepeftError) return false;
      throw e;
    }
    return true;
  }

  /** Run `prompt` into a free row and pick its first new token (in `row.tokens`, or `row.finish`
   * set when it ends at once). Throws EdgepeftError for no free row or an adapter that cannot
   * share the batch (check `fits` first), an empty prompt or ids out of range, prompt + new
   * tokens above `context`, or bad sampling options. */
  async join(prompt: number[], opts: JoinOptions = {}): Promise<Row> {
    const vocab = this.host.vocab;
    if (!Array.isArray(prompt) || !prompt.length || prompt.some((t) => !Number.isInteger(t) || t < 0 || t >= vocab)) {
      throw new EdgepeftError(`a prompt is a non-empty list of token ids in [0, ${vocab}).`);
    }
    const maxNew = opts.maxNewTokens ?? 32;
    if (!Number.isInteger(maxNew) || maxNew < 1) throw new EdgepeftError(`maxNewTokens=${repr(maxNew)}: an integer >= 1.`);
    if (prompt.length + maxNew > this.context) {
      throw new EdgepeftError(`${prompt.length} prompt tokens + ${maxNew} new tokens exceed the ${this.context} ` +
        'tokens a row holds; shorten the prompt or ask for fewer tokens.');
    }
    const sampler = new Sampler(opts, [prompt]);
    const adapter = opts.adapter ?? null;
    return this.exclusive(async () => {
      if (!this.fits(adapter)) {
        throw new EdgepeftError(`the batch is full, or adapter=${repr(adapter)} cannot share a call with the live ` +
          'rows; wait for rows to leave.');
      }
      let slot = 0;
      while (this.rows.has(slot)) slot++;
      const ids = prompt.slice();
      const row = new Row(slot, ids, adapter, maxNew, new Set(this.host.eos(opts.stopAtEos ?? true, opts.stopTokenIds ?? [])),
        sampler);
      const logits = await this.slots.prefill(slot, this.host.open(adapter), ids, maxNew);  // (V,)
      if (!this.rows.size) this.union.clear();
      for (const n of typeof adapter === 'string' ? [adapter] : Object.keys(adapter ?? {})) this.union.add(n);
      this.rows.set(slot, row);
      this.take(row, logits);
      return row;
    });
  }

  /** Drop `row` from the batch (ended or not); its slot is free for the next join. Called while a
   * `join` / `step` runs, the row leaves when that call ends (it may get that step's token). */
  leave(row: Row): void {
    if (this.busy) {
      this.leaving.push(row);
      return;
    }
    if (this.rows.get(row.slot) === row) {
      this.rows.delete(row.slot);
      this.slots.free(row.slot);
    }
  }

  /** One decode call for every live row; the rows that got a token or ended (ended rows leave
   * the batch). Nothing to do: an empty list. */
  async step(): Promise<Row[]> {
    return this.exclusive(async () => {
      const live = [...this.slots.order];  // the rows of the graph batch, in order
      if (!live.length) return [];
      const rows = live.map((s) => this.rows.get(s)!);
      const tokens = rows.map((r) => r.tokens[r.tokens.length - 1]);  // a live row has one
      const { fixed, weights } = this.feedsOf(rows);
      const logits = await this.slots.step(fixed, weights, live, tokens);  // (n, V)
      this.runs++;
      const V = logits.length / live.length;
      rows.forEach((row, i) => this.take(row, logits.slice(i * V, (i + 1) * V)));
      return rows;
    });
  }

  private async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    if (this.busy) {
      throw new EdgepeftError('a Batcher runs one call at a time: await join() / step() before the next.');
    }
    this.busy = true;
    try {
      return await fn();
    } finally {
      this.busy = false;
      for (const row of this.leaving.splice(0)) this.leave(row);
    }
  }

  /** Pick `row`'s next token from its `(V,)` logits; end and drop the row when it ends. */
  private take(row: Row, logits: Float32Array): void {
    row.logits = logits;
    const t = row.sampler.next(logits, 0);
    if (row.stop.has(t)) {
      row.finish = 'stop';
    } else {
      row.tokens.push(t);
      if (row.tokens.length >= row.maxNewTokens) row.finish = 'length';
    }
    if (row.finish && this.rows.get(row.slot) === row) {  // (inside a call: at once)
      this.rows.delete(row.slot);
      this.slots.free(row.slot);
    }
  }

  /** The graph feeds of a step whose rows run their adapters. Rows that agree run their adapter's
   * own feeds; else the adapters every row of this busy spell has used are concatenated once
   * (`fixed`, kept while rows come and go) and the small per-row weights pick each row's columns. */
  private feedsOf(rows: Row[]): { fixed: Feeds; weights: Feeds } {
    if (this.serial) return { fixed: {}, weights: {} };
    const keys = rows.map((r) => key(r.adapter));
    if (keys.every((k) => k === keys[0])) return { fixed: this.host.feeds(rows[0].adapter), weights: {} };
    const union = [...this.union].sort();
    const id = JSON.stringify(keys), names = JSON.stringify(union);
    if (!this.last || this.last.key !== id || this.last.union !== names) {  // rows came or went: new weights
      if (this.last && this.last.union !== names) {  // a new set of adapters: the old concatenation goes first
        this.last = null;
        this.slots.release();
      }
      this.last = { key: id, union: names, feeds: this.host.rowsParts(rows.map((r) => r.adapter), union) };
    }
    return this.last.feeds;
  }
}

/** One generation at a time on the layout's own decoding (merged graphs, fixed shapes). */
class Serial implements Slots {
  order: number[] = [];
  private run: Decoding | null = null;

  constructor(private readonly host: BatchHost) {}

  async prefill(slot: number, opened: Opened, ids: number[], newTokens: number): Promise<Float32Array> {
    this.run = this.host.decoding(opened, ids, newTokens);
    this.order = [slot];
    const logits = await this.run.prefill();  // (rows, V): a fixed batch's filler rows after the row
    return logits.slice(0, logits.length / this.run.rows);
  }

  async step(fixed: Feeds, weights: Feeds, live: number[], tokens: number[]): Promise<Float32Array> {
    const run = this.run!;
    const logits = await run.step(new Array(run.rows).fill(tokens[0]));
    return logits.slice(0, logits.length / run.rows);
  }

  release(): void {}

  free(slot: number): void {
    this.run = null;
    this.order = [];
  }
}
