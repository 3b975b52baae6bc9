/** Backend-independent core: pass an onnxruntime-common API object and a Source to Model.open. */
export { EdgepeftError } from './errors.js';
export { Model } from './model.js';
export type { AdapterChoice, AdapterChoices, AddOptions, GenerateOptions, LoadOptions, Logits, OrtApi, Stats, TextOptions } from './model.js';
export { keyId, nobleVerifier, PACK_FORMAT, PACK_SUFFIX, PACK_VERSION, readPack, verifyEd25519 } from './packs.js';
export type { PackHeader, VerifyEd25519 } from './packs.js';
export type { Batcher, BatcherOptions, JoinOptions, Row } from './batching.js';
export type { Mix } from './mix.js';
export type { Source } from './source.js';
export type { TextTokenizer } from './tokenizer.js';
export { readManifest, baseTag, FORMAT_VERSION } from './manifest.js';
export type { Manifest } from './manifest.js';
export { parseSafetensors } from './safetensors.js';
