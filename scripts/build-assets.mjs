// Copy the third-party browser assets the gateway serves from node_modules into
// src/domum_gateway/static/vendor/ (gitignored). No bundler: the packages ship ES modules.
// Run by `make assets` after `npm ci`; running it again replaces the folder.
import { copyFileSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const vendor = join(root, "src", "domum_gateway", "static", "vendor");

// [package, file inside the package, destination inside vendor/]
const files = [
  ["@xterm/xterm", "lib/xterm.mjs", "xterm/xterm.mjs"],
  ["@xterm/xterm", "css/xterm.css", "xterm/xterm.css"],
  ["@xterm/xterm", "LICENSE", "xterm/LICENSE"],
  ["@xterm/addon-fit", "lib/addon-fit.mjs", "xterm/addon-fit.mjs"],
  ["@xterm/addon-fit", "LICENSE", "xterm/LICENSE.addon-fit"],
];

rmSync(vendor, { recursive: true, force: true });
const versions = {};
for (const [pkg, file, dest] of files) {
  const pkgDir = join(root, "node_modules", pkg);
  const src = join(pkgDir, file);
  if (!existsSync(src)) {
    console.error(`build-assets: ${src} is missing; run \`npm ci\` first`);
    process.exit(1);
  }
  const out = join(vendor, dest);
  mkdirSync(dirname(out), { recursive: true });
  if (file.endsWith(".mjs")) {
    // Source maps are not shipped, so drop the comment that points at them.
    writeFileSync(out, readFileSync(src, "utf8").replace(/\n\/\/# sourceMappingURL=\S+\s*$/, "\n"));
  } else {
    copyFileSync(src, out);
  }
  versions[pkg] = JSON.parse(readFileSync(join(pkgDir, "package.json"), "utf8")).version;
}
writeFileSync(join(vendor, "VERSIONS.json"), JSON.stringify(versions, null, 2) + "\n");
const names = Object.entries(versions).map(([name, version]) => `${name}@${version}`).join(", ");
console.log(`build-assets: ${files.length} files into ${vendor} (${names})`);
