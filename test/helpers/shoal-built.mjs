// The compiled CLI (dist/, from `npm run build`) for tests that start many
// processes. bin/shoal itself has no extension, which tap's CommonJS hooks
// (injected into every child) mistake for CommonJS.
import "reflect-metadata";
import { main } from "../../dist/cli/main.js";

process.exitCode = await main(process.argv.slice(2));
