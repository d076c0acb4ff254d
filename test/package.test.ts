import "reflect-metadata";
import { execFile } from "node:child_process";
import { promises as fs } from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import t from "tap";
import { shoalAt, type spawnShoal, startComputeNode, startOrchestrator, tempDir } from "./helpers/cluster.js";

/**
 * What operators install (docs/deploy.md): scripts/package packs the built
 * tree with the lockfile as npm-shrinkwrap.json, `npm install -g` installs it,
 * and the installed `shoal` runs an orchestrator and a compute node that run a
 * job, each as the systemd units run it as far as this machine allows (see
 * asService). The units verify.
 */

// npm installs the package's dependencies (from its cache, else the registry), then two daemons start.
t.setTimeout(300_000);

const run = promisify(execFile);
const repo = path.resolve(import.meta.dirname, "..");

/**
 * The command as the systemd units run a daemon, less what needs systemd: as
 * an unprivileged user (`nobody`, owning `stateDir` as `shoal` owns its
 * StateDirectory) with no capabilities and no new privileges, and everything
 * read-only but `stateDir` (ProtectSystem=strict), in a mount namespace of its own.
 */
function asService(stateDir: string): string[] {
  const script = [
    "d=$1; shift",
    'chown -R nobody:nogroup "$d"',
    "mount -o remount,bind,ro /",
    'mount --bind "$d" "$d"',
    'mount -o remount,bind,rw "$d"',
    'exec setpriv --reuid=nobody --regid=nogroup --clear-groups --no-new-privs --bounding-set=-all --inh-caps=-all "$@"',
  ].join(" && ");
  return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", stateDir];
}

t.test(
  "the package installs, and its daemons run a job as an unprivileged user writing only their state",
  async (t) => {
    const dir = await tempDir(t, "shoal-package-");
    const { stdout } = await run(path.join(repo, "scripts", "package"), ["--no-build", "--out", dir]);
    const tarball = stdout.trim().split("\n").at(-1)!;
    t.match(path.basename(tarball), /^shoal-\d+\.\d+\.\d+\.tgz$/);
    await t.rejects(fs.access(path.join(repo, "npm-shrinkwrap.json")), "the shrinkwrap copy is gone again");

    const files = (await run("tar", ["tzf", tarball])).stdout.split("\n").filter(Boolean);
    for (const wanted of [
      "package/bin/shoal",
      "package/dist/cli/main.js",
      "package/dist/wasm/hello.wasm",
      "package/configs/policies/default.cedar",
      "package/configs/systemd/shoal-orchestrator.service",
      "package/npm-shrinkwrap.json",
      "package/docs/deploy.md",
    ]) {
      t.ok(files.includes(wanted), `packs ${wanted}`);
    }
    t.same(
      files.filter((f) => /^package\/(dist\/(test|bench)\/|test\/|node_modules\/)|\.(map|key|ts)$/.test(f)),
      [],
      "no tests, benchmarks, sources, source maps or keys",
    );

    const prefix = path.join(dir, "prefix");
    await run("npm", [
      "install",
      "--global",
      "--prefer-offline",
      "--no-audit",
      "--no-fund",
      "--loglevel=error",
      "--prefix",
      prefix,
      tarball,
    ]);
    const shoal = path.join(prefix, "bin", "shoal");
    const pkg = path.join(prefix, "lib", "node_modules", "shoal");

    for (const unit of ["shoal-orchestrator.service", "shoal-compute.service"]) {
      const text = await fs.readFile(path.join(pkg, "configs", "systemd", unit), "utf8");
      t.match(text, /^ExecStart=\/usr\/local\/bin\/shoal /m);
      const installed = path.join(dir, unit);
      await fs.writeFile(installed, text.replace("/usr/local/bin/shoal", shoal));
      const verified = await run("systemd-analyze", ["verify", installed]);
      t.equal(verified.stderr, "", `${unit}: systemd-analyze verify has nothing to say`);
    }

    const orchDir = path.join(dir, "orch");
    const nodeDir = path.join(dir, "n1");
    await Promise.all([fs.mkdir(orchDir), fs.mkdir(nodeDir)]);
    // The unprivileged user passes through the test's directory to the state directories in it.
    await fs.chmod(dir, 0o711);
    // HOME as the units' user has it: its own state directory (the test's HOME is root's).
    const daemon = (stateDir: string): typeof spawnShoal => {
      const launch = shoalAt(shoal, { prefix: asService(stateDir) });
      return (tt, args, env = {}) => launch(tt, args, { ...env, HOME: stateDir });
    };
    const orch = await startOrchestrator(t, orchDir, [], {}, daemon(orchDir));
    const node = await startComputeNode(t, orch, nodeDir, "n1", [], daemon(nodeDir));
    for (const p of [orch.proc, node]) {
      const status = await fs.readFile(`/proc/${p.child.pid}/status`, "utf8");
      t.match(status, /^Uid:\s+65534\s+65534\s+65534\s+65534$/m, "runs as nobody");
      t.match(status, /^CapEff:\s+0+$/m, "with no capabilities");
      t.match(status, /^NoNewPrivs:\s+1$/m, "and no new privileges");
    }

    // The installed example finds its module inside the installed package.
    const submit = shoalAt(shoal)(
      t,
      [
        "job",
        "run",
        path.join(pkg, "configs", "jobs", "hello.yaml"),
        "--wait",
        "--output",
        "json",
        ...orch.api,
      ],
      { SHOAL_TOKEN: await orch.adminToken() },
    );
    t.equal((await submit.exited).code, 0, submit.stderr());
    const job = JSON.parse(submit.stdout()) as { State: string; Executions: { Stdout?: string }[] };
    t.equal(job.State, "Completed");
    t.match(job.Executions[0]?.Stdout, /hello from wasm/);

    // A clean stop writes nothing outside the data directory either.
    node.child.kill("SIGTERM");
    t.equal((await node.exited).code, 0, node.stderr());
    orch.proc.child.kill("SIGTERM");
    t.equal((await orch.proc.exited).code, 0, orch.proc.stderr());
  },
);
