/**
 * The types of a conversion (gear convert, prefetch, copy): options, progress
 * events and the summary.
 */
import type { ReusableImage } from './reuse.js';

export type ProgressEvent =
  | { kind: 'layer'; index: number; count: number; name: string }
  | { kind: 'file-bytes'; bytes: number }
  | { kind: 'layer-bytes'; bytes: number }
  | { kind: 'upload-plan'; blobs: number; bytes: number }
  | { kind: 'blob'; digest: string; size: number; status: 'exists' | 'uploaded' }
  | { kind: 'pack'; digest: string; size: number; status: 'exists' | 'uploaded' | 'present' | 'mounted' | 'copied' }
  | { kind: 'phase'; phase: string };

export interface ConvertOptions {
  /** Blob uploads in flight (default 4). */
  concurrency?: number;
  /** Gear files per keep-alive manifest (default 10,000; always kept under 4 MiB). */
  filesPerManifest?: number;
  /**
   * How Gear files are stored: 'auto' (default) gzips a file when that saves
   * at least 10% (docs/format.md, "Storing Gear files"); 'raw' never compresses.
   * Version 3: 'auto' stores a member as zstd when that saves 10%; 'raw' never.
   */
  storage?: 'auto' | 'raw';
  /**
   * Files of at least this many bytes are stored raw whatever `storage` says,
   * so that a driver can serve HTTP ranges of them while they download
   * (docs/format.md §4, "Big files"). Default BIG_FILE_MIN_BYTES (8 MiB);
   * Infinity gzips big files too.
   */
  rawMinBytes?: number;
  /**
   * Gear format version of the index (default GEAR_FORMAT_VERSION, 2). Version
   * 1 is for nodes running a gear that reads only version 1.
   */
  formatVersion?: 1 | 2 | 3;
  /**
   * Format version 3: Gear v3 images whose packs this conversion may reuse
   * (the image under the destination tag first, then every --dedup-with):
   * contents stored there are referenced, not stored again (reuse.ts).
   */
  reuse?: ReusableImage[];
  /** Format version 3: worker threads that hash and compress (default: the cores). */
  threads?: number;
  /** gzip level for 'auto' (default 6). */
  gzipLevel?: number;
  /** Parent of the temp staging dir (default: OS temp dir). */
  tmpDir?: string;
  progress?: (e: ProgressEvent) => void;
  /**
   * `gear convert --attach`: publish the Gear image as an OCI referrer of the
   * source image manifest `subject` (docs/format.md §9): pushed by digest,
   * listed by the referrers API or the referrers tag; no tag is written.
   */
  attach?: { subject: { mediaType: string; digest: string; size: number } };
}

export interface ConvertSummary {
  source: string;
  destination: string;
  /** Digest of the Gear image manifest. */
  manifestDigest: string;
  /** Digest of the index layer (compressed blob) and its uncompressed diff_id. */
  indexDigest: string;
  indexDiffId: string;
  /** Non-empty regular files (hard links counted once). */
  files: number;
  uniqueContents: number;
  /** Sum of the sizes of those files. */
  logicalBytes: number;
  /** Uncompressed bytes of all source layers. */
  layerBytes: number;
  bytesUploaded: number;
  bytesSkipped: number;
  blobsUploaded: number;
  blobsSkipped: number;
  /** Size of the compressed index layer. */
  indexSize: number;
  keepAliveManifests: number;
  /** Staged contents (and their gzip forms) an interrupted run of the same conversion left and this one reused. */
  resumedContents: number;
  resumedGzip: number;
  seconds: number;
  /** Format version 3: files whose content is in reused packs, and those contents' bytes (as v3.reusedFiles/Bytes). */
  reusedFiles?: number;
  reusedBytes?: number;
  /** Format version 3 (absent otherwise): packs of the index, new and reused. */
  v3?: V3Summary;
}

export interface V3Summary {
  /** Packs the index lists, and their bytes. */
  packs: number;
  packBytes: number;
  /** Packs written by this conversion (in the destination already: not uploaded again), their bytes. */
  newPacks: number;
  newPackBytes: number;
  packsUploaded: number;
  packBytesUploaded: number;
  /** Packs a killed run of the same conversion left staged and this one used. */
  packsResumed: number;
  /** Files whose content is stored in reused (older) packs, and those contents' bytes. */
  reusedFiles: number;
  reusedBytes: number;
  /** Reused packs: already in the destination, mounted from another repository, copied. */
  reusedPacks: number;
  packsPresent: number;
  packsMounted: number;
  packsCopied: number;
  /** Members compressed by this run: uncompressed and stored bytes. */
  compressedMembers: number;
  memberBytesIn: number;
  memberBytesStored: number;
  /** Images given for reuse that were skipped, and why. */
  notices: string[];
}
