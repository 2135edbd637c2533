// Light, dark and automatic (the system's) theme, remembered in localStorage.
// Charts read their colours from here; `theme` events tell them to redraw.

export type Theme = "auto" | "light" | "dark";
const KEY = "streamhub.theme";

export const themeBus = new EventTarget();

export interface Colors {
  fg: string;
  muted: string;
  grid: string;
  accent: string;
  series: string[];
}

let cached: Colors | null = null;

/** The current theme's colours (read from the CSS custom properties once per theme). */
export function colors(): Colors {
  if (!cached) {
    const cs = getComputedStyle(document.documentElement);
    const v = (n: string) => cs.getPropertyValue(n).trim();
    cached = {
      fg: v("--fg"),
      muted: v("--muted"),
      grid: v("--grid"),
      accent: v("--accent"),
      series: [v("--c1"), v("--c2"), v("--c3")],
    };
  }
  return cached;
}

export function currentTheme(): Theme {
  const t = localStorage.getItem(KEY);
  return t === "light" || t === "dark" ? t : "auto";
}

export function applyTheme(t: Theme): void {
  if (t === "auto") {
    delete document.documentElement.dataset.theme;
    localStorage.removeItem(KEY);
  } else {
    document.documentElement.dataset.theme = t;
    localStorage.setItem(KEY, t);
  }
  cached = null;
  themeBus.dispatchEvent(new Event("theme"));
}

matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
  cached = null;
  themeBus.dispatchEvent(new Event("theme"));
});
