/** Just enough ONNX protobuf for the runtime, without an onnx library:
 *  - the `location` of every external tensor (refused when it leaves the artifact, as in Python);
 *  - the adapter inputs' default initializers taken out of the graph, so they become plain graph
 *    inputs. onnxruntime's JS bindings only feed `session.inputNames` (overridable initializers
 *    are silently ignored by onnxruntime-node and refused by onnxruntime-web), so the runtime
 *    always feeds every adapter input: the adapter's arrays or the default taken out here (the
 *    identity, what Python's session uses when an input is not fed). */
import { EdgepeftError } from './errors.js';
import { halfToFloat } from './safetensors.js';

interface Field { num: number; wire: number; start: number; end: number; value: number; body?: Uint8Array }

function fields(buf: Uint8Array, where: string): Field[] {
  const out: Field[] = [];
  let i = 0;
  const damaged = (): never => {
    throw new EdgepeftError(`${where}: not a valid ONNX file (truncated or damaged). Export the artifact again.`);
  };
  const varint = (): number => {
    let v = 0, mul = 1;
    for (let n = 0; n < 10; n++) {
      if (i >= buf.length) damaged();
      const b = buf[i++];
      v += (b & 0x7f) * mul;
      mul *= 128;
      if (b < 0x80) return v;
    }
    return damaged();
  };
  while (i < buf.length) {
    const start = i;
    const key = varint();
    const wire = key % 8, num = Math.floor(key / 8);
    let value = 0, body: Uint8Array | undefined;
    if (wire === 0) value = varint();
    else if (wire === 1) i += 8;
    else if (wire === 5) i += 4;
    else if (wire === 2) {
      const size = varint();
      if (i + size > buf.length) damaged();
      body = buf.subarray(i, i + size);
      i += size;
    } else damaged();
    if (i > buf.length) damaged();
    out.push({ num, wire, start, end: i, value, body });
  }
  return out;
}

const MESSAGES: Record<string, Record<number, string>> = {
  model: { 7: 'graph', 25: 'function' },
  function: { 7: 'node' },
  graph: { 1: 'node', 5: 'tensor', 15: 'sparse' },
  node: { 5: 'attr' },
  attr: { 5: 'tensor', 6: 'graph', 10: 'tensor', 11: 'graph', 22: 'sparse', 23: 'sparse' },
  sparse: { 1: 'tensor', 2: 'tensor' },
};
const utf8 = new TextDecoder();

function entries(t: Uint8Array, where: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const f of fields(t, where)) {
    if (f.num !== 13 || !f.body) continue;
    let k = '', v = '';
    for (const g of fields(f.body, where)) {
      if (g.num === 1 && g.body) k = utf8.decode(g.body);
      if (g.num === 2 && g.body) v = utf8.decode(g.body);
    }
    out[k] = v;
  }
  return out;
}

/** The `location` of every tensor stored outside the graph file (subgraphs and functions too). */
export function externalDataLocations(buf: Uint8Array, where: string): string[] {
  const locations: string[] = [];
  const stack: [string, Uint8Array, number][] = [['model', buf, 0]];
  while (stack.length) {
    const [kind, b, depth] = stack.pop()!;
    if (depth > 64) throw new EdgepeftError(`${where}: ONNX graph nested more than 64 levels deep; refused.`);
    if (kind === 'tensor') {
      const e = entries(b, where);
      if ('location' in e) locations.push(e.location);
      continue;
    }
    for (const f of fields(b, where)) {
      const sub = MESSAGES[kind][f.num];
      if (sub && f.body) stack.push([sub, f.body, depth + 1]);
    }
  }
  return locations;
}

export interface DefaultTensor {
  dims: number[];
  /** Float32 values, or where to read them: {location, offset, length} in an external file. */
  data?: Float32Array;
  external?: { location: string; offset: number; length: number; dtype: number };
}

function varintList(f: Field, where: string): number[] {
  if (f.wire === 0) return [f.value];
  const out: number[] = [];
  const b = f.body!;
  let i = 0;
  while (i < b.length) {
    let v = 0, mul = 1;
    for (;;) {
      if (i >= b.length) throw new EdgepeftError(`${where}: not a valid ONNX file (damaged dims).`);
      const x = b[i++];
      v += (x & 0x7f) * mul;
      mul *= 128;
      if (x < 0x80) break;
    }
    out.push(v);
  }
  return out;
}

export function decodeFloats(raw: Uint8Array, dtype: number, count: number, what: string): Float32Array {
  const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  const out = new Float32Array(count);
  const size = dtype === 1 ? 4 : 2;
  if (raw.byteLength !== count * size) {
    throw new EdgepeftError(`${what}: ${raw.byteLength} bytes for ${count} values; the artifact is damaged. Export it again.`);
  }
  if (dtype === 1) for (let i = 0; i < count; i++) out[i] = view.getFloat32(4 * i, true);
  else for (let i = 0; i < count; i++) out[i] = halfToFloat(view.getUint16(2 * i, true));
  return out;
}

function readTensor(t: Uint8Array, where: string): { name: string; tensor: DefaultTensor } {
  let name = '', dtype = 0;
  const dims: number[] = [];
  let raw: Uint8Array | undefined;
  const floats: number[] = [];
  let external = false;
  for (const f of fields(t, where)) {
    if (f.num === 1) dims.push(...varintList(f, where));
    else if (f.num === 2) dtype = f.value;
    else if (f.num === 8 && f.body) name = utf8.decode(f.body);
    else if (f.num === 9 && f.body) raw = f.body;
    else if (f.num === 14) external = f.value === 1;
    else if (f.num === 4) {
      if (f.wire === 2) {
        const v = new DataView(f.body!.buffer, f.body!.byteOffset, f.body!.byteLength);
        for (let i = 0; i + 4 <= f.body!.byteLength; i += 4) floats.push(v.getFloat32(i, true));
      } else if (f.wire === 5) {
        floats.push(new DataView(t.buffer, t.byteOffset + f.end - 4, 4).getFloat32(0, true));
      }
    }
  }
  const what = `${where}: initializer ${JSON.stringify(name)}`;
  if (dtype !== 1 && dtype !== 10) {
    throw new EdgepeftError(`${what} has ONNX data type ${dtype}; adapter inputs are float32 or float16. ` +
      'Export the artifact again.');
  }
  const count = dims.reduce((a, b) => a * b, 1);
  if (external) {
    const e = entries(t, where);
    return { name, tensor: { dims, external: { location: e.location ?? '', offset: Number(e.offset ?? 0),
      length: e.length === undefined ? count * (dtype === 1 ? 4 : 2) : Number(e.length), dtype } } };
  }
  if (raw) return { name, tensor: { dims, data: decodeFloats(raw, dtype, count, what) } };
  if (dtype === 1 && floats.length === count) return { name, tensor: { dims, data: Float32Array.from(floats) } };
  if (count === 0) return { name, tensor: { dims, data: new Float32Array(0) } };
  throw new EdgepeftError(`${what}: its values are stored in a way this runtime does not read ` +
    `(dtype ${dtype}, no raw_data). Export the artifact again.`);
}

function varintBytes(n: number): number[] {
  const out: number[] = [];
  while (n >= 0x80) {
    out.push((n % 128) | 0x80);
    n = Math.floor(n / 128);
  }
  out.push(n);
  return out;
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** The graph without the initializers named in `names` (they become required inputs), and those
 * initializers' values. */
export function takeInitializers(model: Uint8Array, names: Set<string>, where: string):
    { model: Uint8Array; defaults: Map<string, DefaultTensor> } {
  const defaults = new Map<string, DefaultTensor>();
  const parts: Uint8Array[] = [];
  for (const f of fields(model, where)) {
    if (f.num !== 7 || !f.body) {
      parts.push(model.subarray(f.start, f.end));
      continue;
    }
    const kept: Uint8Array[] = [];
    for (const g of fields(f.body, where)) {
      if (g.num === 5 && g.body) {
        const nameField = fields(g.body, where).find((x) => x.num === 8 && x.body);
        const name = nameField ? utf8.decode(nameField.body) : '';
        if (names.has(name)) {
          defaults.set(name, readTensor(g.body, where).tensor);
          continue;
        }
      }
      kept.push(f.body.subarray(g.start, g.end));
    }
    const graph = concat(kept);
    parts.push(Uint8Array.from([(7 << 3) | 2, ...varintBytes(graph.length)]), graph);
  }
  return { model: concat(parts), defaults };
}
