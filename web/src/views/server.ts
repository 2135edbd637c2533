// Server: version, uptime, open connections and open streams per method,
// asked every 2 s while shown; the table changes only when the answer does.
import * as fmt from "../format";
import { h, text } from "../dom";
import { failure, refusal, server } from "../rpc";
import { store } from "../store";
import type { View } from "../router";

export function serverView(): View {
  const dl = h("dl", { class: "facts" });
  const streams = h("tbody");
  const note = h("p", { class: "denied", hidden: true });
  const facts: Record<string, HTMLElement> = {};
  for (const k of ["Version", "Node", "Uptime", "Open connections", "Authentication"]) {
    facts[k] = h("dd");
    dl.append(h("dt", {}, k), facts[k]);
  }
  const body = h(
    "div",
    {},
    dl,
    h("h2", { id: "streams-h" }, "Open streams"),
    h(
      "div",
      { class: "scroll" },
      h(
        "table",
        { "aria-labelledby": "streams-h" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Method"), h("th", { scope: "col", class: "num" }, "Open"))),
        streams,
      ),
    ),
  );
  const root = h("section", { "aria-labelledby": "server-h" }, h("h1", { id: "server-h" }, "Server"), note, body);
  let timer = 0;
  let last = "";
  let startedAt = 0;

  async function load(): Promise<void> {
    try {
      const r = await server.getServerInfo({});
      note.hidden = true;
      body.hidden = false;
      startedAt = Number(r.startedAtMs);
      text(facts["Version"], r.version);
      text(facts["Node"], r.node || "—");
      text(facts["Open connections"], String(r.openConnections));
      text(facts["Authentication"], r.authEnabled ? "on" : "off");
      tick();
      const key = JSON.stringify(r.streams.map((s) => [s.method, String(s.open)]));
      if (key !== last) {
        last = key;
        streams.replaceChildren(
          ...r.streams.map((s) => h("tr", {}, h("th", { scope: "row" }, s.method), h("td", { class: "num" }, String(s.open)))),
        );
      }
    } catch (e) {
      note.hidden = false;
      body.hidden = true;
      text(note, refusal(failure(e), "read the server's information"));
    }
  }

  function tick(): void {
    if (startedAt) text(facts["Uptime"], fmt.duration((store.serverNow() - startedAt) / 1000));
  }

  return {
    title: "Server",
    root,
    show() {
      void load();
      timer = window.setInterval(() => void load(), 2000);
    },
    hide() {
      clearInterval(timer);
    },
  };
}
