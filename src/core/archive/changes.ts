/**
 * What a layer changes relative to its parent (docker diff, docker commit).
 * (Placeholder types; the implementation lands with the diff work.)
 */

/** Same numbering as Docker's archive.ChangeType, which is also the graph-driver wire value. */
export enum ChangeKind {
  Modify = 0,
  Add = 1,
  Delete = 2,
}

export interface Change {
  /** Absolute path inside the layer, e.g. "/etc/hosts". */
  path: string;
  kind: ChangeKind;
}
