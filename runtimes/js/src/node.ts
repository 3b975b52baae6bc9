/** Node entry: `Model.load(dir)` reads an artifact directory with onnxruntime-node. */
import { open, readFile, stat } from 'node:fs/promises';
import * as path from 'node:path';
import * as ort from 'onnxruntime-node';
import { Model as Core } from './core/model.js';
import type { LoadOptions, OrtApi } from './core/model.js';
import type { Source } from './core/source.js';

export { EdgepeftError } from './core/errors.js';
export type { AdapterChoice, AdapterChoices, GenerateOptions, LoadOptions, Logits, Stats, TextOptions } from './core/model.js';
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

export class Model extends Core {
  /** Load the artifact in directory `dir` (checks manifest, sha256 sums, adapter files). */
  static async load(dir: string, options: LoadOptions = {}): Promise<Model> {
    return (await Core.open(fileSource(dir), backend, options)) as Model;
  }
}
export { ort };
