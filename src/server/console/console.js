// The console's page logic: reads the admin API with the session cookie and the page's CSRF
// token, and writes text only through textContent (never HTML from data).
"use strict";

const csrf = document.querySelector('meta[name="reprise-csrf"]').content;
const SVG = "http://www.w3.org/2000/svg";

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

function element(tag, text, attributes = {}) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

function cell(row, value) {
  const td = document.createElement("td");
  if (value instanceof Node) td.appendChild(value);
  else td.textContent = value;
  row.appendChild(td);
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
  if (rows.length === 0) {
    const row = body.insertRow();
    const empty = element("td", "Nothing yet.", { colspan: String(headers.length) });
    row.appendChild(empty);
  }
  return node;
}

function number(value, digits) {
  return typeof value === "number" ? value.toFixed(digits) : "-";
}

function percent(value) {
  return typeof value === "number" ? `${(value * 100).toFixed(1)}%` : "-";
}

function usd(value) {
  if (typeof value !== "number") return "-";
  if (value === 0) return "$0";
  // Cache savings per request are fractions of a cent: two significant digits keep them visible.
  return Math.abs(value) < 0.01 ? `$${value.toPrecision(2)}` : `$${value.toFixed(2)}`;
}

function ms(value) {
  return typeof value === "number" ? `${value < 10 ? value.toFixed(2) : value.toFixed(0)} ms` : "-";
}

function when(atMs) {
  return new Date(atMs).toISOString().replace("T", " ").slice(0, 19);
}

function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) if (value) search.set(name, value);
  const text = search.toString();
  return text ? `?${text}` : "";
}

async function change(path, options, page) {
  const status = document.querySelector("#status");
  try {
    await api(path, options);
    status.textContent = "Saved.";
    await refresh(true, page);
  } catch (failure) {
    status.textContent = failure.message;
  }
}

function actionButton(text, path, options = { method: "POST" }, page = "prompts") {
  const button = element("button", text, { type: "button" });
  button.addEventListener("click", () => change(path, options, page));
  return button;
}

// ---- Charts: SVG drawn here, each with a text summary for screen readers.

function svgNode(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}

function tick(atMs, stepSeconds) {
  const iso = new Date(atMs).toISOString();
  return stepSeconds >= 3600 ? `${iso.slice(5, 10)} ${iso.slice(11, 13)}h` : iso.slice(11, 16);
}

// A line per series over the summary's points; `format` writes the axis' values.
function chart(title, summary, series, format) {
  const points = summary.points;
  const width = 520;
  const height = 150;
  const left = 64;
  const bottom = 20;
  const values = points.flatMap((p) => series.map((s) => s.value(p)))
    .filter((v) => typeof v === "number" && Number.isFinite(v));
  const top = Math.max(...values, 0) || 1;
  const x = (i) => left + (i * (width - left - 8)) / Math.max(points.length - 1, 1);
  const y = (v) => height - bottom - (v / top) * (height - bottom - 8);
  const figure = element("figure", undefined, { class: "chart" });
  const caption = element("figcaption", title);
  const latest = series.map((s) => {
    const last = [...points].reverse().find((p) => typeof s.value(p) === "number");
    return `${s.name} ${last ? format(s.value(last)) : "none"}`;
  }).join(", ");
  const peak = values.length ? format(Math.max(...values)) : "none";
  const svg = svgNode("svg", {
    viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `${title}, ${summary.window}: latest ${latest}; highest ${peak}`,
  });
  svg.appendChild(svgNode("line", { x1: left, y1: height - bottom, x2: width - 8, y2: height - bottom, class: "axis" }));
  for (const [value, label] of [[0, format(0)], [top, format(top)]]) {
    const text = svgNode("text", { x: left - 6, y: y(value) + 4, "text-anchor": "end", class: "tick" });
    text.textContent = label;
    svg.appendChild(text);
  }
  for (const [i, anchor] of [[0, "start"], [points.length - 1, "end"]]) {
    if (!points[i]) continue;
    const text = svgNode("text", { x: x(i), y: height - 4, "text-anchor": anchor, class: "tick" });
    text.textContent = tick(points[i].at_ms, summary.step_seconds);
    svg.appendChild(text);
  }
  const legend = element("ul", undefined, { class: "legend" });
  series.forEach((s, index) => {
    let path = "";
    let drawing = false;
    points.forEach((p, i) => {
      const v = s.value(p);
      if (typeof v !== "number" || !Number.isFinite(v)) {
        drawing = false;
        return;
      }
      path += `${drawing ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
      drawing = true;
    });
    svg.appendChild(svgNode("path", { d: path || "M0,0", class: `series series-${index}` }));
    // A point with no neighbour draws no line: it gets a dot.
    points.forEach((p, i) => {
      const v = s.value(p);
      const defined = (j) => j >= 0 && j < points.length && typeof s.value(points[j]) === "number";
      if (typeof v === "number" && Number.isFinite(v) && !defined(i - 1) && !defined(i + 1)) {
        svg.appendChild(svgNode("circle", { cx: x(i), cy: y(v), r: 3, class: `dot series-${index}` }));
      }
    });
    legend.appendChild(element("li", s.name, { class: `series-${index}` }));
  });
  caption.appendChild(legend);
  figure.append(caption, svg);
  return figure;
}

function figuresRow(name, f) {
  return [name, String(f.requests), percent(f.hit_ratio), String(f.exact_hits), String(f.semantic_hits),
    usd(f.saved_usd), usd(f.spend_usd), ms(f.latency_p50_ms), ms(f.latency_p95_ms), String(f.errors)];
}

const FIGURE_HEADERS = ["Name", "Requests", "Hit ratio", "Exact hits", "Semantic hits", "Saved", "Spend",
  "p50", "p95", "Errors"];

function options(select, names) {
  const chosen = select.value;
  const wanted = ["", ...names];
  const have = [...select.options].map((o) => o.value);
  if (wanted.join("\n") === have.join("\n")) return;
  select.replaceChildren(...wanted.map((name) => element("option", name || "all", { value: name })));
  select.value = wanted.includes(chosen) ? chosen : "";
}

async function overview() {
  const section = document.querySelector("#overview");
  const form = section.querySelector("form");
  const filters = Object.fromEntries(new FormData(form));
  const summary = await api(`/admin/overview${query(filters)}`);
  // The choices come from the whole window, not from the filtered figures.
  const all = filters.tenant || filters.route ? await api(`/admin/overview${query({ window: filters.window })}`) : summary;
  options(form.elements.tenant, all.by_tenant.map((t) => t.name));
  options(form.elements.route, all.by_route.map((r) => r.name));
  const totals = section.querySelector(".totals");
  const t = summary.total;
  totals.replaceChildren(...[
    ["Requests", String(t.requests)], ["Cache hit ratio", percent(t.hit_ratio)],
    ["Exact hits", String(t.exact_hits)], ["Semantic hits", String(t.semantic_hits)],
    ["Money saved", usd(t.saved_usd)], ["Spend", usd(t.spend_usd)],
    ["Latency p50", ms(t.latency_p50_ms)], ["Latency p95", ms(t.latency_p95_ms)], ["Errors", String(t.errors)],
  ].map(([name, value]) => {
    const box = element("div");
    box.append(element("dt", name), element("dd", value));
    return box;
  }));
  const ratio = (kind) => (p) => (p.requests ? p[kind] / p.requests : null);
  section.querySelector(".charts").replaceChildren(
    chart("Requests and errors", summary, [
      { name: "requests", value: (p) => p.requests }, { name: "errors", value: (p) => p.errors },
    ], (v) => String(Math.round(v))),
    chart("Cache hit ratio", summary, [
      { name: "exact", value: ratio("exact_hits") }, { name: "semantic", value: ratio("semantic_hits") },
    ], percent),
    chart("Latency", summary, [
      { name: "p50", value: (p) => p.latency_p50_ms }, { name: "p95", value: (p) => p.latency_p95_ms },
    ], ms),
    chart("Spend and money saved", summary, [
      { name: "spend", value: (p) => p.spend_usd }, { name: "saved", value: (p) => p.saved_usd },
    ], usd),
  );
  section.querySelector(".breakdown").replaceChildren(
    table("By route", FIGURE_HEADERS, summary.by_route.map((r) => figuresRow(r.name, r))),
    table("By tenant", FIGURE_HEADERS, summary.by_tenant.map((r) => figuresRow(r.name, r))),
  );
}

// ---- Cache review

function feedbackButton(text, reviewed, correct) {
  const button = element("button", text, { type: "button" });
  button.addEventListener("click", () => change("/admin/cache/feedback", {
    method: "POST",
    body: JSON.stringify({
      tenant: reviewed.tenant, entry: reviewed.entry, similarity: reviewed.similarity, correct,
    }),
  }, "cache"));
  return button;
}

function evidence(reviewed) {
  const parts = [];
  if (typeof reviewed.similarity === "number") {
    parts.push(`similarity ${number(reviewed.similarity, 3)} (threshold ${number(reviewed.threshold, 2)})`);
  }
  if (typeof reviewed.probability === "number") parts.push(`probability ${number(reviewed.probability, 3)}`);
  if (reviewed.outcome === "hit-agreement") parts.push("its neighbours were all given this answer");
  return parts.join("; ");
}

async function cacheReview() {
  const section = document.querySelector("#cache");
  const [review, summary] = await Promise.all([
    api("/admin/cache/review?limit=100"),
    api("/admin/overview?window=24h").catch(() => null),
  ]);
  const hits = review.data.filter((r) => r.entry);
  section.querySelector(".review").replaceChildren(table("Recent semantic hits",
    ["When", "Tenant", "Route", "Request", "Answered as", "Evidence", "Review"],
    hits.map((r) => {
      const actions = element("div", undefined, { class: "actions" });
      if (r.marked) actions.appendChild(element("span", `marked ${r.marked}`));
      else actions.append(feedbackButton("Right", r, true), feedbackButton("Wrong", r, false));
      for (const button of actions.querySelectorAll("button")) {
        button.setAttribute("aria-label", `Mark the answer to “${r.request_text}” ${button.textContent.toLowerCase()}`);
      }
      return [when(r.at_ms), r.tenant, r.route, r.request_text, r.entry_text, evidence(r), actions];
    })));
  const refused = review.data.filter((r) => !r.entry);
  const counts = summary ? Object.entries(summary.refusals) : [];
  section.querySelector(".refusals").replaceChildren(
    table("Guard refusals by kind (last day)", ["Guard", "Refused"],
      counts.map(([guard, n]) => [guard, String(n)])),
    table("Recent refusals", ["When", "Tenant", "Route", "Request", "Refused by"],
      refused.slice(0, 20).map((r) => [when(r.at_ms), r.tenant, r.route, r.request_text,
        r.outcome.replace("rejected-", "")])),
  );
}

// ---- Prompts

function describe(target) {
  if (target.version !== undefined) return `v${target.version}`;
  return target.rollout.map((arm) => `v${arm.version} ${arm.weight}%`).join(", ") +
    (target.experiment ? " (experiment)" : "");
}

function labelPath(id, label) {
  return `/admin/prompts/${encodeURIComponent(id)}/labels/${encodeURIComponent(label)}`;
}

function feedbackText(feedback) {
  return Object.entries(feedback || {})
    .map(([name, row]) => {
      const interval = row.ci95 ? ` [${number(row.ci95[0], 3)}, ${number(row.ci95[1], 3)}]` : "";
      return `${name} ${number(row.mean, 3)}${interval} (n ${row.n})`;
    })
    .join("; ");
}

function numberInput(form, id, labelText, value, attributes = {}) {
  form.appendChild(element("label", labelText, { for: id }));
  const input = element("input", undefined, { id, type: "number", value: String(value), ...attributes });
  form.appendChild(input);
  return input;
}

// A form that sets a rollout's weights, keeping its salt and experiment design.
function weightsForm(id, label, target) {
  const form = element("form", undefined, { "aria-label": `Weights of ${id} ${label}` });
  const inputs = target.rollout.map((arm) => [arm.version, numberInput(form,
    `weight-${id}-${label}-${arm.version}`, `v${arm.version} weight`, arm.weight, { min: "0", max: "100" })]);
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
    await change(labelPath(id, label), { method: "PUT", body: JSON.stringify(body) });
  });
  return form;
}

// Starts a rollout on a label that points at one version: the new version gets a share.
function startRolloutForm(id, label, target, latest) {
  const form = element("form", undefined, { "aria-label": `Start a rollout of ${id} ${label}` });
  const candidate = numberInput(form, `rollout-${id}-${label}-version`, "New version", latest,
    { min: "1", max: String(latest) });
  const share = numberInput(form, `rollout-${id}-${label}-share`, "Its share %", 10, { min: "1", max: "99" });
  form.appendChild(element("button", "Start rollout", { type: "submit" }));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const weight = Number(share.value);
    const body = {
      rollout: [
        { version: target.version, weight: 100 - weight },
        { version: Number(candidate.value), weight },
      ],
    };
    await change(labelPath(id, label), { method: "PUT", body: JSON.stringify(body) });
  });
  return form;
}

// Ends a rollout by pointing the label at one of its versions.
function stopRolloutButtons(id, label, target) {
  const box = element("div", undefined, {
    class: "actions", role: "group", "aria-label": `Stop the rollout of ${id} ${label}`,
  });
  for (const arm of target.rollout) {
    box.appendChild(actionButton(`Stop rollout: keep v${arm.version}`, labelPath(id, label),
      { method: "PUT", body: JSON.stringify({ version: arm.version }) }));
  }
  return box;
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

// The versions, each with a button showing its diff from the one before.
function versionsTable(id, versions) {
  const diffBox = element("pre", undefined, { class: "diff", "aria-live": "polite", tabindex: "0", hidden: "" });
  const rows = versions.slice().reverse().map((v) => {
    const actions = element("div");
    if (v.version > 1) {
      const button = element("button", `Diff v${v.version - 1} → v${v.version}`, { type: "button" });
      button.addEventListener("click", async () => {
        const diff = await api(`/admin/prompts/${encodeURIComponent(id)}/diff?from=${v.version - 1}&to=${v.version}`);
        diffBox.replaceChildren(...diff.diff.split("\n").map((line) => {
          const kind = line.startsWith("+") ? "added" : line.startsWith("-") ? "removed" : "same";
          return element("span", `${line}\n`, { class: kind });
        }));
        diffBox.setAttribute("aria-label", `Diff of ${id} v${v.version - 1} to v${v.version}`);
        diffBox.hidden = false;
        pinned.diff = true;
      });
      actions.appendChild(button);
    }
    return [`v${v.version}`, v.created_at, v.created_by, v.model || "", actions];
  });
  const box = element("div");
  box.append(table(`Versions of ${id}`, ["Version", "Created", "By", "Route", "Diff"], rows), diffBox);
  return box;
}

// What a redraw would lose: an open diff or request detail.
const pinned = {};

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
      card.appendChild(actionButton(`Roll back ${label}`, `${labelPath(id, label)}/rollback`));
      if (target.rollout) {
        card.appendChild(weightsForm(id, label, target));
        card.appendChild(stopRolloutButtons(id, label, target));
      } else if (summary.latest_version > 1) {
        card.appendChild(startRolloutForm(id, label, target, summary.latest_version));
      }
      if (target.experiment) await experiment(id, label, card);
    }
    const [view, history] = await Promise.all([
      api(`/admin/prompts/${encodeURIComponent(id)}`),
      api(`/admin/prompts/${encodeURIComponent(id)}/history`),
    ]);
    card.appendChild(versionsTable(id, view.versions));
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

// ---- Providers

async function providers() {
  const [health, summary] = await Promise.all([
    api("/v1/health/providers"),
    api("/admin/overview?window=1h").catch(() => null),
  ]);
  const rows = document.querySelector("#breakers tbody");
  rows.replaceChildren();
  for (const target of health.data) {
    const row = rows.insertRow();
    cell(row, target.target);
    cell(row, target.state);
  }
  document.querySelector("#providers .attempts").replaceChildren(
    table("Upstream attempts (last hour)", ["Target", "Attempts", "Errors", "Error rate", "p50", "p95"],
      (summary ? summary.targets : []).map((t) => [t.target, String(t.attempts), String(t.errors),
        percent(t.error_rate), ms(t.latency_p50_ms), ms(t.latency_p95_ms)])),
  );
}

// ---- Keys

function limitsText(limits) {
  const parts = [];
  for (const name of ["rpm", "tpm", "concurrency"]) if (limits && limits[name]) parts.push(`${name} ${limits[name]}`);
  if (limits && limits.budget) {
    parts.push(`budget ${usd(limits.budget.usd)}/${limits.budget.period}`);
  }
  return parts.join(", ") || "none";
}

function budgetText(budget) {
  if (!budget) return "-";
  return `${usd(budget.spent_usd)} spent, ${usd(budget.held_usd)} held, ${usd(budget.remaining_usd)} left of ${usd(budget.usd)} (${budget.current})`;
}

async function keys() {
  const section = document.querySelector("#keys");
  const [list, tenants] = await Promise.all([
    api("/admin/keys").catch((failure) => ({ data: [], failure: failure.message })),
    api("/admin/tenants"),
  ]);
  const keysTable = table("Keys", ["Key", "Name", "Tenant", "Status", "Limits", "Spend today", "Spend this month", "Budget"],
    list.data.map((k) => [k.id, k.name || "", k.tenant, k.status, limitsText(k.limits),
      usd(k.spend && k.spend.today_usd), usd(k.spend && k.spend.month_usd), budgetText(k.budget)]));
  const notes = list.failure ? [element("p", list.failure)] : [];
  section.querySelector(".keys").replaceChildren(keysTable, ...notes);
  section.querySelector(".tenants").replaceChildren(table("Tenants with limits",
    ["Tenant", "Limits", "Spend today", "Spend this month", "Budget"],
    tenants.data.map((t) => [t.tenant, limitsText(t.limits), usd(t.spend && t.spend.today_usd),
      usd(t.spend && t.spend.month_usd), budgetText(t.budget)])));
}

// ---- Requests

async function showRequest(id) {
  const record = await api(`/admin/requests/${encodeURIComponent(id)}`);
  const detail = document.querySelector("#requests .detail");
  const facts = element("dl", undefined, { class: "facts" });
  const fields = [
    ["Request", record.id], ["Arrived", when(record.at_ms)], ["Tenant", record.tenant], ["Key", record.key || "-"],
    ["Route", record.route || "-"], ["Prompt", record.prompt ? `${record.prompt.id} v${record.prompt.version}${record.prompt.label ? ` (${record.prompt.label})` : ""}` : "-"],
    ["Cache", record.cache || "-"], ["Semantic", record.semantic || "-"],
    ["Similarity", number(record.similarity, 3)], ["Entry", record.entry || "-"],
    ["Target", record.target || "-"], ["Status", String(record.status)], ["Error", record.error || "-"],
    ["Tokens in / out", `${record.input_tokens} / ${record.output_tokens}`], ["Cost", usd(record.cost_usd)],
    ["Saved", usd(record.saved_usd)], ["Latency", ms(record.latency_ms)], ["First token", ms(record.first_token_ms)],
    ["Trace", record.trace_id || "-"],
  ];
  for (const [name, value] of fields) {
    const box = element("div");
    box.append(element("dt", name), element("dd", value));
    facts.appendChild(box);
  }
  const heading = element("h3", `Request ${record.id}`, { tabindex: "-1" });
  detail.replaceChildren(heading, facts, table(`Attempts of ${record.id}`,
    ["#", "Target", "Kind", "Outcome", "Status", "Started", "Latency", "First token"],
    (record.upstream || []).map((a, i) => [String(i + 1), a.target, a.kind, a.outcome,
      a.status ? String(a.status) : "-", ms(a.start_ms), ms(a.latency_ms), ms(a.first_token_ms)])));
  pinned.request = id;
  heading.focus();
}

async function requests() {
  const section = document.querySelector("#requests");
  const filters = Object.fromEntries(new FormData(section.querySelector("form")));
  const found = await api(`/admin/requests${query({ ...filters, limit: "100" })}`);
  section.querySelector(".list").replaceChildren(table("Requests, newest first",
    ["When", "Tenant", "Route", "Cache", "Target", "Status", "Latency", "Cost", "Detail"],
    found.data.map((r) => {
      const open = element("button", "Details", { type: "button", "aria-label": `Details of ${r.id}` });
      open.addEventListener("click", () => showRequest(r.id).catch((failure) => {
        document.querySelector("#status").textContent = failure.message;
      }));
      return [when(r.at_ms), r.tenant, r.route || "-", r.cache || "-", r.target || "-", String(r.status),
        ms(r.latency_ms), usd(r.cost_usd), open];
    })));
}

// ---- Navigation: one section at a time, chosen by the address' fragment.

const PAGES = { overview, cache: cacheReview, prompts, providers, keys, requests };

function current() {
  const name = location.hash.slice(1);
  return PAGES[name] ? name : "overview";
}

async function refresh(force = false, page = current()) {
  const error = document.querySelector("main > .error");
  // Not while someone is typing into a form, or reading a request's detail: a redraw would
  // reset it.
  const focused = document.activeElement;
  const editing = focused && focused.closest("section form:not(.filters)");
  if (!force && (editing || (page === "requests" && pinned.request) || (page === "prompts" && pinned.diff))) return;
  try {
    await PAGES[page]();
    error.textContent = "";
    // For the page-time benchmark (benches/console_pages.py): this page is drawn.
    document.querySelector("main").dataset.drawn = page;
  } catch (failure) {
    error.textContent = failure.message;
  }
}

function show() {
  const page = current();
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== page;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.getAttribute("href") === `#${page}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${document.querySelector(`#${page} h2`).textContent} · Reprise console`;
  return page;
}

window.addEventListener("hashchange", () => {
  const page = show();
  document.querySelector("#status").textContent = "";
  delete pinned.request;
  delete pinned.diff;
  refresh(true, page).then(() => document.querySelector(`#${page} h2`).focus());
});

for (const form of document.querySelectorAll("form.filters")) {
  const page = form.closest("section").id;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    delete pinned.request;
    refresh(true, page);
  });
  form.addEventListener("change", (event) => {
    if (event.target.tagName === "SELECT") {
      delete pinned.request;
      refresh(true, page);
    }
  });
}

show();
refresh(true);
setInterval(() => refresh(), 5000);
