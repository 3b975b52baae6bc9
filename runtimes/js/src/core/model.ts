/** `Model`: an edgepeft artifact, run with any onnxruntime JS backend (node, web, react-native).
 *
 * Same numbers and refusals as the Python runtime (edgepeft/runtime/model.py). A side artifact is
 * one session; an adapter is a set of graph feeds (and, for prefix / decoder prompt tuning, a
 * KV-cache seed). Choosing an adapter per call only changes which tensors are fed: no session is
 * rebuilt; the feeds (ort Tensors) of each choice are built once and cached.
 *
 * Scope: the default graph layout with a dynamic KV cache (causal-lm, traced.ts) and
 * classification, side and merged mode, static-shape artifacts (manifest "static": one session per
 * sequence bucket, see static.ts), and fused-layout artifacts (graph layout "fused": onnxruntime's
 * fused kernels, one KV buffer per layer, see fused.ts). A list of choices, one per row of a
 * batch, runs in one session run per step on a side-branch artifact (per-row weights, mix.ts),
 * one run per distinct adapter on a merged one; `batcher()` keeps a running batch that rows join
 * and leave (batching.ts). `addAdapter` loads an adapter pack (packs.ts), `removeAdapter` unloads
 * an adapter: the loaded adapters are one map, replaced (never changed in place) on each, so a
 * call that has started keeps the adapters it started with. */
import type { InferenceSession, Tensor } from 'onnxruntime-common';
import { EdgepeftError } from './errors.js';
import { ADAPTER_FILE_FORMAT, baseTag, checkAdapterName, MANIFEST_NAME, PROMPT_INPUT, readManifest } from './manifest.js';
import type { AdapterEntry, GraphEntry, Manifest } from './manifest.js';
import { Batcher } from './batching.js';
import type { BatcherOptions, BatchHost } from './batching.js';
import { decode } from './decode.js';
import type { Decoding, OnStep } from './decode.js';
import { FusedRunner } from './fused.js';
import { combine, mixKey, rowWeights, sharedByRows, unionFeeds } from './mix.js';
import type { Key, LoadedAdapter, Mix, RowsSpec, RowValuesSpec } from './mix.js';
import { decodeFloats, externalDataLocations, takeInitializers } from './onnxproto.js';
import { PACK_SUFFIX, packKeys, readPack } from './packs.js';
import type { PackKeys, VerifyEd25519 } from './packs.js';
import type { DefaultTensor } from './onnxproto.js';
import { parseSafetensors } from './safetensors.js';
import type { Array32 } from './safetensors.js';
import { sha256Hex } from './sha256.js';
import { padFeeds, StaticRunner } from './static.js';
import { Sampler, type SamplingOptions } from './sampling.js';
import type { StaticSpec } from './static.js';
import type { Source } from './source.js';
import { inside } from './source.js';
import { loadTokenizer } from './tokenizer.js';
import { TracedRunner } from './traced.js';
import type { TextTokenizer } from './tokenizer.js';

/** The onnxruntime-common API object an entry point passes in (onnxruntime-node / -web / -react-native). */
export interface OrtApi {
  InferenceSession: { create(buffer: Uint8Array, options?: InferenceSession.SessionOptions): Promise<InferenceSession> };
  Tensor: typeof Tensor;
  /** The backend writes preallocated CPU output tensors (onnxruntime-node does; the wasm backend
   * of onnxruntime-web does not): a fused graph's KV buffer is then passed as both past and
   * present. Default false: present is fed back as the next past. */
  inPlaceOutputs?: boolean;
}

/** null / undefined: the base model; a name; or a `{name: weight}` mix (or composition). */
export type AdapterChoice = string | Mix | null | undefined;
/** One choice for every row, or a list of choices, one per row of the batch (per-row adapters:
 * one session run per step on a side-branch artifact, see `Model.logits`). */
export type AdapterChoices = AdapterChoice | AdapterChoice[];

export interface LoadOptions {
  /** Extra onnxruntime session options (execution providers, threads, ...). */
  sessionOptions?: InferenceSession.SessionOptions;
  /** A static-shape artifact of several sequence buckets opens one session per bucket. Where the
   * weights are read from the artifact's folder (node; a Source with `folder`), true (default): the sessions
   * do not prepack them, so all of them read the one memory-mapped data file: one copy in physical
   * memory (calls on CPU take longer; Python's `share_weights`). false: each session holds its own
   * prepacked copy. (Browsers hand each session the file's bytes: a copy per session either way.) */
  shareWeights?: boolean;
  /** Adapter packs (`addAdapter`) must be signed by one of these public keys, each
   * `ed25519:BASE64` as `edgepeft keygen` writes to KEY.pub (the node entry also takes the file).
   * Unset: unsigned packs are accepted and signatures are not checked (development). */
  trustedKeys?: string[];
  /** Keys whose packs are refused even when trusted: key ids (`sha256:` + 16 hex digits) or keys. */
  revoked?: string[];
  /** Verifies a pack's Ed25519 signature where WebCrypto has no Ed25519 (React Native, older
   * browsers): `(key 32 bytes, signature 64 bytes, message) => Promise<boolean>`. WebCrypto is used
   * where it has Ed25519; without this option, @noble/ed25519 is imported (the react-native entry
   * passes it). */
  verifyEd25519?: VerifyEd25519;
}

/** Options of `addAdapter`. */
export interface AddOptions {
  /** The name to load the adapter under (default: the pack's). */
  asName?: string;
  /** How messages name the pack given as bytes (default 'adapter pack'; a path names itself). */
  label?: string;
}

export interface Logits { data: Float32Array; dims: number[] }

export interface Stats {
  /** Time to build (or fetch from the cache) the feeds of the adapter choice: the swap cost. */
  feedsMs: number;
  prefillMs: number;
  decodeMs: number;
  newTokens: number;
}

const MIX_CACHE_SIZE = 8;
type Feeds = Record<string, Tensor>;
interface Choice { feeds: Feeds; prefix: [Array32, Array32][] | null; promptLength: number; hasHead: boolean }
/** One call of a batch: its rows (null: all of them), the session and the adapter feeds. */
interface Group { rows: number[] | null; session: InferenceSession; choice: Choice }

const now = () => (globalThis.performance ?? Date).now();

/** CPython's iteration order of a small set of ints (what `list(eos)` and `next(iter(eos))` give
 * in Python). */
function pySetOrder(values: number[]): number[] {
  const uniq = [...new Set(values)];
  let size = 8;
  while (uniq.length * 5 >= size * 3) size *= 2;
  const table: (number | undefined)[] = new Array(size);
  for (const v of uniq) {
    let i = v % size;
    while (table[i] !== undefined) i = (i + 1) % size;
    table[i] = v;
  }
  return table.filter((v): v is number => v !== undefined);
}

/** Options of `generate`: Python's keyword options in camelCase. */
export interface GenerateOptions extends SamplingOptions {
  maxNewTokens?: number;
  /** One choice for all rows, or one per row (see `Model.logits`). */
  adapter?: AdapterChoices;
  attentionMask?: number[][] | null; stopAtEos?: boolean;
  /** More tokens that end a row, as EOS does. */
  stopTokenIds?: number[];
  /** Called with each step's tokens (one per row); returning false ends the generation. On a
   * merged artifact with a per-row list, each adapter's rows are a generation of their own, run
   * one after another: the callback then sees one group's rows at a time. */
  onStep?: OnStep;
}

/** Options of `generateText` / `streamText`: `stop` strings end the text before them. */
export interface TextOptions extends SamplingOptions {
  maxNewTokens?: number; adapter?: AdapterChoice; stop?: string[]; stopTokenIds?: number[];
}

export class Model {
  /** The manifest, with the adapters loaded now (`addAdapter` / `removeAdapter` replace it). */
  get manifest(): Manifest { return this.man; }
  private man: Manifest;
  readonly task: 'causal-lm' | 'classification';
  readonly merged: boolean;
  /** Timing of the last logits() / generate() / classify() call. */
  stats: Stats = { feedsMs: 0, prefillMs: 0, decodeMs: 0, newTokens: 0 };
  private readonly source: Source;
  private readonly ort: OrtApi;
  private readonly where: string;
  private readonly cache: [number, number][];
  private sessions = new Map<string | null, InferenceSession>();
  private defaults: Feeds = {};
  /** name -> adapter. Replaced as a whole by addAdapter / removeAdapter, never changed in place. */
  private loaded = new Map<string, LoadedAdapter>();
  /** name -> the version of the pack it was loaded from (artifact adapters: none, i.e. 0). */
  private versions = new Map<string, number>();
  private keys: PackKeys = { trusted: null, revoked: new Set() };
  private verifier: VerifyEd25519 | undefined;
  private graphShapes: Record<string, (string | number | null)[]> = {};
  private single = new Map<string, Choice>();
  private mixes = new Map<string, { used: LoadedAdapter[]; choice: Choice }>();
  private base: Choice | null = null;
  private tok: TextTokenizer | null = null;
  private tokError: EdgepeftError | null = null;
  /** Static shapes: the bucket graphs' runner, and each adapter input's fixed shape (ranks at max_rank). */
  private static: StaticRunner | null = null;
  private staticSpec: StaticSpec | null = null;
  private buckets = new Map<number, InferenceSession>();
  private fixed: Record<string, number[]> = {};
  /** Fused layout (graph layout "fused"): right-aligned rows, seqlens_k, one KV buffer per layer. */
  private fused: FusedRunner | null = null;
  /** The traced layout (mask, positions, a growing KV cache): every graph that is not fused. */
  private readonly traced: TracedRunner;
  /** Per-row inputs of the graph (the manifest's `rows` and `row_values`), fed their defaults
   * unless a per-row batch feeds them. */
  private readonly rowsSpec: RowsSpec;
  private readonly rowValues: RowValuesSpec;
  /** The last per-row feeds built outside the mix cache (`rowsParts(..., cache=false)`). */
  private kept: { id: string; used: LoadedAdapter[]; fixed: Feeds } | null = null;

  protected constructor(source: Source, ort: OrtApi, manifest: Manifest) {
    this.source = source;
    this.ort = ort;
    this.man = manifest;
    this.task = manifest.task;
    this.merged = manifest.mode === 'merged';
    this.where = source.describe(MANIFEST_NAME);
    const kv = manifest.kv_cache ?? { kv_heads: [], head_dims: [] };
    this.cache = kv.kv_heads.map((h, i) => [h, kv.head_dims[i]]);
    this.traced = new TracedRunner(ort.Tensor, this.cache);
    this.rowsSpec = this.merged ? {} : manifest.rows ?? {};
    this.rowValues = this.merged ? {} : manifest.row_values ?? {};
  }

  /** Load an artifact from `source` with the onnxruntime API `ort`. Entry points (node.ts, web.ts,
   * react-native.ts) call this with their Source and backend. */
  static async open(source: Source, ort: OrtApi, options: LoadOptions = {}): Promise<Model> {
    const keys = await packKeys(options.trustedKeys, options.revoked);  // bad keys first, as Python
    const manifest = await readManifest(source);
    const m = new (this as unknown as new (s: Source, o: OrtApi, m: Manifest) => Model)(source, ort, manifest);
    m.keys = keys;
    m.verifier = options.verifyEd25519;
    await m.init(options);
    await m.loadTok();
    return m;
  }

  private async init(options: LoadOptions): Promise<void> {
    const m = this.manifest;
    const graphs = this.merged ? Object.values(m.adapters).map((e) => e.graph!) : [m.graph];
    if (m.graph.layout === 'fused' || graphs.some((g) => g.layout === 'fused')) {
      if (this.task !== 'causal-lm' || m.static != null) {
        throw new EdgepeftError(`${this.where}: graph layout "fused" goes with a causal-lm artifact without ` +
          `static shapes (this one: ${this.task}${m.static != null ? ', static' : ''}); the manifest was edited. ` +
          'Export the artifact again.');
      }
      const positions = graphs.map((g) => g.positions).filter((p): p is number => typeof p === 'number');
      this.fused = new FusedRunner(this.ort.Tensor, this.cache, this.ort.inPlaceOutputs === true,
        positions.length ? Math.min(...positions) : null);
    }
    if (this.merged) {
      for (const [name, entry] of Object.entries(m.adapters)) {
        this.sessions.set(name, await this.session(entry.graph!, new Set(), options));
      }
      return;
    }
    const names = new Set(Object.keys(m.inputs));
    // the per-row inputs are graph inputs with a default too: taken out and fed like the adapter inputs
    const taken = new Set([...names, ...Object.keys(this.rowsSpec), ...Object.keys(this.rowValues)]);
    if (m.static != null) {
      await this.initStatic(taken, options);
    } else {
      this.sessions.set(null, await this.session(m.graph, taken, options));
    }
    for (const i of m.graph.inputs ?? []) if (names.has(i.name)) this.graphShapes[i.name] = i.shape;
    for (const [name, entry] of Object.entries(m.adapters)) this.loaded.set(name, await this.loadAdapter(name, entry));
  }

  /** One session per bucket (each a graph of its own over the shared weights file); adapter inputs
   * the graphs give no default (ranks fixed at max_rank) are fed zeros of their fixed shape. */
  private async initStatic(names: Set<string>, options: LoadOptions): Promise<void> {
    const m = this.manifest;
    const spec = m.static as StaticSpec;
    const entries = (m.graph.buckets ?? []) as (GraphEntry & { seq: number })[];
    const share = entries.length > 1 && options.shareWeights !== false;
    for (const entry of entries) {
      this.buckets.set(entry.seq, await this.session(entry, names, options, true, share));
    }
    this.sessions.set(null, this.buckets.get(Math.max(...this.buckets.keys()))!);
    for (const [k, v] of Object.entries(m.inputs)) this.fixed[k] = v.shape.map((d) => d ?? spec.max_rank);
    for (const k of [...Object.keys(this.rowsSpec), ...Object.keys(this.rowValues)]) {  // (batch, 1, width): the default's shape
      const d = this.defaults[k];
      if (!d) {
        throw new EdgepeftError(`${this.where}: per-row input '${k}' has no fixed-shape default in the bucket graphs. ` +
          'Export the artifact again.');
      }
      this.fixed[k] = [...d.dims];
    }
    for (const [k, shape] of Object.entries(this.fixed)) {
      if (this.defaults[k]) continue;
      const size = shape.reduce((a, b) => a * b, 1);
      this.defaults[k] = this.tensor({ data: new Float32Array(size), dims: shape }, k);
    }
    this.staticSpec = spec;
    this.static = new StaticRunner(this.ort.Tensor, spec, this.buckets, this.cache, this.source.describe(''));
  }

  // ------------------------------------------------------------------ loading
  private async readChecked(rel: string, sha256: string, where: string): Promise<Uint8Array> {
    const path = inside(rel, where, this.source.describe(''));
    let bytes: Uint8Array;
    try {
      bytes = await this.source.read(path);
    } catch (e) {
      throw new EdgepeftError(`${this.source.describe(path)}: missing or unreadable (${(e as Error)?.message ?? e}) ` +
        `(${where}). Export the artifact again.`);
    }
    if ((await sha256Hex(bytes)) !== sha256) {
      throw new EdgepeftError(`${this.source.describe(path)}: sha256 does not match the manifest (${where}); the file ` +
        'was changed or damaged. Export the artifact again.');
    }
    return bytes;
  }

  private async session(graph: GraphEntry, adapterInputs: Set<string>, options: LoadOptions,
                        fixedShapes = false, shareWeights = false): Promise<InferenceSession> {
    const file = inside(graph.file, this.where, this.source.describe(''));
    const bytes = await this.readChecked(file, graph.sha256, this.where);
    const dir = file.includes('/') ? file.slice(0, file.lastIndexOf('/') + 1) : '';
    const locations = [...new Set(externalDataLocations(bytes, this.source.describe(file)))];
    for (const loc of locations) {
      try {
        if (!loc) throw new Error('empty');
        inside(dir + loc, this.where, this.source.describe(''));
      } catch {
        throw new EdgepeftError(`${this.source.describe(file)}: external data location ${JSON.stringify(loc)} points ` +
          'outside the artifact directory; the artifact is tampered with. Export it again.');
      }
    }
    const { model, defaults } = takeInitializers(bytes, adapterInputs, this.source.describe(file));
    const missing = [...adapterInputs].filter((n) => !defaults.has(n)).sort();
    if (missing.length && !fixedShapes) {
      throw new EdgepeftError(`${this.where}: input '${missing[0]}' is not an adapter input of ` +
        `${this.source.describe(file)}. Export the artifact again.`);
    }
    const folder = this.source.folder?.(dir.replace(/\/$/, ''));
    const data = new Map<string, Uint8Array>();
    for (const loc of folder === undefined ? locations : []) {
      const rel = inside(dir + loc, this.where, '');
      try {
        data.set(loc, await this.source.read(rel));
      } catch (e) {
        throw new EdgepeftError(`${this.source.describe(rel)}: missing from the artifact (${(e as Error)?.message ?? e}). ` +
          'Export it again.');
      }
    }
    for (const [name, t] of defaults) this.defaults[name] = this.tensor(await this.defaultValue(t, data, dir, file), name);
    const user = options.sessionOptions ?? {};
    const weights: InferenceSession.SessionOptions = folder === undefined
      ? { externalData: [...data].map(([path, d]) => ({ path, data: d })) }
      : { extra: { ...(user.extra as object), session: { ...((user.extra as any)?.session),
          model_external_initializers_file_folder_path: folder,
          // unpacked, the weights stay the mapped file's pages, which every bucket session shares
          ...(shareWeights ? { disable_prepacking: '1' } : {}) } } };
    let session: InferenceSession;
    try {
      session = await this.ort.InferenceSession.create(model, { logSeverityLevel: 3, ...user, ...weights });
    } catch (e) {
      throw new EdgepeftError(`${this.source.describe(file)}: onnxruntime cannot load it ` +
        `(${String((e as Error)?.message ?? e).slice(0, 300)}). Export the artifact again.`);
    }
    this.checkGraph(file, session);
    if (fixedShapes) {  // static graphs: an adapter input without a default must be a graph input
      const bad = missing.find((n) => !session.inputNames.includes(n));
      if (bad) {
        throw new EdgepeftError(`${this.where}: input '${bad}' is not a fixed-shape adapter input of ` +
          `${this.source.describe(file)}. Export the artifact again.`);
      }
    }
    return session;
  }

  private async defaultValue(t: DefaultTensor, data: Map<string, Uint8Array>, dir: string, file: string): Promise<Array32> {
    if (t.data) return { data: t.data, dims: t.dims };
    const ext = t.external!;
    const what = `${this.source.describe(file)}: external data of an adapter input`;
    let bytes = data.get(ext.location);
    if (!bytes) {
      const rel = inside(dir + ext.location, this.where, '');
      bytes = this.source.readRange ? await this.source.readRange(rel, ext.offset, ext.length)
        : (await this.source.read(rel)).subarray(ext.offset);
      ext.offset = 0;
    }
    if (ext.offset + ext.length > bytes.length) {
      throw new EdgepeftError(`${what} lies outside ${this.source.describe(dir + ext.location)}; the artifact is damaged. Export it again.`);
    }
    const count = t.dims.reduce((a, b) => a * b, 1);
    return { data: decodeFloats(bytes.subarray(ext.offset, ext.offset + ext.length), ext.dtype, count, what), dims: t.dims };
  }

  private checkGraph(file: string, session: InferenceSession): void {
    const inputs = new Set(session.inputNames);
    if (this.task === 'causal-lm') {
      const layers = session.inputNames.filter((n) => n.startsWith('past.') && n.endsWith('.key')).length;
      if (layers !== this.cache.length || this.cache.some((_, i) => !inputs.has(`past.${i}.key`) || !inputs.has(`past.${i}.value`))) {
        throw new EdgepeftError(`${this.where}: kv_cache does not match the KV-cache inputs of ${this.source.describe(file)} ` +
          `(${layers} layers); the manifest was edited. Export the artifact again.`);
      }
    }
    const fusedInputs = ['seqlens_k', 'total_sequence_length'];
    if (this.fused && !fusedInputs.every((n) => inputs.has(n))) {
      throw new EdgepeftError(`${this.where}: graph layout "fused", but ${this.source.describe(file)} has no ` +
        `'${fusedInputs.find((n) => !inputs.has(n))}' input (not a fused graph); the manifest was edited. Export ` +
        'the artifact again.');
    }
    if (!this.fused && fusedInputs.some((n) => inputs.has(n))) {
      throw new EdgepeftError(`${this.where}: no graph layout given, but ${this.source.describe(file)} is a fused ` +
        `graph (it takes '${fusedInputs.find((n) => inputs.has(n))}'); the manifest was edited. Export the artifact again.`);
    }
    if (!session.outputNames.includes('logits')) {
      throw new EdgepeftError(`${this.source.describe(file)}: has no 'logits' output. Export the artifact again.`);
    }
  }

  private async loadAdapter(name: string, entry: AdapterEntry): Promise<LoadedAdapter> {
    const where = `adapter '${name}' of ${this.where}`;
    const st = entry.safetensors;
    if (!st) {
      throw new EdgepeftError(`${where}: has no .safetensors file (only ${entry.file}, which onnxruntime's JS API ` +
        'cannot read); export the artifact again with this edgepeft version.');
    }
    const bytes = await this.readChecked(st.file, st.sha256, where);
    const file = this.source.describe(inside(st.file, where, ''));
    const ours = this.manifest.base.fingerprint;
    if (entry.base_fingerprint !== ours) {
      throw new EdgepeftError(`${file}: made for base ${entry.base_fingerprint}, this artifact's base is ${ours} (${where}).`);
    }
    const { tensors, metadata } = parseSafetensors(bytes, file);
    if (metadata.format !== ADAPTER_FILE_FORMAT || metadata.base_tag !== String(baseTag(ours))) {
      throw new EdgepeftError(`${file}: the file was exported for another base model or is not an edgepeft adapter ` +
        `(format ${JSON.stringify(metadata.format)}, base tag ${JSON.stringify(metadata.base_tag)}, expected ` +
        `${baseTag(ours)} from ${ours.slice(0, 23)}...) (${where}). Export the adapter with this artifact's base.`);
    }
    return this.adapterOf(name, entry, tensors, file, where);
  }

  /** An adapter from its arrays (float32) and manifest entry, checked against the graph (Python's
   * `AdapterStore.from_arrays`): the artifact's adapter files and adapter packs alike; `file` and
   * `where` name it in messages. */
  private adapterOf(name: string, entry: AdapterEntry, tensors: Map<string, Array32>, file: string,
                    where: string): LoadedAdapter {
    const graph = new Map<string, Array32>();
    const sizes = new Map<string, [number, string]>();
    for (const [k, v] of tensors) {
      const spec = this.manifest.inputs[k];
      if (!spec) {
        if (k.startsWith('prefix.')) continue;
        throw new EdgepeftError(`${file}: input '${k}' is not an adapter input of this graph (${where}).`);
      }
      const shape = this.graphShapes[k] ?? spec.shape;
      if (v.dims.length !== shape.length || shape.some((e, i) => typeof e === 'number' && e !== v.dims[i])) {
        throw new EdgepeftError(`${file}: ${k} has shape (${v.dims.join(', ')}), the graph takes ` +
          `(${shape.map((d) => (typeof d === 'number' ? d : 'n')).join(', ')}) float32 (${where}).`);
      }
      shape.forEach((e, i) => {
        if (typeof e !== 'string') return;
        const seen = sizes.get(e) ?? [v.dims[i], k];
        sizes.set(e, seen);
        if (seen[0] !== v.dims[i]) {
          throw new EdgepeftError(`${file}: ${k} has ${v.dims[i]} along ${e}, ${seen[1]} has ${seen[0]}; they must ` +
            `agree (${where}). Export the artifact again.`);
        }
      });
      graph.set(k, v);
    }
    for (const [k, shape] of Object.entries(this.graphShapes)) {
      const e = shape.find((d) => typeof d === 'string' && sizes.has(d));
      if (!graph.has(k) && e !== undefined) {
        throw new EdgepeftError(`${file}: has ${sizes.get(e as string)![1]} but not ${k}, which goes with it (${where}). ` +
          'Export the artifact again.');
      }
    }
    const listed = entry.inputs;
    if (listed) {
      const odd = [...listed.filter((n) => !graph.has(n)), ...[...graph.keys()].filter((n) => !listed.includes(n))].sort();
      if (odd.length) {
        throw new EdgepeftError(`${file}: its inputs differ from the manifest's list (e.g. '${odd[0]}') (${where}). ` +
          'Export the artifact again.');
      }
    }
    for (const k of entry.defaults ?? []) {  // shared inputs whose value is the graph's default
      if (graph.has(k) || this.manifest.inputs[k]?.default == null) {
        throw new EdgepeftError(`${file}: its manifest entry lists ${k} under 'defaults', but ` +
          (graph.has(k) ? 'the file holds it' : 'the graph has no shared default of that name') +
          ` (${where}). Export the artifact again.`);
      }
    }
    const prefix: [Array32, Array32][] = [];
    this.cache.forEach(([h, d], i) => {
      const k = tensors.get(`prefix.${i}.key`), v = tensors.get(`prefix.${i}.value`);
      if (!k && !v) return;
      const ok = (x?: Array32) => x && x.dims.length === 4 && x.dims[0] === 1 && x.dims[1] === h && x.dims[3] === d;
      if (!ok(k) || !ok(v) || k!.dims.join() !== v!.dims.join()) {
        throw new EdgepeftError(`${file}: prefix of layer ${i} must be key and value of shape (1, ${h}, p, ${d}) float32 (${where}).`);
      }
      prefix.push([k!, v!]);
    });
    if (prefix.length && prefix.length !== this.cache.length) {
      throw new EdgepeftError(`${file}: prefix covers ${prefix.length} of ${this.cache.length} layers (${where}).`);
    }
    const known = new Set(prefix.flatMap((_, i) => [`prefix.${i}.key`, `prefix.${i}.value`]));
    const stray = [...tensors.keys()].filter((k) => k.startsWith('prefix.') && !known.has(k)).sort();
    if (stray.length) throw new EdgepeftError(`${file}: array '${stray[0]}' is not a KV-cache layer of this model (${where}).`);
    if (prefix.length && new Set(prefix.map(([k, v]) => `${k.dims[2]},${v.dims[2]}`)).size !== 1) {
      throw new EdgepeftError(`${file}: prefix layers have different lengths (${where}).`);
    }
    if (Boolean(prefix.length) !== Boolean(entry.prefix) || (prefix.length && entry.prefix!.length !== prefix[0][0].dims[2])) {
      throw new EdgepeftError(`${file}: its prefix does not match the manifest's 'prefix' entry (${where}). Export the artifact again.`);
    }
    return { name, entry, graph, prefix: prefix.length ? prefix : null };
  }

  // ------------------------------------------------------------------ adapters
  /** Names of the adapters in the artifact (and added ones, less removed ones). */
  get adapters(): string[] {
    return Object.keys(this.manifest.adapters);
  }

  /** Load an adapter pack (`edgepeft adapter pack`, a `.edgepeft-pack` file): its bytes, or its
   * path (URL in browsers) where the Source reads files by path (`readFile`: the node and web
   * entries). As Python's `Model.add_adapter(pack)`: the pack must fit this graph (its base
   * fingerprint and slot schema are this artifact's, every array matches its checksum) and, when
   * the model was opened with `trustedKeys`, be signed by one of them and by no `revoked` key; its
   * arrays are checked against the graph as the artifact's adapter files are. Its name may already
   * be loaded only from an older version of the pack (or from the artifact itself, version 0): a
   * newer version replaces it; calls already running finish with the old one. Nothing is written.
   *
   * Returns the name the adapter is available under.
   * @throws EdgepeftError a merged artifact, another base or graph, a damaged or altered pack, a
   *   missing, untrusted or revoked signature, a version not newer than the loaded one, or arrays
   *   that do not fit; the model is left as it was. */
  async addAdapter(pack: Uint8Array | ArrayBuffer | ArrayBufferView | string, opts: AddOptions = {}): Promise<string> {
    if (this.merged) {
      throw new EdgepeftError(`${this.source.describe('')} is a merged artifact (one graph per adapter); addAdapter ` +
        'needs a side-branch artifact (--mode side).');
    }
    let bytes: Uint8Array, label: string;
    if (typeof pack === 'string') {
      label = opts.label ?? pack;
      if (!pack.endsWith(PACK_SUFFIX)) {
        throw new EdgepeftError(`${label}: not an adapter pack (a pack's file name ends with ${PACK_SUFFIX}; ` +
          '`edgepeft adapter pack` makes one). The JS runtime adds adapters from packs only.');
      }
      if (!this.source.readFile) {
        throw new EdgepeftError(`${label}: this model's Source reads no files by path (no readFile); pass the ` +
          "pack's bytes (a Uint8Array).");
      }
      try {
        bytes = await this.source.readFile(pack);
      } catch (e) {
        throw new EdgepeftError(`${label}: no such adapter pack (${String((e as Error)?.message ?? e).slice(0, 200)}).`);
      }
    } else if (pack instanceof Uint8Array) {
      [bytes, label] = [pack, opts.label ?? 'adapter pack'];
    } else if (pack instanceof ArrayBuffer || ArrayBuffer.isView(pack)) {
      bytes = ArrayBuffer.isView(pack) ? new Uint8Array(pack.buffer, pack.byteOffset, pack.byteLength) : new Uint8Array(pack);
      label = opts.label ?? 'adapter pack';
    } else {
      throw new EdgepeftError("addAdapter: pass an adapter pack's bytes (Uint8Array / ArrayBuffer) or its path.");
    }
    const { header, tensors } = await readPack(bytes, label, this.manifest, this.where, this.keys, this.verifier);
    const name = checkAdapterName(opts.asName || header.name, label);
    const version = header.version;
    const entry = { ...header.entry, pack: { file: label, version } } as unknown as AdapterEntry;
    checkPackEntry(entry, label);
    const adapter = this.adapterOf(name, entry, tensors, label, `adapter pack '${name}'`);
    // from here on no await: the version read and the replacement below are one step
    const loaded = this.versions.get(name) ?? (Object.hasOwn(this.manifest.adapters, name) ? 0 : null);
    if (loaded !== null && version <= loaded) {
      throw new EdgepeftError(`${label}: version ${version} of adapter '${name}', but version ${loaded} is loaded; a ` +
        'pack replaces only an older version. Pack it with a higher --version, or removeAdapter first.');
    }
    this.loaded = new Map([...this.loaded, [name, adapter]]);
    this.versions = new Map([...this.versions, [name, version]]);
    this.man = { ...this.man, adapters: { ...this.man.adapters, [name]: entry } };
    if (loaded !== null) this.forget(name);
    return name;
  }

  /** Unload an adapter (as Python's `remove_adapter`): later calls that name it are refused; calls
   * already running finish with it; cached mixes with it are dropped. The artifact's files are not
   * touched.
   * @throws EdgepeftError no adapter of that name. */
  removeAdapter(name: string): void {
    this.checkNames([name], Object.keys(this.manifest.adapters));
    if (this.merged) this.sessions = new Map([...this.sessions].filter(([k]) => k !== name));
    this.loaded = new Map([...this.loaded].filter(([k]) => k !== name));
    this.versions = new Map([...this.versions].filter(([k]) => k !== name));
    this.man = { ...this.man, adapters: Object.fromEntries(Object.entries(this.man.adapters).filter(([k]) => k !== name)) };
    this.forget(name);
  }

  /** Drop the cached feeds of `name` and of the mixes with it (the choices a running call holds
   * stay with that call). */
  private forget(name: string): void {
    this.single.delete(name);
    for (const [id, hit] of [...this.mixes]) if (hit.used.some((a) => a.name === name)) this.mixes.delete(id);
    if (this.kept?.used.some((a) => a.name === name)) this.kept = null;
  }

  private tensor(a: Array32, name = ''): Tensor {
    return new this.ort.Tensor('float32', a.data, a.dims);
  }

  private checkNames(names: string[], have: Iterable<string>): void {
    const all = [...have];
    const unknown = names.filter((n) => !all.includes(n));
    if (unknown.length) {
      throw new EdgepeftError(`adapter '${unknown[0]}' is not in ${this.source.describe('')}; it has: ` +
        `${all.join(', ') || '(none)'}.`);
    }
  }

  private choiceOf(feeds: Map<string, Array32>, prefix: [Array32, Array32][] | null, names: string[] = []): Choice {
    const out: Feeds = { ...this.defaults };
    if (this.staticSpec) feeds = padFeeds(feeds, this.fixed, names, this.staticSpec.max_rank, this.rowInputs());
    for (const [k, v] of feeds) out[k] = this.tensor(v, k);
    const prompt = feeds.get(PROMPT_INPUT);
    return { feeds: out, prefix, promptLength: prompt ? prompt.dims[0] : 0,
             hasHead: [...feeds.keys()].some((k) => k.startsWith('head.')) };
  }

  private rowInputs(): Set<string> {
    return new Set([...Object.keys(this.rowsSpec), ...Object.keys(this.rowValues)]);
  }

  /** The key of a `{name: weight}` mix, its names and weights checked (`where`: "row b: "). */
  private mixKeyOf(adapter: unknown, where = ''): Key {
    if (typeof adapter !== 'object' || adapter === null || Array.isArray(adapter) || !Object.keys(adapter).length ||
        Object.values(adapter).some((w) => typeof w !== 'number' || !Number.isFinite(w))) {
      throw new EdgepeftError(`adapter=${where}${JSON.stringify(adapter)}: pass null, a name, or a non-empty ` +
        '{name: weight} mix with finite numeric weights.');
    }
    this.checkNames(Object.keys(adapter), this.loaded.keys());
    return mixKey(adapter as Mix);
  }

  /** Feeds (every adapter input: the choice's arrays, the defaults for the rest) and KV-cache seed,
   * built once per choice and cached (names: always; mixes: the last 8). */
  private feeds(adapter: AdapterChoice): Choice {
    if (adapter === null || adapter === undefined) {
      return (this.base ??= this.choiceOf(new Map(), null));
    }
    if (typeof adapter === 'string') {
      const a = this.loaded.get(adapter);
      if (!a) this.checkNames([adapter], this.loaded.keys());
      let c = this.single.get(adapter);
      if (!c) {
        c = this.choiceOf(a!.graph, a!.prefix, [adapter]);
        this.single.set(adapter, c);
      }
      return c;
    }
    const key = this.mixKeyOf(adapter);
    const used = key.map(([n]) => this.loaded.get(n)!);
    return this.cached(JSON.stringify(key), used, () => {
      const { feeds, prefix } = combine(key, this.loaded, this.manifest.inputs, this.where);
      return this.choiceOf(feeds, prefix, key.map(([n]) => n));
    });
  }

  /** `make()`'s choice, cached under `id` while the adapters `used` stay loaded (the last 8). */
  private cached(id: string, used: LoadedAdapter[], make: () => Choice): Choice {
    const hit = this.mixes.get(id);
    if (hit && hit.used.length === used.length && hit.used.every((x, i) => x === used[i])) {
      this.mixes.delete(id);
      this.mixes.set(id, hit);
      return hit.choice;
    }
    const choice = make();
    this.mixes.set(id, { used, choice });
    while (this.mixes.size > MIX_CACHE_SIZE) this.mixes.delete(this.mixes.keys().next().value!);
    return choice;
  }

  // ------------------------------------------------------------------ per-row adapters
  /** Each row's mix key (`[]`: the base) and the feeds every row shares (Python's
   * `AdapterStore._shared`: refused when the rows cannot share one call). */
  private shared(choices: AdapterChoice[]): { keys: Key[]; feeds: Map<string, Array32>; prefix: [Array32, Array32][] | null } {
    const keys = choices.map((c, b) => (c == null ? [] : this.mixKeyOf(typeof c === 'string' ? { [c]: 1.0 } : c, `row ${b}: `)));
    return { keys, ...sharedByRows(keys, this.loaded, this.manifest.inputs, this.rowsSpec, this.where, this.rowValues) };
  }

  /** Throw unless rows running `choices` can share one call (what every row shares must agree);
   * builds no feeds. Rows that all make one choice always can (they run it as one choice for
   * every row, which needs no per-row inputs: a graph without them batches such rows too). */
  private rowsAgree(choices: AdapterChoice[]): void {
    const ids = choices.map(choiceId);
    if (ids.every((x) => x === ids[0])) return;
    this.shared(choices);
  }

  /** The feeds of a batch whose row `b` runs `choices[b]` in one session run (Python's
   * `AdapterStore.rows_parts`), in two parts: `fixed`, the adapters of the batch (and of `union`,
   * names a running batch keeps) concatenated along each slot's rank axis with the inputs every
   * row shares, one cached object per set of adapters (`cache` false: only the last one is kept,
   * outside the mix cache); and `weights`, each slot's per-row weights `(B, 1, R)`, each
   * scale's per-row offsets `(B, 1, width)` and a classification head's per-row offsets (with its
   * input fed zeros), made per call (small). */
  private rowsParts(choices: AdapterChoice[], union: string[] = [], cache = true):
      { fixed: Feeds; weights: Feeds; prefix: [Array32, Array32][] | null } {
    this.checkNames(union, this.loaded.keys());
    const { keys, feeds: shared, prefix } = this.shared(choices);
    const names = [...new Set([...keys.flatMap((k) => k.map(([n]) => n)), ...union])].sort();
    // what the rows share follows from row 0's adapters that set a shared input (and their weights)
    const tag = keys[0].filter(([n]) => [...this.loaded.get(n)!.graph.keys()].some((k) => shared.has(k)));
    const id = JSON.stringify(['rows', names, tag]);
    const used = names.map((n) => this.loaded.get(n)!);
    const make = (): Choice => {
      const feeds = new Map([...shared, ...unionFeeds(names, this.loaded, this.manifest.inputs, this.rowsSpec, this.where)]);
      return this.choiceOf(feeds, prefix, names);
    };
    let fixed: Feeds;
    const kept = this.kept;
    if (cache) {
      fixed = this.cached(id, used, make).feeds;
    } else if (kept && kept.id === id && kept.used.every((x, i) => x === used[i])) {
      fixed = kept.fixed;
    } else {
      this.kept = null;  // the previous one can go before the next is built
      fixed = make().feeds;
      this.kept = { id, used, fixed };
    }
    let weights = rowWeights(keys, names, this.loaded, this.rowsSpec, this.rowValues);
    if (this.staticSpec) weights = padFeeds(weights, this.fixed, names, this.staticSpec.max_rank, this.rowInputs());
    const out: Feeds = {};
    for (const [k, v] of weights) out[k] = this.tensor(v, k);
    return { fixed, weights: out, prefix };
  }

  /** Graph feeds of a batch whose row `b` runs `choices[b]`, in one session run (`rowsParts`, joined). */
  private feedsRows(choices: AdapterChoice[]): Choice {
    const { fixed, weights, prefix } = this.rowsParts(choices);
    const shared = [...Object.keys(fixed)].filter((k) => fixed[k] !== this.defaults[k]);
    // a head is the rows' shared one, or per row (its input fed zeros, each row's head as offsets)
    return { feeds: { ...fixed, ...weights }, prefix,
             promptLength: fixed[PROMPT_INPUT] && fixed[PROMPT_INPUT] !== this.defaults[PROMPT_INPUT] ? fixed[PROMPT_INPUT].dims[0] : 0,
             hasHead: [...shared, ...Object.keys(weights)].some((k) => k.startsWith('head.')) };
  }

  /** The session and feeds of one choice for every row. */
  private choose(adapter: AdapterChoice): { session: InferenceSession; choice: Choice } {
    if (!this.merged) return { session: this.sessions.get(null)!, choice: this.feeds(adapter) };
    if (typeof adapter === 'string') {
      if (!this.sessions.has(adapter)) this.checkNames([adapter], [...this.sessions.keys()] as string[]);
      return { session: this.sessions.get(adapter)!, choice: { feeds: {}, prefix: null, promptLength: 0, hasHead: false } };
    }
    throw new EdgepeftError(`${this.source.describe('')} is a merged artifact: one graph per adapter, so only ` +
      `adapter: '<name>' works (one of ${this.adapters.join(', ')}). Export with --mode side for the base model ` +
      'and weighted mixes.');
  }

  /** The calls that run a batch of `rows` rows with `adapter` (Python's `Model._groups`): one
   * choice for every row, or a list of one per row. A side-branch artifact runs a list in one call
   * (each row weights its own adapters' rank columns); a merged one has a graph per adapter, so
   * its rows run in one call per distinct adapter. Sets `stats.feedsMs`. */
  private groups(adapter: AdapterChoices, rows: number): Group[] {
    const t = now();
    const out = this.groupsOf(adapter, rows);
    this.stats = { feedsMs: now() - t, prefillMs: 0, decodeMs: 0, newTokens: 0 };
    return out;
  }

  private groupsOf(adapter: AdapterChoices, rows: number): Group[] {
    if (!Array.isArray(adapter)) return [{ rows: null, ...this.choose(adapter) }];
    if (adapter.length !== rows) {
      throw new EdgepeftError(`adapter= lists ${adapter.length} choices for a batch of ${rows} rows: pass one per row ` +
        '(None, a name or a {name: weight} mix), or one choice for all rows.');
    }
    const ids = adapter.map(choiceId);
    if (ids.every((x) => x === ids[0])) return [{ rows: null, ...this.choose(adapter[0]) }];
    if (!this.merged) return [{ rows: null, session: this.sessions.get(null)!, choice: this.feedsRows(adapter) }];
    const order = [...new Set(ids)];  // distinct choices, first seen first
    return order.map((id) => {
      const rowsOf = ids.flatMap((x, b) => (x === id ? [b] : []));
      return { rows: rowsOf, ...this.choose(adapter[rowsOf[0]]) };
    });
  }

  private need(task: string, method: string): void {
    if (this.task !== task) {
      const other = this.task === 'classification' ? 'classify()' : 'logits() / generate()';
      throw new EdgepeftError(`${this.source.describe('')} is a ${this.task} artifact: ${method} needs a ${task} ` +
        `artifact; use ${other}.`);
    }
  }

  // ------------------------------------------------------------------ running
  /** A fused graph has no KV-cache seed input (export refuses prefix / prompt tuning with it). */
  private noPrefix(choice: Choice): void {
    if (choice.prefix) {
      throw new EdgepeftError(`${this.where}: a prefix (prefix / prompt tuning) cannot run on a fused graph; ` +
        'export that adapter into an artifact with --graph generic.');
    }
  }

  /** Rows -> (B, S) ids and mask; ragged rows are left-padded (Python's batch_inputs). A mask is
   * accepted with rectangular rows. */
  private batch(ids: number[][] | number[], attentionMask?: number[][] | null): { ids: number[][]; mask: number[][] } {
    let rows = ids as number[][];
    if (ids.length && typeof ids[0] === 'number') rows = [ids as number[]];
    if (!Array.isArray(rows) || !rows.length || !rows.every((r) => Array.isArray(r))) {
      throw new EdgepeftError('input ids must be a non-empty list of rows of token ids (number[][]).');
    }
    const longest = Math.max(...rows.map((r) => r.length));
    let mask: number[][];
    if (attentionMask) {
      if (rows.some((r) => r.length !== longest) || attentionMask.length !== rows.length ||
          attentionMask.some((r) => r.length !== longest)) {
        throw new EdgepeftError('attentionMask goes with rectangular ids of the same shape; for ragged rows leave ' +
          'it out (they are left-padded).');
      }
      mask = attentionMask.map((r) => r.map(Number));
    } else {
      mask = rows.map((r) => [...new Array(longest - r.length).fill(0), ...new Array(r.length).fill(1)]);
      rows = rows.map((r) => [...new Array(longest - r.length).fill(0), ...r]);
    }
    if (longest === 0) {
      throw new EdgepeftError(`input_ids must be (batch, seq) with batch, seq >= 1; got (${rows.length}, 0).`);
    }
    const vocab = this.manifest.base.vocab_size;
    const flat = rows.flat();
    if (flat.some((v) => !Number.isInteger(v) || v < 0 || v >= vocab)) {
      throw new EdgepeftError(`input_ids must lie in [0, ${vocab}); got ${Math.min(...flat)}..${Math.max(...flat)}.`);
    }
    return { ids: rows, mask };
  }

  /** The generations that run `ids` (rows of one group) with `session` and `choice`, as the
   * layout decodes them (static shapes: one per group of the fixed batch). */
  private decodings(session: InferenceSession, choice: Choice, ids: number[][], mask: number[][],
                    newTokens: number): Decoding[] {
    if (this.static) return this.static.decodings(choice.feeds, ids, mask, choice.prefix, newTokens);
    if (this.fused) {
      this.noPrefix(choice);
      return [this.fused.decoding(session, choice.feeds, ids, mask, newTokens)];
    }
    return [this.traced.decoding(session, choice.feeds, choice.prefix, ids, mask)];
  }

  /** Next-token logits for every position (causal-lm): (B, S, vocab), left padding for ragged rows.
   *
   * `adapter`: null (the base), a name or a `{name: weight}` mix for every row; or a list of those,
   * one per row of the batch. On a side-branch artifact (traced, fused or fixed-shape graph) such a
   * list runs in one session run: the adapters of the batch are concatenated along each LoRA-type
   * slot's rank axis and each row weights its own adapters' rank columns (the graph's per-row
   * weights, the manifest's `rows`), and IA3 / DoRA scales (and classification heads) are offset
   * per row where the graph has per-row offsets (`row_values`). What a call applies to every row
   * (prompts and prefixes; scales and heads of a graph without offsets) must agree across the
   * rows, else an EdgepeftError names both rows and the input. A merged artifact runs one call per distinct
   * adapter. A list whose entries are all the same is one choice. */
  async logits(ids: number[][] | number[],
               opts: { adapter?: AdapterChoices; attentionMask?: number[][] | null } = {}): Promise<Logits> {
    this.need('causal-lm', 'logits()');
    const b = this.batch(ids, opts.attentionMask);
    const groups = this.groups(opts.adapter, b.ids.length);
    const t = now();
    const parts: { rows: number[] | null; out: Logits }[] = [];
    for (const g of groups) {
      const [gi, gm] = g.rows ? [g.rows.map((r) => b.ids[r]), g.rows.map((r) => b.mask[r])] : [b.ids, b.mask];
      parts.push({ rows: g.rows, out: await this.logitsOf(g.session, g.choice, gi, gm) });
    }
    this.stats.prefillMs = now() - t;
    return scatter(b.ids.length, parts);
  }

  private async logitsOf(session: InferenceSession, choice: Choice, ids: number[][], mask: number[][]): Promise<Logits> {
    if (this.static) return this.static.logits(choice.feeds, ids, mask, choice.prefix);
    if (this.fused) {
      this.noPrefix(choice);
      return this.fused.logits(session, choice.feeds, ids, mask);
    }
    const { past, mask: full } = this.traced.start(ids.length, mask, choice.prefix);
    const out = await this.traced.run(session, choice.feeds, ids, full, past);
    return { data: out.logits.data as Float32Array, dims: [...out.logits.dims] };
  }

  /** Decoding with the KV cache (causal-lm): greedy by default, or sampled (temperature, topK,
   * topP, repetitionPenalty, seed). Returns the (left-padded) prompt rows followed by n <=
   * maxNewTokens tokens, like Python's generate; a row stops at the base's EOS or one of
   * `stopTokenIds` (later positions repeat EOS) unless stopAtEos is false. `adapter`: as in
   * `logits` (a list: one choice per row; on a merged artifact each adapter's rows are a
   * generation of their own, so a seeded sample differs from one batch's). */
  async generate(ids: number[][] | number[], opts: GenerateOptions = {}): Promise<number[][]> {
    this.need('causal-lm', 'generate()');
    const maxNew = opts.maxNewTokens ?? 32;
    const sampler = new Sampler(opts, []);  // bad options are refused before anything runs
    const b = this.batch(ids, opts.attentionMask);
    const groups = this.groups(opts.adapter, b.ids.length);
    const e = opts.stopAtEos === false ? null : this.manifest.base.eos_token_id;
    const eos = pySetOrder([...(e == null ? [] : Array.isArray(e) ? e : [e]), ...(opts.stopTokenIds ?? [])]);
    const fill = eos.length ? eos[0] : 0;
    const onStep = opts.onStep ?? null;
    const parts: { rows: number[] | null; out: number[][] }[] = [];
    let prefillMs = 0, decodeMs = 0, newTokens = 0;
    for (const g of groups) {
      const [gi, gm] = g.rows ? [g.rows.map((r) => b.ids[r]), g.rows.map((r) => b.mask[r])] : [b.ids, b.mask];
      const pick = sampler.greedy ? null : new Sampler(opts, gi.map((r, i) => r.filter((_, j) => gm[i][j] === 1)));
      const outs: number[][][] = [];
      let offset = 0;
      for (const dec of this.decodings(g.session, g.choice, gi, gm, maxNew)) {
        const rows = [...gi.slice(offset, offset + dec.rows)];
        while (rows.length < dec.rows) rows.push(rows[rows.length - 1]);  // a fixed batch's filler rows
        const out = rows.map((r) => r.slice());
        const t0 = now();
        const res = await decode(dec, out, maxNew, eos, fill, pick, offset, onStep, now);
        prefillMs += res.t1 - t0;
        decodeMs += now() - res.t1;
        newTokens = Math.max(newTokens, res.newTokens);
        outs.push(out);
        offset += dec.rows;
      }
      parts.push({ rows: g.rows, out: padRows(outs.flat().slice(0, gi.length), fill) });
    }
    this.stats = { ...this.stats, prefillMs, decodeMs, newTokens };
    const width = Math.max(...parts.map((p) => p.out[0].length));  // groups that stop early end in EOS
    const out: number[][] = new Array(b.ids.length);
    for (const p of parts) {
      p.out.forEach((r, i) => { out[p.rows ? p.rows[i] : i] = [...r, ...new Array(width - r.length).fill(fill)]; });
    }
    return out;
  }

  /** A running batch that generations join and leave between decode steps, each with its own
   * adapter (or mix), sampling, stop tokens and length, one session run per step for all of them
   * (`Batcher`, batching.ts). Fused and traced side-branch artifacts; merged artifacts and
   * fixed-shape targets get a serial batcher of capacity 1. */
  batcher(opts: BatcherOptions = {}): Batcher {
    this.need('causal-lm', 'a Batcher');
    return new Batcher(this.batchHost(), opts);
  }

  /** What a Batcher needs of this model (its private parts, as closures). */
  private batchHost(): BatchHost {
    const serial = this.merged || this.static !== null;
    const session = this.sessions.get(null) ?? null;
    const base = this.manifest.base as { max_length?: number };
    return {
      vocab: this.manifest.base.vocab_size,
      longest: base.max_length || (serial ? null : this.fused?.positions) || 1024,  // as Python's Batcher
      eos: (stopAtEos, stopTokenIds) => {
        const e = stopAtEos ? this.manifest.base.eos_token_id : null;
        return [...(e == null ? [] : Array.isArray(e) ? e : [e]), ...stopTokenIds];
      },
      slots: serial ? null : (capacity, context) => (this.fused ? this.fused.slots(session!, capacity, context)
        : this.traced.slots(session!, capacity, context)),
      open: (adapter) => {
        const { session: s, choice } = this.choose(adapter);
        if (this.fused) this.noPrefix(choice);
        return { session: s, feeds: choice.feeds, prefix: choice.prefix };
      },
      feeds: (adapter) => this.feeds(adapter).feeds,
      rowsAgree: (choices) => this.rowsAgree(choices),
      rowsParts: (choices, union) => {
        const { fixed, weights } = this.rowsParts(choices, union, false);
        return { fixed, weights };
      },
      decoding: (opened, ids, newTokens) => {
        const choice: Choice = { feeds: opened.feeds, prefix: opened.prefix, promptLength: 0, hasHead: false };
        return this.decodings(opened.session, choice, [ids], [ids.map(() => 1)], newTokens)[0];
      },
    };
  }

  // ------------------------------------------------------------------ classification
  /** Class probabilities (softmax of classifyLogits), (B, num_labels) row-major. `adapter`: as in
   * `classifyLogits`. */
  async classify(textsOrIds: string | string[] | number[][] | number[], opts: { adapter?: AdapterChoices } = {}): Promise<Logits> {
    const lg = await this.classifyLogits(textsOrIds, opts);
    const [B, L] = lg.dims;
    const data = new Float32Array(B * L);
    for (let r = 0; r < B; r++) {
      const row = lg.data.subarray(r * L, (r + 1) * L);
      const mx = Math.max(...row);
      const z = Array.from(row, (x) => Math.exp(x - mx));
      const sum = z.reduce((a, x) => a + x, 0);
      z.forEach((x, j) => { data[r * L + j] = x / sum; });
    }
    return { data, dims: [B, L] };
  }

  /** Index of the largest logit per row (the predicted label id). */
  static argmax(x: Logits): number[] {
    const [B, L] = x.dims;
    return Array.from({ length: B }, (_, r) => {
      let best = 0;
      for (let j = 1; j < L; j++) if (x.data[r * L + j] > x.data[r * L + best]) best = j;
      return best;
    });
  }

  /** Raw classification logits (B, num_labels): texts are tokenized and right-padded, ragged id
   * rows right-padded. `adapter`: null (the base head; only when the base has a trained one), a
   * name or a `{name: weight}` mix (at most one of them may carry a head); or a list, one per row
   * (as in `logits`: on a side-branch artifact with per-row head offsets each row runs its
   * adapter's head, and every row needs an adapter with a head when one does; an older graph
   * needs the rows' heads to agree). */
  async classifyLogits(textsOrIds: string | string[] | number[][] | number[], opts: { adapter?: AdapterChoices } = {}): Promise<Logits> {
    this.need('classification', 'classify()');
    const base = this.manifest.base;
    const adapter = opts.adapter;
    if (!(base.head_trained ?? true) && (Array.isArray(adapter) ? adapter : [adapter]).some((a) => a == null)) {
      throw new EdgepeftError(`${this.source.describe('')}: the base model has no trained classification head; ` +
        `choose an adapter (${this.adapters.join(', ')}) for every row.`);
    }
    const rows = typeof textsOrIds === 'string' || (textsOrIds.length && typeof textsOrIds[0] === 'number') ? 1
      : textsOrIds.length;
    const groups = this.groups(adapter, rows);
    for (const g of groups) {
      if (!this.merged && !g.choice.hasHead && !(base.head_trained ?? true)) {
        throw new EdgepeftError(`adapter=${JSON.stringify(adapter)} carries no classification head and the base has ` +
          'no trained one; include an adapter with a head.');
      }
    }
    const { ids, mask } = await this.encode(textsOrIds, Math.max(...groups.map((g) => g.choice.promptLength)));
    const t = now();
    const parts: { rows: number[] | null; out: Logits }[] = [];
    for (const g of groups) {
      const [gi, gm] = g.rows ? [g.rows.map((r) => ids[r]), g.rows.map((r) => mask[r])] : [ids, mask];
      parts.push({ rows: g.rows, out: await this.classifyOf(g.session, g.choice, gi, gm) });
    }
    this.stats.prefillMs = now() - t;
    return scatter(ids.length, parts);
  }

  private async classifyOf(session: InferenceSession, choice: Choice, ids: number[][], mask: number[][]): Promise<Logits> {
    const int64 = (rows: number[][]) => this.traced.int64(rows);
    if (this.static) {  // right-pad to the shortest bucket that holds the longest row, in row groups
      const s = [...this.buckets.keys()].sort((a, b) => a - b).find((x) => x >= ids[0].length)!;
      const pad = this.manifest.tokenizer?.pad_token_id || 0;
      const groups = this.static.rowGroups(ids.map((r) => [...r, ...new Array(s - r.length).fill(pad)]),
        mask.map((r) => [...r, ...new Array(s - r.length).fill(0)]));
      const parts: Float32Array[] = [];
      let L = 0;
      for (const [i, m] of groups) {
        const out = await this.buckets.get(s)!.run({ input_ids: int64(i), attention_mask: int64(m), ...choice.feeds });
        L = out.logits.dims[1];
        parts.push((out.logits.data as Float32Array).slice());
      }
      const data = new Float32Array(ids.length * L);
      parts.forEach((x, g) => data.set(x.subarray(0, Math.min(x.length, data.length - g * x.length)), g * x.length));
      return { data, dims: [ids.length, L] };
    }
    const out = await session.run({ input_ids: int64(ids), attention_mask: int64(mask), ...choice.feeds });
    return { data: out.logits.data as Float32Array, dims: [...out.logits.dims] };
  }

  private async encode(input: string | string[] | number[][] | number[], reserved: number): Promise<{ ids: number[][]; mask: number[][] }> {
    let limit = (this.manifest.base.max_length ?? 512) - reserved;
    if (this.static) limit = Math.min(limit, Math.max(...this.buckets.keys()));  // the longest fixed-shape graph
    let rows: number[][];
    if (typeof input === 'string') input = [input];
    if (input.length && typeof input[0] === 'string') {
      const tok = this.tokenizer;
      rows = (input as string[]).map((t) => tok.encode(t));
      rows = rows.map((r) => (r.length > limit ? [...r.slice(0, limit - 1), ...r.slice(-1)] : r));  // keep [SEP]
    } else if (input.length && typeof input[0] === 'number') {
      rows = [input as number[]];
    } else {
      rows = (input as number[][]).map((r) => [...r]);
    }
    if (!rows.length || !rows.every((r) => r.length)) {
      throw new EdgepeftError('classify() needs at least one non-empty text or id sequence.');
    }
    const pad = this.manifest.tokenizer?.pad_token_id || 0;
    const longest = Math.max(...rows.map((r) => r.length));
    const vocab = this.manifest.base.vocab_size;
    const flat = rows.flat();
    if (flat.some((v) => !Number.isInteger(v) || v < 0 || v >= vocab)) {
      throw new EdgepeftError(`input ids must lie in [0, ${vocab}); got ${Math.min(...flat)}..${Math.max(...flat)}.`);
    }
    if (longest > limit) {
      throw new EdgepeftError(`sequences of ${longest} tokens exceed the model's ${limit} (after ${reserved} virtual ` +
        'tokens); shorten them.');
    }
    return { ids: rows.map((r) => [...r, ...new Array(longest - r.length).fill(pad)]),
             mask: rows.map((r) => [...new Array(r.length).fill(1), ...new Array(longest - r.length).fill(0)]) };
  }

  // ------------------------------------------------------------------ text
  /** The artifact's tokenizer (loaded with the model; throws EdgepeftError when the artifact has
   * none or @huggingface/tokenizers cannot build it). */
  get tokenizer(): TextTokenizer {
    if (this.tok) return this.tok;
    throw this.tokError ?? new EdgepeftError(`${this.source.describe('')}: the artifact has no tokenizer (the base ` +
      'model had no fast tokenizer); pass token ids instead.');
  }

  private async loadTok(): Promise<void> {
    const t = this.manifest.tokenizer;
    if (!t) return;
    try {
      this.tok = await loadTokenizer(this.source, t.dir, this.where);
    } catch (e) {
      this.tokError = e instanceof EdgepeftError ? e : new EdgepeftError(String(e));
    }
  }

  /** Tokenize `prompt`, generate, and decode only the new tokens (special tokens skipped). */
  async generateText(prompt: string, opts: TextOptions = {}): Promise<string> {
    let text = '';
    for await (const piece of this.streamText(prompt, opts)) text += piece;
    return text;
  }

  /** `generateText` piece by piece as the tokens come, as Python's `stream_text`: text that could
   * start a `stop` string, or an unfinished UTF-8 character, waits for the next tokens. */
  async *streamText(prompt: string, opts: TextOptions = {}): AsyncGenerator<string> {
    this.need('causal-lm', 'streamText()');
    const stop = opts.stop ?? [];
    if (stop.some((x) => typeof x !== 'string' || !x)) {
      throw new EdgepeftError(`stop=${JSON.stringify(stop)}: non-empty strings.`);
    }
    new Sampler(opts, []);  // bad options are refused before anything runs
    const tok = this.tokenizer;
    const ids = tok.encode(prompt);
    const e = this.manifest.base.eos_token_id;
    const eos = new Set([...(e == null ? [] : Array.isArray(e) ? e : [e]), ...(opts.stopTokenIds ?? [])]);
    const queue: number[] = [];
    let finished = false, failure: unknown = null, wake: (() => void) | null = null;
    const ping = () => { const w = wake; wake = null; w?.(); };
    let ended = false, halt = false;
    const run = this.generate([ids], { ...opts, maxNewTokens: opts.maxNewTokens ?? 32, stopAtEos: true,
      onStep: (next) => {
        if (!ended) { if (eos.has(next[0])) ended = true; else queue.push(next[0]); }
        ping();
        return !halt;
      } })
      .then(() => { finished = true; ping(); }, (err) => { failure = err; finished = true; ping(); });
    const tokens: number[] = [];
    let sent = '';
    for (;;) {
      while (!queue.length && !finished) await new Promise<void>((r) => { wake = r; });
      if (failure) throw failure;
      if (!queue.length && finished) break;
      tokens.push(queue.shift()!);
      const text = tok.decode(tokens, true);
      let cut = -1;
      for (const x of stop) {
        const i = text.indexOf(x, Math.max(0, sent.length - x.length));
        if (i >= 0 && (cut < 0 || i < cut)) cut = i;
      }
      if (cut >= 0) {
        halt = true;  // no more tokens: the generation ends at its next step
        if (cut > sent.length) yield text.slice(sent.length, cut);
        await run;
        return;
      }
      let ready = text.replace(/\uFFFD+$/, '').length;  // an unfinished character decodes as U+FFFD
      let hold = 0;
      for (const x of stop) {
        for (let k = Math.min(x.length - 1, ready); k > hold; k--) {
          if (text.slice(0, ready).endsWith(x.slice(0, k))) { hold = k; break; }
        }
      }
      ready -= hold;
      if (ready > sent.length) {
        yield text.slice(sent.length, ready);
        sent = text.slice(0, ready);
      }
    }
    await run;
    const text = tokens.length ? tok.decode(tokens, true) : '';  // the tokenizer refuses no ids
    if (text.length > sent.length) yield text.slice(sent.length);
  }
}

/** How a list of choices is compared (Python's `==`: a mix by its sorted entries). */
function choiceId(c: AdapterChoice): string {
  if (c == null) return 'null';
  if (typeof c === 'string') return JSON.stringify(c);
  if (typeof c === 'object' && !Array.isArray(c)) {
    return 'mix:' + JSON.stringify(Object.entries(c).sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0)));
  }
  return 'other:' + String(c) + Math.random();  // refused when it is run
}

/** The fields of a pack's manifest entry the runtime reads (an artifact's are checked with its
 * manifest): refused before they are used. */
function checkPackEntry(e: AdapterEntry, label: string): void {
  const strings = (v: unknown) => v == null || (Array.isArray(v) && v.every((x) => typeof x === 'string'));
  const p = e.prefix;
  const bad = typeof e.kind !== 'string' ? 'kind' : !strings(e.inputs) ? 'inputs' : !strings(e.defaults) ? 'defaults'
    : !(p == null || (typeof p === 'object' && Number.isInteger(p.length) && p.length >= 1 && typeof p.from_prompt === 'boolean'))
      ? 'prefix' : null;
  if (bad) {
    throw new EdgepeftError(`${label}: the adapter entry in its pack header has a damaged '${bad}' field. Pack the ` +
      'adapter again.');
  }
}

/** Rows of different lengths filled up to the longest with `fill`. */
function padRows(rows: number[][], fill: number): number[][] {
  const width = Math.max(...rows.map((r) => r.length));
  return rows.map((r) => (r.length === width ? r : [...r, ...new Array(width - r.length).fill(fill)]));
}

/** One `(rows, ...)` array from the groups of a batch (`rows` null: the whole batch, in order). */
function scatter(rows: number, parts: { rows: number[] | null; out: Logits }[]): Logits {
  if (parts.length === 1 && parts[0].rows === null) return parts[0].out;
  const dims = [rows, ...parts[0].out.dims.slice(1)];
  const size = dims.slice(1).reduce((a, d) => a * d, 1);
  const data = new Float32Array(rows * size);
  for (const p of parts) {
    p.rows!.forEach((r, i) => data.set(p.out.data.subarray(i * size, (i + 1) * size), r * size));
  }
  return { data, dims };
}
