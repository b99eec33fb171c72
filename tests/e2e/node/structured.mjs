// structured.mjs - constrained decoding through clients nobody here wrote, with ajv (and
// zod, for zod-made schemas) as the oracle. The cluster's model has random weights, so what
// it would write freely is garbage: every answer below must still be a JSON document valid
// against its schema, or forced tool calls naming allowed tools with arguments valid
// against their parameters.
//   * the official `openai` client (v4): chat.completions.create with response_format
//     json_schema (5 schemas: nested objects, enum/const, arrays with min/maxItems, anyOf
//     with null, $defs recursion; 2 seeds/temperatures each, whole and streamed: the same
//     text for the same seed; n = 2), json_object, beta.chat.completions.parse (a plain
//     schema, zodResponseFormat, strict zodFunction tools), tool_choice "required" and named,
//     whole and through beta.chat.completions.stream (the same calls);
//   * LangChain.js (@langchain/openai ChatOpenAI): withStructuredOutput with method
//     "jsonSchema", "functionCalling" and its default, zod and JSON Schema, strict, a zod
//     sub-schema used twice (a "#/properties/..." $ref); bindTools with tool_choice
//     "required" / a name / an object, invoked and streamed, and after a tool result;
//   * the Vercel AI SDK (ai + @ai-sdk/openai's chat-completions model): generateObject
//     (jsonSchema, output "enum" and "array"), streamObject, generateText with
//     Output.object, generateText / streamText with tools and toolChoice "required" / a
//     named tool, two steps with a tool's result in between;
//   * a schema outside the subset ("pattern"): each client surfaces the 400.
// Checks run CPM_STRUCTURED_POOL (4) at a time; CPM_STRUCTURED_ONLY=openaiTools,aiSdk,...
// picks groups. Started by tests/e2e/router_structured.py.
// usage: node structured.mjs BASE_URL MODEL
// Prints one JSON line (what passed, how often; the failures); exits 1 on any failure.
import OpenAI from "openai";
import { zodFunction, zodResponseFormat } from "openai/helpers/zod";
import Ajv from "ajv";
import { z } from "zod";
import { ChatOpenAI } from "@langchain/openai";
import { AIMessage, HumanMessage, ToolMessage } from "@langchain/core/messages";
import { createOpenAI } from "@ai-sdk/openai";
import { generateObject, generateText, jsonSchema, Output, stepCountIs, streamObject, streamText, tool }
  from "ai";

const [baseURL, model] = process.argv.slice(2);
if (!baseURL || !model) {
  console.error("usage: node structured.mjs BASE_URL MODEL");
  process.exit(2);
}
const t0 = Date.now();
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 120000 });
const ajv = new Ajv({ allErrors: true, strict: false });

// ------------------------------------------------------------------ the oracle

const failures = [];
const passed = {};
const pass = (what) => { passed[what] = (passed[what] || 0) + 1; };
const fail = (what, msg) => {
  failures.push(`${what}: ${msg}`);
  console.error(`FAIL ${what}: ${msg}`);
};

// ajv speaks draft-07 here; a "$schema" naming another draft is only a label to it
const validators = new Map();
function validator(schema) {
  const key = JSON.stringify(schema);
  if (!validators.has(key)) {
    const { $schema, ...rest } = schema;
    validators.set(key, ajv.compile(rest));
  }
  return validators.get(key);
}

// value valid against schema, or a failure naming what and why
function valid(what, schema, value, text) {
  const v = validator(schema);
  if (v(value)) return true;
  fail(what, `invalid against its schema: ${ajv.errorsText(v.errors)}; document: ` +
             JSON.stringify(text ?? value).slice(0, 400));
  return false;
}

function parsed(what, text) {
  try {
    return { ok: true, value: JSON.parse(text) };
  } catch (e) {
    fail(what, `not JSON (${e.message}): ${JSON.stringify(text).slice(0, 400)}`);
    return { ok: false };
  }
}

// Runs one named check; an exception is its failure (the message says which client threw).
async function check(what, fn) {
  try {
    await fn();
  } catch (e) {
    const status = e?.status ?? e?.statusCode ?? e?.response?.status;
    fail(what, `threw ${e?.constructor?.name || "error"}${status ? ` (status ${status})` : ""}: ` +
               `${String(e?.message || e).slice(0, 600)}` +
               (e?.responseBody ? ` body: ${String(e.responseBody).slice(0, 300)}` : ""));
  }
}

function expect(what, cond, msg) {
  if (!cond) fail(what, msg);
  return cond;
}

// ------------------------------------------------------------------ schemas

const person = {
  type: "object",
  properties: {
    name: { type: "string", description: "full name" },
    age: { type: "integer" },
    address: {
      type: "object",
      properties: { city: { type: "string" }, zip: { type: "string" }, lat: { type: "number" } },
      required: ["city", "zip", "lat"],
      additionalProperties: false,
    },
    verified: { type: "boolean" },
  },
  required: ["name", "age", "address", "verified"],
  additionalProperties: false,
};
const ticket = {
  type: "object",
  properties: {
    priority: { type: "string", enum: ["low", "medium", "high"] },
    team: { enum: ["infra", "ml", 7, null, true] },
    kind: { const: "ticket" },
    mixed: { type: "array", items: { enum: ["a", "b"] }, maxItems: 2 },
  },
  required: ["priority", "team", "kind", "mixed"],
  additionalProperties: false,
};
const lists = {
  type: "object",
  properties: {
    tags: { type: "array", items: { type: "string" }, minItems: 1, maxItems: 3 },
    pair: { type: "array", items: { type: "number" }, minItems: 2, maxItems: 2 },
    grid: { type: "array", items: { type: "array", items: { type: "integer" }, maxItems: 2 },
            minItems: 1, maxItems: 2 },
  },
  required: ["tags", "pair", "grid"],
  additionalProperties: false,
};
const nullable = {
  type: "object",
  properties: {
    nickname: { anyOf: [{ type: "string" }, { type: "null" }] },
    count: { type: ["integer", "null"] },
    either: { anyOf: [{ type: "object", properties: { n: { type: "number" } }, required: ["n"],
                        additionalProperties: false },
                      { type: "array", items: { type: "boolean" }, maxItems: 2 }] },
    all: { allOf: [{ type: "string" }] },
  },
  required: ["nickname", "count", "either", "all"],
  additionalProperties: false,
};
const tree = {
  type: "object",
  properties: { root: { $ref: "#/$defs/node" } },
  required: ["root"],
  additionalProperties: false,
  $defs: {
    node: {
      type: "object",
      properties: {
        label: { type: "string" },
        children: { type: "array", items: { $ref: "#/$defs/node" }, maxItems: 2 },
      },
      required: ["label", "children"],
      additionalProperties: false,
    },
  },
};
const SCHEMAS = { person, ticket, lists, nullable, tree };
const rf = (name, schema) => ({ type: "json_schema", json_schema: { name, schema, strict: true } });
const ask = (text) => [{ role: "user", content: text }];

// ------------------------------------------------------------------ tools

const weatherParams = {
  type: "object",
  properties: {
    city: { type: "string", description: "the city" },
    unit: { type: "string", enum: ["celsius", "fahrenheit"] },
    days: { type: "integer" },
  },
  required: ["city", "unit", "days"],
  additionalProperties: false,
};
const searchParams = {
  type: "object",
  properties: {
    query: { type: "string" },
    limit: { anyOf: [{ type: "integer" }, { type: "null" }] },
    filters: {
      type: "object",
      properties: { site: { type: "string" }, fresh: { type: "boolean" } },
      required: ["site", "fresh"],
      additionalProperties: false,
    },
  },
  required: ["query", "limit", "filters"],
  additionalProperties: false,
};
const TOOL_PARAMS = { get_weather: weatherParams, search_web: searchParams };
const TOOLS = [
  { type: "function", function: { name: "get_weather", description: "Get the weather of a city",
                                   parameters: weatherParams, strict: true } },
  { type: "function", function: { name: "search_web", description: "Search the web",
                                   parameters: searchParams } },
];

// calls: [{name, args (object)}], allowed: names
function validCalls(what, calls, allowed) {
  if (!expect(what, calls.length >= 1, "no tool call")) return false;
  let ok = true;
  for (const c of calls) {
    if (!allowed.includes(c.name)) {
      fail(what, `call of "${c.name}", allowed: ${allowed}`);
      ok = false;
    } else {
      ok = valid(`${what} ${c.name}`, TOOL_PARAMS[c.name], c.args) && ok;
    }
  }
  return ok;
}

function openaiCalls(what, message) {
  const out = [];
  for (const c of message.tool_calls || []) {
    expect(what, c.type === "function" && typeof c.id === "string" && c.id.length > 0,
           `call type/id: ${JSON.stringify(c).slice(0, 200)}`);
    const p = parsed(`${what} ${c.function.name} arguments`, c.function.arguments);
    if (!p.ok) return null;
    out.push({ name: c.function.name, args: p.value });
  }
  return out;
}

// Every check is a task; POOL run at once (the cluster batches them: on two cores a
// constrained token costs about a third as much with several sequences in flight).
const POOL = Number(process.env.CPM_STRUCTURED_POOL || 4);
const tasks = [];
const task = (group, what, fn) => tasks.push({ group, what, fn });
const MAX_DOC = 64;    // tokens for a schema's document: over twice the shortest of each here
const MAX_CALLS = 120; // tokens for a forced call block

// ------------------------------------------------------------------ 1. the official openai client

async function streamedText(body) {
  const s = await client.chat.completions.create({ ...body, stream: true });
  let text = "", finish = null;
  for await (const chunk of s) {
    for (const c of chunk.choices) {
      text += c.delta?.content || "";
      finish = c.finish_reason || finish;
    }
  }
  return { text, finish };
}

function openaiSchemas() {
  const runs = [{ seed: 1, temperature: 1.0 }, { seed: 42, temperature: 1.3, top_p: 0.95 }];
  for (const [name, schema] of Object.entries(SCHEMAS)) {
    for (const run of runs) {
      const what = `openai create ${name} seed ${run.seed}`;
      task("openaiSchemas", what, async () => {
        const body = { model, messages: ask(`Describe a ${name}.`), max_tokens: MAX_DOC,
                       response_format: rf(name, schema), ...run };
        const r = await client.chat.completions.create(body);
        const ch = r.choices[0];
        expect(what, ch.finish_reason === "stop", `finish_reason ${ch.finish_reason}`);
        const p = parsed(what, ch.message.content);
        if (!p.ok || !valid(what, schema, p.value, ch.message.content)) return;
        pass("openai.create json_schema");
        // streamed, the same seed: the deltas make the same document
        const s = await streamedText(body);
        if (expect(`${what} streamed`, s.text === ch.message.content,
                   `streamed ${JSON.stringify(s.text).slice(0, 200)} != whole ` +
                   `${JSON.stringify(ch.message.content).slice(0, 200)}`) &&
            expect(`${what} streamed`, s.finish === "stop", `streamed finish_reason ${s.finish}`))
          pass("openai.create json_schema streamed");
      });
    }
  }
  // n = 2: each choice on its own grammar
  task("openaiSchemas", "openai create n=2", async () => {
    const r = await client.chat.completions.create({
      model, messages: ask("Two people."), max_tokens: MAX_DOC, n: 2, seed: 3, temperature: 1,
      response_format: rf("person", person) });
    expect("openai create n=2", r.choices.length === 2, `${r.choices.length} choices`);
    for (const ch of r.choices) {
      const p = parsed("openai create n=2", ch.message.content);
      if (p.ok && valid("openai create n=2", person, p.value)) pass("openai.create json_schema n=2");
    }
  });
  // json_object: one JSON object, whatever it holds (whole and streamed)
  task("openaiSchemas", "openai json_object", async () => {
    const body = { model, messages: ask("Answer in JSON."), max_tokens: 48, seed: 5,
                   temperature: 1, response_format: { type: "json_object" } };
    const r = await client.chat.completions.create(body);
    const s = await streamedText(body);
    for (const [w, text] of [["whole", r.choices[0].message.content], ["streamed", s.text]]) {
      const p = parsed(`openai json_object ${w}`, text);
      if (p.ok && expect(`openai json_object ${w}`,
                         p.value !== null && typeof p.value === "object" && !Array.isArray(p.value),
                         `not an object: ${text.slice(0, 200)}`))
        pass("openai.create json_object");
    }
  });
}

function openaiParse() {
  task("openaiParse", "openai beta.parse json_schema", async () => {
    const r = await client.beta.chat.completions.parse({
      model, messages: ask("A ticket."), max_tokens: MAX_DOC, seed: 11, temperature: 1,
      response_format: rf("ticket", ticket) });
    const m = r.choices[0].message;
    if (expect("openai beta.parse json_schema", m.parsed != null,
               `parsed is ${m.parsed}; content ${m.content}`) &&
        valid("openai beta.parse json_schema", ticket, m.parsed))
      pass("openai.beta.chat.completions.parse json_schema");
  });
  // zodResponseFormat: the schema as the client's zod helper writes it
  const Person = z.object({ name: z.string(), rsvp: z.enum(["yes", "no", "maybe"]) });
  const Event = z.object({ // Person twice: the helper writes the second as a $ref
    host: Person,
    title: z.string(),
    attendees: z.array(Person).max(2),
    room: z.number().int().nullable(),
  });
  task("openaiParse", "openai beta.parse zodResponseFormat", async () => {
    const fmt = zodResponseFormat(Event, "event");
    const r = await client.beta.chat.completions.parse({
      model, messages: ask("An event."), max_tokens: MAX_DOC, seed: 12, temperature: 1,
      response_format: fmt });
    const m = r.choices[0].message;
    if (expect("openai beta.parse zodResponseFormat", m.parsed != null, `parsed ${m.parsed}`) &&
        valid("openai beta.parse zodResponseFormat", fmt.json_schema.schema, m.parsed) &&
        expect("openai beta.parse zodResponseFormat", Event.safeParse(m.parsed).success,
               `zod refuses ${JSON.stringify(m.parsed)}`))
      pass("openai.beta.chat.completions.parse zodResponseFormat");
  });
}

// zod-checked values: the third-party schema library as a second oracle
function zodValid(what, schema, value) {
  const r = schema.safeParse(value);
  return expect(what, r.success, `zod refuses ${JSON.stringify(value).slice(0, 300)}: ` +
                String(r.error).slice(0, 300));
}

function openaiTools() {
  // strict function tools from zod (zodFunction): parse() fills parsed_arguments
  const Lookup = z.object({ city: z.string(), units: z.enum(["metric", "imperial"]),
                            hours: z.number().int().nullable() });
  task("openaiTools", "openai beta.parse zodFunction", async () => {
    const what = "openai beta.parse zodFunction";
    const r = await client.beta.chat.completions.parse({
      model, messages: ask("Weather?"), max_tokens: MAX_CALLS, seed: 25, temperature: 1,
      tools: [zodFunction({ name: "lookup", parameters: Lookup })], tool_choice: "required" });
    const ch = r.choices[0];
    expect(what, ch.finish_reason === "tool_calls", `finish_reason ${ch.finish_reason}`);
    const calls = ch.message.tool_calls || [];
    if (expect(what, calls.length >= 1 && calls.every((c) => c.function.name === "lookup"),
               `calls ${JSON.stringify(calls).slice(0, 300)}`) &&
        calls.every((c) => zodValid(what, Lookup, c.function.parsed_arguments)))
      pass("openai.beta.chat.completions.parse zodFunction");
  });

  const cases = [
    ["required", "required", ["get_weather", "search_web"], [21, 22]],
    ["named get_weather", { type: "function", function: { name: "get_weather" } }, ["get_weather"], [23]],
    ["named search_web", { type: "function", function: { name: "search_web" } }, ["search_web"], [24]],
  ];
  for (const [label, tool_choice, allowed, seeds] of cases) {
    for (const seed of seeds) {
      const what = `openai tools ${label} seed ${seed}`;
      const body = { model, messages: ask("What is the weather in Paris?"), tools: TOOLS,
                     tool_choice, max_tokens: MAX_CALLS, seed, temperature: 1 };
      task("openaiTools", what, async () => {
        const r = await client.chat.completions.create(body);
        const ch = r.choices[0];
        expect(what, ch.finish_reason === "tool_calls", `finish_reason ${ch.finish_reason}: ` +
               JSON.stringify(ch.message).slice(0, 300));
        const calls = openaiCalls(what, ch.message);
        if (!calls || !validCalls(what, calls, allowed)) return;
        if (typeof tool_choice === "object")
          expect(what, calls.length === 1, `a named tool_choice made ${calls.length} calls`);
        pass("openai.create tool_choice");
        // the stream helper rebuilds the same calls from the deltas
        const stream = client.beta.chat.completions.stream(body);
        const done = [];
        stream.on("tool_calls.function.arguments.done", (e) => done.push(e.name));
        const s = await stream.finalChatCompletion();
        const sch = s.choices[0];
        expect(`${what} streamed`, sch.finish_reason === "tool_calls",
               `streamed finish_reason ${sch.finish_reason}`);
        const scalls = openaiCalls(`${what} streamed`, sch.message);
        if (!scalls || !validCalls(`${what} streamed`, scalls, allowed)) return;
        if (expect(`${what} streamed`, JSON.stringify(scalls) === JSON.stringify(calls),
                   `streamed calls ${JSON.stringify(scalls)} != whole ${JSON.stringify(calls)}`) &&
            expect(`${what} streamed`, JSON.stringify(done) === JSON.stringify(calls.map((c) => c.name)),
                   `arguments.done events ${done}`))
          pass("openai.beta.chat.completions.stream tool_choice");
      });
    }
  }
}

// ------------------------------------------------------------------ 2. LangChain.js

function langchain(opts = {}) {
  return new ChatOpenAI({ model, apiKey: "x", configuration: { baseURL }, temperature: 1,
                          maxTokens: MAX_CALLS, maxRetries: 0, ...opts });
}

function langchainStructured() {
  const Recipe = z.object({
    dish: z.string().describe("the dish"),
    servings: z.number().int(),
    vegetarian: z.boolean(),
    steps: z.array(z.string()).min(1).max(2),
    course: z.enum(["starter", "main", "dessert"]),
  });
  // method jsonSchema (response_format json_schema), functionCalling (a named tool) and the
  // default, each with a zod schema and a JSON Schema
  const methods = [["jsonSchema", Recipe, "zod"], ["jsonSchema", person, "json"],
                   ["functionCalling", Recipe, "zod"], ["functionCalling", lists, "json"],
                   [undefined, Recipe, "zod"], [undefined, tree, "json"]];
  for (const [method, schema, kind] of methods) {
    const what = `langchain withStructuredOutput ${method || "default"} ${kind}`;
    task("langchain", what, async () => {
      const opts = { name: kind === "zod" ? "recipe" : "answer", includeRaw: true };
      if (method) opts.method = method;
      const llm = langchain().withStructuredOutput(schema, opts);
      const out = await llm.invoke("Give me the answer.", { seed: 31 });
      expect(what, out.parsingError == null, `parsing error: ${out.parsingError}; raw ` +
             JSON.stringify(out.raw?.content ?? out.raw).slice(0, 300));
      const value = out.parsed;
      if (!expect(what, value != null, `parsed ${value}`)) return;
      if (kind === "zod") {
        const r = schema.safeParse(value);
        if (!expect(what, r.success, `zod refuses ${JSON.stringify(value)}: ${r.error}`)) return;
      } else if (!valid(what, schema, value)) return;
      pass(`langchain.withStructuredOutput ${method || "default"}`);
    });
  }
  // a zod sub-schema used twice: LangChain's converter writes the second as
  // {"$ref": "#/properties/home"}, a local pointer the server must follow (it was a 400)
  const Address = z.object({ city: z.string(), zip: z.string() });
  const Move = z.object({ home: Address, work: Address, floors: z.array(z.number().int()).max(2) });
  for (const method of ["functionCalling", "jsonSchema"]) {
    const what = `langchain withStructuredOutput ${method} reused sub-schema`;
    task("langchain", what, async () => {
      const out = await langchain().withStructuredOutput(Move, { name: "move", method })
        .invoke("A move.", { seed: 35 });
      if (zodValid(what, Move, out)) pass(`langchain.withStructuredOutput ${method} $ref`);
    });
  }
  // strict: true (json_schema.strict, or tools[].function.strict with parallel_tool_calls)
  for (const method of ["jsonSchema", "functionCalling"]) {
    const what = `langchain withStructuredOutput ${method} strict`;
    task("langchain", what, async () => {
      const out = await langchain().withStructuredOutput(Recipe, { name: "recipe", method, strict: true })
        .invoke("A recipe.", { seed: 33 });
      if (zodValid(what, Recipe, out)) pass(`langchain.withStructuredOutput ${method} strict`);
    });
  }
  // a conversation that already holds a call and its result: the next call is forced too
  task("langchain", "langchain bindTools after a tool result", async () => {
    const what = "langchain bindTools after a tool result";
    const msg = await langchain().bindTools(TOOLS, { tool_choice: "required", strict: true, seed: 34 })
      .invoke([new HumanMessage("Weather in Paris, then search it."),
               new AIMessage({ content: "", tool_calls: [{ id: "call_1", name: "get_weather",
                 args: { city: "Paris", unit: "celsius", days: 1 } }] }),
               new ToolMessage({ content: "sunny, 21 C", tool_call_id: "call_1" })]);
    const calls = (msg.tool_calls || []).map((c) => ({ name: c.name, args: c.args }));
    if (validCalls(what, calls, ["get_weather", "search_web"])) pass("langchain.bindTools multi-turn");
  });
  // bindTools: the model must call, and the args validate; streamed chunks make the same calls
  const cases = [["required", "required", ["get_weather", "search_web"]],
                 ["named", "search_web", ["search_web"]],
                 ["named object", { type: "function", function: { name: "get_weather" } }, ["get_weather"]]];
  for (const [label, tool_choice, allowed] of cases) {
    const what = `langchain bindTools ${label}`;
    task("langchain", what, async () => {
      const llm = langchain().bindTools(TOOLS, { tool_choice, seed: 32 });
      const msg = await llm.invoke("What is the weather in Paris?");
      expect(what, (msg.invalid_tool_calls || []).length === 0,
             `invalid_tool_calls ${JSON.stringify(msg.invalid_tool_calls).slice(0, 300)}`);
      const calls = (msg.tool_calls || []).map((c) => ({ name: c.name, args: c.args }));
      if (!validCalls(what, calls, allowed)) return;
      pass("langchain.bindTools tool_choice");
      let acc;
      for await (const chunk of await llm.stream("What is the weather in Paris?"))
        acc = acc ? acc.concat(chunk) : chunk;
      const scalls = (acc?.tool_calls || []).map((c) => ({ name: c.name, args: c.args }));
      if (validCalls(`${what} streamed`, scalls, allowed) &&
          expect(`${what} streamed`, JSON.stringify(scalls) === JSON.stringify(calls),
                 `streamed ${JSON.stringify(scalls)} != whole ${JSON.stringify(calls)}`))
        pass("langchain.bindTools tool_choice streamed");
    });
  }
}

// ------------------------------------------------------------------ 3. the Vercel AI SDK

function aiSdk() {
  const chat = () => createOpenAI({ baseURL, apiKey: "x" }).chat(model);
  for (const [name, schema] of [["person", person], ["nullable", nullable], ["tree", tree]]) {
    const what = `ai-sdk generateObject ${name}`;
    task("aiSdk", what, async () => {
      const r = await generateObject({ model: chat(), schema: jsonSchema(schema), schemaName: name,
                                       prompt: `Describe a ${name}.`, maxOutputTokens: MAX_DOC,
                                       temperature: 1, seed: 41, maxRetries: 0 });
      expect(what, r.finishReason === "stop", `finishReason ${r.finishReason}`);
      if (valid(what, schema, r.object)) pass("ai-sdk.generateObject");
    });
  }
  task("aiSdk", "ai-sdk streamObject lists", async () => {
    let error;
    const r = streamObject({ model: chat(), schema: jsonSchema(lists), schemaName: "lists",
                             prompt: "Some lists.", maxOutputTokens: MAX_DOC, temperature: 1,
                             seed: 42, maxRetries: 0, onError: (e) => { error = e.error; } });
    for await (const _ of r.partialObjectStream) { /* drained */ }
    if (error) throw error;
    if (valid("ai-sdk streamObject lists", lists, await r.object)) pass("ai-sdk.streamObject");
  });
  // the SDK's own output modes: an enum, an array (its schema wraps the item), zod schemas
  task("aiSdk", "ai-sdk generateObject enum", async () => {
    const colors = ["red", "green", "blue"];
    const r = await generateObject({ model: chat(), output: "enum", enum: colors, prompt: "A color.",
                                     maxOutputTokens: MAX_DOC, temperature: 1, seed: 43, maxRetries: 0 });
    if (expect("ai-sdk generateObject enum", colors.includes(r.object), `got ${JSON.stringify(r.object)}`))
      pass("ai-sdk.generateObject enum");
  });
  const Item = z.object({ sku: z.string(), qty: z.number().int(), gift: z.boolean().optional(),
                          note: z.string().nullable() });
  task("aiSdk", "ai-sdk generateObject array", async () => {
    const r = await generateObject({ model: chat(), output: "array", schema: Item, prompt: "Items.",
                                     maxOutputTokens: 2 * MAX_DOC, temperature: 1, seed: 44, maxRetries: 0 });
    if (zodValid("ai-sdk generateObject array", z.array(Item), r.object)) pass("ai-sdk.generateObject array");
  });
  task("aiSdk", "ai-sdk generateText Output.object", async () => {
    const r = await generateText({ model: chat(), output: Output.object({ schema: Item }), prompt: "An item.",
                                   maxOutputTokens: MAX_DOC, temperature: 1, seed: 45, maxRetries: 0 });
    if (zodValid("ai-sdk generateText Output.object", Item, r.output)) pass("ai-sdk.generateText Output.object");
  });
  // two steps: a forced call, its result sent back as a tool message, a forced call again
  task("aiSdk", "ai-sdk generateText two steps", async () => {
    const what = "ai-sdk generateText two steps";
    let ran = 0;
    const r = await generateText({
      model: chat(), toolChoice: "required", stopWhen: stepCountIs(2), prompt: "Weather in Paris?",
      maxOutputTokens: MAX_CALLS, temperature: 1, seed: 46, maxRetries: 0,
      tools: { get_weather: tool({ description: "Get the weather of a city",
                                   inputSchema: z.object({ city: z.string(), days: z.number().int() }),
                                   execute: async () => { ran++; return { temp: 21 }; } }) } });
    const calls = r.steps.flatMap((st) => st.toolCalls);
    // "required" lets a step make several calls: each is run, each step has one at least
    if (expect(what, r.steps.length === 2 && r.steps.every((st) => st.toolCalls.length >= 1) &&
                     ran === calls.length, `${r.steps.length} steps, ${ran} runs, ${calls.length} calls`) &&
        calls.every((c) => !c.invalid && zodValid(what, z.object({ city: z.string(), days: z.number().int() }),
                                                  c.input)))
      pass("ai-sdk.generateText multi-step");
  });
  const tools = {
    get_weather: tool({ description: "Get the weather of a city", inputSchema: jsonSchema(weatherParams) }),
    search_web: tool({ description: "Search the web", inputSchema: jsonSchema(searchParams) }),
  };
  const cases = [["required", "required", ["get_weather", "search_web"]],
                 ["named", { type: "tool", toolName: "search_web" }, ["search_web"]]];
  for (const [label, toolChoice, allowed] of cases) {
    const what = `ai-sdk tools ${label}`;
    const args = { model: chat(), tools, toolChoice, prompt: "Weather in Paris?",
                   maxOutputTokens: MAX_CALLS, temperature: 1, seed: 51, maxRetries: 0 };
    task("aiSdk", `${what} generateText`, async () => {
      const r = await generateText(args);
      expect(what, r.finishReason === "tool-calls", `finishReason ${r.finishReason}`);
      expect(what, !r.toolCalls.some((c) => c.invalid),
             `invalid calls: ${JSON.stringify(r.toolCalls).slice(0, 300)}`);
      const calls = r.toolCalls.map((c) => ({ name: c.toolName, args: c.input }));
      if (validCalls(`${what} generateText`, calls, allowed)) pass("ai-sdk.generateText toolChoice");
    });
    task("aiSdk", `${what} streamText`, async () => {
      let error;
      const r = streamText({ ...args, onError: (e) => { error = e.error; } });
      for await (const _ of r.fullStream) { /* drained */ }
      if (error) throw error;
      const calls = (await r.toolCalls).map((c) => ({ name: c.toolName, args: c.input }));
      expect(`${what} streamText`, (await r.finishReason) === "tool-calls",
             `finishReason ${await r.finishReason}`);
      if (validCalls(`${what} streamText`, calls, allowed)) pass("ai-sdk.streamText toolChoice");
    });
  }
}

// ------------------------------------------------------------------ 4. outside the subset: a 400

const patterned = { type: "object", properties: { code: { type: "string", pattern: "^[A-Z]{3}$" } },
                    required: ["code"], additionalProperties: false };

function refused() {
  const status = (e) => e?.status ?? e?.statusCode ?? e?.response?.status ?? e?.lastError?.statusCode ??
                        e?.cause?.statusCode;
  const expect400 = (what, fn) => task("refused", what, async () => {
    try {
      const r = await fn();
      fail(what, `a schema with "pattern" was answered: ${JSON.stringify(r).slice(0, 300)}`);
    } catch (e) {
      if (expect(what, status(e) === 400 && /pattern/.test(String(e.message) + (e.responseBody || "")),
                 `expected a 400 naming "pattern", got ${e?.constructor?.name} status ${status(e)}: ` +
                 String(e?.message).slice(0, 300)))
        pass("400 for a schema outside the subset");
    }
  });
  expect400("openai 400", () => client.chat.completions.create({
    model, messages: ask("A code."), max_tokens: 40, response_format: rf("code", patterned) }));
  expect400("openai tools 400", () => client.chat.completions.create({
    model, messages: ask("A code."), max_tokens: 40, tool_choice: "required",
    tools: [{ type: "function", function: { name: "send", parameters: patterned } }] }));
  expect400("langchain 400", () => langchain().withStructuredOutput(patterned,
    { name: "code", method: "jsonSchema" }).invoke("A code."));
  expect400("ai-sdk 400", () => generateObject({
    model: createOpenAI({ baseURL, apiKey: "x" }).chat(model), schema: jsonSchema(patterned),
    prompt: "A code.", maxOutputTokens: 40, maxRetries: 0 }));
}

// ------------------------------------------------------------------ run

const only = (process.env.CPM_STRUCTURED_ONLY || "").split(",").filter(Boolean);
for (const add of [openaiSchemas, openaiParse, openaiTools, langchainStructured, aiSdk, refused])
  add();
const todo = tasks.filter((t) => !only.length || only.includes(t.group));
const took = {};
await Promise.all(Array.from({ length: POOL }, async () => {
  for (let t; (t = todo.shift());) {
    const t1 = Date.now();
    await check(t.what, t.fn);
    took[t.group] = (took[t.group] || 0) + (Date.now() - t1) / 1000;
  }
}));
console.log(JSON.stringify({ ok: failures.length === 0, model, seconds: (Date.now() - t0) / 1000,
                             passed, failures, busy_seconds: took }));
process.exit(failures.length ? 1 : 0);
