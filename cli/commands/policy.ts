import path from "node:path";
import {
  AUTH_CODES,
  AuthError,
  compilePolicies,
  DEFAULT_SCHEMA_FILE,
  defaultPolicyDir,
  formatProblem,
  parsePolicyCases,
  runPolicyCases,
} from "../../auth/index.js";
import { readFileChecked } from "../../core/index.js";
import type { CommandModule } from "./index.js";

interface PolicyArgs {
  file: string;
  schema?: string;
  output: string;
}

async function compileFile(argv: PolicyArgs) {
  const schemaFile = argv.schema ?? path.join(defaultPolicyDir(), DEFAULT_SCHEMA_FILE);
  const [text, schema] = await Promise.all([readFileChecked(argv.file), readFileChecked(schemaFile)]);
  return compilePolicies(
    { file: argv.file, text: text.toString("utf8") },
    { file: schemaFile, text: schema.toString("utf8") },
  );
}

async function check(argv: PolicyArgs): Promise<void> {
  const compiled = await compileFile(argv);
  if (argv.output === "json") {
    process.stdout.write(
      `${JSON.stringify({ file: compiled.file, policies: compiled.ids, warnings: compiled.warnings })}\n`,
    );
    return;
  }
  process.stdout.write(
    `${compiled.file}: ok, ${compiled.ids.length} policies (${compiled.ids.join(", ")})\n`,
  );
  for (const w of compiled.warnings) process.stdout.write(`warning: ${formatProblem(w)}\n`);
}

async function test(argv: PolicyArgs & { cases: string }): Promise<void> {
  const compiled = await compileFile(argv);
  const cases = parsePolicyCases((await readFileChecked(argv.cases)).toString("utf8"), argv.cases);
  const results = runPolicyCases(compiled, cases);
  const failed = results.filter((r) => !r.passed);
  if (argv.output === "json") {
    process.stdout.write(
      `${JSON.stringify({ passed: results.length - failed.length, failed: failed.length, results })}\n`,
    );
  } else {
    for (const r of results) {
      const why = r.reasons.length ? r.reasons.join(", ") : "no policy allowed it";
      const errors = r.errors.length ? `; errors: ${r.errors.join("; ")}` : "";
      process.stdout.write(
        r.passed
          ? `PASS ${r.name}: ${r.decision} (${why})\n`
          : `FAIL ${r.name}: expected ${r.expected}, got ${r.decision} (${why}${errors})\n`,
      );
    }
    process.stdout.write(`${results.length - failed.length} passed, ${failed.length} failed\n`);
  }
  if (failed.length > 0) {
    throw new AuthError(
      AUTH_CODES.SHOAL_AUTH_POLICY_TEST_FAILED,
      `${failed.length} of ${results.length} policy cases got an unexpected decision: ${failed.map((r) => r.name).join(", ")}`,
      { fix: "fix the policy file, or the expectation if the policy is right" },
    );
  }
}

/** `shoal policy check FILE | test FILE CASES.yaml`: validate and exercise a Cedar policy set offline. */
export const policyCommand: CommandModule = (cli) =>
  cli.command("policy", "check and test Cedar authorization policies", (yargs) =>
    yargs
      .option("schema", {
        type: "string",
        describe:
          "Cedar schema to validate against (default: the built-in configs/policies/shoal.cedarschema)",
      })
      .command(
        "check <file>",
        "parse a policy file and validate it against the schema",
        (y) => y.positional("file", { type: "string", demandOption: true, describe: "Cedar policy file" }),
        (argv) => check(argv as unknown as PolicyArgs),
      )
      .command(
        "test <file> <cases>",
        "decide the cases of a YAML file with a policy file; exits non-zero if any decision differs",
        (y) =>
          y
            .positional("file", { type: "string", demandOption: true, describe: "Cedar policy file" })
            .positional("cases", {
              type: "string",
              demandOption: true,
              describe: "YAML: cases (principal, action, resource, context, expected) and optional roles",
            }),
        (argv) => test(argv as unknown as PolicyArgs & { cases: string }),
      )
      .demandCommand(1, "name a subcommand: check or test"),
  );
