/** The artifact contract (edgepeft/contract/): read manifest.json and check every field
 * the runtime relies on, with the same refusals as Python's read_manifest. */
import { EdgepeftError } from './errors.js';
import type { Source } from './source.js';

import { ADAPTER_NAME_RE, FORMAT, FORMAT_VERSION, MANIFEST_NAME, MAX_MANIFEST_BYTES, MIX_RULES, type MixRule } from './contract.js';

export { ADAPTER_FILE_FORMAT, ADAPTER_NAME_RE, FORMAT, FORMAT_VERSION, MANIFEST_NAME, MAX_MANIFEST_BYTES, MIX_RULES,
  PROMPT_INPUT } from './contract.js';
export type { MixRule } from './contract.js';

export interface GraphEntry {
  file: string; data_file: string; sha256: string; data_sha256: string;
  layout?: string | null; inputs?: { name: string; shape: (string | number)[]; dtype: string }[];
  /** Fused layout: rows of the rotary tables, the longest prompt + generation the graph computes. */
  positions?: number | null;
  buckets?: unknown; [k: string]: unknown;
}
export interface AdapterEntry {
  kind: string; file?: string; sha256?: string; base_fingerprint?: string;
  safetensors?: { file: string; sha256: string } | null; inputs?: string[];
  /** Shared inputs it leaves to the graph's default (a value, not the identity). */
  defaults?: string[];
  prefix?: { length: number; from_prompt: boolean } | null; graph?: GraphEntry; head?: string[];
  [k: string]: unknown;
}
export interface Manifest {
  format: string; format_version: number; task: 'causal-lm' | 'classification'; mode: 'side' | 'merged';
  precision: string;
  base: { fingerprint: string; model_type: string; vocab_size: number; eos_token_id?: number | number[] | null;
          num_labels?: number; head_trained?: boolean; max_length?: number; id2label?: Record<string, string> };
  graph: GraphEntry;
  static?: unknown;
  kv_cache?: { layers: number; kv_heads: number[]; head_dims: number[] };
  tokenizer?: { dir: string; pad_token_id?: number | null; eos_token_id?: number | null; bos_token_id?: number | null } | null;
  /** `default`: sha256 of a shared input's default value (not the identity), see `defaults`. */
  inputs: Record<string, { shape: (number | null)[]; mix: MixRule; default?: string }>;
  /** Per-row weights inputs `{slot}.rows (N, 1, R)` -> the adapter inputs whose rank columns they
   * weight (and the first one's rank axis): rows of one batch may run different adapters. */
  rows?: Record<string, { inputs: string[]; axis: number }>;
  /** Per-row offsets inputs `{input}.rows` -> the input they offset (a scale of IA3 / DoRA,
   * offsets `(N, 1, width)`; a classification head's `head.*`, `(N, out, in)` / `(N, 1, out)`),
   * that input's identity, and `fed` (optional): whether a per-row call feeds the input its
   * identity (a head, whose graph default is the base's head). */
  row_values?: Record<string, { input: string; identity: number; fed?: boolean }>;
  adapters: Record<string, AdapterEntry>;
  /** What an adapter pack must have been made for (edgepeft/contract/packs.py `slot_schema`):
   * written at export; artifacts from before adapter packs lack it. */
  slot_schema?: string;
  [k: string]: unknown;
}

function short(v: unknown): string {
  let t: string;
  try { t = v === undefined ? 'None' : JSON.stringify(v) ?? String(v); } catch { t = String(v); }
  return t.length <= 80 ? t : t.slice(0, 77) + '...';
}

const isStr = (v: unknown): v is string => typeof v === 'string';
const isObj = (v: unknown): v is Record<string, any> => typeof v === 'object' && v !== null && !Array.isArray(v);
const isInt = (v: unknown, min = 0): boolean => typeof v === 'number' && Number.isInteger(v) && v >= min;

export function checkAdapterName(name: string, where: string): string {
  if (!ADAPTER_NAME_RE.test(name)) {
    throw new EdgepeftError(`${where}: adapter name ${JSON.stringify(name)} is not allowed. Use letters, digits, ` +
      "'_', '-', '.' (not first), at most 64 characters.");
  }
  return name;
}

/** The AdapterFormat / safetensors base tag: 31 bits of the base fingerprint (never 0 or 1). */
export function baseTag(fingerprint: string): number {
  const hex = fingerprint.slice(fingerprint.lastIndexOf(':') + 1).slice(0, 8);
  const tag = Math.floor(parseInt(hex, 16) / 2);
  return tag > 1 ? tag : tag + 2;
}

/** Read and check manifest.json from `source`. */
export async function readManifest(source: Source): Promise<Manifest> {
  const where = source.describe(MANIFEST_NAME);
  let bytes: Uint8Array;
  try {
    bytes = await source.read(MANIFEST_NAME);
  } catch (e) {
    throw new EdgepeftError(`${where}: missing or unreadable (${(e as Error)?.message ?? e}); this is not an ` +
      'edgepeft artifact (or its export did not finish). Export it again with `edgepeft export`.');
  }
  if (bytes.length > MAX_MANIFEST_BYTES) {
    throw new EdgepeftError(`${where}: ${bytes.length} bytes, too large for a manifest (at most ` +
      `${MAX_MANIFEST_BYTES}); the artifact is damaged. Export it again.`);
  }
  let m: any;
  try {
    m = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (e) {
    throw new EdgepeftError(`${where}: not valid JSON (${String((e as Error).message).slice(0, 200)}). ` +
      'Export the artifact again.');
  }
  if (!isObj(m) || m.format !== FORMAT) {
    throw new EdgepeftError(`${where}: not an edgepeft manifest (format != '${FORMAT}').`);
  }
  if (!isInt(m.format_version) || m.format_version !== FORMAT_VERSION) {
    throw new EdgepeftError(`${where}: format_version ${short(m.format_version)}; this runtime reads version ` +
      `${FORMAT_VERSION}. Use the @edgepeft/runtime version that matches the edgepeft that exported it, ` +
      'or export the artifact again.');
  }
  for (const key of ['task', 'mode', 'base', 'graph', 'adapters']) {
    if (!(key in m)) throw new EdgepeftError(`${where}: key '${key}' missing. Export the artifact again.`);
  }
  checkFields(m, where);
  for (const name of Object.keys(m.adapters)) checkAdapterName(name, where);
  return m as Manifest;
}

function checkFields(m: any, where: string): void {
  const need = (ok: boolean, field: string, what: string, value?: unknown) => {
    if (!ok) {
      throw new EdgepeftError(`${where}: ${field} = ${short(value)}: expected ${what}. The manifest was ` +
        'edited or damaged; export the artifact again.');
    }
  };
  const graph = (g: any, field: string) => {
    need(isObj(g), field, 'an object', g);
    for (const key of ['file', 'data_file', 'sha256', 'data_sha256']) need(isStr(g[key]), `${field}.${key}`, 'a string', g[key]);
    for (const key of ['ops', 'quantization']) {
      need(g[key] == null || isObj(g[key]), `${field}.${key}`, 'an object or null', g[key]);
    }
    const ort = g.ort;
    need(ort == null || (isObj(ort) && isStr(ort.file) && isStr(ort.sha256)), `${field}.ort`,
      'null or {file, sha256} strings', ort);
    need(g.layout == null || g.layout === 'fused', `${field}.layout`, "one of (None, 'fused')", g.layout);
    need(g.positions == null || isInt(g.positions, 1), `${field}.positions`, 'a positive integer or null', g.positions);
  };
  need(m.task === 'causal-lm' || m.task === 'classification', 'task', "'causal-lm' or 'classification'", m.task);
  need(m.mode === 'side' || m.mode === 'merged', 'mode', "'side' or 'merged'", m.mode);
  for (const key of ['precision', 'edgepeft_version']) need(isStr(m[key]), key, 'a string', m[key]);
  const base = m.base;
  need(isObj(base), 'base', 'an object', base);
  for (const key of ['fingerprint', 'model_type']) need(isStr(base[key]), `base.${key}`, 'a string', base[key]);
  need(isInt(base.vocab_size, 1), 'base.vocab_size', 'an integer >= 1', base.vocab_size);
  const eos = base.eos_token_id;
  need(eos == null || isInt(eos) || (Array.isArray(eos) && eos.every((e) => isInt(e))), 'base.eos_token_id',
    'null, a token id or a list of them', eos);
  if (m.task === 'classification') {
    need(isInt(base.num_labels, 1), 'base.num_labels', 'an integer >= 1', base.num_labels);
    need(typeof (base.head_trained ?? true) === 'boolean', 'base.head_trained', 'true or false', base.head_trained);
    need(isInt(base.max_length ?? 512, 1), 'base.max_length', 'an integer >= 1', base.max_length);
    need(isObj(base.id2label ?? {}), 'base.id2label', 'an object', base.id2label);
  } else {
    const kv = m.kv_cache;
    need(isObj(kv), 'kv_cache', 'an object', kv);
    const heads = kv.kv_heads, dims = kv.head_dims;
    need(Array.isArray(heads) && heads.every((h: unknown) => isInt(h, 1)), 'kv_cache.kv_heads', 'a list of integers >= 1', heads);
    need(Array.isArray(dims) && dims.every((d: unknown) => isInt(d, 1)) && dims.length === heads.length,
      'kv_cache.head_dims', `a list of ${heads.length} integers >= 1`, dims);
    need(kv.layers === heads.length, 'kv_cache.layers', `the integer ${heads.length}`, kv.layers);
  }
  const tok = m.tokenizer;
  need(tok == null || (isObj(tok) && isStr(tok.dir)), 'tokenizer', "null or an object with a 'dir' string", tok);
  if (tok) {
    for (const key of ['pad_token_id', 'eos_token_id', 'bos_token_id']) {
      need(tok[key] == null || isInt(tok[key]), `tokenizer.${key}`, 'null or a token id', tok[key]);
    }
  }
  const inputs = m.inputs ?? {};
  m.inputs = inputs;
  need(isObj(inputs), 'inputs', 'an object', inputs);
  for (const [name, spec] of Object.entries<any>(inputs)) {
    need(isObj(spec) && (MIX_RULES as readonly string[]).includes(spec.mix), `inputs['${name}'].mix`,
      `one of ${MIX_RULES.join(', ')}`, spec);
    need(Array.isArray(spec.shape) && spec.shape.every((d: unknown) => d === null || isInt(d)),
      `inputs['${name}'].shape`, 'a list of sizes (null: varies per adapter)', spec.shape);
    need(spec.default == null || (isStr(spec.default) && !spec.shape.includes(null)), `inputs['${name}'].default`,
      'absent, or the sha256 of a fixed-shape default', spec.default);
  }
  const rows = m.rows ?? {};
  need(isObj(rows) && Object.values<any>(rows).every((v) => isObj(v) && Array.isArray(v.inputs) && v.inputs.length &&
    v.inputs.every((k: unknown) => isStr(k) && Object.hasOwn(inputs, k)) && isInt(v.axis) &&
    v.axis < inputs[v.inputs[0]].shape.length), 'rows',
    "{rows input: {'inputs': [adapter inputs it weights], 'axis': the first one's rank axis}}", rows);
  const values = m.row_values ?? {};
  need(isObj(values) && Object.values<any>(values).every((v) => isObj(v) && isStr(v.input) && Object.hasOwn(inputs, v.input) &&
    typeof v.identity === 'number' && typeof (v.fed ?? false) === 'boolean'), 'row_values',
    "{offsets input: {'input': the input it offsets, 'identity': that input's identity, 'fed': " +
    "whether a per-row call feeds the input its identity (optional)}}", values);
  need(Array.isArray(m.slots ?? []), 'slots', 'a list', m.slots);
  if (m.mode === 'side') {
    graph(m.graph, 'graph');
    need(m.static == null || isObj(m.static), 'static', 'null or {batch, max_rank, context} integers', m.static);
  }
  const adapters = m.adapters;
  need(isObj(adapters), 'adapters', 'an object {name: entry}', adapters);
  for (const [name, e] of Object.entries<any>(adapters)) {
    const field = `adapters['${name}']`;
    need(isObj(e), field, 'an object', e);
    need(isStr(e.kind), `${field}.kind`, 'a string', e.kind);
    for (const key of ['targets', 'head']) need(Array.isArray(e[key] ?? []), `${field}.${key}`, 'a list', e[key]);
    if (m.mode === 'merged') {
      graph(e.graph, `${field}.graph`);
      continue;
    }
    for (const key of ['file', 'sha256', 'base_fingerprint']) need(isStr(e[key]), `${field}.${key}`, 'a string', e[key]);
    const st = e.safetensors;
    need(st == null || (isObj(st) && isStr(st.file) && isStr(st.sha256)), `${field}.safetensors`,
      'null or {file, sha256} strings', st);
    const feeds = e.inputs ?? [];
    need(Array.isArray(feeds) && feeds.every((n: unknown) => isStr(n) && n in inputs), `${field}.inputs`,
      "a list of names from 'inputs'", feeds);
    const uses = e.defaults ?? [];
    need(Array.isArray(uses) && uses.every((n: unknown) => isStr(n) && inputs[n]?.default != null && !feeds.includes(n)),
      `${field}.defaults`, "a list of inputs with a 'default' that the adapter does not feed", uses);
    const prefix = e.prefix;
    need(prefix == null || (isObj(prefix) && isInt(prefix.length, 1) && typeof prefix.from_prompt === 'boolean'),
      `${field}.prefix`, 'null or {length: integer >= 1, from_prompt: true/false}', prefix);
  }
}
