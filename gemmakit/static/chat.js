// The chat page of `gemmakit serve`: a multi-turn conversation streamed from
// /v1/chat/completions (server-sent events read with fetch, so the API key can travel in a
// header, which EventSource cannot send). Text is only ever inserted as textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // the conversation sent with each request: {role, content}
let modelName = null;
let controller = null; // aborts the reply being streamed
let conversation = 0; // bumped by Clear, so a reply cut short by it is not recorded

function setStatus(text) {
  $("status").textContent = text;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      $("model").textContent = "(API key needed)";
      $("settings").open = true;
      setStatus("This server needs an API key: enter it under Settings.");
      return;
    }
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    modelName = body.data[0].id;
    $("model").textContent = modelName;
    document.title = `${modelName} · gemmakit chat`;
    setStatus("");
  } catch (e) {
    $("model").textContent = "(unavailable)";
    setStatus(`Cannot reach the server: ${e.message || e}`);
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(body);
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// Yields the data of each server-sent event; events end with a blank line.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let match;
    while ((match = /\r\n\r\n|\n\n|\r\r/.exec(buffer))) {
      const event = buffer.slice(0, match.index);
      buffer = buffer.slice(match.index + match[0].length);
      const data = event
        .split(/\r\n|\n|\r/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = {
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
  if (modelName) body.model = modelName;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

async function send(text) {
  const turnOf = conversation;
  history.push({ role: "user", content: text });
  const userDiv = addMessage("user", text);
  const bubble = addMessage("assistant", "");
  const textSpan = bubble.querySelector(".text");
  bubble.dataset.state = "streaming";
  bubble.dataset.deltas = "0";
  controller = new AbortController();
  setBusy(true);
  setStatus("");
  const started = performance.now();
  let reply = "";
  let usage = null;
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        textSpan.textContent = reply;
        bubble.dataset.deltas = String(Number(bubble.dataset.deltas) + 1);
        bubble.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    bubble.dataset.state = "done";
    if (usage) {
      const seconds = (performance.now() - started) / 1000;
      const stats = document.createElement("span");
      stats.className = "stats";
      const rate = usage.completion_tokens / seconds;
      stats.textContent = `${usage.completion_tokens} tokens in ${seconds.toFixed(1)} s (${rate.toFixed(1)} tokens/s), finish: ${finish}`;
      bubble.append(stats);
    }
  } catch (e) {
    if (e.name === "AbortError") {
      bubble.dataset.state = "stopped";
    } else {
      bubble.dataset.state = "error";
      bubble.classList.add("error");
      textSpan.textContent = (reply ? reply + "\n" : "") + `Error: ${e.message || e}`;
    }
  } finally {
    controller = null;
    setBusy(false);
    if (turnOf !== conversation) {
      // cleared meanwhile: the history this turn belonged to is gone
    } else if (reply) {
      history.push({ role: "assistant", content: reply });
    } else if (history.length && history[history.length - 1].role === "user") {
      // Nothing came back: drop the turn so that roles keep alternating.
      history.pop();
      userDiv.title = "not answered; not part of the conversation";
      userDiv.classList.add("unanswered");
      if (bubble.dataset.state === "stopped") bubble.remove();
    }
  }
}

function clearConversation() {
  conversation += 1;
  if (controller) controller.abort();
  history.length = 0;
  $("log").replaceChildren();
  setStatus("Conversation cleared.");
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", clearConversation);
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("gemmakit-api-key", $("api-key").value);
    loadModel();
  });
  $("api-key").value = sessionStorage.getItem("gemmakit-api-key") || "";
  loadModel();
});
