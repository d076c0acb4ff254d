// The CLI entry for tests: what bin/shoal does, from the TypeScript sources.
import "reflect-metadata";
import { main } from "../../cli/main.js";

process.exitCode = await main(process.argv.slice(2));
