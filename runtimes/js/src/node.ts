/** Node entry: `Model.load(dir)` reads an artifact directory with onnxruntime-node; `addAdapter`
 * takes a pack's path too, and `trustedKeys` / `revoked` take KEY.pub files too (as Python). */
import { open, readFile, stat } from 'node:fs/promises';
import * as path from 'node:path';
import * as ort from 'onnxruntime-node';
import { Model as Core } from './core/model.js';
import type { LoadOptions, OrtApi } from './core/model.js';
import type { Source } from './core/source.js';

export { EdgepeftError } from './core/errors.js';
export type { AdapterChoice, AdapterChoices, AddOptions, GenerateOptions, LoadOptions, Logits, Stats, TextOptions } from './core/model.js';
export type { VerifyEd25519 } from './core/packs.js';
export type { Batcher, BatcherOptions, JoinOptions, Row } from './core/batching.js';
export type { Mix } from './core/mix.js';
export type { Source } from './core/source.js';

/** A Source over a directory. */
export function fileSource(dir: string): Source {
  const root = path.resolve(dir);
  return {
    read: async (rel) => new Uint8Array(await readFile(path.join(root, rel))),
    describe: (rel) => (rel ? path.join(root, rel) : root),
    exists: async (rel) => (await stat(path.join(root, rel)).catch(() => null))?.isFile() ?? false,
    folder: (rel) => path.join(root, rel),
    readFile: async (file) => new Uint8Array(await readFile(path.resolve(file))),
    readRange: async (rel, offset, length) => {
      const f = await open(path.join(root, rel), 'r');
      try {
        const buf = new Uint8Array(length);
        const { bytesRead } = await f.read(buf, 0, length, offset);
        return buf.subarray(0, bytesRead);
      } finally {
        await f.close();
      }
    },
  };
}

/** onnxruntime-node writes preallocated output tensors: a fused graph's KV buffer is passed as
 * both past and present (no new arrays per decode step; the binding still copies per call, see
 * core/fused.ts). */
const backend: OrtApi = { InferenceSession: ort.InferenceSession, Tensor: ort.Tensor, inPlaceOutputs: true } as unknown as OrtApi;

/** A key given as a KEY.pub file (what `edgepeft keygen` writes) -> its line; keys (`ed25519:...`),
 * key ids (`sha256:...`) and what is not a file pass as they are (the core refuses bad ones). */
async function keyText(value: string): Promise<string> {
  const text = String(value).trim();
  if (text.startsWith('ed25519:') || text.startsWith('sha256:')) return text;
  return (await readFile(text, 'utf8').catch(() => null))?.trim() ?? text;
}

export class Model extends Core {
  /** Load the artifact in directory `dir` (checks manifest, sha256 sums, adapter files). */
  static async load(dir: string, options: LoadOptions = {}): Promise<Model> {
    const keys = async (list?: string[]) => (list == null ? list : Promise.all(list.map(keyText)));
    const opts = { ...options, trustedKeys: await keys(options.trustedKeys), revoked: await keys(options.revoked) };
    return (await Core.open(fileSource(dir), backend, opts)) as Model;
  }
}
export { ort };
