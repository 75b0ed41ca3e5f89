// Structured output and tool calls with the official npm `openai` client, unchanged:
// `chat.completions.parse` with `zodResponseFormat` and with a `zodFunction` tool. Run by
// openai_client.rs with the server's base URL and model id; prints one line per check and
// exits non-zero on the first failure.
import OpenAI from "openai";
import { zodFunction, zodResponseFormat } from "openai/helpers/zod";
import { z } from "zod";

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 120000 });

const Ticket = z.object({
  category: z.enum(["billing", "delivery", "account", "other"]),
  urgent: z.boolean(),
  order_ids: z.array(z.number().int()),
  customer: z.object({ name: z.string(), city: z.string() }),
});
const r = await client.chat.completions.parse({
  model,
  messages: [{ role: "user", content: "주문 1024번이 아직 안 왔어요. 급해요! 부산의 김서연입니다. Classify this ticket." }],
  response_format: zodResponseFormat(Ticket, "ticket"),
  temperature: 0.7,
  seed: 3,
  max_tokens: 150,
});
const ticket = r.choices[0].message.parsed;
Ticket.parse(ticket);
if (r.choices[0].finish_reason !== "stop") throw new Error(`finish ${r.choices[0].finish_reason}`);
console.log("zod parse ok", JSON.stringify(ticket));

const GetWeather = z.object({ city: z.string(), unit: z.enum(["celsius", "fahrenheit"]) });
const r2 = await client.chat.completions.parse({
  model,
  messages: [{ role: "user", content: "What's the weather in Seoul, in celsius?" }],
  tools: [zodFunction({ name: "get_weather", parameters: GetWeather })],
  tool_choice: "required",
  temperature: 0,
  max_tokens: 120,
});
const call = r2.choices[0].message.tool_calls[0];
if (r2.choices[0].finish_reason !== "tool_calls") throw new Error(`finish ${r2.choices[0].finish_reason}`);
if (call.function.name !== "get_weather") throw new Error(`called ${call.function.name}`);
GetWeather.parse(call.function.parsed_arguments);
console.log("zod tool ok", call.function.arguments);
console.log("ALL OK");
