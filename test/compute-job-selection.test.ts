import "reflect-metadata";
import t from "tap";
import {
  CapacityLedger,
  decideBid,
  isPathWithin,
  type JobDemand,
  type JobSelectionPolicy,
  jobDemand,
} from "../compute/index.js";
import { parseJobSpec } from "../core/index.js";

const policy: JobSelectionPolicy = {
  engines: ["wasm"],
  execAllow: [],
  labels: { region: "eu", gpu: "0" },
  locality: "anywhere",
  rejectStatelessJobs: false,
  allowedSubmitters: [],
  allowedInputPaths: ["/data/shared"],
};

const demand: JobDemand = {
  engine: "wasm",
  inputs: [],
  constraints: [],
  submitter: { sub: "alice", namespace: "default", method: "password" },
  resources: { cpu: 1, memory: 64 * 2 ** 20 },
};

const free = { cpu: 4, memory: 2 ** 30 };
const dir = (localPath: string, present = true) =>
  ({ role: "input", type: "localDirectory", localPath, present }) as const;

t.test("a plain wasm job that fits is accepted", async (t) => {
  t.same(decideBid(policy, demand, free), { accept: true });
});

t.test("each rule refuses with its own check and a reason naming the setting", async (t) => {
  const cases: [string, Partial<JobSelectionPolicy>, Partial<JobDemand>, string, RegExp][] = [
    [
      "exec is off without an allow list",
      {},
      { engine: "exec", command: "/bin/echo" },
      "engine",
      /^SHOAL_ENGINE_EXEC_NOT_ALLOWED: .*Exec\.Allow/,
    ],
    ["unknown engine", {}, { engine: "docker" }, "engine", /docker/],
    [
      "command not allowed",
      { engines: ["wasm", "exec"], execAllow: ["/usr/bin/echo"] },
      { engine: "exec", command: "/bin/sh", commandRealPath: "/usr/bin/dash" },
      "command",
      /^SHOAL_ENGINE_EXEC_NOT_ALLOWED: command "\/bin\/sh" is not in .*resolves to \/usr\/bin\/dash/,
    ],
    [
      "a link named like an allowed program is what it leads to",
      { engines: ["wasm", "exec"], execAllow: ["/usr/bin/echo"] },
      { engine: "exec", command: "/tmp/x/echo", commandRealPath: "/usr/bin/dash" },
      "command",
      /^SHOAL_ENGINE_EXEC_NOT_ALLOWED: .*resolves to \/usr\/bin\/dash/,
    ],
    [
      "the allowed path as written, when it resolves elsewhere",
      { engines: ["wasm", "exec"], execAllow: ["/usr/bin/echo"] },
      { engine: "exec", command: "/usr/bin/echo", commandRealPath: "/usr/bin/dash" },
      "command",
      /^SHOAL_ENGINE_EXEC_NOT_ALLOWED: /,
    ],
    [
      "a command that does not exist here",
      { engines: ["wasm", "exec"], execAllow: ["/usr/bin/echo"] },
      { engine: "exec", command: "/usr/bin/echo" },
      "command",
      /^SHOAL_ENGINE_EXEC_NOT_ALLOWED: .*does not exist on this node/,
    ],
    [
      "a relative command",
      { engines: ["wasm", "exec"], execAllow: ["/usr/bin/echo"] },
      { engine: "exec", command: "echo", commandRealPath: "/usr/bin/echo" },
      "command",
      /^SHOAL_ENGINE_EXEC_NOT_ALLOWED: .*is not an absolute path/,
    ],
    ["submitter not allowed", { allowedSubmitters: ["bob"] }, {}, "submitter", /alice/],
    ["stateless refused", { rejectStatelessJobs: true }, {}, "stateless", /RejectStatelessJobs/],
    [
      "a module alone does not make a job stateful",
      { rejectStatelessJobs: true },
      { inputs: [{ role: "module", type: "localFile", localPath: "/data/shared/m.wasm", present: true }] },
      "stateless",
      /no inputs/,
    ],
    ["input path outside the allowed roots", {}, { inputs: [dir("/etc")] }, "input-path", /\/etc/],
    [
      "a sibling prefix is not inside",
      {},
      { inputs: [dir("/data/shared-other/x")] },
      "input-path",
      /shared-other/,
    ],
    [
      "module path outside the allowed roots",
      {},
      { inputs: [{ role: "module", type: "localFile", localPath: "/opt/m.wasm", present: true }] },
      "input-path",
      /module path/,
    ],
    [
      "missing input under local locality",
      { locality: "local" },
      { inputs: [dir("/data/shared/x", false)] },
      "locality",
      /Locality/,
    ],
    [
      "label constraint unmet",
      {},
      { constraints: [{ Key: "region", Operator: "=", Values: ["us"] }] },
      "constraints",
      /region = us/,
    ],
    ["too much cpu", {}, { resources: { cpu: 5, memory: 1 } }, "capacity", /cpu 5/],
    ["too much memory", {}, { resources: { cpu: 1, memory: 2 ** 31 } }, "capacity", /memory/],
  ];
  for (const [name, p, d, check, reason] of cases) {
    const decision = decideBid({ ...policy, ...p }, { ...demand, ...d }, free);
    t.equal(decision.accept, false, name);
    if (!decision.accept) {
      t.equal(decision.check, check, `${name}: check`);
      t.match(decision.reason, reason, `${name}: reason`);
    }
  }
});

t.test("what each rule allows is accepted", async (t) => {
  const ok: [string, Partial<JobSelectionPolicy>, Partial<JobDemand>][] = [
    [
      "allowed exec command",
      { engines: ["wasm", "exec"], execAllow: ["/usr/bin/echo"] },
      { engine: "exec", command: "/usr/bin/echo", commandRealPath: "/usr/bin/echo" },
    ],
    [
      "another path to an allowed program (/bin is a link to usr/bin)",
      { engines: ["wasm", "exec"], execAllow: ["/usr/bin/echo"] },
      { engine: "exec", command: "/bin/echo", commandRealPath: "/usr/bin/echo" },
    ],
    ["allowed submitter", { allowedSubmitters: ["alice"] }, {}],
    ["input inside the allowed root", { rejectStatelessJobs: true }, { inputs: [dir("/data/shared/a/b")] }],
    ["local locality with a present input", { locality: "local" }, { inputs: [dir("/data/shared")] }],
    ["missing input anywhere (the run reports it)", {}, { inputs: [dir("/data/shared/x", false)] }],
    ["inline input", { rejectStatelessJobs: true }, { inputs: [{ role: "input", type: "inline" }] }],
    ["constraint met", {}, { constraints: [{ Key: "gpu", Operator: "lt", Values: ["1"] }] }],
    ["exactly the free capacity", {}, { resources: free }],
  ];
  for (const [name, p, d] of ok) {
    t.same(decideBid({ ...policy, ...p }, { ...demand, ...d }, free), { accept: true }, name);
  }
});

t.test("jobDemand reads engine, command, host paths and constraints from a spec", async (t) => {
  const spec = parseJobSpec({
    Name: "j",
    Constraints: [{ Key: "region", Operator: "=", Values: ["eu"] }],
    Tasks: [
      {
        Name: "main",
        Engine: { Type: "exec", Params: { Command: "/bin/cat", Arguments: ["/inputs/a"] } },
        InputSources: [
          { Target: "/inputs/a", Source: { Type: "localFile", Params: { SourcePath: "/data/shared/a" } } },
          { Target: "/inputs/b", Source: { Type: "inline", Params: { Content: "hi" } } },
        ],
      },
    ],
  });
  const submitter = { sub: "alice", namespace: "default", method: "password" };
  const d = jobDemand(spec, submitter, { cpu: 0.1, memory: 1 });
  t.equal(d.engine, "exec");
  t.equal(d.command, "/bin/cat");
  t.same(d.inputs, [
    { role: "input", type: "localFile", localPath: "/data/shared/a" },
    { role: "input", type: "inline" },
  ]);
  t.same(d.constraints, [{ Key: "region", Operator: "=", Values: ["eu"] }]);
  t.equal(d.commandRealPath, undefined, "the caller looks the real path up");
  const decision = decideBid(
    { ...policy, engines: ["wasm", "exec"], execAllow: ["/usr/bin/cat"] },
    { ...d, commandRealPath: "/usr/bin/cat" },
    free,
  );
  t.same(decision, { accept: true });
});

t.test("isPathWithin is lexical containment of absolute paths", async (t) => {
  t.ok(isPathWithin("/a/b", "/a"));
  t.ok(isPathWithin("/a", "/a/"));
  t.notOk(isPathWithin("/a/../b", "/a"));
  t.notOk(isPathWithin("/ab", "/a"));
  t.notOk(isPathWithin("a/b", "/a"), "relative paths are never inside");
});

t.test("the ledger reserves and releases capacity per execution", async (t) => {
  const ledger = new CapacityLedger({ cpu: 2, memory: 100 });
  ledger.hold("e1", { cpu: 1.5, memory: 60 });
  t.same(ledger.free(), { cpu: 0.5, memory: 40 });
  t.equal(decideBid(policy, { ...demand, resources: { cpu: 1, memory: 10 } }, ledger.free()).accept, false);
  ledger.hold("e2", { cpu: 0.5, memory: 40 });
  t.same(ledger.free(), { cpu: 0, memory: 0 });
  t.same(ledger.executions().sort(), ["e1", "e2"]);
  ledger.release("e1");
  ledger.release("e1");
  t.same(ledger.allocated(), { cpu: 0.5, memory: 40 });
  t.notOk(ledger.has("e1"));
});
