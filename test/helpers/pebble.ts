import type { ChildProcess } from "node:child_process";
import { promises as fs } from "node:fs";
import path from "node:path";
import type { Test } from "tap";
import { writeIssued } from "../../pki/index.js";
import { freePort, spawnTied } from "./cluster.js";
import { freshPki } from "./pki.js";

/** A running pebble ACME test server. */
export interface Pebble {
  /** The ACME directory URL (HTTPS on loopback). */
  directoryUrl: string;
  /** CA certificate of pebble's own HTTPS listener, to trust for the directory. */
  caPem: string;
  /** Pebble's management URL; `GET /roots/0` is the root that signs the certificates it issues. */
  managementUrl: string;
  /** Everything pebble logged so far (for failure messages). */
  output: () => string;
  /** Stops pebble now (it is stopped on teardown anyway). */
  stop: () => Promise<void>;
}

/**
 * Starts pebble on free loopback ports, validating HTTP-01 challenges on
 * 127.0.0.1:`challengePort` (pebble dials `<domain>:<httpPort>`; use the domain
 * `localhost`). Its HTTPS listener uses a certificate from a throwaway PKI.
 * Authorisations are never reused, so every order is validated again. Waits at
 * most `timeoutMs` for it to listen; stopped on teardown.
 */
export async function startPebble(t: Test, challengePort: number, timeoutMs = 15_000): Promise<Pebble> {
  const { pki, root } = await freshPki(t);
  const prefix = path.join(root, "pebble-https");
  await writeIssued(prefix, await pki.issue({ role: "server", id: "pebble", days: 1 }));
  const [listen, management, tlsPort] = [await freePort(), await freePort(), await freePort()];
  const configFile = path.join(root, "pebble-config.json");
  await fs.writeFile(
    configFile,
    JSON.stringify({
      pebble: {
        listenAddress: `127.0.0.1:${listen}`,
        managementListenAddress: `127.0.0.1:${management}`,
        certificate: `${prefix}.crt`,
        privateKey: `${prefix}.key`,
        httpPort: challengePort,
        tlsPort,
        ocspResponderURL: "",
        externalAccountBindingRequired: false,
      },
    }),
  );
  const child: ChildProcess = spawnTied("pebble", ["-config", configFile], {
    env: {
      ...process.env,
      PEBBLE_VA_NOSLEEP: "1",
      PEBBLE_WFE_NONCEREJECT: "0",
      PEBBLE_AUTHZREUSE: "0",
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  const collect = (d: Buffer) => {
    output += d.toString("utf8");
  };
  child.stdout?.on("data", collect);
  child.stderr?.on("data", collect);
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((resolve) => child.once("exit", resolve));
      child.kill("SIGTERM");
      await exited;
    }
  };
  t.teardown(stop);
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      reject(new Error(`pebble did not start within ${timeoutMs} ms:\n${output}`));
    }, timeoutMs);
    const check = () => {
      if (output.includes("ACME directory available at")) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stdout?.on("data", check);
    child.stderr?.on("data", check);
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`pebble exited (${code}) before listening:\n${output}`));
    });
  });
  return {
    directoryUrl: `https://127.0.0.1:${listen}/dir`,
    managementUrl: `https://127.0.0.1:${management}`,
    caPem: pki.caCertPem,
    output: () => output,
    stop,
  };
}
