// Drop files, POST them to /v1/scores, show the rows least likely (highest bits/dim) first. Plain browser JavaScript.
"use strict";
const $ = (id) => document.getElementById(id);
let dropped = [];
$("key").value = localStorage.getItem("starflow-key") || "";

const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  dropped = [...event.dataTransfer.files];
  drop.firstChild.textContent = `${dropped.length} file(s) dropped; `;
});

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;  // file names come from the user: text, never HTML
  if (className) td.className = className;
  return td;
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("error").textContent = "";
  const files = dropped.length ? dropped : [...$("files").files];
  const body = new FormData();
  body.append("prompt", $("prompt").value);
  for (const file of files) body.append("file", file, file.name);
  const key = $("key").value;
  if (key) localStorage.setItem("starflow-key", key);
  try {
    const response = await fetch("/v1/scores", { method: "POST", body,
                                                 headers: key ? { Authorization: `Bearer ${key}` } : {} });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error ? answer.error.message : response.statusText);
    const rows = answer.data.sort((a, b) => (b.bits_per_dim ?? -Infinity) - (a.bits_per_dim ?? -Infinity));
    const tbody = $("ranked").querySelector("tbody");
    tbody.replaceChildren(...rows.map((row) => {
      const tr = document.createElement("tr");
      tr.append(cell(row.error ? `error: ${row.error}` : row.bits_per_dim.toFixed(4), "bits"), cell(row.path));
      return tr;
    }));
  } catch (error) {
    $("error").textContent = error.message;
  }
});
