/**
 * What a conversion sent to the destination and what was there already
 * (blobs and bytes), counted as each push settles; every push is also
 * reported as a progress event.
 */
import type { ProgressEvent } from './types.js';

export type PushStatus = 'exists' | 'uploaded';

export class UploadTally {
  bytesUploaded = 0;
  bytesSkipped = 0;
  blobsUploaded = 0;
  blobsSkipped = 0;

  constructor(private readonly progress: (e: ProgressEvent) => void) {}

  /** One blob pushed (or found there already). */
  readonly account = (digest: string, size: number, status: PushStatus): void => {
    if (status === 'uploaded') {
      this.bytesUploaded += size;
      this.blobsUploaded++;
    } else {
      this.bytesSkipped += size;
      this.blobsSkipped++;
    }
    this.progress({ kind: 'blob', digest, size, status });
  };

  /** The four totals, as ConvertSummary carries them. */
  totals(): { bytesUploaded: number; bytesSkipped: number; blobsUploaded: number; blobsSkipped: number } {
    return { bytesUploaded: this.bytesUploaded, bytesSkipped: this.bytesSkipped, blobsUploaded: this.blobsUploaded, blobsSkipped: this.blobsSkipped };
  }
}
