// The console's page logic: reads the admin API with the session cookie and the page's CSRF
// token, and writes text only through textContent (never HTML from data).
"use strict";

const csrf = document.querySelector('meta[name="reprise-csrf"]').content;

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    credentials: "same-origin",
    headers: {
      "x-reprise-csrf": csrf,
      "x-reprise-actor": "console",
      "content-type": "application/json",
      ...(options.headers || {}),
    },
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

function element(tag, text, attributes = {}) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

function table(caption, headers, rows) {
  const node = element("table");
  node.appendChild(element("caption", caption));
  const head = node.createTHead().insertRow();
  for (const name of headers) head.appendChild(element("th", name, { scope: "col" }));
  const body = node.createTBody();
  for (const values of rows) {
    const row = body.insertRow();
    for (const value of values) cell(row, value);
  }
  return node;
}

function number(value, digits) {
  return typeof value === "number" ? value.toFixed(digits) : "-";
}

function feedbackText(feedback) {
  return Object.entries(feedback || {})
    .map(([name, row]) => {
      const interval = row.ci95 ? ` [${number(row.ci95[0], 3)}, ${number(row.ci95[1], 3)}]` : "";
      return `${name} ${number(row.mean, 3)}${interval} (n ${row.n})`;
    })
    .join("; ");
}

// A form that sets a rollout's weights, keeping its salt and experiment design.
function weightsForm(id, label, target) {
  const form = element("form", undefined, { "aria-label": `Weights of ${id} ${label}` });
  const inputs = [];
  for (const arm of target.rollout) {
    const inputId = `weight-${id}-${label}-${arm.version}`;
    form.appendChild(element("label", `v${arm.version} weight`, { for: inputId }));
    const input = element("input", undefined, {
      id: inputId, type: "number", min: "0", max: "100", value: String(arm.weight),
    });
    inputs.push([arm.version, input]);
    form.appendChild(input);
  }
  form.appendChild(element("button", "Apply weights", { type: "submit" }));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {
      rollout: inputs.map(([version, input]) => ({ version, weight: Number(input.value) })),
      salt: target.salt,
    };
    if (target.experiment) {
      const { id: _id, started_at: _started, ...design } = target.experiment;
      body.experiment = design;
    }
    await change(`/admin/prompts/${encodeURIComponent(id)}/labels/${encodeURIComponent(label)}`,
      { method: "PUT", body: JSON.stringify(body) });
  });
  return form;
}

async function change(path, options) {
  const status = document.querySelector("#status");
  try {
    await api(path, options);
    status.textContent = "Saved.";
    await refresh(true);
  } catch (failure) {
    status.textContent = failure.message;
  }
}

function actionButton(text, path) {
  const button = element("button", text, { type: "button" });
  button.addEventListener("click", () => change(path, { method: "POST" }));
  return button;
}

async function experiment(id, label, holder) {
  const path = `/admin/prompts/${encodeURIComponent(id)}/experiments/${encodeURIComponent(label)}`;
  const status = await api(path);
  const box = element("div", undefined, { class: "experiment" });
  box.appendChild(element("h4", `Experiment on ${label}: ${status.state.replaceAll("_", " ")}`));
  if (status.arms) {
    box.appendChild(table(`Arms of ${id} ${label}`,
      ["Version", "Role", "Weight", "Requests", "Cached", "Error rate", "p95 ms", "Feedback (mean [95% CI])"],
      status.arms.map((arm) => [
        `v${arm.version}`, arm.decided ? `${arm.role} (decided)` : arm.role, `${arm.weight}%`,
        String(arm.requests), String(arm.cached), number(arm.error_rate, 3),
        number(arm.latency_p95_ms, 1), feedbackText(arm.feedback),
      ])));
    box.appendChild(table(`Tests of ${id} ${label}`,
      ["Version", "Test", "Estimate", "Against", "ln Λ / threshold", "Verdict"],
      status.tests.map((test) => [
        `v${test.version}`, test.metric ? `${test.test} ${test.metric}` : test.test,
        number(test.estimate, 4), number(test.against, 4),
        `${number(test.log_likelihood_ratio, 2)} / ${number(test.threshold, 2)}`, test.verdict,
      ])));
  }
  if (status.pending_decision) {
    box.appendChild(element("p", `Pending: ${status.pending_decision.action} v${status.pending_decision.version}: ${status.pending_decision.reason}`));
  }
  if (status.state === "ready_to_promote") {
    box.appendChild(actionButton("Promote the winner", `${path}/promote`));
  }
  holder.appendChild(box);
}

async function prompts() {
  const body = await api("/admin/prompts");
  const holder = document.querySelector("#prompts .prompts");
  const rendered = element("div");
  for (const summary of body.data) {
    const id = summary.id;
    const card = element("article", undefined, { "aria-labelledby": `prompt-${id}` });
    card.appendChild(element("h3", `${id} (${summary.versions} versions)`, { id: `prompt-${id}` }));
    for (const [label, target] of Object.entries(summary.labels)) {
      card.appendChild(element("p", `${label}: ${describe(target)}`));
      const labelPath = `/admin/prompts/${encodeURIComponent(id)}/labels/${encodeURIComponent(label)}`;
      card.appendChild(actionButton(`Roll back ${label}`, `${labelPath}/rollback`));
      if (target.rollout) card.appendChild(weightsForm(id, label, target));
      if (target.experiment) await experiment(id, label, card);
    }
    const history = await api(`/admin/prompts/${encodeURIComponent(id)}/history`);
    card.appendChild(table(`Audit trail of ${id}`, ["Revision", "When", "Who", "What", "Evidence"],
      history.data.slice(-10).reverse().map((event) => [
        String(event.revision), event.at, event.actor,
        `${event.action}${event.label ? ` ${event.label}` : ""}${event.after ? ` → ${describe(event.after)}` : ""}`,
        event.evidence ? event.evidence.reason : "",
      ])));
    rendered.appendChild(card);
  }
  holder.replaceChildren(...rendered.childNodes);
}

async function refresh(force = false) {
  const error = document.querySelector("main > .error");
  try {
    // Not while someone is typing into a form: a redraw would reset it.
    const editing = !force && document.activeElement && document.activeElement.closest("#prompts form");
    await Promise.all([providers(), editing ? null : prompts()]);
    error.textContent = "";
  } catch (failure) {
    error.textContent = failure.message;
  }
}

refresh();
setInterval(refresh, 5000);
