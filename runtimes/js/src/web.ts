/** Browser entry: `Model.load(urlBase)` fetches an artifact served over http(s) and runs it with
 * onnxruntime-web (sessions from bytes; the external weights passed as `externalData`);
 * `addAdapter(url)` fetches a pack. */
import * as ort from 'onnxruntime-web';
import { EdgepeftError } from './core/errors.js';
import { Model as Core } from './core/model.js';
import type { LoadOptions, OrtApi } from './core/model.js';
import type { Source } from './core/source.js';

export { EdgepeftError } from './core/errors.js';
export type { AdapterChoice, AdapterChoices, AddOptions, GenerateOptions, LoadOptions, Logits, Stats, TextOptions } from './core/model.js';
export type { VerifyEd25519 } from './core/packs.js';
export type { Batcher, BatcherOptions, JoinOptions, Row } from './core/batching.js';
export type { Mix } from './core/mix.js';
export type { Source } from './core/source.js';

/** A Source over `base` (a URL of the artifact directory; a trailing '/' is added). */
export function urlSource(base: string, init?: RequestInit): Source {
  const root = base.endsWith('/') ? base : base + '/';
  const url = (rel: string) => new URL(rel, new URL(root, globalThis.location?.href)).href;
  const get = async (href: string) => {
    const res = await fetch(href, init);
    if (!res.ok) throw new EdgepeftError(`${href}: HTTP ${res.status} ${res.statusText}`);
    return new Uint8Array(await res.arrayBuffer());
  };
  return {
    read: async (rel) => get(url(rel)),
    readFile: async (file) => get(new URL(file, globalThis.location?.href).href),  // a pack: relative to the page
    describe: (rel) => (rel ? url(rel) : root),
  };
}

export class Model extends Core {
  /** Load the artifact served at `urlBase` (checks manifest, sha256 sums, adapter files). */
  static async load(urlBase: string, options: LoadOptions & { fetchInit?: RequestInit } = {}): Promise<Model> {
    return (await Core.open(urlSource(urlBase, options.fetchInit), ort as unknown as OrtApi, options)) as Model;
  }
}
export { ort };
