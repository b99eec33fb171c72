// openai_chat.mjs - the official `openai` npm client against a running cpm-router:
// one non-streaming and one streaming chat completion; both must succeed and give the
// same text (greedy). usage: node openai_chat.mjs BASE_URL MODEL
import OpenAI from "openai";
import assert from "node:assert/strict";

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 60000 });
const messages = [{ role: "user", content: "Hello! Who are you?" }];

const full = await client.chat.completions.create({
  model, messages, max_tokens: 16, temperature: 0,
});
assert.equal(full.object, "chat.completion");
assert.equal(full.choices.length, 1);
assert.equal(full.choices[0].message.role, "assistant");
assert.ok(["stop", "length"].includes(full.choices[0].finish_reason));
assert.ok(full.usage.prompt_tokens > 0 && full.usage.completion_tokens > 0);

const stream = await client.chat.completions.create({
  model, messages, max_tokens: 16, temperature: 0, stream: true,
  stream_options: { include_usage: true },
});
let text = "";
let finish = null;
let usage = null;
for await (const chunk of stream) {
  assert.equal(chunk.object, "chat.completion.chunk");
  for (const c of chunk.choices) {
    text += c.delta.content ?? "";
    if (c.finish_reason) finish = c.finish_reason;
  }
  if (chunk.usage) usage = chunk.usage;
}
assert.equal(text, full.choices[0].message.content);
assert.equal(finish, full.choices[0].finish_reason);
assert.deepEqual(usage, full.usage);

// an error comes back as the client's typed error, with OpenAI's shape
await assert.rejects(
  client.chat.completions.create({ model, messages: [], max_tokens: 4 }),
  (e) => e.status === 400 && typeof e.message === "string",
);
console.log(JSON.stringify({ ok: true, text, finish, usage }));
