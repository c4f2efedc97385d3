#!/usr/bin/env node
// Search a facepq coordinator from Node.js; prints the SearchResponse as JSON.
//   node search.js --coordinator 127.0.0.1:50051 --photo face.jpg [-k 10]
//   node search.js --coordinator 127.0.0.1:50051 --embedding 0.1,0.2,... [-k 10]
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

function parseArgs(argv) {
  const env = process.env;
  const args = { k: 10, timeout: 10, tlsCa: env.FACEPQ_TLS_CA, tlsCert: env.FACEPQ_TLS_CERT,
                 tlsKey: env.FACEPQ_TLS_KEY, token: env.FACEPQ_AUTH_TOKEN };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => { if (i + 1 >= argv.length) fail(`${a} needs a value`); return argv[++i]; };
    if (a === '--coordinator') args.coordinator = next();
    else if (a === '--photo') args.photo = next();
    else if (a === '--embedding') args.embedding = next();
    else if (a === '-k' || a === '--top-k') args.k = parseInt(next(), 10);
    else if (a === '--timeout') args.timeout = parseFloat(next());
    else if (a === '--tls-ca') args.tlsCa = next();
    else if (a === '--tls-cert') args.tlsCert = next();
    else if (a === '--tls-key') args.tlsKey = next();
    else if (a === '--token-file') args.tokenFile = next();
    else fail(`unknown argument ${a}`);
  }
  if (!args.coordinator) fail('--coordinator host:port is required');
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
  const def = protoLoader.loadSync(PROTO, { longs: String, enums: String, defaults: true, oneofs: true });
  const facepq = grpc.loadPackageDefinition(def).facepq.v1;
  const client = new facepq.Coordinator(args.coordinator, credentials(args));
  const request = { topK: args.k };  // proto-loader camel-cases field names (keepCase: false)
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
    process.stdout.write(JSON.stringify(reply, null, 1) + '\n');
    client.close();
  });
}

main();
