// BullMQ's side of keyfleet's queue benchmark: one measured run, driven by
// crates/keyfleet/benches/queue.rs, which installs this folder's package-lock.json with `npm ci`
// into a folder under target/, starts a redis-server of its own for BullMQ, and runs
// `node bench.cjs <spec.json>`. The spec:
//   { "redis_port": 40001, "concurrency": 64, "jobs": [<keyfleet JobPayload JSON>, ...],
//     "warmup": [<the same, fewer>], "servers": [{ "url": "http://127.0.0.1:port", "key": "..." }] }
// `servers` empty: no-op jobs; otherwise each job is one GET /api/keys/<uuid v5>/link to the job's
// server (index server - 1), as the Rust side's handler does. Prints one JSON line on stdout.
//
// The warm-up jobs are drained first, unmeasured, in the same process. The clock runs as on the
// Rust side: from the worker's start (connected, scripts loaded) until the
// last job is acknowledged ('completed' fires after BullMQ's moveToFinished script returned).
// Enqueueing (Queue.addBulk, 1,000 at a time) is not timed. BullMQ runs with its defaults
// (completed jobs kept, stalled checks on, one Worker of the given concurrency).
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const http = require('node:http');
const crypto = require('node:crypto');
const { Queue, Worker } = require('bullmq');
const IORedis = require('ioredis');

const QUEUE = 'kfbench';
const ENQUEUE_CHUNK = 1000;

// RFC 4122 version 5 (SHA-1) UUID in the URL namespace, as Rust's `Uuid::new_v5(NAMESPACE_URL, ..)`.
const NAMESPACE_URL = Buffer.from('6ba7b8119dad11d180b400c04fd430c8', 'hex');
function uuidV5(name) {
  const h = crypto.createHash('sha1').update(NAMESPACE_URL).update(name).digest();
  h[6] = (h[6] & 0x0f) | 0x50;
  h[8] = (h[8] & 0x3f) | 0x80;
  const x = h.subarray(0, 16).toString('hex');
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}

// One keep-alive agent per fake server, as the Rust side holds one pooled client per server.
function httpServers(servers) {
  return servers.map(({ url, key }) => {
    const base = new URL(url);
    return {
      host: base.hostname,
      port: Number(base.port),
      prefix: base.pathname.replace(/\/$/, ''),
      key,
      agent: new http.Agent({ keepAlive: true }),
    };
  });
}

// A 404 (no such key) is the expected answer: the round trip is what counts.
function roundTrip(servers, job) {
  const server = servers[job.server - 1];
  if (!server) return Promise.resolve(false);
  const options = {
    host: server.host,
    port: server.port,
    path: `${server.prefix}/api/keys/${uuidV5(job.subscription)}/link`,
    headers: { 'X-API-Key': server.key },
    agent: server.agent,
    timeout: 10000,
  };
  return new Promise((resolve) => {
    const request = http.get(options, (response) => {
      response.on('data', () => {});
      response.on('end', () => resolve(response.statusCode === 404 || response.statusCode === 200));
      response.on('error', () => resolve(false));
    });
    request.on('timeout', () => request.destroy(new Error('timed out')));
    request.on('error', () => resolve(false));
  });
}

// Script calls (EVALSHA, EVAL) so far, from INFO commandstats.
function scriptCalls(info) {
  return info.split(/\r?\n/)
    .filter((l) => l.startsWith('cmdstat_evalsha:') || l.startsWith('cmdstat_eval:'))
    .map((l) => Number((l.match(/calls=(\d+)/) || [0, 0])[1]))
    .reduce((a, b) => a + b, 0);
}

function cpuSeconds(info) {
  const field = (name) => {
    const line = info.split(/\r?\n/).find((l) => l.startsWith(`${name}:`));
    return line ? Number(line.slice(name.length + 1)) : 0;
  };
  return field('used_cpu_user') + field('used_cpu_sys');
}

// Enqueues `jobs` on queue `name`, then drains them with one Worker; the clock covers the drain.
async function drain(name, jobs, spec, servers, stats) {
  const connection = { host: '127.0.0.1', port: spec.redis_port };
  const total = jobs.length;
  const queue = new Queue(name, { connection });
  for (let i = 0; i < total; i += ENQUEUE_CHUNK) {
    await queue.addBulk(jobs.slice(i, i + ENQUEUE_CHUNK).map((data) => ({ name: data.kind, data })));
  }

  let done = 0;
  let errors = 0;
  let lastDone = null;
  let allDone;
  const finished = new Promise((resolve) => { allDone = resolve; });
  const complete = () => {
    done += 1;
    if (done === total) {
      lastDone = performance.now();
      allDone();
    }
  };
  const processor = servers.length === 0
    ? async () => {}
    : async (job) => {
      if (!(await roundTrip(servers, job.data))) errors += 1;
    };
  const worker = new Worker(name, processor, { connection, concurrency: spec.concurrency, autorun: false });
  worker.on('completed', complete);
  worker.on('failed', () => { errors += 1; complete(); });
  worker.on('error', (error) => { process.stderr.write(`bullmq worker error: ${error}\n`); });
  await worker.waitUntilReady();

  const callsBefore = scriptCalls(await stats.info('commandstats'));
  const cpuBefore = cpuSeconds(await stats.info('cpu'));
  const processBefore = process.cpuUsage();
  const started = performance.now();
  const running = worker.run();
  await finished;
  await worker.close();
  await running;
  const stopped = performance.now();
  const processCpu = process.cpuUsage(processBefore);
  const cpuAfter = cpuSeconds(await stats.info('cpu'));
  const calls = scriptCalls(await stats.info('commandstats')) - callsBefore;

  const counts = await queue.getJobCounts('completed', 'failed', 'wait', 'active', 'delayed', 'prioritized');
  await queue.close();
  return {
    jobs: total,
    errors,
    completed: counts.completed,
    left: counts.failed + counts.wait + counts.active + counts.delayed + counts.prioritized,
    elapsed_s: (lastDone - started) / 1e3,
    stop_s: (stopped - lastDone) / 1e3,
    redis_cpu_s: Math.max(0, cpuAfter - cpuBefore),
    worker_cpu_s: (processCpu.user + processCpu.system) / 1e6,
    script_calls: calls,
  };
}

async function main() {
  const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const servers = httpServers(spec.servers || []);
  // A connection of our own for INFO cpu: the Redis server's CPU time over the timed window.
  const stats = new IORedis({ host: '127.0.0.1', port: spec.redis_port });
  // A long-running worker process has a warm JIT and warm HTTP connections, as the Rust side's
  // runs share one warmed-up process: drain the warm-up jobs first, on a queue of their own.
  if (spec.warmup && spec.warmup.length > 0) {
    const warm = await drain(`${QUEUE}-warmup`, spec.warmup, spec, servers, stats);
    if (warm.errors > 0) throw new Error(`${warm.errors} warm-up jobs failed`);
  }
  const result = await drain(QUEUE, spec.jobs, spec, servers, stats);
  stats.disconnect();
  servers.forEach((s) => s.agent.destroy());
  const version = JSON.parse(
    fs.readFileSync(path.join(__dirname, 'node_modules', 'bullmq', 'package.json'), 'utf8'),
  ).version;
  return { bullmq: version, node: process.version, ...result };
}

main().then(
  (result) => process.stdout.write(`${JSON.stringify(result)}\n`, () => process.exit(0)),
  (error) => {
    process.stderr.write(`${error && error.stack ? error.stack : error}\n`);
    process.exit(1);
  },
);
