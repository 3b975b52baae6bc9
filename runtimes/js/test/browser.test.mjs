// The web page (runtimes/js/web) in headless Chromium: load an artifact, generate with one
// adapter and with a weighted mix, compare the shown text with the Python runtime's, read the
// shown swap time and tok/s, and check from screenshots that the text is really on screen.
//
//   EDGEPEFT_JS_BROWSER_CASE=case.json node --test runtimes/js/test/browser.test.mjs
//
// case.json (written by tests/test_js_browser.py):
//   {"artifact": dir, "prompt": str, "maxNewTokens": int, "adapter": name, "mix": {name: w},
//    "expected": {"adapter": text, "mix": text, "base"?: text}}
// Screenshots (page.png, output.png) are saved next to case.json.
// CHROMIUM: the browser binary (default /usr/bin/chromium).

import assert from 'node:assert/strict';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { inflateSync } from 'node:zlib';

import { chromium } from 'playwright-core';

import { startServer } from '../web/serve.mjs';

const CASE_FILE = process.env.EDGEPEFT_JS_BROWSER_CASE;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const TIMEOUT = 60_000;

// ---------------------------------------------------------------- PNG decoding (no deps)
/** Decode an 8-bit, non-interlaced PNG (what Chromium's screenshots are) to RGBA. */
export function decodePng(buf) {
  assert.equal(buf.subarray(0, 8).toString('hex'), '89504e470d0a1a0a', 'not a PNG');
  let pos = 8;
  let width, height, bitDepth, colorType, interlace;
  const idat = [];
  while (pos < buf.length) {
    const len = buf.readUInt32BE(pos);
    const type = buf.toString('latin1', pos + 4, pos + 8);
    const data = buf.subarray(pos + 8, pos + 8 + len);
    if (type === 'IHDR') {
      width = data.readUInt32BE(0);
      height = data.readUInt32BE(4);
      bitDepth = data[8];
      colorType = data[9];
      interlace = data[12];
    } else if (type === 'IDAT') idat.push(data);
    else if (type === 'IEND') break;
    pos += 12 + len;
  }
  const channels = { 0: 1, 2: 3, 4: 2, 6: 4 }[colorType];
  assert.ok(bitDepth === 8 && channels && interlace === 0, `PNG kind not handled: depth ${bitDepth}, color ${colorType}, interlace ${interlace}`);
  const raw = inflateSync(Buffer.concat(idat));
  const stride = width * channels;
  const px = Buffer.alloc(height * stride);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)];
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    const out = px.subarray(y * stride, (y + 1) * stride);
    const prev = y ? px.subarray((y - 1) * stride, y * stride) : Buffer.alloc(stride);
    for (let i = 0; i < stride; i++) {
      const a = i >= channels ? out[i - channels] : 0;
      const b = prev[i];
      const c = i >= channels ? prev[i - channels] : 0;
      let v = line[i];
      if (filter === 1) v += a;
      else if (filter === 2) v += b;
      else if (filter === 3) v += (a + b) >> 1;
      else if (filter === 4) {
        const p = a + b - c;
        const pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
        v += pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      }
      out[i] = v & 0xff;
    }
  }
  const rgba = Buffer.alloc(width * height * 4);
  for (let i = 0; i < width * height; i++) {
    const s = i * channels;
    const gray = channels <= 2;
    rgba[i * 4] = px[s];
    rgba[i * 4 + 1] = gray ? px[s] : px[s + 1];
    rgba[i * 4 + 2] = gray ? px[s] : px[s + 2];
    rgba[i * 4 + 3] = channels === 4 ? px[s + 3] : channels === 2 ? px[s + 1] : 255;
  }
  return { width, height, rgba };
}

/** Pixels that are "ink": darker than mid-grey (the output box is near-white with black text). */
function inkPixels({ width, height, rgba }) {
  let ink = 0;
  for (let i = 0; i < width * height; i++) {
    const lum = 0.299 * rgba[i * 4] + 0.587 * rgba[i * 4 + 1] + 0.114 * rgba[i * 4 + 2];
    if (lum < 128) ink++;
  }
  return ink;
}

/** Number of pixels that differ between two decoded images of the same size, `inset` pixels
 * from the edges left out (an element at a fractional position gets its border anti-aliased
 * differently in the outermost rows). */
function diffPixels(a, b, inset = 2) {
  assert.deepEqual([a.width, a.height], [b.width, b.height], 'images differ in size');
  let n = 0;
  for (let i = 0; i < a.width * a.height; i++) {
    const x = i % a.width, y = Math.floor(i / a.width);
    if (x < inset || y < inset || x >= a.width - inset || y >= a.height - inset) continue;
    for (let c = 0; c < 4; c++) {
      if (Math.abs(a.rgba[i * 4 + c] - b.rgba[i * 4 + c]) > 8) {
        n++;
        break;
      }
    }
  }
  return n;
}

// ---------------------------------------------------------------- fixture
let kase, outDir, server, browser, page;
const problems = []; // console errors, page errors, failed requests

before(async () => {
  assert.ok(CASE_FILE, 'set EDGEPEFT_JS_BROWSER_CASE to a case JSON (tests/test_js_browser.py writes one)');
  kase = JSON.parse(readFileSync(CASE_FILE, 'utf8'));
  outDir = path.dirname(path.resolve(CASE_FILE));
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM}: no Chromium there; apt-get install -y chromium (or set CHROMIUM)`);
  server = await startServer({ artifact: kase.artifact });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-dev-shm-usage',
      '--disable-extensions', '--no-first-run', '--mute-audio', '--disable-component-update'],
    timeout: TIMEOUT,
  });
  page = await browser.newPage({ viewport: { width: 1000, height: 1000 }, deviceScaleFactor: 1 });
  page.setDefaultTimeout(10_000); // clicks and fills; loading and generating wait TIMEOUT
  page.on('console', (m) => {
    if (m.type() === 'error') problems.push(`console.error: ${m.text()}`);
  });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('requestfailed', (r) => problems.push(`request failed: ${r.url()} (${r.failure()?.errorText})`));
  page.on('response', (r) => {
    if (r.status() >= 400) problems.push(`HTTP ${r.status()}: ${r.url()}`);
  });
});

after(async () => {
  await browser?.close();
  await server?.close();
});

function noProblems(where) {
  if (!problems.length) return;
  const shown = problems.slice(0, 12).map((p) => (p.length > 400 ? p.slice(0, 400) + '…' : p));
  if (problems.length > 12) shown.push(`… and ${problems.length - 12} more`);
  assert.fail(`${problems.length} browser problem(s) ${where}:\n  ${shown.join('\n  ')}`);
}

async function pageError() {
  return (await page.locator('#error').isVisible()) ? await page.locator('#error').textContent() : '';
}

/** Wait for the page to leave `busy`/`loading`, then fail with what it shows if it errored. */
async function waitReady(what) {
  await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state), null, { timeout: TIMEOUT });
  const err = await pageError();
  assert.equal(err, '', `${what}: the page shows an error:\n${err}`);
  noProblems(what);
}

let loaded = false;

async function generateWith(setChoice, run) {
  assert.ok(loaded, 'the page did not load the artifact (see the first failure)');
  await setChoice();
  await page.fill('#prompt', kase.prompt);
  await page.fill('#max-new-tokens', String(kase.maxNewTokens));
  await page.click('#generate');
  await page.waitForFunction((n) => ['error', String(n)].includes(document.getElementById('output').dataset.done),
    run, { timeout: TIMEOUT });
  await waitReady(`generate #${run}`);
  return {
    text: await page.locator('#output').textContent(),
    swapMs: await page.locator('#swap-ms').textContent(),
    tokS: await page.locator('#tok-s').textContent(),
  };
}

function positiveNumber(shown, what) {
  const x = Number(shown);
  assert.ok(Number.isFinite(x) && x > 0, `${what}: the page shows ${JSON.stringify(shown)}, not a number > 0`);
  return x;
}

// ---------------------------------------------------------------- tests
test('page loads the artifact and lists its adapters', { timeout: TIMEOUT * 2 }, async () => {
  const url = `${server.pageUrl}&prompt=${encodeURIComponent(kase.prompt)}&max=${kase.maxNewTokens}`;
  const resp = await page.goto(url, { timeout: TIMEOUT });
  assert.equal(resp.status(), 200);
  assert.equal(resp.headers()['cross-origin-embedder-policy'], 'require-corp');
  await waitReady('loading the artifact');
  assert.equal(await page.evaluate(() => self.crossOriginIsolated), true, 'page is not cross-origin isolated');
  const names = await page.locator('#adapter-select option').evaluateAll((os) => os.map((o) => o.value));
  const want = [kase.adapter, ...Object.keys(kase.mix)];
  for (const n of want) assert.ok(names.includes(n), `adapter ${n} not listed (page lists ${names})`);
  loaded = true;
});

const shown = {};

test('one adapter: text equals the Python runtime', { timeout: TIMEOUT * 2 }, async () => {
  const r = await generateWith(async () => {
    await page.check('#mode-adapter');
    await page.selectOption('#adapter-select', kase.adapter);
  }, 1);
  assert.equal(r.text, kase.expected.adapter, `adapter ${kase.adapter}: browser text differs from Python's`);
  shown.adapter = { swapMs: positiveNumber(r.swapMs, 'swap time (adapter)'), tokS: positiveNumber(r.tokS, 'tok/s (adapter)') };
});

test('weighted mix: text equals the Python runtime; swap time and tok/s shown', { timeout: TIMEOUT * 2 }, async () => {
  const r = await generateWith(async () => {
    await page.check('#mode-mix');
    for (const input of await page.locator('#mix-weights input[data-adapter]').all()) {
      const name = await input.getAttribute('data-adapter');
      await input.fill(String(kase.mix[name] ?? 0));
    }
  }, 2);
  assert.equal(r.text, kase.expected.mix, `mix ${JSON.stringify(kase.mix)}: browser text differs from Python's`);
  shown.mix = { swapMs: positiveNumber(r.swapMs, 'swap time (mix)'), tokS: positiveNumber(r.tokS, 'tok/s (mix)') };
  console.log(`# shown: ${JSON.stringify(shown)}`);
  writeFileSync(path.join(outDir, 'shown.json'), JSON.stringify(shown, null, 1));
});

test('base model: text equals the Python runtime', { timeout: TIMEOUT * 2 }, async (t) => {
  if (kase.expected.base === undefined) return t.skip('no expected.base in the case');
  const r = await generateWith(() => page.check('#mode-base'), 3);
  assert.equal(r.text, kase.expected.base, "base model: browser text differs from Python's");
  // Back to the mix: its feeds come from the runtime's cache, and the page shows the same text.
  const again = await generateWith(() => page.check('#mode-mix'), 4);
  assert.equal(again.text, kase.expected.mix, 'mix again (cached feeds): browser text differs');
});

test('screenshot shows the generated text', { timeout: TIMEOUT }, async () => {
  assert.ok(shown.mix, 'no generated text to check (see the earlier failures)');
  await page.screenshot({ path: path.join(outDir, 'page.png'), fullPage: true });
  const out = page.locator('#output');
  const box = await out.boundingBox();
  const shot = decodePng(await out.screenshot({ path: path.join(outDir, 'output.png') }));
  // Size: the element's box (device scale 1), wide and tall enough for at least one line.
  assert.ok(Math.abs(shot.width - box.width) <= 1 && Math.abs(shot.height - box.height) <= 1,
    `screenshot ${shot.width}x${shot.height} vs element ${box.width}x${box.height}`);
  assert.ok(shot.width >= 300 && shot.height >= 20, `output element too small: ${shot.width}x${shot.height}`);
  const ink = inkPixels(shot);
  assert.ok(ink > 10 * kase.expected.mix.replace(/\s/g, '').length,
    `output screenshot is (nearly) blank: ${ink} dark pixels for ${JSON.stringify(kase.expected.mix)}`);

  // The same text rendered by the page into a fresh element of the same kind must give the same
  // pixels, and a different text must not: the screenshot shows exactly the expected text.
  let refs = 0;
  const render = async (text) => {
    const handle = await page.evaluate((text) => {
      const ref = document.createElement('pre');
      ref.className = 'output';
      ref.id = 'reference-render';
      ref.textContent = text;
      document.getElementById('output').after(ref);
      return true;
    }, text);
    assert.ok(handle);
    const img = decodePng(await page.locator('#reference-render').screenshot({ path: path.join(outDir, `reference-${++refs}.png`) }));
    await page.evaluate(() => document.getElementById('reference-render').remove());
    return img;
  };
  const same = await render(kase.expected.mix);
  const sameDiff = diffPixels(shot, same);
  assert.equal(sameDiff, 0, 'output screenshot differs from the expected text rendered in the page');
  const other = await render(kase.expected.mix.split('').reverse().join('') + ' #');
  const otherDiff = other.width === shot.width && other.height === shot.height ? diffPixels(shot, other) : 'size';
  assert.ok(otherDiff === 'size' || otherDiff > 20, 'a different text renders the same pixels: the comparison proves nothing');
  console.log(`# screenshot ${shot.width}x${shot.height}: ${ink} dark pixels; differs from the expected text's `
    + `rendering in ${sameDiff} pixels, from another text's in ${otherDiff}`);
  noProblems('at the end');
});
