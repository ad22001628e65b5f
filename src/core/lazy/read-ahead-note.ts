/**
 * The read-ahead a daemon ran with, noted in its pool directory
 * (ROOT/pool/read-ahead, the window in bytes), for `gear prefetch
 * --from-pool`: a prefetch list is recorded from the files a run left in the
 * pool, and read-ahead also leaves there the pack neighbours it brought along
 * with each miss, which the task never opened. With read-ahead on, the list
 * then holds them too (bench, pyapp-1: 803 files listed against 81 with
 * GEAR_READ_AHEAD=0, 11.8 MB received against 8.8 at each cold start). Leaving
 * them out instead would drop the ones the task did open later: such an open
 * finds the file in the pool and never reaches the daemon. So a faithful list
 * is recorded with read-ahead off, and the note lets `gear prefetch` say so.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { writeFileAtomic } from '../sys/fsutil.js';

export const READ_AHEAD_NOTE = 'read-ahead';

/** Writes the note (at daemon start, once the pool is open). */
export async function noteReadAhead(poolDir: string, bytes: number): Promise<void> {
  await writeFileAtomic(path.join(poolDir, READ_AHEAD_NOTE), `${Math.max(0, Math.floor(bytes))}\n`, 0o644);
}

/** The read-ahead window noted in a pool directory, or undefined when there is no readable note. */
export async function notedReadAhead(poolDir: string): Promise<number | undefined> {
  let text: string;
  try {
    const fh = await fs.open(path.join(poolDir, READ_AHEAD_NOTE), 'r');
    try {
      // A few digits; never more than this is read.
      const buf = Buffer.alloc(32);
      const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
      text = buf.subarray(0, bytesRead).toString('utf8').trim();
    } finally {
      await fh.close();
    }
  } catch {
    return undefined;
  }
  if (!/^\d{1,15}$/.test(text)) return undefined;
  return Number(text);
}
