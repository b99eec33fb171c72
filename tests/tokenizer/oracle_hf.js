// oracle_hf.js - the reference side of the tokenizer.json parity test: Hugging Face's
// Rust `tokenizers` (npm @anush008/tokenizers) encodes/decodes what parity.py asks.
//   node oracle_hf.js encode tokenizer.json corpus.jsonl   -> one line of ids per string (bos added)
//   node oracle_hf.js decode tokenizer.json ids.txt        -> one JSON string per line of ids
'use strict';
const fs = require('fs');
const { Tokenizer } = require('@anush008/tokenizers');

async function main() {
  const [mode, model, input] = process.argv.slice(2);
  const tok = Tokenizer.fromFile(model);
  const lines = fs.readFileSync(input, 'utf8').split('\n');
  if (lines.length && lines[lines.length - 1] === '') lines.pop();
  const out = [];
  for (const line of lines) {
    if (mode === 'encode') {
      const enc = await tok.encode(JSON.parse(line), null, { addSpecialTokens: true });
      out.push(enc.getIds().join(' '));
    } else if (mode === 'decode') {
      const ids = line.trim() === '' ? [] : line.trim().split(/\s+/).map(Number);
      out.push(JSON.stringify(await tok.decode(ids, false)));
    } else {
      throw new Error('mode must be encode or decode');
    }
  }
  process.stdout.write(out.join('\n') + (out.length ? '\n' : ''));
}

main().catch((e) => { console.error('oracle_hf: ' + e.message); process.exit(1); });
