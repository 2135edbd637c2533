// Numbers as the CLI prints them (src/cli/telemetry.rs, src/cli/upload.rs),
// so a person can compare the page with `streamhub subscribe`.

/**
 * `v` with `digits` decimals as Rust's `{:.N}` writes it: the exact binary
 * value rounded to nearest with ties to even (`12.25` -> `12.2`, `2.5` ->
 * `2`), where `toFixed` rounds ties up (`12.3`, `3`). A tie is exact, so
 * the 100 exact decimals `toFixed(100)` gives are enough to see one.
 */
export function fixed(v: number, digits: number): string {
  if (!Number.isFinite(v)) return Number.isNaN(v) ? "NaN" : v > 0 ? "inf" : "-inf";
  const sign = v < 0 || Object.is(v, -0) ? "-" : "";
  const a = Math.abs(v);
  if (a >= 1e21) return sign + a.toFixed(digits);
  const [int, frac] = a.toFixed(100).split(".");
  const rest = frac.slice(digits);
  const tie = rest[0] === "5" && /^0*$/.test(rest.slice(1));
  const kept = digits > 0 ? `${int}.${frac.slice(0, digits)}` : int;
  if (tie && Number(kept.slice(-1)) % 2 === 0) return sign + kept;
  return sign + a.toFixed(digits);
}

/** CPU with one decimal and `%`, as `CPU {:>5.1}%`. */
export function cpu(v: number): string {
  return `${fixed(v, 1)}%`;
}

/** Memory in whole MB, as `memory {:>8.0} MB`. */
export function memory(v: number): string {
  return `${fixed(v, 0)} MB`;
}

/** Requests per second from request_count deltas. */
export function rate(v: number | null | undefined): string {
  if (v == null || !Number.isFinite(v)) return "—";
  return `${v < 10 ? v.toFixed(1) : v.toFixed(0)}/s`;
}

/** Bytes in binary units with two decimals, as indicatif's HumanBytes. */
export function bytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${fixed(v, 2)} ${units[i]}`;
}

/** RFC 3339 in UTC with milliseconds, as the CLI's timestamps. */
export function time(ms: number): string {
  return ms > 0 ? new Date(ms).toISOString() : "—";
}

/** Local wall-clock time of day, for feeds. */
export function clock(ms: number): string {
  return new Date(ms).toLocaleTimeString(undefined, { hour12: false });
}

/** A duration in seconds as `42 s`, `3 min 5 s`, `2 h 4 min`, `1 d 3 h`. */
export function duration(s: number): string {
  s = Math.max(0, Math.floor(s));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  const h = Math.floor(m / 60);
  if (h < 24) return `${h} h ${m % 60} min`;
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

export function hex(b: Uint8Array): string {
  let out = "";
  for (const x of b) out += x.toString(16).padStart(2, "0");
  return out;
}
