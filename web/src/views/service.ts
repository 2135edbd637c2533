// Service view: CPU, memory and request-rate charts (uPlot) filled from
// history the moment they open, then moving live; pause/resume, zoom,
// 1/5/15 min windows, and a cursor synced across the three charts.
// Charts redraw only when the service's data changes (or on a control).
import uPlot from "uplot";
import * as fmt from "../format";
import { h, text } from "../dom";
import { failure, refusal, telemetry } from "../rpc";
import { store, type Series } from "../store";
import { colors, themeBus } from "../theme";
import type { View } from "../router";

const WINDOWS: [string, number][] = [
  ["1 min", 60_000],
  ["5 min", 300_000],
  ["15 min", 900_000],
];

interface ChartDef {
  label: string;
  unit: (v: number) => string;
  pick: (s: Series) => (number | null)[];
}

const DEFS: ChartDef[] = [
  { label: "CPU", unit: fmt.cpu, pick: (s) => s.cpu },
  { label: "Memory", unit: fmt.memory, pick: (s) => s.mem },
  { label: "Requests", unit: fmt.rate, pick: (s) => s.rate },
];

export function serviceView(): View {
  const heading = h("h1", { id: "service-h" });
  const latest = h("p", { class: "latest", "aria-live": "off" });
  const status = h("p", { class: "muted", role: "status" });
  const note = h("p", { class: "denied", hidden: true });
  const windowButtons = WINDOWS.map(([label, ms]) => {
    const b = h("button", { type: "button", "aria-pressed": ms === 60_000 ? "true" : "false" }, label);
    b.addEventListener("click", () => {
      windowMs = ms;
      zoom = null;
      for (const x of windowButtons) x.setAttribute("aria-pressed", String(x === b));
      draw();
    });
    return b;
  });
  const pauseBtn = h("button", { type: "button", "aria-pressed": "false" }, "Pause");
  const zoomInBtn = h("button", { type: "button" }, "Zoom in");
  const resetBtn = h("button", { type: "button", disabled: true }, "Reset zoom");
  const charts = h("div", { class: "charts" });
  const root = h(
    "section",
    { "aria-labelledby": "service-h" },
    h("div", { class: "bar" }, heading, h("a", { href: "#/" }, "All services")),
    latest,
    h(
      "div",
      { class: "controls" },
      h("div", { role: "group", "aria-label": "Time window", class: "seg" }, ...windowButtons),
      pauseBtn,
      zoomInBtn,
      resetBtn,
    ),
    status,
    note,
    charts,
  );

  let name = "";
  let windowMs = 60_000;
  let paused = false;
  let zoom: [number, number] | null = null;
  let plots: uPlot[] = [];
  let ro: ResizeObserver | null = null;
  let history: AbortController | null = null;

  function setPaused(p: boolean): void {
    paused = p;
    text(pauseBtn, p ? "Resume" : "Pause");
    pauseBtn.setAttribute("aria-pressed", String(p));
    if (!p) {
      zoom = null;
      draw();
    }
    resetBtn.disabled = zoom === null;
  }

  pauseBtn.addEventListener("click", () => setPaused(!paused));
  zoomInBtn.addEventListener("click", () => {
    const [lo, hi] = zoom ?? currentRange();
    const mid = hi - (hi - lo) / 4;
    applyZoom([mid - (hi - lo) / 4, hi]);
  });
  resetBtn.addEventListener("click", () => setPaused(false));

  function currentRange(): [number, number] {
    const s = store.services.get(name);
    const last = s && s.ts.length ? s.ts[s.ts.length - 1] : store.serverNow();
    return [(last - windowMs) / 1000, last / 1000];
  }

  /** Zooming is an interaction: it pauses, as Netdata does, until Resume or Reset. */
  function applyZoom(range: [number, number]): void {
    zoom = range;
    paused = true;
    text(pauseBtn, "Resume");
    pauseBtn.setAttribute("aria-pressed", "true");
    resetBtn.disabled = false;
    for (const p of plots) p.setScale("x", { min: range[0], max: range[1] });
  }

  function build(): void {
    for (const p of plots) p.destroy();
    charts.replaceChildren();
    const c = colors();
    const sync = uPlot.sync(`svc`);
    const width = Math.max(260, charts.clientWidth || 600);
    plots = DEFS.map((def, i) => {
      const fig = h("figure", { class: "chart" }, h("figcaption", {}, def.label));
      charts.append(fig);
      const opts: uPlot.Options = {
        width,
        height: 170,
        cursor: { sync: { key: sync.key, setSeries: false }, drag: { x: true, y: false, setScale: false } },
        legend: { live: true },
        scales: { x: { time: true }, y: { range: (_u, lo, hi) => [Math.min(0, lo), hi > 0 ? hi * 1.1 : 1] } },
        series: [
          { value: (_u, v) => (v == null ? "—" : fmt.clock(v * 1000)) },
          {
            label: def.label,
            stroke: c.series[i],
            width: 1.5,
            points: { show: false },
            spanGaps: false,
            value: (_u, v) => (v == null ? "—" : def.unit(v)),
          },
        ],
        axes: [
          { stroke: c.muted, grid: { stroke: c.grid, width: 1 }, ticks: { stroke: c.grid, width: 1 } },
          {
            stroke: c.muted,
            grid: { stroke: c.grid, width: 1 },
            ticks: { stroke: c.grid, width: 1 },
            size: 76,
            values: (_u, vals) => vals.map((v) => def.unit(v)),
          },
        ],
        hooks: {
          setSelect: [
            (u) => {
              if (u.select.width < 5) return;
              const lo = u.posToVal(u.select.left, "x");
              const hi = u.posToVal(u.select.left + u.select.width, "x");
              u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
              applyZoom([lo, hi]);
            },
          ],
        },
      };
      return new uPlot(opts, [[], []], fig);
    });
    draw(true);
  }

  /** Puts the service's samples into the charts and moves the window to the newest. */
  function draw(force = false): void {
    if (paused && !force) return;
    const s = store.services.get(name);
    if (!s) return;
    const xs = s.ts.map((t) => t / 1000);
    const [lo, hi] = zoom ?? currentRange();
    let shown = 0;
    for (const t of xs) if (t >= lo && t <= hi) shown++;
    text(status, `${shown} samples shown, ${s.ts.length} samples kept`);
    DEFS.forEach((def, i) => {
      const p = plots[i];
      if (!p) return;
      p.batch(() => {
        p.setData([xs, def.pick(s)] as uPlot.AlignedData, false);
        p.setScale("x", { min: lo, max: hi });
      });
    });
  }

  function showLatest(): void {
    const s = store.services.get(name);
    const n = s ? s.ts.length : 0;
    if (!s || n === 0) {
      // Empty only once the Watch backfill arrived and the history was not refused.
      text(latest, !note.hidden ? "" : store.loaded ? `No samples of ${name} yet.` : "Waiting for the server…");
      return;
    }
    text(
      latest,
      `CPU ${fmt.cpu(s.cpu[n - 1])} · memory ${fmt.memory(s.mem[n - 1])} · requests ${fmt.rate(s.rate[n - 1])} · at ${fmt.time(s.ts[n - 1])}`,
    );
  }

  function onFlush(): void {
    if (!store.dirty.has(name)) return;
    showLatest();
    draw();
  }

  function onTheme(): void {
    build();
  }

  /** Asks GetHistory for the service and merges it: on open, and after a reconnect (the gap). */
  function loadHistory(): void {
    history?.abort();
    const ctl = new AbortController();
    history = ctl;
    telemetry
      .getHistory({ serviceName: name, limit: 0 }, { signal: ctl.signal })
      .then((r) => store.merge(name, r.samples))
      .catch((e) => {
        if (ctl.signal.aborted) return;
        const f = failure(e);
        note.hidden = false;
        text(note, `History: ${refusal(f, `read ${name}`)}`);
        showLatest();
      });
  }

  let wasLive = store.state === "live";
  function onState(): void {
    const live = store.state === "live";
    if (live && !wasLive) loadHistory();
    wasLive = live;
  }

  return {
    title: "Service",
    root,
    show(arg: string) {
      name = arg;
      text(heading, name);
      zoom = null;
      setPaused(false);
      note.hidden = true;
      showLatest();
      store.addEventListener("flush", onFlush);
      store.addEventListener("loaded", showLatest);
      themeBus.addEventListener("theme", onTheme);
      // Build once laid out, so the charts take the page's width.
      requestAnimationFrame(build);
      ro = new ResizeObserver(() => {
        const w = Math.max(260, charts.clientWidth);
        for (const p of plots) if (Math.abs(p.width - w) > 2) p.setSize({ width: w, height: 170 });
      });
      ro.observe(charts);
      // The Watch backfill holds the last two minutes; history fills the longer windows.
      wasLive = store.state === "live";
      store.addEventListener("state", onState);
      loadHistory();
    },
    hide() {
      store.removeEventListener("flush", onFlush);
      store.removeEventListener("loaded", showLatest);
      store.removeEventListener("state", onState);
      themeBus.removeEventListener("theme", onTheme);
      history?.abort();
      ro?.disconnect();
      for (const p of plots) p.destroy();
      plots = [];
      charts.replaceChildren();
    },
  };
}
