// openai_tools.mjs - the official `openai` npm client reads cpm-router's tool calls: whole
// (chat.completions.create) and streamed through its stream helper
// (beta.chat.completions.stream), which rebuilds calls from the deltas; both must agree.
// The cluster's sampler is scripted to answer one get_weather and one search call
// (tests/e2e/router_tools.py). usage: node openai_tools.mjs BASE_URL MODEL
import OpenAI from "openai";
import assert from "node:assert/strict";

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 60000 });
const tools = [
  { type: "function", function: { name: "get_weather", description: "Get the weather of a city",
    parameters: { type: "object", properties: { city: { type: "string" }, days: { type: "integer" } },
                  required: ["city"] } } },
  { type: "function", function: { name: "search", description: "Search the web",
    parameters: { type: "object", properties: { query: { type: "string" } } } } },
];
const request = {
  model, tools, max_tokens: 96, temperature: 0,
  messages: [{ role: "user", content: "Weather in Paris?" }],
};

const full = await client.chat.completions.create(request);
const msg = full.choices[0].message;
assert.equal(full.choices[0].finish_reason, "tool_calls");
assert.equal(msg.content, null);
assert.equal(msg.tool_calls.length, 2);
assert.equal(msg.tool_calls[0].type, "function");
assert.equal(msg.tool_calls[0].function.name, "get_weather");
assert.deepEqual(JSON.parse(msg.tool_calls[0].function.arguments), { city: "Paris", days: 3 });

const stream = client.beta.chat.completions.stream(request);
const done = [];
stream.on("tool_calls.function.arguments.done", (e) => done.push(e.name));
const streamed = await stream.finalChatCompletion();
const smsg = streamed.choices[0].message;
assert.equal(streamed.choices[0].finish_reason, "tool_calls");
assert.deepEqual(smsg.tool_calls.map((c) => [c.type, c.function.name, JSON.parse(c.function.arguments)]),
                 msg.tool_calls.map((c) => [c.type, c.function.name, JSON.parse(c.function.arguments)]));
assert.ok(smsg.tool_calls.every((c) => c.id.startsWith("call_")));
assert.deepEqual(done, ["get_weather", "search"]);

// the conversation goes on with the calls and their results
const next = await client.chat.completions.create({
  ...request,
  messages: [...request.messages, msg,
    ...msg.tool_calls.map((c) => ({ role: "tool", tool_call_id: c.id, content: "sunny" }))],
});
assert.ok(["tool_calls", "stop", "length"].includes(next.choices[0].finish_reason));
console.log(JSON.stringify({ ok: true, calls: smsg.tool_calls.map((c) => c.function.name) }));
