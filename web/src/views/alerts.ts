// Alerts: every alert raised or resolved by any LiveFeed call, newest
// first, back-filled by the Watch stream, then live.
import * as fmt from "../format";
import { h, text } from "../dom";
import { store, type Alert } from "../store";
import type { View } from "../router";
import { bus, reach } from "../rpc";

export function alertsView(): View {
  const list = h("ol", { class: "feed", "aria-label": "Alerts, newest first" });
  const empty = h("p", { class: "muted" });
  const refused = h("p", { class: "denied", role: "alert", hidden: true });
  const root = h("section", { "aria-labelledby": "alerts-h" }, h("h1", { id: "alerts-h" }, "Alerts"), refused, empty, list);
  const shown = new Map<string, HTMLLIElement>();

  function item(a: Alert): HTMLLIElement {
    return h(
      "li",
      { class: a.resolved ? "resolved" : "raised" },
      h("time", { datetime: new Date(a.ts).toISOString() }, fmt.clock(a.ts)),
      h("span", { class: "badge" }, a.type),
      h("a", { href: `#/service/${encodeURIComponent(a.service)}` }, a.service),
      h("span", { class: "msg" }, a.message),
    );
  }

  /** Brings the list in line with the store, touching only new or dropped items. */
  function render(): void {
    const keep = new Set<string>();
    let prev: HTMLLIElement | null = null;
    for (const a of store.alerts) {
      keep.add(a.key);
      let li = shown.get(a.key);
      if (!li) {
        li = item(a);
        shown.set(a.key, li);
        list.insertBefore(li, prev ? prev.nextSibling : list.firstChild);
      }
      prev = li;
    }
    for (const [k, li] of shown) {
      if (!keep.has(k)) {
        li.remove();
        shown.delete(k);
      }
    }
    onRefused();
  }

  function onFlush(): void {
    if (store.alertsDirty) render();
  }
  /** Says why the feed is empty, claiming emptiness only once the Watch backfill has arrived. */
  function onRefused(): void {
    const canRead = reach("telemetry", "read");
    const why = store.refused ?? (canRead === "none" ? "This token cannot read telemetry, so no alerts: it has no telemetry:read scope." : null);
    refused.hidden = !why;
    text(refused, why ?? "");
    let note = "";
    if (!why && store.alerts.length === 0) {
      if (!store.loaded) note = store.state === "needs token" ? "Sign in to see the alerts." : "Waiting for the server…";
      else note = canRead === "some" ? "No alerts yet for the services this token can read." : "No alerts yet.";
    }
    empty.hidden = !note;
    text(empty, note);
  }

  return {
    title: "Alerts",
    root,
    show() {
      render();
      onRefused();
      store.addEventListener("flush", onFlush);
      for (const ev of ["refused", "loaded", "state", "reset"]) store.addEventListener(ev, ev === "reset" ? render : onRefused);
      bus.addEventListener("scopes", onRefused);
    },
    hide() {
      store.removeEventListener("flush", onFlush);
      for (const ev of ["refused", "loaded", "state", "reset"]) store.removeEventListener(ev, ev === "reset" ? render : onRefused);
      bus.removeEventListener("scopes", onRefused);
    },
  };
}
