// The fleet page's live half: the server renders the panel (GET /fleet/panel), this keeps it
// fresh, sends the buttons to the admin API (docs/fleet-control.md) and runs the playground.
const $ = id => document.getElementById(id);
const KEY = "cortex-admin-key";
const adminKey = () => sessionStorage.getItem(KEY) || "";
const auth = key => key ? {Authorization: "Bearer " + key} : {};
const notice = text => { $("notice").textContent = text; };

async function refresh() {
  const target = $("target") ? $("target").value : "";
  try {
    const response = await fetch("/fleet/panel", {headers: auth(adminKey())});
    if (response.status === 401 || response.status === 403) {
      notice("this gateway needs an admin key: enter it above");
      return;
    }
    $("panel").innerHTML = await response.text();
    if ($("target")) $("target").value = target;
    models();
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    $("updated").textContent = "gateway unreachable: " + e;
  }
}

function models() {  // the playground offers the chat models, the one chosen kept
  const select = $("chat-model"), chosen = select.value;
  const chat = [...document.querySelectorAll("tr[data-kind=chat]")].map(r => r.dataset.model);
  select.innerHTML = chat.map(m => `<option>${m.replace(/[&<>"]/g, "")}</option>`).join("");
  if (chat.includes(chosen)) select.value = chosen;
}

async function failure(response) {
  try { return (await response.json()).error.message; } catch { return response.statusText; }
}

async function load(model) {  // the admin API streams NDJSON progress lines, the last ready or failed
  const neuron = $("target").value;
  const response = await fetch(`/admin/models/${encodeURIComponent(model)}/load`, {
    method: "POST", headers: {...auth(adminKey()), "Content-Type": "application/json"},
    body: JSON.stringify(neuron ? {neuron} : {}),
  });
  if (!response.ok) return notice(`load ${model}: ${await failure(response)}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", last = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += value;
    const lines = buffer.split("\n"); buffer = lines.pop();
    for (const line of lines.filter(l => l.trim())) {
      last = JSON.parse(line);
      const cell = document.querySelector(`tr[data-model="${CSS.escape(model)}"] td.state`);
      if (cell && last.state === "loading")
        cell.innerHTML = `<span class="status loading">loading ${Math.round(100 * last.progress)}%</span>`;
    }
  }
  notice(last && last.state === "failed" ? `load ${model} failed: ${last.error}`
                                         : `${model} ready on ${last ? last.neuron : "?"}`);
}

async function act(button) {
  const {action, model, neuron} = button.dataset;
  notice(`${action} ${model || neuron}…`);
  if (action === "load") return load(model);
  let path, body = null;
  if (model) {
    path = `/admin/models/${encodeURIComponent(model)}/${action}`;
    const row = button.closest("tr"), target = $("target").value;
    const held = row.dataset.locations ? row.dataset.locations.split(",") : [];
    const first = document.querySelector("[data-neuron]");
    const where = target || held[0] || (first ? first.dataset.neuron : "");
    if (action === "unload") body = target ? {neuron: target} : {};
    else body = {neuron: where};  // pin and unpin name a neuron
  } else {
    path = `/admin/neurons/${encodeURIComponent(neuron)}/${action}`;
  }
  const response = await fetch(path, {
    method: "POST", headers: {...auth(adminKey()), "Content-Type": "application/json"},
    body: body ? JSON.stringify(body) : undefined,
  });
  notice(response.ok ? `${action} ${model || neuron}: done`
                     : `${action} ${model || neuron}: ${await failure(response)}`);
}

async function chat(event) {  // one streamed chat completion through /v1/chat/completions
  event.preventDefault();
  const answer = $("answer"), key = $("api-key").value || adminKey();
  answer.textContent = "";
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: {...auth(key), "Content-Type": "application/json"},
    body: JSON.stringify({model: $("chat-model").value, stream: true, max_tokens: 200,
                          messages: [{role: "user", content: $("prompt").value}]}),
  });
  if (!response.ok) { answer.textContent = "error: " + await failure(response); return; }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += value;
    const events = buffer.split("\n\n"); buffer = events.pop();
    for (const data of events.map(e => e.replace(/^data: /, "").trim())) {
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) { answer.textContent += "\nerror: " + chunk.error.message; continue; }
      answer.textContent += (chunk.choices[0] && chunk.choices[0].delta.content) || "";
    }
  }
  answer.dataset.done = "true";
}

$("signin").addEventListener("submit", event => {  // with JS the key stays in this tab only
  event.preventDefault();
  sessionStorage.setItem(KEY, $("admin-key").value);
  $("admin-key").value = "";
  notice("admin key set for this tab"); refresh();
});
document.addEventListener("click", event => {
  const button = event.target.closest("button[data-action]");
  if (button) act(button).then(refresh, e => notice(String(e)));
});
$("chat").addEventListener("submit", event => chat(event).catch(e => {
  $("answer").textContent = "error: " + e;
}));
models(); refresh(); setInterval(refresh, 2000);
