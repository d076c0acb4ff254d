import "reflect-metadata";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import t, { type Test } from "tap";
import { isShoalError } from "../core/index.js";
import {
  DEFAULT_MAX_INLINE_INPUT_BYTES,
  DEFAULT_MAX_MODULE_BYTES,
  executionTimeoutMs,
  type JobSpecInput,
  jobResources,
  moduleDigest,
  parseJobSpec,
  queueTimeoutMs,
  separateModules,
  storedModules,
  wasmJobSpec,
} from "../core/job-spec.js";
import { matchesConstraint } from "../core/job-spec-constraints.js";
import type { JobSpecError } from "../core/job-spec-errors.js";
import { loadJobSpecFile } from "../core/job-spec-files.js";
import { formatBytes, parseCpu, parseMemory, parseTimeoutMs } from "../core/job-spec-resources.js";

const WASM_HEADER = Buffer.from([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]);
const MODULE_B64 = WASM_HEADER.toString("base64");

function wasmJob(
  overrides: Record<string, unknown> = {},
  task: Record<string, unknown> = {},
): Record<string, unknown> {
  return {
    Name: "hello",
    Tasks: [
      {
        Name: "main",
        Engine: {
          Type: "wasm",
          Params: { EntryModule: { Type: "inline", Params: { Content: MODULE_B64 } } },
        },
        ...task,
      },
    ],
    ...overrides,
  };
}

/** Asserts that parsing fails with SHOAL_JOB_INVALID at `field`, with a message matching `message`. */
function rejects(t: Test, input: string | object, field: string, message: RegExp): void {
  try {
    parseJobSpec(input);
    t.fail(`expected ${field} to be rejected`);
  } catch (err) {
    t.ok(isShoalError(err, "SHOAL_JOB_INVALID"), `code for ${field}`);
    t.equal((err as JobSpecError).field, field);
    t.match((err as JobSpecError).message, message);
    if (field)
      t.ok((err as JobSpecError).message.startsWith(`${field}: `), "the message starts with the field");
  }
}

t.test("a minimal spec is normalized with defaults and frozen", async (t) => {
  const spec = parseJobSpec(wasmJob());
  t.equal(spec.Namespace, "default");
  t.equal(spec.Type, "batch");
  t.equal(spec.Count, 1);
  t.same(spec.Constraints, []);
  const task = spec.Tasks[0]!;
  t.equal(task.Engine.Type, "wasm");
  t.equal(task.Engine.Type === "wasm" && task.Engine.Params.Entrypoint, "_start");
  t.same(task.Resources, { CPU: "100m", Memory: "64Mi" });
  t.same(jobResources(spec), { cpu: 0.1, memory: 64 * 2 ** 20 });
  t.equal(executionTimeoutMs(task), 600_000);
  t.equal(queueTimeoutMs(spec), 600_000);
  t.ok(Object.isFrozen(spec) && Object.isFrozen(task.Engine));
  t.same(parseJobSpec(spec), spec, "parsing the normalized spec again gives the same spec");
});

t.test("YAML and JSON text, with YAML numbers taken as strings where strings are wanted", async (t) => {
  const yaml = `
Name: 2024
Type: ops
Constraints:
  - {Key: cores, Operator: gt, Values: [3]}
Tasks:
  - Name: main
    Engine: {Type: exec, Params: {Command: /bin/echo, Arguments: [1, true]}}
    Resources: {CPU: 2, Memory: 1Gi}
    Timeouts: {ExecutionTimeout: 1m30s, QueueTimeout: 0}
`;
  const spec = parseJobSpec(yaml);
  t.equal(spec.Name, "2024");
  t.equal(spec.Count, undefined, "ops jobs have no Count");
  t.same(spec.Constraints[0]!.Values, ["3"]);
  t.same(spec.Tasks[0]!.Engine.Params, { Command: "/bin/echo", Arguments: ["1", "true"] });
  t.equal(executionTimeoutMs(spec.Tasks[0]!), 90_000);
  t.equal(queueTimeoutMs(spec), 0);
  const json = parseJobSpec(JSON.stringify(wasmJob({ Count: 3 })), { format: "json" });
  t.equal(json.Count, 3);
  rejects(t, "Name: [unclosed", "", /not valid YAML at line 1/);
  rejects(t, "{", "", /not valid/);
  rejects(t, "- a list", "", /must be a mapping/);
});

t.test("a YAML scalar in a string field is taken as written, in engine parameters too", async (t) => {
  const yaml = `
Name: 1.10
Labels: {version: 1.10}
Constraints:
  - {Key: version, Operator: in, Values: [1.10, 007, 0x1F, 1e3]}
Tasks:
  - Name: main
    Engine: {Type: wasm, Params: {EntryModule: {Type: stored, Params: {Digest: "sha256:${"a".repeat(64)}"}}, Parameters: [2.50, 010], EnvironmentVariables: {V: 1.10}}}
    Env: {LEVEL: 1.10}
    Resources: {CPU: 0.50}
`;
  const spec = parseJobSpec(yaml);
  t.equal(spec.Name, "1.10");
  t.same(spec.Labels, { version: "1.10" });
  t.same(spec.Constraints[0]!.Values, ["1.10", "007", "0x1F", "1e3"]);
  const task = spec.Tasks[0]!;
  t.same(task.Env, { LEVEL: "1.10" });
  t.same(task.Engine.Type === "wasm" && task.Engine.Params.Parameters, ["2.50", "010"]);
  t.same(task.Engine.Type === "wasm" && task.Engine.Params.EnvironmentVariables, { V: "1.10" });
  t.equal(jobResources(spec).cpu, 0.5, "a number field stays a number");
  // An explicit tag is kept to, and the failsafe reading of it warns of nothing.
  const warnings: Error[] = [];
  const onWarning = (w: Error) => warnings.push(w);
  process.on("warning", onWarning);
  t.teardown(() => process.off("warning", onWarning));
  const tagged = parseJobSpec(yaml.replace("Labels: {version: 1.10}", "Labels: {version: !!float 1.10}"));
  t.same(tagged.Labels, { version: "1.10" });
  await new Promise((r) => setImmediate(r));
  t.same(warnings, [], "no YAML warning");
  // JSON has no text for a number: 1.10 is 1.1 before Shoal sees it.
  const json = parseJobSpec(JSON.stringify(wasmJob({ Labels: { version: 1.1 } })), { format: "json" });
  t.same(json.Labels, { version: "1.1" });
});

t.test("negative cases name the field and the problem", async (t) => {
  const task = (patch: Record<string, unknown>) => wasmJob({}, patch);
  rejects(
    t,
    task({ Engine: { Type: "docker" } }),
    "Tasks[0].Engine.Type",
    /unknown engine "docker"; expected wasm or exec/,
  );
  rejects(
    t,
    task({ Engine: { Type: "wasm" } }),
    "Tasks[0].Engine.Params.EntryModule",
    /is required: the wasm engine needs a module/,
  );
  rejects(
    t,
    task({ Engine: { Type: "wasm", Params: {} } }),
    "Tasks[0].Engine.Params.EntryModule",
    /is required/,
  );
  rejects(
    t,
    task({
      Engine: {
        Type: "wasm",
        Params: {
          EntryModule: { Type: "inline", Params: { Content: Buffer.from("#!/bin/sh").toString("base64") } },
        },
      },
    }),
    "Tasks[0].Engine.Params.EntryModule.Params.Content",
    /not a WebAssembly module/,
  );
  rejects(
    t,
    task({
      Engine: { Type: "wasm", Params: { EntryModule: { Type: "inline", Params: { Content: "%%%" } } } },
    }),
    "Tasks[0].Engine.Params.EntryModule.Params.Content",
    /not valid base64/,
  );
  rejects(
    t,
    task({
      Engine: {
        Type: "wasm",
        Params: { EntryModule: { Type: "localDirectory", Params: { SourcePath: "/x" } } },
      },
    }),
    "Tasks[0].Engine.Params.EntryModule.Type",
    /one file/,
  );
  rejects(t, task({ Resources: { CPU: "-1" } }), "Tasks[0].Resources.CPU", /not a CPU quantity/);
  rejects(t, task({ Resources: { CPU: -2 } }), "Tasks[0].Resources.CPU", /more than zero/);
  rejects(t, task({ Resources: { CPU: "2000" } }), "Tasks[0].Resources.CPU", /maximum of 1024 CPUs/);
  rejects(t, task({ Resources: { Memory: "2Ti" } }), "Tasks[0].Resources.Memory", /maximum of 1 TiB/);
  rejects(t, task({ Resources: { Memory: "lots" } }), "Tasks[0].Resources.Memory", /not a size/);
  rejects(t, task({ Resources: { Memory: "0" } }), "Tasks[0].Resources.Memory", /more than zero/);
  rejects(
    t,
    task({ Resources: { Disk: "1Gi" } }),
    "Tasks[0].Resources.Disk",
    /unknown field \(expected one of CPU, Memory\)/,
  );
  rejects(t, task({ Engin: {} }), "Tasks[0].Engin", /unknown field; did you mean Engine\?/);
  rejects(t, wasmJob({ ID: "x" }), "ID", /unknown field/);
  rejects(
    t,
    task({ ResultPaths: [{ Name: "o", Path: "/outputs/../etc" }] }),
    "Tasks[0].ResultPaths[0].Path",
    /must not contain "\.\."/,
  );
  rejects(
    t,
    task({ ResultPaths: [{ Name: "o", Path: "/etc/passwd" }] }),
    "Tasks[0].ResultPaths[0].Path",
    /must be \/outputs or a path under it/,
  );
  rejects(
    t,
    task({ ResultPaths: [{ Name: "o", Path: "/outputsx" }] }),
    "Tasks[0].ResultPaths[0].Path",
    /under it/,
  );
  rejects(
    t,
    task({ ResultPaths: [{ Name: "o", Path: "out.txt" }] }),
    "Tasks[0].ResultPaths[0].Path",
    /absolute path under \/outputs/,
  );
  rejects(
    t,
    task({
      ResultPaths: [
        { Name: "o", Path: "/outputs/a" },
        { Name: "o", Path: "/outputs/b" },
      ],
    }),
    "Tasks[0].ResultPaths[1].Name",
    /used twice/,
  );
  const big = "x".repeat(DEFAULT_MAX_INLINE_INPUT_BYTES + 1);
  rejects(
    t,
    task({ InputSources: [{ Target: "/inputs/a", Source: { Type: "inline", Params: { Content: big } } }] }),
    "Tasks[0].InputSources[0].Source.Params.Content",
    /256\.0 KiB; an inline input may be at most 256 KiB/,
  );
  const most = "y".repeat(DEFAULT_MAX_INLINE_INPUT_BYTES);
  rejects(
    t,
    task({
      InputSources: [0, 1, 2].map((i) => ({
        Target: `/inputs/${i}`,
        Source: { Type: "inline", Params: { Content: most } },
      })),
    }),
    "Tasks",
    /inline inputs add up to 768 KiB; the limit is 512 KiB/,
  );
  // Each part within its limit, but the whole job too large for one fabric message.
  const binary = Buffer.alloc(DEFAULT_MAX_INLINE_INPUT_BYTES, 1).toString("base64");
  rejects(
    t,
    task({
      InputSources: [0, 1].map((i) => ({
        Target: `/inputs/${i}`,
        Source: { Type: "inline", Params: { Content: binary, Encoding: "base64" } },
      })),
    }),
    "Tasks",
    /the job is 68\d\.\d KiB as JSON, inline inputs included; the limit is 640 KiB/,
  );
  const storedModule = (params: Record<string, unknown>) =>
    wasmJob({}, { Engine: { Type: "wasm", Params: { EntryModule: { Type: "stored", Params: params } } } });
  rejects(
    t,
    storedModule({}),
    "Tasks[0].Engine.Params.EntryModule.Params.Digest",
    /is required for a stored module/,
  );
  rejects(
    t,
    storedModule({ Digest: "sha256:ABC" }),
    "Tasks[0].Engine.Params.EntryModule.Params.Digest",
    /"sha256:" and 64 lower-case hex digits/,
  );
  rejects(
    t,
    storedModule({ Digest: `sha256:${"a".repeat(64)}`, Content: MODULE_B64 }),
    "Tasks[0].Engine.Params.EntryModule.Params.Content",
    /a stored module carries only its Digest/,
  );
  rejects(
    t,
    task({
      InputSources: [
        { Target: "/inputs/x", Source: { Type: "stored", Params: { Digest: `sha256:${"a".repeat(64)}` } } },
      ],
    }),
    "Tasks[0].InputSources[0].Source.Type",
    /only a module is stored by digest/,
  );
  rejects(
    t,
    wasmJob(
      {},
      {
        Engine: {
          Type: "wasm",
          Params: {
            EntryModule: {
              Type: "inline",
              Params: { Content: MODULE_B64, Digest: `sha256:${"a".repeat(64)}` },
            },
          },
        },
      },
    ),
    "Tasks[0].Engine.Params.EntryModule.Params.Digest",
    /only a stored module has a Digest/,
  );
  rejects(
    t,
    task({ InputSources: [{ Target: "/etc/x", Source: { Type: "inline", Params: { Content: "a" } } }] }),
    "Tasks[0].InputSources[0].Target",
    /must be \/inputs or a path under it/,
  );
  rejects(
    t,
    task({
      InputSources: [{ Target: "/inputs/x", Source: { Type: "localFile", Params: { SourcePath: "rel/x" } } }],
    }),
    "Tasks[0].InputSources[0].Source.Params.SourcePath",
    /absolute path/,
  );
  rejects(
    t,
    task({ InputSources: [{ Target: "/inputs/x", Source: { Type: "s3", Params: {} } }] }),
    "Tasks[0].InputSources[0].Source.Type",
    /unknown source type "s3"; expected inline, localFile, localDirectory or stored/,
  );
  rejects(
    t,
    task({ Timeouts: { ExecutionTimeout: 0 } }),
    "Tasks[0].Timeouts.ExecutionTimeout",
    /more than zero/,
  );
  rejects(
    t,
    task({ Timeouts: { ExecutionTimeout: "30 parsecs" } }),
    "Tasks[0].Timeouts.ExecutionTimeout",
    /not a duration/,
  );
  rejects(t, task({ Timeouts: { QueueTimeout: "8d" } }), "Tasks[0].Timeouts.QueueTimeout", /7 days/);
  rejects(
    t,
    task({ Env: { "1BAD": "x" } }),
    'Tasks[0].Env["1BAD"]',
    /invalid key "1BAD": expected an environment variable name/,
  );
  rejects(
    t,
    wasmJob({ Labels: { "bad key": "x" } }),
    'Labels["bad key"]',
    /invalid key "bad key": expected a label key/,
  );
  rejects(t, wasmJob({ Type: "service" }), "Type", /unknown job type "service"; expected batch or ops/);
  rejects(t, wasmJob({ Count: 0 }), "Count", /greater or equal to 1/);
  rejects(t, wasmJob({ Type: "ops", Count: 2 }), "Count", /ops jobs run once on every matching node/);
  rejects(t, wasmJob({ Name: "../x" }), "Name", /expected a name of letters/);
  rejects(t, { Tasks: [] }, "Name", /is required/);
  rejects(t, wasmJob({ Tasks: [] }), "Tasks", /exactly one task/);
  rejects(
    t,
    wasmJob({ Constraints: [{ Key: "a", Operator: "~" }] }),
    "Constraints[0].Operator",
    /unknown operator "~"/,
  );
  rejects(
    t,
    wasmJob({ Constraints: [{ Key: "a", Operator: "=" }] }),
    "Constraints[0].Values",
    /exactly one value/,
  );
  rejects(
    t,
    wasmJob({ Constraints: [{ Key: "a", Operator: "gt", Values: ["x"] }] }),
    "Constraints[0].Values",
    /compares numbers/,
  );
  rejects(
    t,
    wasmJob({ Constraints: [{ Key: "a", Operator: "exists", Values: ["x"] }] }),
    "Constraints[0].Values",
    /takes no values/,
  );
});

t.test("exec tasks: absolute command, no loader variables", async (t) => {
  const exec = (params: Record<string, unknown>, env: Record<string, string> = {}) =>
    ({
      Name: "e",
      Tasks: [{ Name: "m", Engine: { Type: "exec", Params: params }, Env: env }],
    }) as JobSpecInput;
  t.equal(parseJobSpec(exec({ Command: "/bin/echo" })).Tasks[0]!.Engine.Type, "exec");
  rejects(t, exec({}), "Tasks[0].Engine.Params.Command", /is required/);
  rejects(t, exec({ Command: "echo" }), "Tasks[0].Engine.Params.Command", /absolute path/);
  rejects(t, exec({ Command: "/bin/echo", Shell: true }), "Tasks[0].Engine.Params.Shell", /unknown field/);
  rejects(
    t,
    exec({ Command: "/bin/echo" }, { LD_PRELOAD: "/inputs/x.so" }),
    "Tasks[0].Env.LD_PRELOAD",
    /exec jobs may not set it/,
  );
  rejects(t, exec({ Command: "/bin/echo" }, { GCONV_PATH: "/x" }), "Tasks[0].Env.GCONV_PATH", /may not set/);
});

t.test("every problem is listed, for an HTTP 400 body", async (t) => {
  const err = t.throws(() =>
    parseJobSpec(
      wasmJob(
        { Type: "ops", Count: 2 },
        { Resources: { CPU: "0" }, ResultPaths: [{ Name: "x", Path: "/" }] },
      ),
    ),
  ) as unknown as JobSpecError;
  t.equal(err.problems.length, 3);
  t.match(err.message, /and 2 more problem/);
  t.same(
    err.toJSON().problems,
    err.problems.map((p) => ({ field: p.field, message: p.message })),
  );
  t.equal(err.toJSON().code, "SHOAL_JOB_INVALID");
});

t.test("resource and timeout parsing", async (t) => {
  t.equal(parseCpu("500m"), 0.5);
  t.equal(parseCpu("2"), 2);
  t.equal(parseCpu("0.25"), 0.25);
  t.equal(parseCpu(3), 3);
  t.throws(() => parseCpu("1 core"), RangeError);
  t.equal(parseMemory("64Mi"), 64 * 2 ** 20);
  t.equal(parseMemory("1Gi"), 2 ** 30);
  t.equal(parseMemory("100M"), 100e6);
  t.equal(parseMemory(1024), 1024);
  t.throws(() => parseMemory("64 apples"), RangeError);
  t.equal(parseTimeoutMs(30), 30_000);
  t.equal(parseTimeoutMs("45"), 45_000);
  t.equal(parseTimeoutMs("5m"), 300_000);
  t.equal(formatBytes(64 * 2 ** 20), "64 MiB");
  t.equal(formatBytes(1536), "1.5 KiB");
});

t.test("constraint operators", async (t) => {
  const labels = { region: "eu", cores: "8", gpu: "" };
  const m = (Operator: string, Key: string, Values?: string[]) =>
    matchesConstraint(labels, { Key, Operator: Operator as "=", ...(Values ? { Values } : {}) });
  t.ok(m("=", "region", ["eu"]));
  t.notOk(m("=", "region", ["us"]));
  t.ok(m("!=", "region", ["us"]));
  t.ok(m("!=", "zone", ["a"]), "a missing label is not equal");
  t.ok(m("exists", "gpu"));
  t.notOk(m("exists", "zone"));
  t.ok(m("!", "zone"));
  t.ok(m("in", "region", ["us", "eu"]));
  t.notOk(m("in", "zone", ["a"]));
  t.ok(m("notin", "region", ["us"]));
  t.ok(m("notin", "zone", ["a"]));
  t.ok(m("gt", "cores", ["4"]));
  t.notOk(m("gt", "cores", ["8"]));
  t.ok(m("lt", "cores", ["16"]));
  t.notOk(m("lt", "region", ["16"]), "a non-numeric label never compares");
  t.notOk(m("gt", "gpu", ["-1"]), "an empty label never compares");
});

t.test("the example job files load, with their modules inlined", async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "shoal-jobspec-"));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  await writeFile(path.join(dir, "m.wasm"), WASM_HEADER);
  await writeFile(
    path.join(dir, "job.yaml"),
    "Name: j\nTasks:\n  - Name: t\n    Engine:\n      Type: wasm\n      Params:\n        EntryModule: {Type: localFile, Params: {SourcePath: m.wasm}}\n",
  );
  const spec = await loadJobSpecFile(path.join(dir, "job.yaml"));
  const engine = spec.Tasks[0]!.Engine;
  t.equal(engine.Type === "wasm" && engine.Params.EntryModule.Type, "inline");
  t.equal(engine.Type === "wasm" && engine.Params.EntryModule.Params.Content, MODULE_B64);

  await writeFile(path.join(dir, "bad.wasm"), "not wasm at all");
  await writeFile(
    path.join(dir, "bad.yaml"),
    "Name: j\nTasks:\n  - Name: t\n    Engine: {Type: wasm, Params: {EntryModule: {Type: localFile, Params: {SourcePath: bad.wasm}}}}\n",
  );
  await t.rejects(loadJobSpecFile(path.join(dir, "bad.yaml")), {
    code: "SHOAL_JOB_INVALID",
    field: "Tasks[0].Engine.Params.EntryModule.Params.Content",
  });
  await writeFile(
    path.join(dir, "missing.yaml"),
    "Name: j\nTasks:\n  - Name: t\n    Engine: {Type: wasm, Params: {EntryModule: {Type: localFile, Params: {SourcePath: gone.wasm}}}}\n",
  );
  await t.rejects(loadJobSpecFile(path.join(dir, "missing.yaml")), {
    code: "SHOAL_JOB_INVALID",
    field: "Tasks[0].Engine.Params.EntryModule.Params.SourcePath",
  });
  await t.rejects(loadJobSpecFile(path.join(dir, "nope.yaml")), { code: "SHOAL_FILE_READ" });

  const repo = path.resolve(import.meta.dirname, "..");
  for (const name of ["exec-echo.yaml"]) {
    const example = await loadJobSpecFile(path.join(repo, "configs/jobs", name));
    t.equal(example.Name, "exec-echo");
  }
  // The wasm examples need their modules; check their shape as written.
  const { readJobSpecDocument } = await import("../core/job-spec.js");
  const { readFile } = await import("node:fs/promises");
  for (const name of ["hello.yaml", "upper.yaml", "ops-hello.yaml"]) {
    const doc = readJobSpecDocument(await readFile(path.join(repo, "configs/jobs", name))) as JobSpecInput;
    const task = doc.Tasks[0]!;
    const withModule = {
      ...doc,
      Tasks: [
        {
          ...task,
          Engine: {
            Type: "wasm",
            Params: {
              ...task.Engine.Params,
              EntryModule: { Type: "inline", Params: { Content: MODULE_B64 } },
            },
          },
        },
      ],
    };
    t.equal(parseJobSpec(withModule).Name, doc.Name, `${name} validates`);
  }
});

t.test("wasmJobSpec builds the spec of `job run --wasm`", async (t) => {
  const spec = wasmJobSpec({ name: "quick", module: WASM_HEADER, args: ["a", "b"] });
  const engine = spec.Tasks[0]!.Engine;
  t.same(engine.Type === "wasm" && engine.Params.Parameters, ["a", "b"]);
  t.throws(() => wasmJobSpec({ name: "quick", module: Buffer.from("nope") }), { code: "SHOAL_JOB_INVALID" });
});

t.test(
  "an inline module is stored apart: the job keeps its digest, whatever the module's size",
  async (t) => {
    const module = Buffer.concat([
      WASM_HEADER,
      Buffer.alloc(DEFAULT_MAX_MODULE_BYTES - WASM_HEADER.length, 7),
    ]);
    const spec = parseJobSpec(
      wasmJob(
        {},
        {
          Engine: {
            Type: "wasm",
            Params: { EntryModule: { Type: "inline", Params: { Content: module.toString("base64") } } },
          },
        },
      ),
    );
    const digest = moduleDigest(module);
    t.match(digest, /^sha256:[0-9a-f]{64}$/);
    const separated = separateModules(spec);
    t.same([...separated.modules.keys()], [digest], "the module, by its digest");
    t.ok(separated.modules.get(digest)?.equals(module), "with its bytes");
    t.same(separated.spec.Tasks[0]?.Engine.Params, {
      ...spec.Tasks[0]?.Engine.Params,
      EntryModule: { Type: "stored", Params: { Digest: digest } },
    });
    t.ok(Buffer.byteLength(JSON.stringify(separated.spec)) < 1024, "the job itself stays small");
    t.same(parseJobSpec(separated.spec), separated.spec, "and parses again to itself, as a node parses it");
    t.same(storedModules(separated.spec), [
      { digest, field: "Tasks[0].Engine.Params.EntryModule.Params.Digest" },
    ]);
    t.same(storedModules(spec), [], "an inline module is not stored yet");
    t.ok(
      Object.isFrozen((separated.spec.Tasks[0]!.Engine.Params as { EntryModule: unknown }).EntryModule),
      "frozen like every parsed spec",
    );

    const over = Buffer.concat([module, Buffer.alloc(1)]);
    rejects(
      t,
      wasmJob(
        {},
        {
          Engine: {
            Type: "wasm",
            Params: { EntryModule: { Type: "inline", Params: { Content: over.toString("base64") } } },
          },
        },
      ),
      "Tasks[0].Engine.Params.EntryModule.Params.Content",
      /is 8\.0 MiB; an inline module may be at most 8 MiB/,
    );
  },
);
