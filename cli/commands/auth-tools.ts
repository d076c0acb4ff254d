import type { Argv } from "yargs";
import { assertPasswordStrength, hashPassword } from "../../auth/index.js";
import { CORE_CODES, ShoalError } from "../../core/index.js";

/** Reads a line from the terminal without echoing it. */
export function promptHidden(prompt: string): Promise<string> {
  const stdin = process.stdin;
  process.stderr.write(prompt);
  stdin.setRawMode(true);
  stdin.resume();
  stdin.setEncoding("utf8");
  return new Promise((resolve, reject) => {
    let value = "";
    const finish = (err?: Error) => {
      stdin.off("data", onData);
      stdin.setRawMode(false);
      stdin.pause();
      process.stderr.write("\n");
      if (err) reject(err);
      else resolve(value);
    };
    const onData = (chunk: string) => {
      for (const c of chunk) {
        if (c === "\r" || c === "\n") return finish();
        if (c === "\u0003" || c === "\u0004") {
          return finish(new ShoalError(CORE_CODES.SHOAL_USAGE, "no password entered"));
        }
        if (c === "\u007f" || c === "\b") value = value.slice(0, -1);
        else value += c;
      }
    };
    stdin.on("data", onData);
  });
}

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks)
    .toString("utf8")
    .replace(/\r?\n$/, "");
}

/** A new password: SHOAL_PASSWORD, else typed twice at a terminal, else standard input. */
export async function readPassword(): Promise<string> {
  const fromEnv = process.env.SHOAL_PASSWORD;
  if (fromEnv) return fromEnv;
  if (!process.stdin.isTTY) return readStdin();
  const first = await promptHidden("password: ");
  assertPasswordStrength(first);
  if ((await promptHidden("again: ")) !== first) {
    throw new ShoalError(CORE_CODES.SHOAL_USAGE, "the two passwords differ", {
      fix: "type the same password twice",
    });
  }
  return first;
}

/**
 * `shoal auth hash-password`: prints the scrypt hash of a password, for user
 * records prepared offline. The other `shoal auth` subcommands (login,
 * users, roles, tokens) talk to the API; see auth.ts.
 */
export const hashPasswordCommand = (yargs: Argv): Argv =>
  yargs.command(
    "hash-password",
    "print the scrypt hash of a password (from SHOAL_PASSWORD, a prompt, or standard input)",
    () => {},
    async () => {
      const password = await readPassword();
      assertPasswordStrength(password);
      process.stdout.write(`${await hashPassword(password)}\n`);
    },
  );
