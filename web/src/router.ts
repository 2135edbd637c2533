// Hash routing: `#/`, `#/service/NAME`, `#/alerts`, `#/files`, `#/chat`, `#/server`.

/** A page section: built once, shown and hidden as the route changes. */
export interface View {
  title: string;
  root: HTMLElement;
  /** Starts listening and fetching; `arg` is the route's argument (a service name). */
  show(arg: string): void;
  /** Stops every timer and stream the view started. */
  hide(): void;
}

export function parseRoute(hash: string): { name: string; arg: string } {
  const parts = hash.replace(/^#\/?/, "").split("/");
  const name = parts[0] || "overview";
  return { name, arg: decodeURIComponent(parts.slice(1).join("/")) };
}
