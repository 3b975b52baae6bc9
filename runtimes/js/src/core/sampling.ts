/** How a row's next token is chosen, as Python's edgepeft/runtime/decode.py: the rules of
 * transformers' logits processors in their order (repetition penalty over the row's prompt and
 * generated tokens, temperature, top-k, top-p), then the argmax (temperature 0, the default) or a
 * draw. The draws come from a seeded xoshiro128** generator: a seed reproduces a generation in JS
 * (numpy's generator in Python draws another sequence, so sampled tokens differ between the two). */
import { EdgepeftError } from './errors.js';

export interface SamplingOptions {
  temperature?: number; topK?: number; topP?: number; repetitionPenalty?: number; seed?: number | null;
}

/** Python's repr of an option value in messages: -1, 1.5, None. */
const repr = (v: unknown): string => (v == null ? 'None' : String(v));

export class Sampler {
  readonly temperature: number; readonly topK: number; readonly topP: number;
  readonly repetitionPenalty: number; readonly seed: number | null;
  private seen: number[][];
  private state: Uint32Array;

  /** `prompts[r]`: row r's real prompt tokens (the repetition penalty's history). */
  constructor(opts: SamplingOptions = {}, prompts: number[][] = []) {
    this.temperature = opts.temperature ?? 0;
    this.topK = opts.topK ?? 0;
    this.topP = opts.topP ?? 1;
    this.repetitionPenalty = opts.repetitionPenalty ?? 1;
    this.seed = opts.seed ?? null;
    const checks: [string, unknown, boolean, string][] = [
      ['temperature', this.temperature, this.temperature >= 0, '>= 0 (0: greedy)'],
      ['top_k', this.topK, Number.isInteger(this.topK) && this.topK >= 0, 'an integer >= 0 (0: off)'],
      ['top_p', this.topP, this.topP > 0 && this.topP <= 1, 'in (0, 1] (1: off)'],
      ['repetition_penalty', this.repetitionPenalty, this.repetitionPenalty > 0, '> 0 (1: off)'],
      ['seed', this.seed, this.seed == null || (Number.isInteger(this.seed) && this.seed >= 0), 'an integer >= 0 or None'],
    ];
    for (const [name, v, ok, what] of checks) {
      if (!ok) throw new EdgepeftError(`${name}=${repr(v)}: must be ${what}.`);
    }
    this.seen = this.repetitionPenalty !== 1 ? prompts.map((p) => p.slice()) : [];
    this.state = seedState(this.seed ?? Math.floor(Math.random() * 2 ** 32));
  }

  get greedy(): boolean { return this.temperature === 0 && this.repetitionPenalty === 1; }

  /** One row's logits after the rules (a copy; removed tokens -Infinity). */
  processed(logits: Float32Array, seen: number[] = []): Float32Array {
    const x = Float32Array.from(logits);
    const p = Math.fround(this.repetitionPenalty);  // numpy computes in float32
    if (p !== 1) for (const t of new Set(seen)) x[t] = x[t] < 0 ? x[t] * p : x[t] / p;
    if (this.temperature === 0) return x;
    const t = Math.fround(this.temperature);
    for (let i = 0; i < x.length; i++) x[i] = x[i] / t;
    if (this.topK > 0 && this.topK < x.length) {
      const kth = Float32Array.from(x).sort()[x.length - this.topK];  // k-th largest
      for (let i = 0; i < x.length; i++) if (x[i] < kth) x[i] = -Infinity;
    }
    if (this.topP < 1) {
      const order = Array.from(x.keys()).sort((a, b) => x[a] - x[b] || a - b);  // ascending, stable
      const max = x[order[order.length - 1]];
      let sum = 0;
      for (const i of order) sum += Math.exp(x[i] - max);
      let cum = 0;
      const drop: number[] = [];
      order.forEach((i, j) => {
        cum += Math.exp(x[i] - max) / sum;
        if (cum <= 1 - this.topP && j < order.length - 1) drop.push(i);
      });
      for (const i of drop) x[i] = -Infinity;
    }
    return x;
  }

  /** Row `row`'s next token from its logits; the token joins the row's history. */
  next(logits: Float32Array, row: number): number {
    const x = this.greedy ? logits : this.processed(logits, this.seen[row]);
    let tok = 0;
    if (this.temperature === 0) {
      for (let v = 1; v < x.length; v++) if (x[v] > x[tok]) tok = v;  // first max, as argmax
    } else {
      let max = -Infinity;
      for (const v of x) if (v > max) max = v;
      const p = Array.from(x, (v) => Math.exp(v - max));
      const u = (1 - this.random()) * p.reduce((a, b) => a + b, 0);  // (0, total]
      let cum = 0;
      tok = p.length - 1;
      for (let v = 0; v < p.length; v++) { cum += p[v]; if (cum >= u) { tok = v; break; } }
    }
    if (this.seen[row]) this.seen[row].push(tok);
    return tok;
  }

  /** A double in [0, 1) from xoshiro128** (53 bits from two draws). */
  private random(): number {
    const hi = this.u32() >>> 5, lo = this.u32() >>> 6;
    return (hi * 67108864 + lo) / 9007199254740992;
  }

  private u32(): number {
    const s = this.state;
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = rotl(s[3], 11);
    return result;
  }
}

const rotl = (x: number, k: number): number => (x << k) | (x >>> (32 - k));

/** xoshiro128** state from a seed through splitmix32 (never all zero). */
function seedState(seed: number): Uint32Array {
  const s = new Uint32Array(4);
  let z = (seed >>> 0) ^ Math.floor(seed / 2 ** 32);
  for (let i = 0; i < 4; i++) {
    z = (z + 0x9e3779b9) | 0;
    let v = z;
    v = Math.imul(v ^ (v >>> 16), 0x85ebca6b);
    v = Math.imul(v ^ (v >>> 13), 0xc2b2ae35);
    s[i] = (v ^ (v >>> 16)) >>> 0;
  }
  if (!s.some(Boolean)) s[0] = 1;
  return s;
}
