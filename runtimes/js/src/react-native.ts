/** React Native entry. UNTESTED here (no device / simulator in CI): kept thin on purpose.
 *
 * Pass onnxruntime-react-native's API object (the same onnxruntime-common shape as node / web)
 * and a reader for the artifact's files, e.g. with react-native-fs:
 *
 *   import * as ort from 'onnxruntime-react-native';
 *   const model = await Model.load(ort, {
 *     read: async (rel) => Uint8Array.from(atob(await RNFS.readFile(`${dir}/${rel}`, 'base64')), c => c.charCodeAt(0)),
 *     describe: (rel) => `${dir}/${rel}`,
 *   });
 *
 * Needs globalThis.crypto.subtle (sha256 checks) and TextDecoder: add polyfills where the JS
 * engine lacks them. Whether onnxruntime-react-native honours the `externalData` session option
 * is not verified.
 *
 * Adapter packs: `model.addAdapter(bytes)`. Their Ed25519 signatures (with `trustedKeys`) are
 * verified with WebCrypto where the engine has Ed25519, else with @noble/ed25519 (bundled here;
 * its SHA-512 comes from crypto.subtle.digest, which the sha256 checks need anyway), or with the
 * `verifyEd25519` the app passes. */
import * as ed from '@noble/ed25519';
import { Model as Core } from './core/model.js';
import { nobleVerifier } from './core/packs.js';
import type { LoadOptions, OrtApi } from './core/model.js';
import type { Source } from './core/source.js';

export { EdgepeftError } from './core/errors.js';
export type { AdapterChoice, AdapterChoices, AddOptions, GenerateOptions, LoadOptions, Logits, OrtApi, Stats, TextOptions } from './core/model.js';
export type { VerifyEd25519 } from './core/packs.js';
export type { Batcher, BatcherOptions, JoinOptions, Row } from './core/batching.js';
export type { Source } from './core/source.js';

export class Model extends Core {
  static async load(ort: unknown, source: Source, options: LoadOptions = {}): Promise<Model> {
    return (await Core.open(source, ort as OrtApi, { verifyEd25519: nobleVerifier(ed), ...options })) as Model;
  }
}
