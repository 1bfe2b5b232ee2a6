// The teaching page: every action is a call to the JSON API under /api (see docs/teach.md).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { skills: [], skill: "", losses: [], followed: new Set(), lastPrompt: "" };

// The API key, when the server has one, comes in the URL after "#key=" (never sent to the server by the
// browser) and is kept for this tab only.
(function takeKey() {
  const m = location.hash.match(/key=([^&]+)/);
  if (m) { sessionStorage.setItem("rllama-key", decodeURIComponent(m[1])); history.replaceState(null, "", location.pathname); }
})();

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = sessionStorage.getItem("rllama-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(method, path, body) {
  // every POST, PUT and PATCH is JSON, even without a body: the server refuses any other (no other page can
  // send one without the browser asking the server first)
  if (body === undefined && method !== "GET" && method !== "DELETE") body = {};
  const response = await fetch(path, { method, headers: headers(body !== undefined),
                                       body: body !== undefined ? JSON.stringify(body) : undefined });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = { error: { message: text } }; }
  if (!response.ok) throw new Error((data && data.error && data.error.message) || response.statusText);
  return data;
}

// Server-sent events read from a fetch response (fetch, unlike EventSource, can send the key).
async function readEvents(response, onEvent) {
  if (!response.ok) {
    const data = await response.json().catch(() => null);
    throw new Error((data && data.error && data.error.message) || response.statusText);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let kind = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(kind, JSON.parse(data));
    }
  }
}

function showError(message) { $("error").textContent = message || ""; }

async function guarded(fn) {
  showError("");
  try { await fn(); } catch (e) { showError(e.message); }
}

// ---------------------------------------------------------------------- skills
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
const describe = (s) => `${s.name} (${plural(s.examples, "example")}, ${plural(s.steps, "step")})`;

async function refreshSkills(select) {
  const data = await api("GET", "/api/skills");
  state.skills = data.skills;
  const menu = $("skill-select");
  const current = select !== undefined ? select : state.skill;
  menu.innerHTML = '<option value="">base model (no skill)</option>';
  for (const s of state.skills) {
    const o = document.createElement("option");
    o.value = s.name;
    o.textContent = describe(s);
    menu.appendChild(o);
  }
  menu.value = state.skills.some((s) => s.name === current) ? current : "";
  await selectSkill(menu.value);
}

async function selectSkill(name) {
  state.skill = name;
  $("chat-skill").textContent = name ? `answering with skill “${name}”` : "answering with the base model";
  for (const id of ["rename-skill", "delete-skill", "save-skill", "learn", "add-example"]) $(id).disabled = !name;
  await refreshExamples();
  const skill = state.skills.find((s) => s.name === name);
  if (skill) for (const job of skill.learning) followJob(job);
}

async function refreshExamples() {
  const list = $("examples");
  list.innerHTML = "";
  if (!state.skill) { $("example-count").textContent = "(pick or create a skill)"; return; }
  const { examples } = await api("GET", `/api/skills/${state.skill}/examples`);
  $("example-count").textContent = `(${examples.length})`;
  examples.forEach((ex, i) => list.appendChild(exampleRow(ex, i, examples)));
}

function exampleRow(ex, i, all) {
  const row = document.createElement("div");
  row.className = "example";
  const prompt = document.createElement("textarea");
  const response = document.createElement("textarea");
  prompt.value = ex.prompt; response.value = ex.response;
  prompt.className = "example-prompt"; response.className = "example-response";
  const remove = document.createElement("button");
  remove.textContent = "✕"; remove.title = "Remove this example"; remove.className = "remove-example";
  const save = () => guarded(async () => {
    all[i] = { prompt: prompt.value, response: response.value };
    await api("PUT", `/api/skills/${state.skill}/examples`, { examples: all });
    await refreshSkillsQuietly();
  });
  prompt.addEventListener("change", save);
  response.addEventListener("change", save);
  remove.addEventListener("click", () => guarded(async () => {
    all.splice(i, 1);
    await api("PUT", `/api/skills/${state.skill}/examples`, { examples: all });
    await refreshExamples();
    await refreshSkillsQuietly();
  }));
  row.append(prompt, response, remove);
  return row;
}

async function refreshSkillsQuietly() {
  const data = await api("GET", "/api/skills");
  state.skills = data.skills;
  for (const o of $("skill-select").options) {
    const s = state.skills.find((x) => x.name === o.value);
    if (s) o.textContent = describe(s);
  }
}

async function addExample(prompt, response) {
  if (!state.skill) throw new Error("pick or create a skill first: examples belong to a skill");
  await api("POST", `/api/skills/${state.skill}/examples`, { prompt, response });
  await refreshExamples();
  await refreshSkillsQuietly();
}

// ---------------------------------------------------------------------- chat
function message(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : (state.skill || "base model");
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

async function send(prompt) {
  state.lastPrompt = prompt;
  message("user", prompt);
  const skill = state.skill || null;
  const reply = message("assistant", "");
  reply.classList.add("streaming");
  const text = reply.querySelector(".text");
  let base = null;
  if ($("compare").checked && skill) {
    reply.querySelector(".who").textContent = `${skill} | base model`;
    const pair = document.createElement("div");
    pair.className = "pair";
    base = document.createElement("span");
    base.className = "base-text";
    base.textContent = "…";
    text.remove();
    pair.append(text, base);
    reply.appendChild(pair);
    api("POST", "/api/chat", { prompt, skill: null }).then((d) => { base.textContent = d.reply; })
      .catch((e) => { base.textContent = "(" + e.message + ")"; });
  }
  const response = await fetch("/api/chat", { method: "POST", headers: headers(true),
                                              body: JSON.stringify({ prompt, skill, stream: true }) });
  let final = "";
  await readEvents(response, (kind, data) => {
    if (kind === "token") { text.textContent += data.text; $("messages").scrollTop = $("messages").scrollHeight; }
    else if (kind === "done") final = data.reply;
    else if (kind === "error") throw new Error(data.message);
  });
  text.textContent = final;
  reply.classList.remove("streaming");
  reply.classList.add("done");
  reply.dataset.prompt = prompt;
  addReplyActions(reply, prompt, text);
}

function addReplyActions(reply, prompt, text) {
  const actions = document.createElement("div");
  actions.className = "actions";
  const correct = document.createElement("button");
  correct.textContent = "Correct"; correct.className = "correct";
  const approve = document.createElement("button");
  approve.textContent = "Approve"; approve.className = "approve";
  correct.addEventListener("click", () => {
    if (reply.querySelector(".correction")) return;
    const box = document.createElement("div");
    box.className = "correction";
    const edit = document.createElement("textarea");
    edit.rows = 2;
    edit.value = text.textContent;
    const save = document.createElement("button");
    save.textContent = "Save correction"; save.className = "save-correction";
    save.addEventListener("click", () => guarded(async () => {
      await addExample(prompt, edit.value);
      text.textContent = edit.value;
      box.remove();
      reply.classList.add("approved");
    }));
    box.append(edit, save);
    reply.appendChild(box);
    box.scrollIntoView({ block: "nearest" });
    edit.focus();
  });
  approve.addEventListener("click", () => guarded(async () => {
    await addExample(prompt, text.textContent);
    reply.classList.add("approved");
  }));
  actions.append(correct, approve);
  reply.appendChild(actions);
}

// ---------------------------------------------------------------------- learning
function drawLosses() {
  const canvas = $("loss-chart");
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  g.clearRect(0, 0, w, h);
  g.fillStyle = "#667085";
  g.font = "11px system-ui";
  g.textAlign = "right";
  g.fillText("loss per step", w - 6, 14);
  g.textAlign = "left";
  const ys = state.losses;
  if (!ys.length) {
    g.textAlign = "center";
    g.fillText("press Learn: the loss of each step is drawn here", w / 2, h / 2);
    g.textAlign = "left";
    return;
  }
  const top = Math.max(...ys), bottom = Math.min(0, ...ys);
  const x = (i) => pad + (w - 2 * pad) * (ys.length === 1 ? 0.5 : i / (ys.length - 1));
  const y = (v) => h - pad + (pad + 8 - h) * (v - bottom) / ((top - bottom) || 1);
  g.strokeStyle = "#d9dee7";
  g.beginPath(); g.moveTo(pad, h - pad); g.lineTo(w - pad, h - pad); g.stroke();
  g.fillText(top.toFixed(2), 2, y(top) + 10);
  g.fillText(bottom.toFixed(2), 2, y(bottom));
  g.strokeStyle = "#3b5bdb"; g.lineWidth = 2;
  g.beginPath();
  ys.forEach((v, i) => (i ? g.lineTo(x(i), y(v)) : g.moveTo(x(i), y(v))));
  g.stroke();
}

async function learn() {
  if (!state.skill) throw new Error("pick a skill to learn");
  const body = state.lastPrompt ? { probe: state.lastPrompt } : {};
  const job = await api("POST", `/api/skills/${state.skill}/learn`, body);
  await followJob(job.id);
}

async function followJob(jobId) {
  if (state.followed.has(jobId)) return;
  state.followed.add(jobId);
  state.losses = [];
  drawLosses();
  $("learn").disabled = true;
  $("learn-status").textContent = "queued…";
  try {
    const response = await fetch(`/api/jobs/${jobId}/events`, { headers: headers(false) });
    await readEvents(response, (kind, data) => {
      if (kind === "queued") $("learn-status").textContent = data.position ? `queued behind ${data.position} learn(s)…` : "starting…";
      if (kind === "started") $("learn-status").textContent = `learning on ${data.examples} examples, ${data.epochs} epochs…`;
      if (kind === "before") { $("before-after").hidden = false; $("before").textContent = data.reply; $("after").textContent = "…"; }
      if (kind === "step") {
        state.losses.push(data.loss);
        drawLosses();
        $("learn-status").textContent = `step ${data.step}, loss ${data.loss.toFixed(3)}`;
      }
      if (kind === "done") {
        $("before-after").hidden = false;
        $("before").textContent = data.before;
        $("after").textContent = data.after;
        $("learn-status").textContent = `learned: ${data.steps} steps in ${data.seconds.toFixed(1)} s`;
        $("learn-status").dataset.state = "done";
      }
      if (kind === "failed") { $("learn-status").textContent = "failed"; showError(data.message); }
    });
  } finally {
    $("learn").disabled = !state.skill;
    await refreshSkillsQuietly().catch(() => {});
  }
}

// ---------------------------------------------------------------------- wiring
$("chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) return;
  $("prompt").value = "";
  guarded(() => send(prompt));
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
});
$("skill-select").addEventListener("change", (e) => guarded(() => selectSkill(e.target.value)));
$("new-skill").addEventListener("click", () => guarded(async () => {
  const name = prompt("Name of the new skill (letters, digits, _ or -):");
  if (!name) return;
  await api("POST", "/api/skills", { name });
  await refreshSkills(name);
}));
$("rename-skill").addEventListener("click", () => guarded(async () => {
  const name = prompt(`Rename “${state.skill}” to:`, state.skill);
  if (!name || name === state.skill) return;
  await api("PATCH", `/api/skills/${state.skill}`, { name });
  await refreshSkills(name);
}));
$("delete-skill").addEventListener("click", () => guarded(async () => {
  if (!confirm(`Delete skill “${state.skill}”, its adapter and its examples?`)) return;
  await api("DELETE", `/api/skills/${state.skill}`);
  await refreshSkills("");
}));
$("save-skill").addEventListener("click", () => guarded(async () => {
  const saved = await api("POST", `/api/skills/${state.skill}/save`);
  $("learn-status").textContent = `saved to ${saved.folder}`;
}));
$("load-skill").addEventListener("click", () => guarded(async () => {
  const path = prompt("Folder of a saved skill (skill.json) or a PEFT adapter:");
  if (!path) return;
  const skill = await api("POST", "/api/skills/load", { path });
  await refreshSkills(skill.name);
}));
$("add-example").addEventListener("click", () => guarded(async () => {
  const p = prompt("Prompt:");
  if (!p) return;
  const r = window.prompt("The reply it should give:");
  if (!r) return;
  await addExample(p, r);
}));
$("export").addEventListener("click", (e) => {
  e.preventDefault();
  guarded(async () => {
    if (!state.skill) throw new Error("pick a skill to export");
    const response = await fetch(`/api/skills/${state.skill}/examples.jsonl`, { headers: headers(false) });
    if (!response.ok) throw new Error(response.statusText);
    const url = URL.createObjectURL(await response.blob());
    const a = document.createElement("a");
    a.href = url; a.download = `${state.skill}.jsonl`; a.click();
    URL.revokeObjectURL(url);
  });
});
$("learn").addEventListener("click", () => guarded(learn));

drawLosses();
guarded(async () => {
  const info = await api("GET", "/api/info");
  $("model-info").textContent = `${info.model} · chat on ${info.engine} · skills in ${info.folder}`;
  await refreshSkills(state.skills.length ? state.skills[0].name : "");
  const first = state.skills[0];
  if (first) { $("skill-select").value = first.name; await selectSkill(first.name); }
  document.body.dataset.ready = "1";
});
