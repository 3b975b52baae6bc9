/** Adapter packs (edgepeft/contract/packs.py): one adapter of an artifact as one safetensors file,
 * optionally Ed25519-signed, read and checked as Python's `read_pack` does, in the same order and
 * with the same messages.
 *
 * The file's metadata holds `format` ("edgepeft-adapter-pack"), `pack` (JSON text: format,
 * format_version, name, version, entry, base_fingerprint, slot_schema, arrays `{name: [dtype,
 * shape, sha256 of the stored bytes]}`, created) and, when signed, `signature` (JSON text: `key`,
 * a key id, and `sig`, the base64 Ed25519 signature of the UTF-8 bytes of the `pack` text exactly
 * as stored). A public key is `ed25519:BASE64` of its 32 raw bytes; a key id is `sha256:` and the
 * first 16 hex digits of the sha256 of those bytes.
 *
 * Signatures are verified with WebCrypto's Ed25519 where the platform has it (Node >= 20, current
 * browsers); elsewhere with the verifier the app passes (`verifyEd25519` in the load options; the
 * react-native entry passes @noble/ed25519's), else with @noble/ed25519 imported on first use. */
import { EdgepeftError } from './errors.js';
import type { Manifest } from './manifest.js';
import { parseSafetensors } from './safetensors.js';
import type { Array32 } from './safetensors.js';
import { sha256Hex } from './sha256.js';

// the constants of edgepeft/contract/packs.py (the parity test checks them against Python's)
export const PACK_FORMAT = 'edgepeft-adapter-pack';
export const PACK_VERSION = 1;
export const PACK_SUFFIX = '.edgepeft-pack';
export const MAX_PACK_BYTES = 2 * 2 ** 30;
export const KEY_PREFIX = 'ed25519:';

/** `(public key (32 bytes), signature (64 bytes), message) -> whether the signature verifies`. */
export type VerifyEd25519 = (key: Uint8Array, signature: Uint8Array, message: Uint8Array) => Promise<boolean>;

/** The `pack` header, its fields checked. */
export interface PackHeader {
  format: string; format_version: number; name: string; version: number;
  entry: Record<string, unknown>; base_fingerprint: string; slot_schema: string;
  arrays: Record<string, unknown>; created?: string; [k: string]: unknown;
}

/** What a model pins: `trusted` (key id -> raw key; null: unsigned packs are accepted, signatures
 * not checked) and `revoked` key ids. */
export interface PackKeys { trusted: Map<string, Uint8Array> | null; revoked: Set<string> }

const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';

/** Strict base64 (Python's `b64decode(validate=True)`): null for anything else. */
export function fromBase64(text: string): Uint8Array | null {
  if (typeof text !== 'string' || text.length % 4 !== 0) return null;
  const pad = text.endsWith('==') ? 2 : text.endsWith('=') ? 1 : 0;
  const out = new Uint8Array((text.length / 4) * 3 - pad);
  let acc = 0, bits = 0, j = 0;
  for (let i = 0; i < text.length - pad; i++) {
    const v = B64.indexOf(text[i]);
    if (v < 0) return null;
    acc = ((acc << 6) | v) & 0xffff;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[j++] = (acc >> bits) & 0xff;
    }
  }
  return out;
}

/** Python's `repr` of a short JSON value (how its messages quote one). */
function pyRepr(v: unknown): string {
  if (v === undefined || v === null) return 'None';
  if (typeof v === 'boolean') return v ? 'True' : 'False';
  if (typeof v === 'string') return v.includes("'") && !v.includes('"') ? `"${v}"` : `'${v.replaceAll("'", "\\'")}'`;
  return JSON.stringify(v) ?? String(v);
}

export async function keyId(raw: Uint8Array): Promise<string> {
  return 'sha256:' + (await sha256Hex(raw)).slice(0, 16);
}

/** The 32 raw bytes of a public key given as `ed25519:BASE64` (Python's `public_key`; the node
 * entry also takes a KEY.pub file, read before it comes here). */
export function publicKey(value: string): Uint8Array {
  const text = String(value).trim();
  const raw = text.startsWith(KEY_PREFIX) ? fromBase64(text.slice(KEY_PREFIX.length)) : null;
  if (!raw || raw.length !== 32) {
    throw new EdgepeftError(`trusted key ${pyRepr(String(value).slice(0, 60))}: not an Ed25519 public key (expected ` +
      "'ed25519:' and 32 bytes in base64, as edgepeft keygen writes to KEY.pub).");
  }
  return raw;
}

/** The keys of `Model.open`'s `trustedKeys` (undefined / null: unsigned packs are accepted) and
 * `revoked` (key ids, or keys). */
export async function packKeys(trusted?: readonly string[] | null, revoked: readonly string[] = []): Promise<PackKeys> {
  let keys: Map<string, Uint8Array> | null = null;
  if (trusted != null) {
    const raw = trusted.map(publicKey);
    keys = new Map();
    for (const k of raw) {
      const id = await keyId(k);
      if (!keys.has(id)) keys.set(id, k);
    }
  }
  const ids = new Set<string>();
  for (const r of revoked) ids.add(String(r).startsWith('sha256:') ? String(r) : await keyId(publicKey(r)));
  return { trusted: keys, revoked: ids };
}

/** A verifier over @noble/ed25519 (RFC 8032's strict rules, as WebCrypto and Python's
 * `cryptography` verify). */
export function nobleVerifier(ed: { verifyAsync(sig: Uint8Array, msg: Uint8Array, key: Uint8Array,
                                                opts?: { zip215?: boolean }): Promise<boolean> }): VerifyEd25519 {
  return (key, sig, msg) => ed.verifyAsync(sig, msg, key, { zip215: false });
}

/** Whether `sig` is `key`'s Ed25519 signature of `msg`: WebCrypto where it has Ed25519, else
 * `fallback`, else @noble/ed25519 (imported on first use). Throws an EdgepeftError when nothing
 * can verify (not when the signature is wrong: that is `false`). */
export async function verifyEd25519(key: Uint8Array, sig: Uint8Array, msg: Uint8Array,
                                    fallback?: VerifyEd25519): Promise<boolean> {
  const subtle = globalThis.crypto?.subtle;
  let imported: CryptoKey | null = null;
  try {
    if (subtle) imported = await subtle.importKey('raw', key as BufferSource, { name: 'Ed25519' }, false, ['verify']);
  } catch {
    imported = null;  // an engine without Ed25519 in WebCrypto (NotSupportedError): the fallback
  }
  if (imported) {
    try {
      return await subtle!.verify({ name: 'Ed25519' }, imported, sig as BufferSource, msg as BufferSource);
    } catch {
      return false;  // e.g. a signature of another length
    }
  }
  if (sig.length !== 64) return false;  // (a verifier may throw on other lengths)
  let verify = fallback;
  if (!verify) {
    try {
      verify = nobleVerifier(await import('@noble/ed25519'));
    } catch (e) {
      throw new EdgepeftError('cannot verify an adapter pack\'s signature: this JS engine\'s WebCrypto has no Ed25519 ' +
        `and @noble/ed25519 could not be loaded (${String((e as Error)?.message ?? e).slice(0, 200)}). Pass ` +
        'verifyEd25519 in the load options (the react-native entry passes @noble/ed25519\'s).');
    }
  }
  try {
    return await verify(key, sig, msg);
  } catch (e) {
    throw new EdgepeftError(`cannot verify an adapter pack's signature: the Ed25519 verifier failed ` +
      `(${String((e as Error)?.message ?? e).slice(0, 200)}).`);
  }
}

const isObj = (v: unknown): v is Record<string, any> => typeof v === 'object' && v !== null && !Array.isArray(v);

/** Read and check a pack (`bytes`, named `label` in messages) against an artifact's `manifest`
 * (its manifest.json named `where`): Python's `read_pack`, in its order: the file is a pack
 * (format, header fields); its signature, when `keys.trusted` are pinned (a missing signature, a
 * key revoked or not pinned, a signature that does not verify); the base fingerprint; the slot
 * schema (the manifest's `slot_schema`); every array's dtype, shape and sha256 against the header.
 *
 * Returns the header and the arrays (float16 widened to float32, as adapter files are).
 * @throws EdgepeftError naming `label` and the check that failed. */
export async function readPack(bytes: Uint8Array, label: string, manifest: Manifest, where: string, keys: PackKeys,
                               verify?: VerifyEd25519): Promise<{ header: PackHeader; tensors: Map<string, Array32> }> {
  if (bytes.length > MAX_PACK_BYTES) {
    throw new EdgepeftError(`${label}: larger than ${MAX_PACK_BYTES / 2 ** 30} GB; not an adapter pack.`);
  }
  const { tensors, metadata, stored } = parseSafetensors(bytes, label, (what) => `not a readable adapter pack (${what}).`);
  if (metadata.format !== PACK_FORMAT || !Object.hasOwn(metadata, 'pack')) {
    throw new EdgepeftError(`${label}: not an edgepeft adapter pack (make one with \`edgepeft adapter pack\`).`);
  }
  const text = metadata.pack;
  let header: any = null;
  try {
    header = JSON.parse(text);
  } catch {
    header = null;
  }
  if (!isObj(header) || header.format !== PACK_FORMAT) {
    throw new EdgepeftError(`${label}: its pack header is damaged. Download the pack again.`);
  }
  if (header.format_version !== PACK_VERSION) {
    throw new EdgepeftError(`${label}: pack format_version ${pyRepr(header.format_version)}; this runtime reads ` +
      `${PACK_VERSION}. Use the @edgepeft/runtime version that matches the edgepeft that packed it.`);
  }
  const kinds: [string, string, (v: unknown) => boolean][] = [
    ['name', 'str', (v) => typeof v === 'string'], ['version', 'int', (v) => Number.isInteger(v)],
    ['entry', 'dict', isObj], ['arrays', 'dict', isObj], ['base_fingerprint', 'str', (v) => typeof v === 'string'],
    ['slot_schema', 'str', (v) => typeof v === 'string']];
  for (const [field, kind, ok] of kinds) {
    if (!ok(header[field])) throw new EdgepeftError(`${label}: pack header field '${field}' missing or not a ${kind}.`);
  }
  if (keys.trusted !== null) await checkSignature(label, metadata.signature, text, keys.trusted, keys.revoked, verify);
  const ours = manifest.base.fingerprint;
  if (header.base_fingerprint !== ours) {
    throw new EdgepeftError(`${label}: packed for base ${header.base_fingerprint.slice(0, 23)}..., this artifact's base ` +
      `is ${ours.slice(0, 23)}.... Pack the adapter from an artifact of this base.`);
  }
  const schema = manifest.slot_schema;
  if (typeof schema !== 'string') {
    throw new EdgepeftError(`${label}: ${where} records no slot_schema (the artifact was exported by an edgepeft ` +
      'without adapter packs), so the graph this pack fits cannot be checked. Export the artifact again to load packs.');
  }
  if (header.slot_schema !== schema) {
    throw new EdgepeftError(`${label}: packed for another graph (slot schema ${header.slot_schema.slice(0, 23)}..., this ` +
      `artifact's is ${schema.slice(0, 23)}...): its slots, layout or shapes differ. Pack the adapter from an artifact ` +
      'exported like this one.');
  }
  const names = [...stored.keys()].sort();
  const listed = Object.keys(header.arrays).sort();
  if (names.length !== listed.length || names.some((n, i) => n !== listed[i])) {
    throw new EdgepeftError(`${label}: its arrays are not the ones its header lists; the file was altered.`);
  }
  for (const k of names) {
    const { dtype, bytes: raw } = stored.get(k)!;
    const digest = [dtype, tensors.get(k)!.dims, await sha256Hex(raw)];
    if (JSON.stringify(digest) !== JSON.stringify(header.arrays[k])) {
      throw new EdgepeftError(`${label}: array '${k}' does not match its sha256 in the header; the file was altered ` +
        'or damaged. Download the pack again.');
    }
  }
  return { header: header as PackHeader, tensors };
}

async function checkSignature(label: string, signature: string | undefined, text: string, trusted: Map<string, Uint8Array>,
                              revoked: Set<string>, verify?: VerifyEd25519): Promise<void> {
  if (signature === undefined) {
    throw new EdgepeftError(`${label}: not signed, and this model accepts only packs signed by a trusted key. Sign it ` +
      'with `edgepeft adapter pack ... --sign KEY`.');
  }
  let kid: unknown, sig: Uint8Array | null = null;
  try {
    const parsed = JSON.parse(signature);
    kid = parsed?.key;
    sig = fromBase64(parsed?.sig);
  } catch {
    sig = null;
  }
  if (typeof kid !== 'string' || sig === null) {
    throw new EdgepeftError(`${label}: its signature field is damaged. Download the pack again.`);
  }
  if (revoked.has(kid)) throw new EdgepeftError(`${label}: signed by key ${kid}, which is revoked.`);
  const key = trusted.get(kid);
  if (!key) {
    throw new EdgepeftError(`${label}: signed by key ${kid}, which is not among the trusted keys ` +
      `(${[...trusted.keys()].join(', ') || 'none'}).`);
  }
  if (!(await verifyEd25519(key, sig, new TextEncoder().encode(text), verify))) {
    throw new EdgepeftError(`${label}: the signature does not verify with key ${kid}: the pack was altered after ` +
      'signing, or signed by another key.');
  }
}
