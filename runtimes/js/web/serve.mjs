#!/usr/bin/env node
// A tiny static server for the edgepeft web demo (no dependencies).
//
//   node runtimes/js/web/serve.mjs path/to/artifact [--port 8080] [--host 127.0.0.1]
//
// Serves runtimes/js/ at / (so /web/, /dist/ and /node_modules/ resolve) and the artifact
// directory at /artifact/, with the cross-origin isolation headers onnxruntime-web needs for
// threads (COOP same-origin, COEP require-corp). Port 0 (the default) picks a free port.
// Prints the page's URL. Also importable: `startServer({artifact, port, host})`.

import { createReadStream, promises as fs } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(HERE, '..'); // runtimes/js

const MIME = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'application/javascript; charset=utf-8',
  '.mjs': 'application/javascript; charset=utf-8',
  '.cjs': 'application/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json; charset=utf-8',
  '.map': 'application/json; charset=utf-8',
  '.wasm': 'application/wasm',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
  '.ico': 'image/x-icon',
  '.txt': 'text/plain; charset=utf-8',
  '.md': 'text/plain; charset=utf-8',
};

const HEADERS = {
  'Cross-Origin-Opener-Policy': 'same-origin',
  'Cross-Origin-Embedder-Policy': 'require-corp',
  'Cross-Origin-Resource-Policy': 'same-origin',
  'Cache-Control': 'no-store',
  'X-Content-Type-Options': 'nosniff',
};

/** `rel` (URL path, decoded) inside `dir`, or null when it escapes it. */
function within(dir, rel) {
  const full = path.resolve(dir, '.' + path.posix.normalize('/' + rel));
  return full === dir || full.startsWith(dir + path.sep) ? full : null;
}

function send(res, status, body, type = 'text/plain; charset=utf-8', extra = {}) {
  res.writeHead(status, { ...HEADERS, 'Content-Type': type, ...extra });
  res.end(body);
}

/**
 * Start the server. Resolves to {server, url, port, pageUrl, close()}.
 * @param {{artifact?: string, port?: number, host?: string, root?: string, quiet?: boolean}} opts
 */
export function startServer({ artifact, port = 0, host = '127.0.0.1', root = ROOT, quiet = true } = {}) {
  const rootDir = path.resolve(root);
  const artifactDir = artifact ? path.resolve(artifact) : null;
  const server = http.createServer(async (req, res) => {
    if (!quiet) res.on('finish', () => console.log(`${res.statusCode} ${req.method} ${req.url}`));
    try {
      if (req.method !== 'GET' && req.method !== 'HEAD') return send(res, 405, 'method not allowed\n');
      let pathname;
      try {
        pathname = decodeURIComponent(new URL(req.url, 'http://x').pathname);
      } catch {
        return send(res, 400, 'bad request\n');
      }
      if (pathname.includes('\0')) return send(res, 400, 'bad request\n');
      if (pathname === '/' || pathname === '/web') {
        const to = '/web/' + (artifactDir ? '?artifact=/artifact/' : '');
        return send(res, 302, `see ${to}\n`, undefined, { Location: to });
      }
      let file;
      if (pathname === '/artifact' || pathname.startsWith('/artifact/')) {
        if (!artifactDir) return send(res, 404, 'no artifact directory was given to serve.mjs\n');
        file = within(artifactDir, pathname.slice('/artifact'.length) || '/');
      } else {
        file = within(rootDir, pathname);
      }
      if (!file) return send(res, 403, 'forbidden\n');
      let stat;
      try {
        stat = await fs.stat(file);
        if (stat.isDirectory()) {
          if (!pathname.endsWith('/')) {
            const u = new URL(req.url, 'http://x');
            return send(res, 301, 'moved\n', undefined, { Location: u.pathname + '/' + u.search });
          }
          file = path.join(file, 'index.html');
          stat = await fs.stat(file);
        }
      } catch {
        return send(res, 404, `not found: ${pathname}\n`);
      }
      const type = MIME[path.extname(file).toLowerCase()] || 'application/octet-stream';
      res.writeHead(200, { ...HEADERS, 'Content-Type': type, 'Content-Length': stat.size });
      if (req.method === 'HEAD') return res.end();
      const stream = createReadStream(file);
      stream.on('error', () => res.destroy());
      stream.pipe(res);
    } catch (e) {
      if (!res.headersSent) send(res, 500, `server error: ${e && e.message}\n`);
      else res.destroy();
    }
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      const addr = server.address();
      const shown = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
      const url = `http://${shown}:${addr.port}/`;
      resolve({
        server,
        url,
        port: addr.port,
        pageUrl: url + 'web/' + (artifactDir ? '?artifact=/artifact/' : ''),
        close: () => new Promise((r) => { server.closeAllConnections?.(); server.close(() => r()); }),
      });
    });
  });
}

function usage(code) {
  (code ? console.error : console.log)(
    'usage: node runtimes/js/web/serve.mjs ARTIFACT_DIR [--port N (0 = free port)] [--host H]');
  process.exit(code);
}

async function main(argv) {
  let artifact = null;
  let port = Number(process.env.PORT || 0);
  let host = '127.0.0.1';
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '-h' || a === '--help') usage(0);
    else if (a === '--port') port = Number(argv[++i]);
    else if (a.startsWith('--port=')) port = Number(a.slice(7));
    else if (a === '--host') host = argv[++i];
    else if (a.startsWith('--host=')) host = a.slice(7);
    else if (a.startsWith('-')) usage(2);
    else if (artifact === null) artifact = a;
    else usage(2);
  }
  if (!Number.isInteger(port) || port < 0 || port > 65535) usage(2);
  if (artifact !== null) {
    try {
      await fs.access(path.join(artifact, 'manifest.json'));
    } catch {
      console.error(`${artifact}: no manifest.json there; give the directory written by 'edgepeft export'.`);
      process.exit(2);
    }
  }
  for (const need of ['dist/web.js', 'node_modules/onnxruntime-web', 'node_modules/@huggingface/tokenizers']) {
    try {
      await fs.access(path.join(ROOT, need));
    } catch {
      console.error(`warning: ${path.join(ROOT, need)} is missing; run: (cd runtimes/js && npm ci && npm run build)`);
    }
  }
  const s = await startServer({ artifact, port, host, quiet: !process.env.EDGEPEFT_SERVE_LOG });
  console.log(`edgepeft web demo: ${s.pageUrl}`);
  const stop = () => s.close().then(() => process.exit(0));
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  main(process.argv.slice(2)).catch((e) => {
    console.error(e && e.stack ? e.stack : e);
    process.exit(1);
  });
}
