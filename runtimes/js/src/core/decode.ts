/** Decoding, once for every layout (Python's edgepeft/runtime/decode.py and layout.Decoding):
 * a layout gives a `Decoding` per group of rows (its prompt, then one token per row at a time),
 * and `decode` runs it with the stop conditions, picking each row's next token greedily or with
 * a `Sampler`. */
import type { Sampler } from './sampling.js';

/** One generation over `rows` rows: the prompt, then one token per row at a time. */
export interface Decoding {
  readonly rows: number;
  /** Run the prompt; `(rows, V)` logits of each row's next token, row-major. */
  prefill(): Promise<Float32Array>;
  /** Append `tokens` (one per row); `(rows, V)` logits of the next ones. The array may be a
   * buffer the next step overwrites: read (or copy) it first. */
  step(tokens: number[]): Promise<Float32Array>;
}

/** Each step's tokens of one row, called as they come; returning false ends the generation. */
export type OnStep = (next: number[]) => boolean | void;

/** Greedy next token of every row from the last position of logits (B, S, V), appended to `out`;
 * with EOS ids, a finished row repeats `fill` and `done` marks rows that produced an EOS. */
export function pickNext(data: Float32Array, dims: number[], out: number[][], done: boolean[],
                         eos: number[], fill: number, sampler: Sampler | null = null, rowOffset = 0,
                         onStep: OnStep | null = null): number[] {
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

/** `(B, V)`: the logits of each row's last position of `(B, S, V)` logits (`at[b]`: another
 * position per row, e.g. the last real token of right-aligned rows). */
export function lastPositions(data: Float32Array, dims: readonly number[], at: number[] | null = null): Float32Array {
  const [B, S, V] = dims;
  if (S === 1 && !at) return data;
  const out = new Float32Array(B * V);
  for (let b = 0; b < B; b++) {
    const p = at ? at[b] : S - 1;
    out.set(data.subarray((b * S + p) * V, (b * S + p + 1) * V), b * V);
  }
  return out;
}

/** Run `dec` for at most `maxNew` tokens, appending each row's tokens to `out` (its rows in
 * order; rows of a fixed batch past the caller's may be there too), until every row has ended
 * (EOS: it repeats `fill` from then on) or `onStep` returns false. Returns the number of new
 * tokens and when the prompt was done (`t1`). */
export async function decode(dec: Decoding, out: number[][], maxNew: number, eos: number[], fill: number,
                             sampler: Sampler | null, rowOffset: number, onStep: OnStep | null,
                             now: () => number): Promise<{ newTokens: number; t1: number }> {
  if (maxNew <= 0) return { newTokens: 0, t1: now() };
  let last = await dec.prefill();
  const t1 = now();
  const V = last.length / dec.rows;
  const done = out.map(() => false);
  let n = 0;
  for (let step = 0; step < maxNew; step++) {
    const next = pickNext(last, [dec.rows, 1, V], out, done, eos, fill, sampler, rowOffset, onStep);
    n = step + 1;
    if (done.every(Boolean) || step === maxNew - 1) break;  // done: EOS, or the caller stopped
    last = await dec.step(next);
  }
  return { newTokens: n, t1 };
}
