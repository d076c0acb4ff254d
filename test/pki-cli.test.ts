import "reflect-metadata";
import { promises as fs } from "node:fs";
import path from "node:path";
import t from "tap";
import { openssl, shoal, shoalInProcess, tempDir } from "./helpers/pki.js";

t.test("operator flow through the real CLI, with exit codes", async (t) => {
  const root = await tempDir(t);
  const dir = path.join(root, "pki");
  const env = { SHOAL_CA_PASSPHRASE: "s3cret passphrase" };
  const init = await shoal(["pki", "init", "--dir", dir, "--trust-domain", "prod.example.com"], { env });
  t.equal(init.code, 0, init.stderr);
  t.match(init.stdout, /root CA fingerprint: sha256:[0-9a-f]{64}/);
  t.match(await fs.readFile(path.join(dir, "ca.key"), "utf8"), /ENCRYPTED PRIVATE KEY/);

  const again = await shoalInProcess(["pki", "init", "--dir", dir], env);
  t.equal(again.code, 1);
  t.match(again.stderr, /SHOAL_PKI_EXISTS/);

  const noPass = await shoalInProcess([
    "pki",
    "issue",
    "server",
    "--dir",
    dir,
    "--out",
    path.join(root, "x"),
  ]);
  t.equal(noPass.code, 1);
  t.match(noPass.stderr, /SHOAL_PKI_PASSPHRASE_REQUIRED/);

  const srv = path.join(root, "srv");
  const issue = await shoal(
    [
      "pki",
      "issue",
      "server",
      "--dir",
      dir,
      "--dns",
      "orch.example.com",
      "--ip",
      "10.0.5.16",
      "--out",
      srv,
      "--output",
      "json",
    ],
    { env },
  );
  t.equal(issue.code, 0, issue.stderr);
  const issued = JSON.parse(issue.stdout);
  t.equal(issued.certFile, `${srv}.crt`);
  t.notOk("keyPem" in issued, "the key is never printed");
  t.equal((await fs.stat(`${srv}.key`)).mode & 0o777, 0o600);

  const ca = path.join(dir, "ca.crt");
  const ok = await shoal([
    "pki",
    "verify",
    `${srv}.crt`,
    "--ca",
    ca,
    "--host",
    "10.0.5.16",
    "--role",
    "server",
  ]);
  t.equal(ok.code, 0, ok.stderr);
  t.match(ok.stdout, /^OK: /);

  const wrongHost = await shoal(["pki", "verify", `${srv}.crt`, "--ca", ca, "--host", "10.0.5.17"]);
  t.equal(wrongHost.code, 1);
  t.match(
    wrongHost.stderr,
    "SHOAL_PKI_HOST_MISMATCH: valid for localhost, orch.example.com, 127.0.0.1, 10.0.5.16 — not 10.0.5.17: reissue with --ip 10.0.5.17",
  );

  const asJson = await shoalInProcess([
    "pki",
    "verify",
    `${srv}.crt`,
    "--ca",
    ca,
    "--role",
    "compute",
    "--output",
    "json",
  ]);
  t.equal(asJson.code, 1);
  const error = JSON.parse(asJson.stderr).error;
  t.equal(error.code, "SHOAL_PKI_VERIFY_FAILED");
  t.same(
    error.failures.map((f: { code: string }) => f.code),
    ["SHOAL_PKI_ROLE_MISMATCH"],
  );

  const revoke = await shoalInProcess([
    "pki",
    "revoke",
    `${srv}.crt`,
    "--dir",
    dir,
    "--reason",
    "keyCompromise",
  ]);
  t.equal(revoke.code, 0, revoke.stderr);
  const crl = path.join(root, "crl.pem");
  t.equal((await shoalInProcess(["pki", "crl", "--dir", dir, "--out", crl], env)).code, 0);
  const revoked = await shoalInProcess(["pki", "verify", `${srv}.crt`, "--ca", ca, "--crl", crl]);
  t.equal(revoked.code, 1);
  t.match(revoked.stderr, /SHOAL_PKI_REVOKED/);

  const list = await shoalInProcess(["pki", "list", "--dir", dir, "--output", "json"]);
  t.match(JSON.parse(list.stdout), [{ serial: issued.serial, status: "revoked", reason: "keyCompromise" }]);

  const p12 = path.join(root, "srv.p12");
  const exp = await shoalInProcess(
    ["pki", "export-p12", "--cert", `${srv}.crt`, "--key", `${srv}.key`, "--out", p12],
    { SHOAL_P12_PASSWORD: "p12-pass" },
  );
  t.equal(exp.code, 0, exp.stderr);
  t.equal((await openssl(["pkcs12", "-info", "-in", p12, "-passin", "pass:p12-pass", "-nodes"])).code, 0);
});

t.test("bad input exits 1 with its code and writes nothing (in-process CLI)", async (t) => {
  const root = await tempDir(t);
  const dir = path.join(root, "pki");
  const badType = await shoalInProcess(["pki", "init", "--dir", dir, "--key-type", "dsa"]);
  t.equal(badType.code, 1);
  t.match(badType.stderr, /SHOAL_PKI_UNKNOWN_KEY_TYPE/);
  t.same(await fs.readdir(root), []);
  t.equal((await shoalInProcess(["pki", "init", "--dir", dir])).code, 0);
  const badRole = await shoalInProcess([
    "pki",
    "issue",
    "robot",
    "--dir",
    dir,
    "--out",
    path.join(root, "r"),
  ]);
  t.equal(badRole.code, 1);
  t.match(badRole.stderr, /SHOAL_PKI_UNKNOWN_ROLE/);
  const corrupt = path.join(root, "corrupt.crt");
  await fs.writeFile(corrupt, "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n");
  const inspect = await shoalInProcess(["pki", "inspect", corrupt]);
  t.equal(inspect.code, 1);
  t.match(inspect.stderr, /SHOAL_PKI_BAD_PEM/);
  const missing = await shoalInProcess(["pki", "inspect", path.join(root, "nope.crt")]);
  t.equal(missing.code, 1);
  t.match(missing.stderr, /SHOAL_FILE_READ/);
  t.same((await fs.readdir(root)).sort(), ["corrupt.crt", "pki"]);
});
