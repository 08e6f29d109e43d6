// Independent tokenizers from the npm registry, for tests/integration/test_tokenizers.py
// and scripts/bench/tokenizer.sh: encodes each file with one of them (ordinary text, no
// special tokens) and prints {"file", "tokens"} per file as JSON lines, and the rate of
// the encoding alone (MB/s) on stderr.
//
//   node tokenizer_reference.js gpt-3-encoder|js-tiktoken:ENCODING|tiktoken:ENCODING FILE...
"use strict";
const fs = require("fs");
const [which, ...files] = process.argv.slice(2);
let encode, done = () => {};
if (which === "gpt-3-encoder") {
  encode = require("gpt-3-encoder").encode;
} else if (which.startsWith("js-tiktoken:")) {
  const enc = require("js-tiktoken").getEncoding(which.slice("js-tiktoken:".length));
  encode = (text) => enc.encode(text, [], []);
} else if (which.startsWith("tiktoken:")) {
  const enc = require("tiktoken").get_encoding(which.slice("tiktoken:".length));
  encode = (text) => enc.encode_ordinary(text);
  done = () => enc.free();
} else {
  process.stderr.write(`unknown tokenizer ${which}\n`);
  process.exit(2);
}
const texts = files.map((f) => fs.readFileSync(f, "utf8"));
const bytes = texts.reduce((n, t) => n + Buffer.byteLength(t), 0);
const start = process.hrtime.bigint();
const out = texts.map((t) => Array.from(encode(t)));
const seconds = Number(process.hrtime.bigint() - start) / 1e9;
done();
process.stderr.write(JSON.stringify({ tokenizer: which, bytes, seconds, mb_per_second: bytes / 1e6 / seconds }) + "\n");
for (let i = 0; i < files.length; ++i) process.stdout.write(JSON.stringify({ file: files[i], tokens: out[i] }) + "\n");
