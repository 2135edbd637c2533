// The browser's gRPC-Web clients (one transport for the page, same origin),
// the bearer token kept for the browser session, and how a failed call is
// classified: transient (reconnect with backoff), needs a token, denied.
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { ChatService } from "./gen/chat_pb";
import { FileUploadService } from "./gen/fileupload_pb";
import { ServerService } from "./gen/server_pb";
import { TelemetryService } from "./gen/telemetry_pb";

const TOKEN_KEY = "streamhub.token";

/** The token the person gave, kept for this browser session only. */
export function getToken(): string | null {
  try {
    return sessionStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

/** Page-wide events: `auth` when the token changes, `unauthenticated` when a call needs one. */
export const bus = new EventTarget();

export function setToken(token: string | null): void {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // Storage refused (private mode): the token lives until the page closes.
  }
  memoryToken = token;
  bus.dispatchEvent(new Event("auth"));
}

let memoryToken: string | null = getToken();

const bearer: Interceptor = (next) => (req) => {
  const token = memoryToken;
  if (token) req.header.set("authorization", `Bearer ${token}`);
  return next(req);
};

const transport = createGrpcWebTransport({
  baseUrl: location.origin,
  interceptors: [bearer],
});

export const telemetry = createClient(TelemetryService, transport);
export const chat = createClient(ChatService, transport);
export const files = createClient(FileUploadService, transport);
export const server = createClient(ServerService, transport);

export { Code };

/** A failed call's code and the server's message. */
export interface Failure {
  code: Code;
  message: string;
}

export function failure(e: unknown): Failure {
  const err = ConnectError.from(e);
  if (err.code === Code.Unauthenticated) bus.dispatchEvent(new Event("unauthenticated"));
  return { code: err.code, message: err.rawMessage };
}

/** Worth retrying after a pause: the server went away, restarts, or cut a slow reader. */
export function isTransient(code: Code): boolean {
  return (
    code === Code.Unavailable ||
    code === Code.Unknown ||
    code === Code.Internal ||
    code === Code.Canceled ||
    code === Code.DeadlineExceeded ||
    code === Code.ResourceExhausted ||
    code === Code.Aborted
  );
}

/**
 * What a section shows when its call was refused for good; `what` names
 * what the section reads, as in "this token cannot read files".
 */
export function refusal(f: Failure, what: string): string {
  switch (f.code) {
    case Code.PermissionDenied:
      return `This token cannot ${what}: ${f.message}`;
    case Code.Unauthenticated:
      return `Sign in with a token to see this (${f.message}).`;
    case Code.Unimplemented:
      return `This server does not offer it: ${f.message}`;
    default:
      return `${Code[f.code]}: ${f.message}`;
  }
}

/** What the identity may do, from WhoAmI: `null` until it answered or with authentication off. */
export let scopes: string[] | null = null;

export function setScopes(s: string[] | null): void {
  scopes = s;
  bus.dispatchEvent(new Event("scopes"));
}

/**
 * How much of `resource` the identity may `action`, from its scopes
 * (`*` or `resource:action:pattern`, either part `*`): "all" names, "some"
 * (a pattern narrower than `*`), or "none". "all" while WhoAmI has not
 * answered or authentication is off (the server is then the judge).
 */
export function reach(resource: string, action: string): "all" | "some" | "none" {
  if (scopes === null) return "all";
  let some = false;
  for (const s of scopes) {
    if (s === "*") return "all";
    const [r, a, ...rest] = s.split(":");
    if ((r !== "*" && r !== resource) || (a !== "*" && a !== action)) continue;
    if (rest.join(":") === "*") return "all";
    some = true;
  }
  return some ? "some" : "none";
}

/** Backoff before reconnect attempt `n` (1-based): 250 ms doubling to 5 s, with jitter. */
export function backoffMs(n: number): number {
  const base = Math.min(5000, 250 * 2 ** Math.max(0, n - 1));
  return base * (0.75 + Math.random() * 0.5);
}

/** Resolves after `ms`, or earlier when `signal` aborts or the token changes. */
export function pause(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      bus.removeEventListener("auth", done);
      window.removeEventListener("online", done);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    bus.addEventListener("auth", done);
    window.addEventListener("online", done);
    signal?.addEventListener("abort", done);
  });
}
