#!/usr/bin/env node
// Search a facepq coordinator from Node.js; prints the answer as one line of JSON.
//   node search.js --photo face.jpg [--coordinator HOST[:PORT]] [-k 10]
//   node search.js --embedding 0.1,0.2,... [--coordinator HOST[:PORT]] [-k 10]
// The coordinator defaults to $FACEPQ_COORDINATOR, else 127.0.0.1:50050; a host without a port
// means port 50050, as for `facepq search`.
// Output: the same JSON as `facepq search --json` (facepq/client.py SearchReply.to_json):
//   {"query", "hits": [{"rank", "face_id" (a decimal string: uint64), "person", "score", "source",
//    "shard", "similarity" (calibrated models)}], "complete", "missing_shards", "index_version", "took_ms",
//    "node_scan_ms"}
// Exit codes as `facepq search`: 0 complete, 2 error, 3 incomplete (a warning on stderr names the
// shards that did not answer).
// Security (same meaning as `facepq search`):
//   --tls-ca ca.pem [--tls-cert client.pem --tls-key client-key.pem]   TLS, optionally mutual
//   --token-file token.txt  (or env FACEPQ_AUTH_TOKEN)                  sends authorization: Bearer <token>
// TLS paths also come from env FACEPQ_TLS_CA / FACEPQ_TLS_CERT / FACEPQ_TLS_KEY.
// The .proto is loaded at run time: no generated code to keep in sync.
'use strict';
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = path.join(__dirname, '..', '..', 'proto', 'facepq', 'v1', 'facepq.proto');
const DEFAULT_PORT = 50050;  // facepq_core/addresses.py DEFAULT_COORDINATOR_PORT
const MAX_TOP_K = 1000;
const EXIT_INCOMPLETE = 3;

// host -> host:50050; host:port, [v6]:port and gRPC target schemes (unix:, dns:, ...) unchanged.
function parseAddress(text) {
  const a = (text || '').trim();
  if (!a) fail('empty coordinator address: give host or host:port');
  if (/^(unix|unix-abstract|dns|ipv4|ipv6|vsock):/.test(a)) return a;
  if (a.startsWith('[')) return a.includes(']:') ? a : `${a}:${DEFAULT_PORT}`;
  if ((a.match(/:/g) || []).length > 1) return `[${a}]:${DEFAULT_PORT}`;
  const [host, port] = a.split(':');
  if (port === undefined) return `${host}:${DEFAULT_PORT}`;
  const n = Number(port);
  if (!Number.isInteger(n) || n < 1 || n > 65535) fail(`bad address ${a}: the port must be in 1..65535`);
  return `${host || '127.0.0.1'}:${n}`;
}

// A float32 from the wire as the shortest decimal that reads back as the same float32 (what
// facepq/client.py writes), so both clients print the same numbers.
function f32(x) {
  const f = Math.fround(x);
  for (let p = 1; p <= 9; p++) {
    const v = Number(f.toPrecision(p));
    if (Math.fround(v) === f) return v;
  }
  return f;
}

function toJson(reply, query) {
  return {
    query,
    hits: reply.hits.map((h, i) => Object.assign(
      { rank: i + 1, face_id: String(h.face_id), person: h.person, score: f32(h.score), source: h.source, shard: h.shard },
      // a calibrated model's similarity (proto3 optional: present only when the coordinator set it)
      h._similarity === 'similarity' ? { similarity: f32(h.similarity) } : {})),
    complete: reply.complete,
    missing_shards: reply.missing_shards,
    index_version: reply.index_version,
    took_ms: f32(reply.took_ms),
    node_scan_ms: f32(reply.node_scan_ms),
  };
}

function parseArgs(argv) {
  const env = process.env;
  const args = { k: 10, timeout: 10, tlsCa: env.FACEPQ_TLS_CA, tlsCert: env.FACEPQ_TLS_CERT,
                 tlsKey: env.FACEPQ_TLS_KEY, token: env.FACEPQ_AUTH_TOKEN,
                 coordinator: env.FACEPQ_COORDINATOR || `127.0.0.1:${DEFAULT_PORT}` };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => { if (i + 1 >= argv.length) fail(`${a} needs a value`); return argv[++i]; };
    if (a === '--coordinator') args.coordinator = next();
    else if (a === '--photo') args.photo = next();
    else if (a === '--embedding') args.embedding = next();
    else if (a === '-k' || a === '--top-k') args.k = Number(next());
    else if (a === '--timeout') args.timeout = parseFloat(next());
    else if (a === '--tls-ca') args.tlsCa = next();
    else if (a === '--tls-cert') args.tlsCert = next();
    else if (a === '--tls-key') args.tlsKey = next();
    else if (a === '--token-file') args.tokenFile = next();
    else fail(`unknown argument ${a}`);
  }
  args.coordinator = parseAddress(args.coordinator);
  if (!Number.isInteger(args.k) || args.k < 1 || args.k > MAX_TOP_K) fail(`-k must be in 1..${MAX_TOP_K}`);
  if (!!args.photo === !!args.embedding) fail('give exactly one of --photo FILE or --embedding v1,v2,...');
  if (args.tlsCa && (!!args.tlsCert !== !!args.tlsKey)) fail('a client certificate needs both --tls-cert and --tls-key');
  return args;
}

function readFile(file, what) {
  try { return fs.readFileSync(file); } catch (e) { fail(`cannot read the ${what} ${file}: ${e.message}`); }
}

function credentials(args) {
  if (!args.tlsCa) return grpc.credentials.createInsecure();
  const key = args.tlsKey ? readFile(args.tlsKey, 'TLS private key') : null;
  const cert = args.tlsCert ? readFile(args.tlsCert, 'TLS certificate') : null;
  return grpc.credentials.createSsl(readFile(args.tlsCa, 'TLS CA'), key, cert);
}

function metadata(args) {
  const md = new grpc.Metadata();
  let token = args.token;
  if (args.tokenFile) {
    token = readFile(args.tokenFile, 'token file').toString('utf8').split('\n')
      .map((l) => l.trim()).find((l) => l && !l.startsWith('#'));
  }
  if (token) md.add('authorization', `Bearer ${token}`);
  return md;
}

function fail(msg) {
  process.stderr.write(`search.js: error: ${msg}\n`);
  process.exit(2);
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  // keepCase: the proto's own snake_case field names, the names of the JSON output
  const def = protoLoader.loadSync(PROTO, { keepCase: true, longs: String, enums: String, defaults: true,
                                            oneofs: true });
  const facepq = grpc.loadPackageDefinition(def).facepq.v1;
  const client = new facepq.Coordinator(args.coordinator, credentials(args));
  const request = { top_k: args.k };
  if (args.photo) {
    try { request.photo = fs.readFileSync(args.photo); } catch (e) { fail(`cannot read ${args.photo}: ${e.message}`); }
  } else {
    const values = args.embedding.split(',').map(Number);
    if (values.some(Number.isNaN)) fail('--embedding must be comma-separated numbers');
    request.embedding = { values };
  }
  const deadline = new Date(Date.now() + args.timeout * 1000);
  client.Search(request, metadata(args), { deadline }, (err, reply) => {
    if (err) fail(`${grpc.status[err.code]}: ${err.details}`);
    process.stdout.write(JSON.stringify(toJson(reply, args.photo || 'embedding')) + '\n');
    client.close();
    if (!reply.complete) {
      process.stderr.write(`search.js: warning: INCOMPLETE answer: shards ${JSON.stringify(reply.missing_shards)} ` +
                           'had no node answering; the hits are the best of the other shards only\n');
      process.exitCode = EXIT_INCOMPLETE;
    }
  });
}

main();
