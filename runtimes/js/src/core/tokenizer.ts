/** The artifact's tokenizer (tokenizer/tokenizer.json + tokenizer_config.json) through
 * @huggingface/tokenizers (pure JS). Padding and truncation of tokenizer.json are ignored, as in
 * Python (the runtime pads and truncates itself). */
import { Tokenizer as HFTokenizer } from '@huggingface/tokenizers';
import { EdgepeftError } from './errors.js';
import type { Source } from './source.js';
import { inside } from './source.js';

export interface TextTokenizer {
  /** Token ids of `text`, special tokens added as the tokenizer's post-processor says. */
  encode(text: string): number[];
  /** Text of `ids`; special tokens skipped by default (like Python's generate_text). */
  decode(ids: number[], skipSpecialTokens?: boolean): string;
}

export async function loadTokenizer(source: Source, dir: string, where: string): Promise<TextTokenizer> {
  const rel = inside(`${dir}/tokenizer.json`, where, source.describe(''));
  let json: any, config: any = {};
  try {
    json = JSON.parse(new TextDecoder().decode(await source.read(rel)));
  } catch (e) {
    throw new EdgepeftError(`${source.describe(rel)}: cannot read the tokenizer (${String((e as Error).message).slice(0, 200)}). ` +
      'Export the artifact again.');
  }
  try {
    config = JSON.parse(new TextDecoder().decode(await source.read(inside(`${dir}/tokenizer_config.json`, where, ''))));
  } catch {
    config = {};  // optional: tokenizer.json alone describes the pipeline
  }
  json = { ...json, padding: null, truncation: null };
  let tok: HFTokenizer;
  try {
    tok = new HFTokenizer(json, config);
  } catch (e) {
    throw new EdgepeftError(`${source.describe(rel)}: @huggingface/tokenizers cannot build this tokenizer ` +
      `(${String((e as Error).message).slice(0, 200)}); it may use a component the JS library does not support. ` +
      'Pass token ids instead of text.');
  }
  return {
    encode: (text: string) => tok.encode(text).ids,
    decode: (ids: number[], skipSpecialTokens = true) => tok.decode(ids, { skip_special_tokens: skipSpecialTokens }),
  };
}
