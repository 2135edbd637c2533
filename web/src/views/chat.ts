// Chat: a room's recent history, then live messages (WatchRoom); lines sent
// with Enter (Send, with an idempotency key, retried under the same key
// until acknowledged). After a dropped stream it resumes with `after_seq` of
// the last message seen, so nothing is lost or shown twice.
import * as fmt from "../format";
import { h, text } from "../dom";
import { backoffMs, bus, chat, failure, isTransient, pause, refusal } from "../rpc";
import { MessageKind, type ChatMessage } from "../gen/chat_pb";
import type { View } from "../router";

const HISTORY = 100;
/** Messages kept on screen per room. */
const MAX_LINES = 1000;

/** This page's sender id prefix for idempotency keys (unique per page load). */
const PAGE_ID = Math.random().toString(36).slice(2, 10);

let identity: string | null = null;
/** Set by the WhoAmI answer: under authentication the member name is the identity. */
export function setChatIdentity(id: string | null): void {
  identity = id;
  bus.dispatchEvent(new Event("chat-identity"));
}

export function chatView(): View {
  const room = h("input", { id: "room", name: "room", autocomplete: "off", value: localStorage.getItem("streamhub.room") ?? "lobby", list: "rooms" });
  const rooms = h("datalist", { id: "rooms" });
  const member = h("input", { id: "member", name: "member", autocomplete: "nickname", value: sessionStorage.getItem("streamhub.member") ?? `web-${PAGE_ID.slice(0, 4)}` });
  const join = h("button", { type: "submit" }, "Join");
  const log = h("ol", { class: "chat-log", role: "log", "aria-label": "Conversation", "aria-live": "polite" });
  const message = h("input", { id: "message", name: "message", autocomplete: "off", enterkeyhint: "send" });
  const status = h("p", { class: "muted", role: "status" });
  const roomForm = h(
    "form",
    { class: "row" },
    h("label", { for: "room" }, "Room"),
    room,
    rooms,
    h("label", { for: "member" }, "Name"),
    member,
    join,
  );
  const sendForm = h("form", { class: "row send" }, h("label", { for: "message" }, "Message"), message, h("button", { type: "submit" }, "Send"));
  const root = h("section", { "aria-labelledby": "chat-h" }, h("h1", { id: "chat-h" }, "Chat"), roomForm, status, log, sendForm);

  let current = "";
  let ctl: AbortController | null = null;
  let lastSeq = 0n;
  let epoch = 0n;
  const seen = new Map<string, HTMLLIElement>();
  /** Lines sent and not yet seen stored, by idempotency key. */
  const pending = new Map<string, HTMLLIElement>();
  let sendCounter = 0;

  function rememberRoom(name: string): void {
    const list = JSON.parse(localStorage.getItem("streamhub.rooms") ?? "[]") as string[];
    const next = [name, ...list.filter((r) => r !== name)].slice(0, 10);
    localStorage.setItem("streamhub.rooms", JSON.stringify(next));
    localStorage.setItem("streamhub.room", name);
    rooms.replaceChildren(...next.map((r) => h("option", { value: r })));
  }

  function who(): string {
    return identity ?? (member.value.trim() || `web-${PAGE_ID.slice(0, 4)}`);
  }

  /** Adds a stored message once (keyed by epoch and seq), in seq order. */
  function add(m: ChatMessage): void {
    if (m.seq === 0n) return;
    if (m.idempotencyKey) {
      pending.get(m.idempotencyKey)?.remove();
      pending.delete(m.idempotencyKey);
    }
    const key = `${m.epoch}:${m.seq}`;
    if (seen.has(key)) return;
    const ts = Number(m.timestampMs) || Number(m.timestamp) * 1000;
    let li: HTMLLIElement;
    if (m.kind === MessageKind.KIND_JOINED || m.kind === MessageKind.KIND_LEFT) {
      li = h(
        "li",
        { class: "presence", "data-seq": String(m.seq) },
        h("time", { datetime: new Date(ts).toISOString() }, fmt.clock(ts)),
        ` ${m.sender} ${m.kind === MessageKind.KIND_JOINED ? "joined" : "left"}`,
      );
    } else {
      li = h(
        "li",
        { "data-seq": String(m.seq) },
        h("time", { datetime: new Date(ts).toISOString() }, fmt.clock(ts)),
        " ",
        h("b", {}, m.sender),
        ": ",
        h("span", { class: "msg" }, m.message),
      );
    }
    seen.set(key, li);
    // Messages come in seq order; one answered by Send may overtake the stream.
    let after: Element | null = log.lastElementChild;
    while (after && after.getAttribute("data-seq") && BigInt(after.getAttribute("data-seq")!) > m.seq) after = after.previousElementSibling;
    const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
    log.insertBefore(li, after ? after.nextSibling : log.firstChild);
    while (log.children.length > MAX_LINES) log.firstElementChild?.remove();
    if (m.epoch === epoch && m.seq > lastSeq) lastSeq = m.seq;
    if (stick) log.scrollTop = log.scrollHeight;
  }

  async function watch(name: string, signal: AbortSignal): Promise<void> {
    let attempt = 0;
    while (!signal.aborted) {
      try {
        const resume = lastSeq > 0n;
        const stream = chat.watchRoom(
          resume
            ? { room: name, afterSeq: lastSeq, epoch, member: who() }
            : { room: name, history: HISTORY, member: who() },
          { signal },
        );
        text(status, `In room ${name}${resume ? " (resumed)" : ""}.`);
        for await (const m of stream) {
          attempt = 0;
          if (m.kind === MessageKind.KIND_SHUTDOWN) {
            text(status, "The server is shutting down; reconnecting…");
            continue;
          }
          if (m.epoch !== epoch) {
            // A new history epoch: what we knew no longer applies.
            if (epoch !== 0n) lastSeq = 0n;
            epoch = m.epoch;
          }
          add(m);
        }
      } catch (e) {
        if (signal.aborted) return;
        const f = failure(e);
        if (!isTransient(f.code)) {
          text(status, refusal(f, `join room ${name}`));
          if (lastSeq > 0n) {
            // The history may no longer reach back to our seq: start over from the recent history.
            lastSeq = 0n;
          }
          await pause(30_000, signal);
          continue;
        }
      }
      attempt++;
      text(status, `Disconnected from room ${name}; reconnecting…`);
      await pause(backoffMs(attempt), signal);
    }
  }

  function enter(name: string): void {
    if (name === current && ctl) return;
    ctl?.abort();
    current = name;
    lastSeq = 0n;
    epoch = 0n;
    seen.clear();
    log.replaceChildren();
    rememberRoom(name);
    ctl = new AbortController();
    void watch(name, ctl.signal);
  }

  roomForm.addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("streamhub.member", member.value.trim());
    const name = room.value.trim() || "lobby";
    if (name !== current) enter(name);
  });

  /** Sends one line, retrying under the same key until the server stores it. */
  async function send(line: string): Promise<void> {
    const key = `${who()}-${PAGE_ID}-${++sendCounter}`;
    const r = current;
    const item = h("li", { class: "pending" }, h("b", {}, who()), ": ", line, " ", h("small", {}, "(sending…)"));
    pending.set(key, item);
    log.append(item);
    log.scrollTop = log.scrollHeight;
    for (let attempt = 1; ; attempt++) {
      try {
        const stored = await chat.send({ room: r, message: { sender: who(), message: line, idempotencyKey: key } });
        item.remove();
        pending.delete(key);
        if (r === current) add(stored);
        return;
      } catch (e) {
        const f = failure(e);
        if (!isTransient(f.code)) {
          pending.delete(key);
          item.classList.add("failed");
          item.lastElementChild!.textContent = `(not sent: ${refusal(f, `send to room ${r}`)})`;
          return;
        }
        await pause(backoffMs(attempt));
      }
    }
  }

  sendForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const line = message.value;
    if (!line.trim()) return;
    message.value = "";
    void send(line);
  });

  bus.addEventListener("chat-identity", () => {
    member.disabled = identity !== null;
    if (identity) member.value = identity;
  });
  rememberRoom(room.value || "lobby");

  return {
    title: "Chat",
    root,
    show() {
      enter(room.value.trim() || "lobby");
      message.focus();
    },
    hide() {
      // Leave the room: the stream ends and the server announces the leave.
      ctl?.abort();
      ctl = null;
      current = "";
    },
  };
}
