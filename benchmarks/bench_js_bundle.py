"""What a web page and a Node app download for the JS runtime: file sizes, raw and gzipped.

Run from the repo root after ``runtimes/js/setup.sh``::

    python benchmarks/bench_js_bundle.py

Counts, in bytes (KB = 1,000 bytes, MB = 1,000,000):
- the runtime a web page loads: ``dist/web.js`` and every module it imports, followed through the
  relative ``import``/``export ... from`` lines of the built JS (source maps and ``.d.ts`` excluded);
- onnxruntime-web's wasm loader (``ort.wasm.min.mjs`` + ``ort-wasm-simd-threaded.mjs``) and its
  ``ort-wasm-simd-threaded.wasm``;
- ``@huggingface/tokenizers``' ``tokenizers.mjs`` (what ``runtimes/js/web/index.html`` maps it to);
- onnxruntime-node's Linux x64 ``libonnxruntime.so.1`` and its binding, and the npm package whole.

gzip is Python's ``gzip.compress`` at level 9, per file, summed.
Output: a table on stdout, ``docs/bench/js-bundle.json`` and ``.md``.
"""

from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, write_result  # noqa: E402

JS = REPO / "runtimes" / "js"
NODE_MODULES = JS / "node_modules"
_IMPORT = re.compile(r"""(?:^|\n)\s*(?:import|export)\b[^;'"]*?from\s*['"](\.[^'"]+)['"]""")
_DYNAMIC = re.compile(r"""import\(\s*['"](\.[^'"]+)['"]\s*\)""")


def import_closure(entry: Path) -> list[Path]:
    """``entry`` and every file it reaches through relative imports (dynamic ones included)."""
    seen, todo = [], [entry.resolve()]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.append(f)
        text = f.read_text()
        for rel in _IMPORT.findall(text) + _DYNAMIC.findall(text):
            todo.append((f.parent / rel).resolve())
    return sorted(seen)


def sizes(files: list[Path]) -> dict:
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"bench_js_bundle: missing {', '.join(missing)}: run runtimes/js/setup.sh first")
    return {"files": [str(f.relative_to(JS)) for f in files],
            "bytes": sum(f.stat().st_size for f in files),
            "gzip_bytes": sum(len(gzip.compress(f.read_bytes(), 9)) for f in files)}


def main() -> int:
    web = NODE_MODULES / "onnxruntime-web" / "dist"
    node_bin = NODE_MODULES / "onnxruntime-node" / "bin" / "napi-v6" / "linux" / "x64"
    parts = {
        "the runtime (dist/web.js and its imports)": sizes(import_closure(JS / "dist" / "web.js")),
        "onnxruntime-web (ort.wasm.min.mjs + ort-wasm-simd-threaded.mjs)":
            sizes([web / "ort.wasm.min.mjs", web / "ort-wasm-simd-threaded.mjs"]),
        "onnxruntime-web's ort-wasm-simd-threaded.wasm": sizes([web / "ort-wasm-simd-threaded.wasm"]),
        "@huggingface/tokenizers (tokenizers.mjs)":
            sizes([NODE_MODULES / "@huggingface" / "tokenizers" / "dist" / "tokenizers.mjs"]),
    }
    node = {"libonnxruntime.so.1 (linux x64)": (node_bin / "libonnxruntime.so.1").stat().st_size,
            "onnxruntime_binding.node (linux x64)": (node_bin / "onnxruntime_binding.node").stat().st_size,
            "onnxruntime-node package, every platform":
                sum(f.stat().st_size for f in (NODE_MODULES / "onnxruntime-node").rglob("*") if f.is_file())}
    result = {"machine": machine_info(), "web": parts, "node_bytes": node}
    lines = ["| part | size | gzip |", "|---|---|---|"]
    for name, p in parts.items():
        lines.append(f"| {name} | {_fmt(p['bytes'])} | {_fmt(p['gzip_bytes'])} |")
    lines += ["", "| Node | size |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in node.items()]
    write_result("js-bundle", result, lines)
    return 0


def _fmt(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


if __name__ == "__main__":
    sys.exit(main())
