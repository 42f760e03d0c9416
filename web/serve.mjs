// Serve the kvpack page on 127.0.0.1: web/ (index.html, app.js, pkg/) and the default model at
// /models/default.gguf. Usage: node web/serve.mjs [--port N] [--model PATH]
// --port 0 picks a free port; the first line printed is "serving http://127.0.0.1:PORT/".
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const opt = (name, dflt) => { const i = args.indexOf(name); return i >= 0 ? args[i + 1] : dflt; };
const port = Number(opt("--port", process.env.PORT ?? 8080));
const model = path.resolve(opt("--model", process.env.KVPACK_WEB_MODEL ?? path.join(here, "..", "data", "SmolLM2-135M-Instruct.Q4_1.gguf")));
const types = { ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json", ".css": "text/css", ".png": "image/png", ".gguf": "application/octet-stream", ".kvpack": "application/octet-stream" };

function send(res, file) {
  fs.stat(file, (err, st) => {
    if (err || !st.isFile()) { res.writeHead(404, { "content-type": "text/plain" }); res.end("not found\n"); return; }
    res.writeHead(200, { "content-type": types[path.extname(file)] ?? "application/octet-stream", "content-length": st.size, "cache-control": "no-store" });
    fs.createReadStream(file).pipe(res);
  });
}

const server = http.createServer((req, res) => {
  const url = decodeURIComponent(new URL(req.url, "http://x").pathname);
  if (url === "/models/default.gguf") return send(res, model);
  const file = path.normalize(path.join(here, url === "/" ? "index.html" : url));
  if (!file.startsWith(here + path.sep) || file.includes(`${path.sep}node_modules${path.sep}`)) {
    res.writeHead(403); res.end(); return;
  }
  send(res, file);
});
server.listen(port, "127.0.0.1", () => {
  console.log(`serving http://127.0.0.1:${server.address().port}/`);
  if (!fs.existsSync(model)) console.log(`warning: no model at ${model} (scripts/fetch-model.sh fetches it)`);
});
