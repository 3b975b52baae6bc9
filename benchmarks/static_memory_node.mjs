// The node row of bench_static_memory.py: one static artifact, one process; prints one JSON line.
import fs from 'node:fs';
import { Model } from '../runtimes/js/dist/node.js';

const spec = JSON.parse(process.argv[2]);
const status = (k) => +fs.readFileSync('/proc/self/status', 'utf8').match(new RegExp(`${k}:\\s+(\\d+)`))[1] / 1024;
const pss = () => +fs.readFileSync('/proc/self/smaps_rollup', 'utf8').match(/\nPss:\s+(\d+)/)[1] / 1024;
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return (s[(s.length - 1) >> 1] + s[s.length >> 1]) / 2; };
const base = { rss: status('VmRSS'), pss: pss() };
const m = await Model.load(spec.artifact, { shareWeights: spec.share,
  sessionOptions: { intraOpNumThreads: 1, enableCpuMemArena: spec.arena !== false } });
const opened = status('VmRSS');
const ms = {};
for (const seq of spec.buckets) {  // one call per bucket: ids of a length that picks it ([CLS] 101 first)
  const n = Math.max(2, seq - 2);
  const ids = [[101, ...Array.from({ length: n - 2 }, (_, i) => 2000 + i), 102]];
  await m.classifyLogits(ids, { adapter: 'lora' });
  const times = [];
  for (let i = 0; i < 5; i++) {
    const t = performance.now();
    await m.classifyLogits(ids, { adapter: 'lora' });
    times.push(performance.now() - t);
  }
  ms[String(seq)] = median(times);
}
console.log(JSON.stringify({ format: 'onnx', rss_mb: status('VmRSS') - base.rss, pss_mb: pss() - base.pss,
  rss_opened_mb: opened - base.rss, hwm_mb: status('VmHWM'), ms }));
