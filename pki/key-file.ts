import { createPrivateKey, generateKeyPairSync, type KeyObject } from "node:crypto";
import { promises as fs } from "node:fs";
import path from "node:path";
import { writeFileAtomic } from "../core/index.js";

/**
 * The private key in the PEM file `file`, or a new P-256 key written there
 * (PKCS#8, 0600, its directory 0700) when the file does not exist.
 */
export async function loadOrCreateKeyFile(file: string): Promise<KeyObject> {
  const pem = await fs.readFile(file, "utf8").catch((err: NodeJS.ErrnoException) => {
    if (err.code === "ENOENT") return undefined;
    throw err;
  });
  if (pem !== undefined) return createPrivateKey(pem);
  const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  await fs.mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
  await writeFileAtomic(file, privateKey.export({ type: "pkcs8", format: "pem" }).toString(), 0o600);
  return privateKey;
}
