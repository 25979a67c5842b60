// The page of `starflow serve`: submit jobs, follow their progress (server-sent events), show images and videos.
// Plain browser JavaScript, no build step. Every request carries the API key when one is set, so media is fetched
// as blobs (an <img src> cannot send a header). The key is kept for this tab only (sessionStorage): other pages and
// later visits cannot read it.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("starflow-key") || "", kind: "image", following: new Set() };

function headers(extra = {}) {
  return state.key ? { ...extra, Authorization: `Bearer ${state.key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (response.status === 401) {
    $("keybox").style.display = "block";
    throw new Error("this server needs an API key: enter it above");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
  return body;
}

function setOptions(select, values) {
  select.replaceChildren(...values.map((value) => new Option(value, value)));
}

async function connect() {
  $("error").textContent = "";
  const model = (await api("/v1/models")).data[0];
  state.kind = model.makes;  // "image" or "video", whatever conditions it (text, classes)
  $("model").textContent = `${model.id} · ${model.kind}`;
  setOptions($("size"), model.sizes);
  $("classes").replaceChildren(...(model.classes || []).map((name) => new Option(name)));
  $("prompt").placeholder = model.classes ? `a class: ${model.classes.join(", ")}` : "a prompt";
  $("editprompt").placeholder = $("prompt").placeholder;
  for (const el of document.querySelectorAll(".image-only")) el.style.display = state.kind === "image" ? "" : "none";
  for (const el of document.querySelectorAll(".video-only")) el.style.display = state.kind === "video" ? "" : "none";
  const jobs = (await api("/v1/jobs")).data;
  for (const job of jobs.reverse()) {
    render(job);
    if (job.status === "queued" || job.status === "in_progress") follow(job.id);
  }
}

function card(job) {
  let el = $(`job-${job.id}`);
  if (el) return el;
  $("nojobs").style.display = "none";
  el = document.createElement("article");
  el.className = "job";
  el.id = `job-${job.id}`;
  el.innerHTML = `<header><span><span class="operation"></span><span class="prompt"></span></span>
    <button type="button">Cancel</button></header>
    <progress max="100" value="0"></progress><div class="meta"></div><div class="error"></div>
    <div class="gallery"></div>`;
  // An edit says so (and what it edits from); a generation shows its prompt alone.
  el.dataset.operation = job.operation;
  if (job.operation !== "generate") {
    const label = el.querySelector(".operation");
    label.textContent = "edit";
    label.title = job.operation === "inpaint" ? "an edit: the masked part regenerated, the rest kept"
      : "an edit: the source remade under the prompt";
  }
  el.querySelector(".prompt").textContent = job.request.from_prompt
    ? `${job.request.from_prompt} → ${job.request.prompt}` : job.request.prompt;
  el.querySelector("button").addEventListener("click", () => remove(job.id));
  $("jobs").prepend(el);
  return el;
}

function render(job) {
  const el = card(job);
  el.dataset.status = job.status;
  el.querySelector("progress").value = job.progress;
  const seed = job.params.seed !== undefined ? ` · seed ${job.params.seed}` : "";
  const took = job.seconds ? ` · ${job.seconds.toFixed(1)} s` : "";
  el.querySelector(".meta").textContent = `${job.status} · ${job.progress}% · ${job.stage || ""}${seed}${took}`;
  el.querySelector(".error").textContent = job.error ? job.error.message : "";
  el.querySelector("button").textContent = ["queued", "in_progress"].includes(job.status) ? "Cancel" : "Remove";
  if (job.status === "completed" && !el.dataset.shown) {
    el.dataset.shown = "1";
    showFiles(el, job);
  }
}

async function showFiles(el, job) {
  const gallery = el.querySelector(".gallery");
  for (const file of job.files) {
    const response = await fetch(file.url, { headers: headers() });
    if (!response.ok) continue;
    const url = URL.createObjectURL(await response.blob());
    const media = document.createElement(file.type.startsWith("video/") ? "video" : "img");
    if (media.tagName === "VIDEO") Object.assign(media, { controls: true, loop: true, muted: true, autoplay: true });
    else media.alt = job.request.prompt;
    media.src = url;
    gallery.append(media);
  }
}

// Server-sent events through fetch (EventSource cannot send the API key): one `data:` line per change.
async function follow(id) {
  if (state.following.has(id)) return;
  state.following.add(id);
  try {
    const response = await fetch(`/v1/jobs/${id}/events`, { headers: headers() });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const message = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = message.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (data) render(JSON.parse(data));
      }
    }
  } catch (err) {
    $("error").textContent = `lost the job's progress: ${err.message}`;
  } finally {
    state.following.delete(id);
  }
}

async function remove(id) {
  const finished = $(`job-${id}`).dataset.status === "completed";
  if (finished && !confirm("Delete this job and its files from the server?")) return;
  try {
    const answer = await api(`/v1/jobs/${id}`, { method: "DELETE" });
    if (answer.deleted) $(`job-${id}`).remove();
    else render(answer);
  } catch (err) {
    $("error").textContent = err.message;
  }
}

function number(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function rememberKey() {
  if ($("key").value) {
    state.key = $("key").value;
    sessionStorage.setItem("starflow-key", state.key);
  }
}

async function connected() {
  if (!$("model").dataset.ready) {
    await connect();
    $("model").dataset.ready = "1";
  }
}

async function submit(event) {
  event.preventDefault();
  $("error").textContent = "";
  rememberKey();
  const body = { prompt: $("prompt").value, size: $("size").value || undefined, seed: number("seed"),
                 cfg: number("cfg"), jacobi: $("jacobi").value === "" ? undefined : $("jacobi").value === "true" };
  if (state.kind === "image") Object.assign(body, { n: number("n"), wait: false });
  else Object.assign(body, { frames: number("frames"), fps: number("fps") });
  $("generate").disabled = true;
  try {
    await connected();
    const path = state.kind === "image" ? "/v1/images/generations" : "/v1/videos";
    const job = await api(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                  body: JSON.stringify(body) });
    follow(job.id);
  } catch (err) {
    $("error").textContent = err.message;
  } finally {
    $("generate").disabled = false;
  }
}

$("form").addEventListener("submit", submit);
if (state.key) $("key").value = state.key;
connect().then(() => { $("model").dataset.ready = "1"; }, (err) => { $("error").textContent = err.message; });
