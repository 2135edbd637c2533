// The page's one multiplexed Watch stream and what it has delivered: every
// service's recent samples and the alert feed. Views never open streams of
// their own for telemetry; they read this store and are told, once per
// animation frame, which services changed.
import type { MetricsResponse } from "./gen/telemetry_pb";
import { Code, backoffMs, bus, failure, isTransient, pause, refusal, telemetry } from "./rpc";
import { frameBatcher } from "./dom";

/** Samples kept per service in the page (one hour at 1 Hz). */
export const MAX_SAMPLES = 3600;
/** Samples per service asked for in the Watch backfill (sparklines, 1 min chart). */
const WATCH_BACKFILL = 120;
/** Alerts kept and back-filled. */
const MAX_ALERTS = 500;

export interface Series {
  name: string;
  /** Sample times, Unix ms, strictly increasing. */
  ts: number[];
  cpu: number[];
  mem: number[];
  count: number[];
  /** Requests per second between a sample and the one before (null: unknown or counter reset). */
  rate: (number | null)[];
}

export interface Alert {
  key: string;
  service: string;
  type: string;
  message: string;
  value: number;
  ts: number;
  resolved: boolean;
}

/**
 * What the connection indicator says: "needs token" while the server
 * refuses the page for want of a (valid) token, "refused" when it refuses
 * the Watch stream for another lasting reason; never "live" unless the
 * Watch stream is delivering.
 */
export type ConnState = "connecting" | "live" | "reconnecting" | "offline" | "needs token" | "refused";

class Store extends EventTarget {
  services = new Map<string, Series>();
  alerts: Alert[] = [];
  private alertKeys = new Set<string>();
  state: ConnState = "connecting";
  /** The current Watch stream has delivered its backfill (the live marker): an empty store is then known to be empty. */
  loaded = false;
  /** Why the Watch stream is refused for good (permission, not offered), or null. */
  refused: string | null = null;
  /** Server clock minus browser clock, ms (from the live marker). */
  clockOffset = 0;
  /** Services whose data changed since the last `flush` event. */
  dirty = new Set<string>();
  alertsDirty = false;
  private flushSoon = frameBatcher(() => this.flush());

  serverNow(): number {
    return Date.now() + this.clockOffset;
  }

  series(name: string): Series {
    let s = this.services.get(name);
    if (!s) {
      s = { name, ts: [], cpu: [], mem: [], count: [], rate: [] };
      this.services.set(name, s);
    }
    return s;
  }

  /** Appends one live sample (older or repeated ones are merged instead). */
  addSample(m: MetricsResponse): void {
    const s = this.series(m.serviceName);
    const t = Number(m.timestampMs);
    const n = s.ts.length;
    if (n > 0 && t <= s.ts[n - 1]) {
      this.merge(m.serviceName, [m]);
      return;
    }
    const c = Number(m.requestCount);
    s.ts.push(t);
    s.cpu.push(m.cpuUsage);
    s.mem.push(m.memoryMb);
    s.count.push(c);
    s.rate.push(n > 0 ? rateBetween(s.ts[n - 1], s.count[n - 1], t, c) : null);
    if (s.ts.length > MAX_SAMPLES + 200) trim(s);
    this.touch(m.serviceName);
  }

  /** Merges a batch of samples (backfill, history) into a service, by timestamp. */
  merge(name: string, samples: MetricsResponse[]): void {
    const s = this.series(name);
    const byTs = new Map<number, [number, number, number]>();
    for (let i = 0; i < s.ts.length; i++) byTs.set(s.ts[i], [s.cpu[i], s.mem[i], s.count[i]]);
    for (const m of samples) byTs.set(Number(m.timestampMs), [m.cpuUsage, m.memoryMb, Number(m.requestCount)]);
    const ts = [...byTs.keys()].sort((a, b) => a - b).slice(-MAX_SAMPLES);
    s.ts = ts;
    s.cpu = [];
    s.mem = [];
    s.count = [];
    s.rate = [];
    for (let i = 0; i < ts.length; i++) {
      const [c, mem, count] = byTs.get(ts[i])!;
      s.cpu.push(c);
      s.mem.push(mem);
      s.count.push(count);
      s.rate.push(i > 0 ? rateBetween(ts[i - 1], s.count[i - 1], ts[i], count) : null);
    }
    this.touch(name);
  }

  addAlert(service: string, type: string, message: string, value: number, ts: number): void {
    const key = `${service}\u0000${type}\u0000${ts}\u0000${message}`;
    if (this.alertKeys.has(key)) return;
    this.alertKeys.add(key);
    const a: Alert = { key, service, type, message, value, ts, resolved: type.endsWith("_RESOLVED") };
    // Newest first; a back-filled alert older than the newest goes in its place.
    let i = 0;
    while (i < this.alerts.length && this.alerts[i].ts > ts) i++;
    this.alerts.splice(i, 0, a);
    while (this.alerts.length > MAX_ALERTS) this.alertKeys.delete(this.alerts.pop()!.key);
    this.alertsDirty = true;
    this.flushSoon();
  }

  /** Forgets everything delivered (a new identity may see less); views rebuild on `reset`. */
  reset(): void {
    this.services.clear();
    this.alerts = [];
    this.alertKeys.clear();
    this.dirty.clear();
    this.loaded = false;
    this.refused = null;
    this.dispatchEvent(new Event("reset"));
  }

  setState(state: ConnState): void {
    if (this.state === state) return;
    this.state = state;
    this.dispatchEvent(new Event("state"));
  }

  private touch(name: string): void {
    this.dirty.add(name);
    this.flushSoon();
  }

  private flush(): void {
    this.dispatchEvent(new Event("flush"));
    this.dirty.clear();
    this.alertsDirty = false;
  }
}

function rateBetween(t0: number, c0: number, t1: number, c1: number): number | null {
  const dt = (t1 - t0) / 1000;
  if (dt <= 0 || c1 < c0) return null;
  return (c1 - c0) / dt;
}

function trim(s: Series): void {
  const drop = s.ts.length - MAX_SAMPLES;
  s.ts.splice(0, drop);
  s.cpu.splice(0, drop);
  s.mem.splice(0, drop);
  s.count.splice(0, drop);
  s.rate.splice(0, drop);
  s.rate[0] = null;
}

export const store = new Store();

/**
 * Keeps one Watch stream open for the page: backfill, then live; on a
 * transient failure reconnects with backoff and asks for the backfill
 * again, which fills the gap (samples merge by timestamp, alerts by key).
 */
export async function runWatch(): Promise<void> {
  let attempt = 0;
  let everLive = false;
  for (;;) {
    store.setState(everLive ? "reconnecting" : attempt > 0 ? "reconnecting" : "connecting");
    const ctl = new AbortController();
    const restart = () => ctl.abort();
    bus.addEventListener("auth", restart);
    try {
      const stream = telemetry.watch({
        pattern: "*",
        intervalMs: 1000,
        backfillSamples: WATCH_BACKFILL,
        alerts: true,
        backfillAlerts: MAX_ALERTS,
      }, { signal: ctl.signal });
      for await (const ev of stream) {
        switch (ev.event.case) {
          case "sample":
            store.addSample(ev.event.value);
            break;
          case "backfill":
            store.merge(ev.event.value.serviceName, ev.event.value.samples);
            break;
          case "alert": {
            const a = ev.event.value;
            if (a.alert) {
              store.addAlert(a.serviceName, a.alert.alertType, a.alert.message, a.alert.value, Number(a.alert.timestampMs));
            }
            break;
          }
          case "live":
            store.clockOffset = Number(ev.event.value.timestampMs) - Date.now();
            store.refused = null;
            everLive = true;
            attempt = 0;
            store.loaded = true;
            store.setState("live");
            store.dispatchEvent(new Event("loaded"));
            break;
        }
      }
      // The server ended the stream without a status: treat as a restart.
    } catch (e) {
      if (ctl.signal.aborted) {
        // A new token: start again at once, as a first connection.
        attempt = 0;
        everLive = false;
        continue;
      }
      const f = failure(e);
      if (!isTransient(f.code)) {
        // Not "live": nothing is delivered until a token (or the server) changes.
        store.refused = f.code === Code.Unauthenticated ? null : refusal(f, "read telemetry");
        store.setState(f.code === Code.Unauthenticated ? "needs token" : "refused");
        store.dispatchEvent(new Event("refused"));
        // Wait for a new token (or retry slowly in case the server changes).
        await pause(f.code === Code.Unauthenticated ? 3_600_000 : 30_000);
        attempt = 0;
        continue;
      }
    } finally {
      bus.removeEventListener("auth", restart);
    }
    attempt++;
    if (attempt > 8) store.setState("offline");
    else store.setState("reconnecting");
    await pause(backoffMs(attempt));
  }
}

// A new token (or none): what the old identity was shown goes, the refusal may be gone.
bus.addEventListener("auth", () => {
  store.reset();
  store.dispatchEvent(new Event("refused"));
});
