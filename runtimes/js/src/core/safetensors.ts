/** A safetensors reader: 8-byte little-endian header length, a JSON header, raw little-endian data.
 * F32 and F16 only (what edgepeft writes); F16 is widened to F32 here (Node 20 has no Float16Array). */
import { EdgepeftError } from './errors.js';

export interface Array32 { data: Float32Array; dims: number[] }
/** One tensor as the file stores it: its dtype (numpy's name) and its raw little-endian bytes (a
 * view into the file's bytes, not a copy): what an adapter pack's checksums cover. */
export interface Stored { dtype: 'float32' | 'float16'; bytes: Uint8Array }
export interface SafeTensors {
  tensors: Map<string, Array32>; metadata: Record<string, string>; stored: Map<string, Stored>;
}

const MAX_HEADER = 64 << 20;

/** IEEE half -> float. */
export function halfToFloat(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const f = h & 0x3ff;
  if (e === 0) return s * f * 2 ** -24;
  if (e === 31) return f ? NaN : s * Infinity;
  return s * (1 + f / 1024) * 2 ** (e - 15);
}

/** Parse `bytes`; `unreadable(what)` is the message of a malformed file (default: an artifact's
 * adapter file, "export the artifact again"). */
export function parseSafetensors(bytes: Uint8Array, where: string,
                                 unreadable = (what: string) => `not a readable safetensors file (${what}). Export the artifact again.`): SafeTensors {
  const bad = (what: string): never => {
    throw new EdgepeftError(`${where}: ${unreadable(what)}`);
  };
  if (bytes.length < 8) bad('shorter than its 8-byte header length');
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = Number(view.getBigUint64(0, true));
  if (n > MAX_HEADER || 8 + n > bytes.length) bad(`header of ${n} bytes in a file of ${bytes.length}`);
  let header: any;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(8, 8 + n)));
  } catch (e) {
    bad(`header is not JSON: ${String((e as Error).message).slice(0, 100)}`);
  }
  if (typeof header !== 'object' || header === null || Array.isArray(header)) bad('header is not an object');
  const metadata = (header.__metadata__ ?? {}) as Record<string, string>;
  if (typeof metadata !== 'object' || metadata === null || Array.isArray(metadata) ||
      Object.values(metadata).some((v) => typeof v !== 'string')) bad('__metadata__ is not an object of strings');
  const body = bytes.subarray(8 + n);
  const tensors = new Map<string, Array32>();
  const stored = new Map<string, Stored>();
  for (const [name, info] of Object.entries<any>(header)) {
    if (name === '__metadata__') continue;
    const dims = info?.shape;
    const off = info?.data_offsets;
    if (!Array.isArray(dims) || !dims.every((d: unknown) => Number.isInteger(d) && (d as number) >= 0)) bad(`${name}: bad shape`);
    if (!Array.isArray(off) || off.length !== 2 || !(off[0] <= off[1]) || off[1] > body.length) bad(`${name}: bad data_offsets`);
    const count = dims.reduce((a: number, b: number) => a * b, 1);
    const size = info.dtype === 'F32' ? 4 : info.dtype === 'F16' ? 2 : bad(`${name}: dtype ${info.dtype}, expected F32 or F16`);
    if (off[1] - off[0] !== count * size) bad(`${name}: ${off[1] - off[0]} bytes for ${count} values of ${info.dtype}`);
    const raw = new DataView(body.buffer, body.byteOffset + off[0], off[1] - off[0]);
    const data = new Float32Array(count);
    if (size === 4) for (let i = 0; i < count; i++) data[i] = raw.getFloat32(4 * i, true);
    else for (let i = 0; i < count; i++) data[i] = halfToFloat(raw.getUint16(2 * i, true));
    tensors.set(name, { data, dims: dims.slice() });
    stored.set(name, { dtype: size === 4 ? 'float32' : 'float16', bytes: body.subarray(off[0], off[1]) });
  }
  return { tensors, metadata, stored };
}
