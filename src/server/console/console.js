// The console's page logic: reads the admin API with the session cookie and the page's CSRF
// token, and writes text only through textContent (never HTML from data).
"use strict";

const csrf = document.querySelector('meta[name="reprise-csrf"]').content;

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    credentials: "same-origin",
    headers: { "x-reprise-csrf": csrf, "content-type": "application/json", ...(options.headers || {}) },
  });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    throw new Error((body && body.error && body.error.message) || `${path}: ${response.status}`);
  }
  return body;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
}

function describe(target) {
  if (target.version !== undefined) return `v${target.version}`;
  return target.rollout.map((arm) => `v${arm.version} ${arm.weight}%`).join(", ") +
    (target.experiment ? " (experiment)" : "");
}

async function providers() {
  const body = await api("/v1/health/providers");
  const rows = document.querySelector("#providers tbody");
  rows.replaceChildren();
  for (const target of body.data) {
    const row = document.createElement("tr");
    cell(row, target.target);
    cell(row, target.state);
    rows.appendChild(row);
  }
}

async function prompts() {
  const body = await api("/admin/prompts");
  const holder = document.querySelector("#prompts .prompts");
  holder.replaceChildren();
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  for (const name of ["Prompt", "Versions", "Labels"]) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = name;
    head.appendChild(th);
  }
  const rows = table.createTBody();
  for (const prompt of body.data) {
    const row = rows.insertRow();
    cell(row, prompt.id);
    cell(row, String(prompt.versions));
    cell(row, Object.entries(prompt.labels).map(([label, target]) => `${label}: ${describe(target)}`).join("; "));
  }
  holder.appendChild(table);
}

async function refresh() {
  const error = document.querySelector("main > .error");
  try {
    await Promise.all([providers(), prompts()]);
    error.textContent = "";
  } catch (failure) {
    error.textContent = failure.message;
  }
}

refresh();
setInterval(refresh, 5000);
