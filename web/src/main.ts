// The page: header (navigation, connection indicator, identity, theme),
// the token form when the server asks for one, and the hash router that
// shows one view at a time. Telemetry comes from the one Watch stream in
// store.ts; the chat view opens its own WatchRoom while shown.
import "./style.css";
import { h, text } from "./dom";
import { Code, bus, failure, getToken, server, setScopes, setToken } from "./rpc";
import { parseRoute, type View } from "./router";
import { runWatch, store } from "./store";
import { applyTheme, currentTheme, type Theme } from "./theme";
import { alertsView } from "./views/alerts";
import { chatView, setChatIdentity } from "./views/chat";
import { filesView } from "./views/files";
import { overview } from "./views/overview";
import { serverView } from "./views/server";
import { serviceView } from "./views/service";

const NAV: [string, string][] = [
  ["overview", "Overview"],
  ["alerts", "Alerts"],
  ["files", "Files"],
  ["chat", "Chat"],
  ["server", "Server"],
];

const views: Record<string, () => View> = {
  overview,
  service: serviceView,
  alerts: alertsView,
  files: filesView,
  chat: chatView,
  server: serverView,
};

function header(): HTMLElement {
  const conn = h("span", { class: "conn", role: "status", "aria-label": "Connection", "data-state": store.state }, store.state);
  store.addEventListener("state", () => {
    conn.dataset.state = store.state;
    text(conn, store.state);
  });
  const links = NAV.map(([route, label]) => h("a", { href: `#/${route === "overview" ? "" : route}`, "data-route": route }, label));
  const theme = h(
    "select",
    { id: "theme" },
    ...(["auto", "light", "dark"] as Theme[]).map((t) => h("option", { value: t, selected: currentTheme() === t }, t)),
  );
  theme.addEventListener("change", () => applyTheme(theme.value as Theme));
  const who = h("span", { class: "who", hidden: true });
  const signOut = h("button", { type: "button", hidden: true }, "Sign out");
  signOut.addEventListener("click", () => setToken(null));
  bus.addEventListener("identity", ((e: CustomEvent<string | null>) => {
    who.hidden = !e.detail;
    text(who, e.detail ? `Signed in as ${e.detail}` : "");
    signOut.hidden = !getToken();
  }) as EventListener);
  return h(
    "header",
    {},
    h("a", { href: "#/", class: "brand" }, "streamhub"),
    h("nav", { "aria-label": "Sections" }, ...links),
    h("div", { class: "tools" }, conn, who, signOut, h("label", { for: "theme" }, "Theme"), theme),
  );
}

/** The form shown when a call answers UNAUTHENTICATED. */
function tokenForm(): HTMLElement {
  const input = h("input", { id: "token", type: "password", autocomplete: "off", required: true });
  const why = h("p", {}, "This server needs a token. It is kept for this browser session only.");
  const form = h(
    "form",
    { class: "token", hidden: true, "aria-labelledby": "token-h" },
    h("h2", { id: "token-h" }, "Sign in"),
    why,
    h("div", { class: "row" }, h("label", { for: "token" }, "Token"), input, h("button", { type: "submit" }, "Use token")),
  );
  bus.addEventListener("unauthenticated", () => {
    if (!form.hidden) return;
    form.hidden = false;
    text(why, getToken() ? "The server refused the token. Enter another one." : "This server needs a token. It is kept for this browser session only.");
    input.focus();
  });
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const t = input.value.trim();
    if (!t) return;
    form.hidden = true;
    input.value = "";
    setToken(t);
  });
  return form;
}

/** Asks WhoAmI who the server sees; shown in the header when authentication is on. */
async function whoAmI(): Promise<void> {
  try {
    const r = await server.whoAmI({});
    const id = r.authEnabled ? r.identity : null;
    setScopes(r.authEnabled ? r.scopes : null);
    setChatIdentity(id);
    bus.dispatchEvent(new CustomEvent("identity", { detail: id }));
  } catch (e) {
    const f = failure(e);
    setScopes(null);
    if (f.code !== Code.Unimplemented) bus.dispatchEvent(new CustomEvent("identity", { detail: null }));
  }
}

function start(): void {
  applyTheme(currentTheme());
  const main = h("main", { id: "main", tabindex: -1 });
  document.body.append(
    h("a", { href: "#main", class: "skip" }, "Skip to content"),
    header(),
    tokenForm(),
    main,
  );

  const built = new Map<string, View>();
  let shown: View | null = null;
  let shownKey = "";
  function route(): void {
    const { name, arg } = parseRoute(location.hash);
    const key = views[name] ? name : "overview";
    const routeKey = `${key}/${arg}`;
    if (routeKey === shownKey) return;
    shown?.hide();
    let v = built.get(key);
    if (!v) {
      v = views[key]();
      built.set(key, v);
    }
    main.replaceChildren(v.root);
    shown = v;
    shownKey = routeKey;
    v.show(arg);
    document.title = key === "service" ? `${arg} · streamhub` : `${v.title} · streamhub`;
    for (const a of document.querySelectorAll<HTMLAnchorElement>("nav a")) {
      if (a.dataset.route === key) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
  }
  window.addEventListener("hashchange", route);
  route();

  bus.addEventListener("auth", () => {
    void whoAmI();
    // Views that fetch on show fetch again with the new credentials.
    if (shown) {
      const v = shown;
      v.hide();
      v.show(parseRoute(location.hash).arg);
    }
  });
  window.addEventListener("offline", () => store.setState("offline"));
  void whoAmI();
  void runWatch();
}

start();
