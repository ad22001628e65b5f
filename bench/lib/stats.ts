/** Summary statistics of raw samples (SOCI-style: mean, stdDev, min, pct25/50/75/90, max). */
export interface Summary {
  n: number;
  mean: number;
  stdDev: number;
  min: number;
  pct25: number;
  median: number;
  pct75: number;
  pct90: number;
  max: number;
}

/** Linear-interpolated percentile (p in 0..100) of unsorted samples. */
export function percentile(samples: number[], p: number): number {
  if (samples.length === 0) return NaN;
  const s = [...samples].sort((a, b) => a - b);
  const k = ((s.length - 1) * p) / 100;
  const lo = Math.floor(k);
  const hi = Math.ceil(k);
  return s[lo]! + (s[hi]! - s[lo]!) * (k - lo);
}

export const median = (samples: number[]): number => percentile(samples, 50);

export function summarize(samples: number[]): Summary {
  const n = samples.length;
  const mean = n ? samples.reduce((a, b) => a + b, 0) / n : NaN;
  const variance = n > 1 ? samples.reduce((a, b) => a + (b - mean) ** 2, 0) / (n - 1) : 0;
  return {
    n,
    mean,
    stdDev: Math.sqrt(variance),
    min: n ? Math.min(...samples) : NaN,
    pct25: percentile(samples, 25),
    median: percentile(samples, 50),
    pct75: percentile(samples, 75),
    pct90: percentile(samples, 90),
    max: n ? Math.max(...samples) : NaN,
  };
}
