// render_official.mjs - the reference side of the chat-template test: renders every
// case of chat_cases.json with the official MiniCPM Jinja templates through
// Hugging Face's Jinja implementation; prints one JSON string per case.
//   node render_official.mjs chat_cases.json ASSETS_DIR
import fs from 'fs';
import path from 'path';
import { fileURLToPath } from 'url';
import { Template } from '@huggingface/jinja';

const here = path.dirname(fileURLToPath(import.meta.url));
const [casesPath, assets] = process.argv.slice(2);
const chatml = JSON.parse(fs.readFileSync(path.join(assets, 'minicpm3', 'tokenizer_config.json'), 'utf8')).chat_template;
const templates = {
  minicpm2: new Template(fs.readFileSync(path.join(here, 'templates', 'minicpm2.jinja'), 'utf8')),
  minicpm3: new Template(fs.readFileSync(path.join(here, 'templates', 'minicpm3_tool.jinja'), 'utf8')),
  chatml: new Template(chatml),
};

// OpenAI clients send tool-call arguments as JSON text; the template iterates a mapping.
function prepare(msg) {
  const m = { ...msg };
  if (m.tool_calls) {
    m.tool_calls = m.tool_calls.map((c) => {
      const f = c.function ? { ...c.function } : { ...c };
      if (typeof f.arguments === 'string') f.arguments = JSON.parse(f.arguments);
      return c.function ? { ...c, function: f } : f;
    });
  }
  return m;
}

const out = [];
for (const c of JSON.parse(fs.readFileSync(casesPath, 'utf8'))) {
  const tpl = c.tools && c.tools.length ? templates.minicpm3 : templates[c.family];
  out.push(JSON.stringify(tpl.render({
    messages: c.messages.map(prepare), tools: c.tools, add_generation_prompt: c.add_generation_prompt,
    bos_token: '<s>', eos_token: '</s>',
  })));
}
process.stdout.write(out.join('\n') + '\n');
