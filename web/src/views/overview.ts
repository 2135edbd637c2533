// Overview: every service with its latest CPU, memory, request rate, age,
// a sparkline and a silent mark; a filter box; new services appear live.
import * as fmt from "../format";
import { h, text } from "../dom";
import { colors } from "../theme";
import { store, type Series } from "../store";
import { bus, reach } from "../rpc";
import type { View } from "../router";

interface Row {
  tr: HTMLTableRowElement;
  cpu: HTMLElement;
  mem: HTMLElement;
  rate: HTMLElement;
  age: HTMLElement;
  spark: HTMLCanvasElement;
}

/** A service is silent when it has not reported for 3 of its intervals, and at least this long. */
const SILENT_MIN_MS = 5000;

export function overview(): View {
  const filter = h("input", { type: "search", id: "filter", placeholder: "name or part of it", autocomplete: "off" });
  const tbody = h("tbody");
  const empty = h("p", { class: "muted" });
  const refused = h("p", { class: "denied", role: "alert", hidden: true });
  const table = h(
    "table",
    { class: "services" },
    h("caption", { class: "sr-only" }, "Services"),
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        h("th", { scope: "col" }, "Service"),
        h("th", { scope: "col", class: "num" }, "CPU"),
        h("th", { scope: "col", class: "num" }, "Memory"),
        h("th", { scope: "col", class: "num" }, "Requests"),
        h("th", { scope: "col" }, "Last reported"),
        h("th", { scope: "col", class: "spark-col" }, "CPU trend"),
      ),
    ),
    tbody,
  );
  const root = h(
    "section",
    { "aria-labelledby": "overview-h" },
    h("div", { class: "bar" }, h("h1", { id: "overview-h" }, "Services"), h("label", { for: "filter" }, "Filter services"), filter),
    refused,
    empty,
    h("div", { class: "scroll" }, table),
  );

  const rows = new Map<string, Row>();
  let needle = "";
  let active = false;

  const matches = (name: string) => !needle || name.toLowerCase().includes(needle);

  function row(name: string): Row {
    let r = rows.get(name);
    if (r) return r;
    const link = h("a", { href: `#/service/${encodeURIComponent(name)}` }, name);
    const spark = h("canvas", { class: "spark", width: 120, height: 28, "aria-hidden": "true" });
    r = {
      tr: h("tr", { "data-service": name }),
      cpu: h("td", { class: "num" }),
      mem: h("td", { class: "num" }),
      rate: h("td", { class: "num" }),
      age: h("td", { class: "age" }),
      spark,
    };
    r.tr.append(h("th", { scope: "row" }, link), r.cpu, r.mem, r.rate, r.age, h("td", { class: "spark-col" }, spark));
    r.tr.hidden = !matches(name);
    // Keep rows sorted by name.
    const names = [...rows.keys(), name].sort();
    const next = names[names.indexOf(name) + 1];
    tbody.insertBefore(r.tr, next ? rows.get(next)!.tr : null);
    rows.set(name, r);
    return r;
  }

  function update(s: Series): void {
    const r = row(s.name);
    const n = s.ts.length;
    if (n === 0) return;
    text(r.cpu, fmt.cpu(s.cpu[n - 1]));
    text(r.mem, fmt.memory(s.mem[n - 1]));
    text(r.rate, fmt.rate(s.rate[n - 1]));
    age(s, r);
    sparkline(r.spark, s);
  }

  function age(s: Series, r: Row): void {
    const n = s.ts.length;
    if (n === 0) return;
    const ago = Math.max(0, store.serverNow() - s.ts[n - 1]);
    const interval = n > 1 ? s.ts[n - 1] - s.ts[n - 2] : 1000;
    const silent = ago > Math.max(SILENT_MIN_MS, 3 * interval);
    text(r.age, silent ? `silent · ${fmt.duration(ago / 1000)} ago` : `${fmt.duration(ago / 1000)} ago`);
    r.tr.classList.toggle("silent", silent);
  }

  function onFlush(): void {
    if (!active) return;
    const before = rows.size;
    for (const name of store.dirty) update(store.series(name));
    if (rows.size !== before) onRefused();
  }

  /**
   * Says why no row shows, and claims emptiness only when it is known: the
   * Watch backfill has arrived, and the identity may read telemetry at all.
   */
  function onRefused(): void {
    const canRead = reach("telemetry", "read");
    const why = store.refused ?? (canRead === "none" ? "This token cannot read telemetry: it has no telemetry:read scope." : null);
    refused.hidden = !why;
    text(refused, why ?? "");
    let note = "";
    if (!why && !store.loaded) {
      note = store.state === "needs token" ? "Sign in to see the services." : "Waiting for the server…";
    } else if (!why && rows.size === 0) {
      note = canRead === "some" ? "No service this token can read has reported yet." : "No service has reported yet.";
    } else if (!why && needle && ![...rows.values()].some((r) => !r.tr.hidden)) {
      note = `No service matches “${filter.value.trim()}”.`;
    }
    empty.hidden = !note;
    text(empty, note);
  }

  function onReset(): void {
    rows.clear();
    tbody.replaceChildren();
    onRefused();
  }

  filter.addEventListener("input", () => {
    needle = filter.value.trim().toLowerCase();
    for (const [name, r] of rows) r.tr.hidden = !matches(name);
    onRefused();
  });

  // Rows of an identity signed out go even while the view is hidden.
  store.addEventListener("reset", onReset);

  let ticker = 0;
  return {
    title: "Overview",
    root,
    show() {
      active = true;
      for (const s of store.services.values()) update(s);
      onRefused();
      store.addEventListener("flush", onFlush);
      for (const ev of ["refused", "loaded", "state"]) store.addEventListener(ev, onRefused);
      bus.addEventListener("scopes", onRefused);
      // Ages move with the clock: one text update a second, no redraw of anything else.
      ticker = window.setInterval(() => {
        for (const s of store.services.values()) {
          const r = rows.get(s.name);
          if (r && !r.tr.hidden) age(s, r);
        }
      }, 1000);
    },
    hide() {
      active = false;
      store.removeEventListener("flush", onFlush);
      for (const ev of ["refused", "loaded", "state"]) store.removeEventListener(ev, onRefused);
      bus.removeEventListener("scopes", onRefused);
      clearInterval(ticker);
    },
  };
}

/** The last minute of CPU as a line on a small canvas (cheaper than a chart per row). */
function sparkline(c: HTMLCanvasElement, s: Series): void {
  const ctx = c.getContext("2d");
  if (!ctx) return;
  const w = c.width;
  const hgt = c.height;
  ctx.clearRect(0, 0, w, hgt);
  const n = s.ts.length;
  const from = Math.max(0, n - 60);
  if (n - from < 2) return;
  let max = 100;
  for (let i = from; i < n; i++) max = Math.max(max, s.cpu[i]);
  const t0 = s.ts[from];
  const span = Math.max(1, s.ts[n - 1] - t0);
  ctx.beginPath();
  for (let i = from; i < n; i++) {
    const x = ((s.ts[i] - t0) / span) * (w - 2) + 1;
    const y = hgt - 2 - (s.cpu[i] / max) * (hgt - 4);
    if (i === from) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
  }
  ctx.strokeStyle = colors().accent;
  ctx.lineWidth = 1.5;
  ctx.stroke();
}
