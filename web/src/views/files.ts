// Files: the stored files with a download link to `/files/NAME`, and the
// uploads in progress with how many bytes the server holds. Refreshed while
// shown (every 3 s), and the tables change only when the answer does.
import * as fmt from "../format";
import { h, text } from "../dom";
import { failure, files, getToken, reach, refusal } from "../rpc";
import type { View } from "../router";

export function filesView(): View {
  const stored = h("tbody");
  const partial = h("tbody");
  const storedNote = h("p", { class: "muted" });
  const partialNote = h("p", { class: "muted" });
  const refresh = h("button", { type: "button" }, "Refresh");
  let storedWrap: HTMLElement;
  let partialWrap: HTMLElement;
  const root = h(
    "section",
    { "aria-labelledby": "files-h" },
    h("div", { class: "bar" }, h("h1", { id: "files-h" }, "Files"), refresh),
    h("h2", { id: "stored-h" }, "Stored files"),
    storedNote,
    (storedWrap = h(
      "div",
      { class: "scroll" },
      h(
        "table",
        { "aria-labelledby": "stored-h" },
        h(
          "thead",
          {},
          h("tr", {}, ...["Name", "Size", "SHA-256", "Stored at"].map((c) => h("th", { scope: "col" }, c))),
        ),
        stored,
      ),
    )),
    h("h2", { id: "partial-h" }, "Uploads in progress"),
    partialNote,
    (partialWrap = h(
      "div",
      { class: "scroll" },
      h(
        "table",
        { "aria-labelledby": "partial-h" },
        h(
          "thead",
          {},
          h("tr", {}, ...["Name", "Held", "Writing now", "Expires"].map((c) => h("th", { scope: "col" }, c))),
        ),
        partial,
      ),
    )),
  );

  let timer = 0;
  let lastStored = "";
  let lastPartial = "";

  async function load(): Promise<void> {
    try {
      const r = await files.listFiles({});
      const key = JSON.stringify(r.files.map((f) => [f.filename, String(f.size), fmt.hex(f.sha256), String(f.modifiedMs)]));
      if (key !== lastStored) {
        lastStored = key;
        stored.replaceChildren(
          ...r.files.map((f) => {
            const href = `/files/${encodeURIComponent(f.filename)}`;
            const link = h("a", { href, download: f.filename }, f.filename);
            link.addEventListener("click", (e) => download(e, href, f.filename));
            return h(
              "tr",
              {},
              h("th", { scope: "row" }, link),
              h("td", { class: "num" }, fmt.bytes(Number(f.size))),
              h("td", { class: "hash" }, fmt.hex(f.sha256)),
              h("td", {}, fmt.time(Number(f.modifiedMs))),
            );
          }),
        );
      }
      text(storedNote, r.files.length ? "" : reach("upload", "read") === "some" ? "No file this token can read is stored." : "No files stored yet.");
      storedWrap.hidden = r.files.length === 0;
      storedNote.className = "muted";
    } catch (e) {
      lastStored = "";
      stored.replaceChildren();
      storedWrap.hidden = true;
      storedNote.className = "denied";
      text(storedNote, refusal(failure(e), "read files"));
    }
    try {
      const r = await files.listUploads({});
      const key = JSON.stringify(r.uploads.map((u) => [u.filename, String(u.heldBytes), u.inProgress, String(u.expiresAtMs)]));
      if (key !== lastPartial) {
        lastPartial = key;
        partial.replaceChildren(
          ...r.uploads.map((u) =>
            h(
              "tr",
              {},
              h("th", { scope: "row" }, u.filename),
              h("td", { class: "num" }, fmt.bytes(Number(u.heldBytes))),
              h("td", {}, u.inProgress ? "yes" : "no"),
              h("td", {}, u.expiresAtMs ? fmt.time(Number(u.expiresAtMs)) : "never"),
            ),
          ),
        );
      }
      text(partialNote, r.uploads.length ? "" : reach("upload", "write") === "some" ? "No upload this token can see is in progress." : "No uploads in progress.");
      partialWrap.hidden = r.uploads.length === 0;
      partialNote.className = "muted";
    } catch (e) {
      lastPartial = "";
      partial.replaceChildren();
      partialWrap.hidden = true;
      partialNote.className = "denied";
      text(partialNote, refusal(failure(e), "see uploads in progress"));
    }
  }

  refresh.addEventListener("click", () => void load());

  return {
    title: "Files",
    root,
    show() {
      void load();
      timer = window.setInterval(() => void load(), 3000);
    },
    hide() {
      clearInterval(timer);
    },
  };
}

/**
 * With a token the download must carry it in `authorization`, which a plain
 * link cannot: fetch it with the header and save the blob. Without one the
 * browser follows the link and streams the file to disk itself.
 */
async function download(e: MouseEvent, href: string, name: string): Promise<void> {
  const token = getToken();
  if (!token) return;
  e.preventDefault();
  const r = await fetch(href, { headers: { authorization: `Bearer ${token}` } });
  if (!r.ok) {
    alert(`Download of ${name} failed: HTTP ${r.status} ${await r.text()}`);
    return;
  }
  const url = URL.createObjectURL(await r.blob());
  const a = h("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
