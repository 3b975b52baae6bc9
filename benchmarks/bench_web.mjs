// The web page (runtimes/js/web) in headless Chromium on a real artifact: load time, and per
// choice the swap time and decode tok/s the page shows. Chromium runs onnxruntime-web (wasm).
//
//   node benchmarks/bench_web.mjs [ARTIFACT] [--max 32] [--repeat 3]
//
// ARTIFACT defaults to benchmarks/results/js/demo (exported by benchmarks/bench_js.py). The
// choices run in turn: numbers, sentiment, a 0.5/0.5 mix, then each again --repeat - 1 times (the
// first use builds the adapter's feeds, later uses find them cached). Writes
// benchmarks/results/web.json. CHROMIUM: the browser binary (default /usr/bin/chromium).
import { writeFileSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { startServer } from '../runtimes/js/web/serve.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const { chromium } = createRequire(path.join(ROOT, 'runtimes/js/package.json'))('playwright-core');  // runtimes/js's node_modules
const args = process.argv.slice(2);
const opt = (name, d) => { const i = args.indexOf(name); return i >= 0 ? Number(args.splice(i, 2)[1]) : d; };
const max = opt('--max', 32), repeat = opt('--repeat', 3);
const artifact = args[0] ?? path.join(ROOT, 'benchmarks/results/js/demo');
const prompt = 'Number: 4821\nIn words:';
const server = await startServer({ artifact });
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-dev-shm-usage'] });
try {
  const page = await browser.newPage();
  const t = Date.now();
  await page.goto(`${server.pageUrl}&prompt=${encodeURIComponent(prompt)}&max=${max}`);
  const ready = () => page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state), null, { timeout: 600_000 });
  await ready();
  const loadS = (Date.now() - t) / 1e3;
  const err = async () => ((await page.locator('#error').isVisible()) ? page.locator('#error').textContent() : '');
  if (await err()) throw new Error(`page error: ${await err()}`);
  const choices = {
    numbers: async () => { await page.check('#mode-adapter'); await page.selectOption('#adapter-select', 'numbers'); },
    sentiment: async () => { await page.check('#mode-adapter'); await page.selectOption('#adapter-select', 'sentiment'); },
    'numbers 0.5 + sentiment 0.5': async () => {
      await page.check('#mode-mix');
      for (const input of await page.locator('#mix-weights input').all()) await input.fill('0.5');
    },
  };
  const rows = [];
  let run = 0;
  for (let r = 0; r < repeat; r++) {
    for (const [name, set] of Object.entries(choices)) {
      await set();
      await page.click('#generate');
      run++;
      await page.waitForFunction((n) => ['error', String(n)].includes(document.getElementById('output').dataset.done), run, { timeout: 600_000 });
      await ready();
      if (await err()) throw new Error(`page error: ${await err()}`);
      const num = async (id) => Number(await page.locator(id).textContent());
      rows.push({ choice: name, use: r + 1, swap_ms: await num('#swap-ms'), decode_tok_s: await num('#tok-s'),
                  prefill_ms: await num('#prefill-ms'), new_tokens: await num('#new-tokens') });
    }
  }
  const threads = await page.evaluate(() => navigator.hardwareConcurrency);
  const res = { date: new Date().toISOString(), artifact, max_new_tokens: max, load_s: loadS, browser: browser.version(),
                hardware_concurrency: threads, rows };
  mkdirSync(path.join(ROOT, 'benchmarks/results'), { recursive: true });
  writeFileSync(path.join(ROOT, 'benchmarks/results/web.json'), JSON.stringify(res, null, 1));
  console.log(`Chromium ${browser.version()}, load ${loadS.toFixed(1)} s, ${max} new tokens`);
  console.log('| choice | use | swap ms | decode tok/s | prefill ms |\n|---|---|---|---|---|');
  for (const x of rows) console.log(`| ${x.choice} | ${x.use} | ${x.swap_ms} | ${x.decode_tok_s} | ${x.prefill_ms} |`);
} finally {
  await browser.close();
  await server.close();
}
