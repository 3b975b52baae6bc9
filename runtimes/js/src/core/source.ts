import { EdgepeftError } from './errors.js';

/** Where an artifact's files come from: a directory (Node), a URL base (browsers), a user reader
 * (React Native). Paths are relative to the artifact root, '/'-separated. */
export interface Source {
  /** The whole file. Rejects (with any error) when it is missing. */
  read(rel: string): Promise<Uint8Array>;
  /** How messages name the file: a path or URL. */
  describe(rel: string): string;
  /** Optional: bytes [offset, offset + length) of a file (external data of a default initializer). */
  readRange?(rel: string, offset: number, length: number): Promise<Uint8Array>;
  /** Optional: whether the file exists (better messages than a failed read). */
  exists?(rel: string): Promise<boolean>;
  /** Optional (file systems): the absolute path of directory `rel` ('' the root). When given,
   * onnxruntime reads a graph's external weights from there itself instead of being handed the
   * bytes (no copy of the weights in JS memory). */
  folder?(rel: string): string;
  /** Optional: a file by its own path or URL, not under the artifact (an adapter pack given to
   * `Model.addAdapter` by path). Node's source reads the file system, the browser's fetches. */
  readFile?(path: string): Promise<Uint8Array>;
}

/** What an entry point hands the core besides the Source: how to create a session. */
export interface SessionFactory {
  /** A session from the graph bytes; `dataFile` is the external data file's path relative to the
   * artifact root (as recorded in the manifest), `dataName` the location the graph names. */
  (graph: Uint8Array, dataFile: string, dataName: string): Promise<unknown>;
}

/** `rel` joined under the artifact root; refuses absolute paths and `..` escapes. */
export function inside(rel: string, where: string, root: string): string {
  const parts: string[] = [];
  if (rel.startsWith('/') || rel.startsWith('\\') || /^[A-Za-z]:/.test(rel) || rel.includes('\\')) {
    throw new EdgepeftError(`${where}: path ${JSON.stringify(rel)} points outside the artifact directory ${root}; ` +
      'the artifact is corrupt or tampered with. Export it again.');
  }
  for (const p of rel.split('/')) {
    if (p === '' || p === '.') continue;
    if (p === '..') {
      if (!parts.length) {
        throw new EdgepeftError(`${where}: path ${JSON.stringify(rel)} points outside the artifact directory ${root}; ` +
          'the artifact is corrupt or tampered with. Export it again.');
      }
      parts.pop();
    } else parts.push(p);
  }
  return parts.join('/');
}
