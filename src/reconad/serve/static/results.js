// reconad serve: browse a study or run folder (tables, curves, overlays) read from its saved files.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  Object.entries(attrs).forEach(([k, v]) => node.setAttribute(k, v));
  if (text) node.textContent = text;
  return node;
}

function cellText(v) {
  if (v === null || v === undefined || v === "") return "–";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(4);
  return String(v);
}

function tableElement(table) {
  const node = el("table", { "data-name": table.name });
  const head = node.createTHead().insertRow();
  const body = node.createTBody();
  const fill = (rows) => {
    body.replaceChildren();
    for (const row of rows) {
      const tr = body.insertRow();
      row.forEach((v) => { const td = tr.insertCell(); td.textContent = cellText(v); if (typeof v === "number") td.className = "num"; });
    }
  };
  let order = { col: -1, dir: 1 };
  table.columns.forEach((name, col) => {
    const th = el("th", { title: "sort" }, name);
    th.addEventListener("click", () => {  // click a header to sort by it (again: reverse)
      order = { col, dir: order.col === col ? -order.dir : 1 };
      fill([...table.rows].sort((a, b) => (a[col] > b[col] ? 1 : a[col] < b[col] ? -1 : 0) * order.dir));
    });
    head.appendChild(th);
  });
  fill(table.rows);
  return node;
}

function figures(paths, small = false) {
  const box = el("div", { class: small ? "figures small" : "figures" });
  for (const p of paths) {
    const fig = el("figure");
    fig.appendChild(el("img", { src: `/files/${p.split("/").map(encodeURIComponent).join("/")}`, alt: p, loading: "lazy" }));
    fig.appendChild(el("figcaption", {}, p.split("/").pop()));
    box.appendChild(fig);
  }
  return box;
}

async function load() {
  const response = await fetch("/api/results");
  const data = await response.json();
  if (!response.ok) { $("error").hidden = false; $("error").textContent = data.detail; return; }
  $("title").textContent = data.title;
  for (const table of data.tables) {
    $("tables").appendChild(el("h2", {}, `${table.name} (${table.source})`));
    $("tables").appendChild(tableElement(table));
  }
  $("study-figures").replaceWith(figures(data.figures));
  for (const run of data.runs) {
    const section = el("section", { class: "run", "data-path": run.path });
    section.appendChild(el("h3", {}, run.name));
    section.appendChild(el("div", { class: "muted" },
      [run.method, run.backbone, run.category, run.seed === null ? "" : `seed ${run.seed}`].filter(Boolean).join(" · ")));
    const metrics = Object.entries(run.metrics);
    if (metrics.length) section.appendChild(tableElement({ name: "metrics", columns: metrics.map((m) => m[0]), rows: [metrics.map((m) => m[1])] }));
    if (run.figures.length) section.appendChild(figures(run.figures));
    if (run.overlays.length) section.appendChild(figures(run.overlays, true));
    $("runs").appendChild(section);
  }
}

load();
