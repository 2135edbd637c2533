#!/usr/bin/env node
// Reference peer of streamhub on @grpc/grpc-js (pure JavaScript gRPC stack).
//
// Implements the same wire contract (../proto, loaded at run time) and the
// same semantics as streamhub, so that benchmarks can compare the two:
//
//   telemetry.TelemetryService    LiveFeed / GetSnapshot / Subscribe
//   fileupload.FileUploadService  Upload
//   chat.ChatService              Chat
//
// Usage: node server.js --port 0 --data-dir /tmp/peer-data
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const fsp = require('node:fs/promises');
const path = require('node:path');
const { parseArgs, promisify } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const MAX_MESSAGE_BYTES = 4 * 1024 * 1024;
const MAX_SERVICE_NAME_BYTES = 200;
const CPU_THRESHOLD = 90; // percent
const MEMORY_THRESHOLD = 4096; // MB
const DEFAULT_INTERVAL_MS = 1000;
const MIN_INTERVAL_MS = 100;
const CHAT_MAX_QUEUED = 1024; // per member; beyond that the member is dropped
const MAX_ROOM_BYTES = 64;
const Status = grpc.status;

const write = promisify(fs.write);
const fsync = promisify(fs.fsync);

/** Writes all of `buf` to file descriptor `fd` (write() may be partial). */
async function writeAll(fd, buf) {
  for (let off = 0; off < buf.length; ) {
    off += (await write(fd, buf, off, buf.length - off)).bytesWritten;
  }
}

const protoDir = path.join(__dirname, '..', 'proto');
const proto = grpc.loadPackageDefinition(
  protoLoader.loadSync(['telemetry.proto', 'fileupload.proto', 'chat.proto'], {
    includeDirs: [protoDir],
    keepCase: true, // field names as in the .proto (snake_case)
    longs: Number, // uint64/int64 as JS numbers (exact up to 2^53)
    defaults: true, // absent fields read as 0 / '' / false
  }),
);

/** A gRPC error for callbacks and call.emit('error'). */
function rpcError(code, details) {
  return { code, details };
}

/** Why `name` is not a valid service name, or null if it is. */
function checkServiceName(name) {
  if (!name) return 'service_name is empty';
  const size = Buffer.byteLength(name);
  if (size > MAX_SERVICE_NAME_BYTES) {
    return `service_name is ${size} bytes; the limit is ${MAX_SERVICE_NAME_BYTES}`;
  }
  return null;
}

/** Why a LiveFeed payload is refused, or null if it is valid. */
function checkPayload(p) {
  const why = checkServiceName(p.service_name);
  if (why) return why;
  for (const field of ['cpu_usage', 'memory_mb']) {
    if (!(Number.isFinite(p[field]) && p[field] >= 0)) {
      return `${field} is ${p[field]}; it must be a finite number, zero or more`;
    }
  }
  return null;
}

// ---------------------------------------------------------------- telemetry

/** Latest sample of one service and the subscribers to notify on publish. */
class ServiceEntry {
  constructor() {
    this.latest = null;
    this.version = 0; // bumped on every publish; 0 = no sample yet
    this.subscribers = new Set();
  }

  publish(sample) {
    this.latest = sample;
    this.version += 1;
    for (const sub of this.subscribers) sub.notify();
  }
}

/**
 * One Subscribe call. Driven purely by notifications from its ServiceEntry
 * (shared fan-out, no polling): sends the newest sample at most once per
 * interval, never the same version twice. While the call's buffer is full
 * (write() returned false) it sends nothing and, on 'drain', skips straight
 * to the newest sample, so a slow subscriber costs the others nothing.
 */
class Subscriber {
  constructor(call, entry, intervalMs) {
    this.call = call;
    this.entry = entry;
    this.intervalMs = intervalMs;
    this.sentVersion = 0;
    this.lastSentAt = -Infinity;
    this.timer = null;
    this.blocked = false;
    this.closed = false;
  }

  notify() {
    if (this.closed || this.blocked || this.timer) return;
    if (this.entry.version === this.sentVersion) return; // nothing new
    const wait = this.lastSentAt + this.intervalMs - performance.now();
    if (wait > 0) {
      this.timer = setTimeout(() => {
        this.timer = null;
        this.notify();
      }, wait);
      return;
    }
    this.sentVersion = this.entry.version;
    this.lastSentAt = performance.now();
    if (!this.call.write(this.entry.latest)) {
      this.blocked = true;
      this.call.once('drain', () => {
        this.blocked = false;
        this.notify();
      });
    }
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    this.entry.subscribers.delete(this);
  }
}

// [alert type, MetricsPayload field, threshold, label, how to show a value,
// unit]; messages are worded as streamhub's.
const ALERT_RULES = [
  ['CPU_HIGH', 'cpu_usage', CPU_THRESHOLD, 'CPU', (v) => `${v.toFixed(1)}%`, '%'],
  ['MEMORY_HIGH', 'memory_mb', MEMORY_THRESHOLD, 'Memory', (v) => `${v.toFixed(0)}MB`, 'MB'],
];

class Telemetry {
  constructor() {
    this.services = new Map(); // service_name -> ServiceEntry
  }

  entry(name) {
    let entry = this.services.get(name);
    if (!entry) this.services.set(name, (entry = new ServiceEntry()));
    return entry;
  }

  liveFeed(call) {
    const firing = new Set(); // per stream: `${alert}\0${service}` currently above
    let failed = false;
    call.on('data', (p) => {
      if (failed) return;
      const why = checkPayload(p);
      if (why) {
        failed = true;
        call.emit('error', rpcError(Status.INVALID_ARGUMENT, why));
        return;
      }
      const sample = {
        service_name: p.service_name,
        cpu_usage: p.cpu_usage,
        memory_mb: p.memory_mb,
        request_count: p.request_count,
        timestamp_ms: p.timestamp_ms || Date.now(),
      };
      this.entry(p.service_name).publish(sample);
      // Edge-triggered: one alert when crossing above the threshold, one
      // *_RESOLVED when falling back to or below it.
      for (const [alert, field, threshold, label, show, unit] of ALERT_RULES) {
        const value = p[field];
        const above = value > threshold;
        const key = `${alert}\0${p.service_name}`;
        if (above === firing.has(key)) continue;
        if (above) firing.add(key);
        else firing.delete(key);
        const buffered = call.write({
          alert_type: above ? alert : `${alert}_RESOLVED`,
          message: above
            ? `${p.service_name}: ${label} at ${show(value)} — above ${threshold}${unit} threshold`
            : `${p.service_name}: ${label} back to ${show(value)} — ` +
              `at or below ${threshold}${unit} threshold`,
          value,
          timestamp_ms: sample.timestamp_ms,
        });
        // A client that does not read its alerts stops us reading its
        // payloads, as HTTP/2 flow control would.
        if (!buffered) {
          call.pause();
          call.once('drain', () => call.resume());
        }
      }
    });
    call.on('end', () => {
      if (!failed) call.end();
    });
  }

  getSnapshot(call, callback) {
    const name = call.request.service_name;
    const why = checkServiceName(name);
    if (why) return callback(rpcError(Status.INVALID_ARGUMENT, why));
    const latest = this.services.get(name)?.latest;
    if (!latest) return callback(rpcError(Status.NOT_FOUND, `no sample for service '${name}'`));
    callback(null, latest);
  }

  subscribe(call) {
    const { service_name: name, interval_ms: intervalMs } = call.request;
    const why = checkServiceName(name);
    if (why) return call.emit('error', rpcError(Status.INVALID_ARGUMENT, why));
    const entry = this.entry(name); // may wait for a first sample
    const interval = Math.max(intervalMs || DEFAULT_INTERVAL_MS, MIN_INTERVAL_MS);
    const sub = new Subscriber(call, entry, interval);
    entry.subscribers.add(sub);
    call.on('cancelled', () => sub.close());
    sub.notify(); // first message at once if there is a sample
  }
}

// ------------------------------------------------------------------- upload

function checkFilename(name) {
  if (!name) return 'filename is empty';
  if (/[/\\\0]/.test(name) || name.includes('..') || name === '.') {
    return `filename '${name}' must be a plain file name`;
  }
  return null;
}

class Upload {
  constructor(dataDir) {
    this.dir = path.join(dataDir, 'uploads');
    fs.mkdirSync(this.dir, { recursive: true });
  }

  upload(call, callback) {
    this.receive(call).then(
      (response) => callback(null, response),
      (err) => callback(Number.isInteger(err.code) ? err : rpcError(Status.INTERNAL, String(err))),
    );
  }

  async receive(call) {
    const tmpPath = path.join(this.dir, `.upload-${crypto.randomBytes(8).toString('hex')}.part`);
    const file = await fsp.open(tmpPath, 'wx');
    const digest = crypto.createHash('sha256');
    let filename = null;
    let totalBytes = 0;
    let totalChunks = 0;
    let published = false;
    // Read with next() rather than for-await, so that returning early on
    // is_last does not destroy the call.
    const chunks = call[Symbol.asyncIterator]();
    try {
      for (;;) {
        const { value: chunk, done } = await chunks.next();
        if (done) {
          throw rpcError(Status.ABORTED, 'upload ended before a chunk with is_last; nothing stored');
        }
        if (filename === null) {
          const why = checkFilename(chunk.filename);
          if (why) throw rpcError(Status.INVALID_ARGUMENT, why);
          filename = chunk.filename;
        } else if (chunk.filename !== '' && chunk.filename !== filename) {
          throw rpcError(
            Status.INVALID_ARGUMENT,
            `chunk ${totalChunks} names '${chunk.filename}', the upload is '${filename}'`,
          );
        }
        digest.update(chunk.data);
        await writeAll(file.fd, chunk.data);
        totalBytes += chunk.data.length;
        totalChunks += 1;
        if (chunk.is_last) break;
      }
      // Durable, then visible: fsync, atomic rename, fsync the directory.
      await file.sync();
      const finalPath = path.join(this.dir, filename);
      await fsp.rename(tmpPath, finalPath);
      published = true;
      const dir = await fsp.open(this.dir, 'r');
      await dir.sync().finally(() => dir.close());
      return {
        filename,
        total_bytes: totalBytes,
        total_chunks: totalChunks,
        success: true,
        message: `stored ${totalBytes} bytes in ${totalChunks} chunks, sha256=${digest.digest('hex')}`,
      };
    } finally {
      await file.close();
      if (!published) await fsp.rm(tmpPath, { force: true }); // leave no trace
    }
  }
}

// --------------------------------------------------------------------- chat

/** Any room name -> safe file name: [A-Za-z0-9_-] kept, other UTF-8 bytes as %XX. */
function roomFileName(room) {
  let out = '';
  for (const b of Buffer.from(room)) {
    const c = String.fromCharCode(b);
    out += /[A-Za-z0-9_-]/.test(c) ? c : `%${b.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return `${out}.log`;
}

/**
 * The seq of the last complete record of an existing log (0 if none), so
 * that a restarted server continues the room's numbering.
 */
function lastSeq(file) {
  let fd;
  try {
    fd = fs.openSync(file, 'r');
  } catch (err) {
    if (err.code === 'ENOENT') return 0;
    throw err;
  }
  let text;
  try {
    const size = fs.fstatSync(fd).size;
    const tail = Buffer.alloc(Math.min(size, 64 * 1024));
    fs.readSync(fd, tail, 0, tail.length, size - tail.length);
    text = tail.toString();
  } finally {
    fs.closeSync(fd);
  }
  const lines = text.split('\n').slice(0, -1); // after the last \n: torn
  for (let i = lines.length - 1; i >= 0; i -= 1) {
    try {
      return Number(JSON.parse(lines[i]).seq) || 0;
    } catch {
      // a partial first line of the tail window; try the previous one
    }
  }
  return 0;
}

/**
 * A chat room: members, next seq and an append-only log with group commit.
 * Messages get their seq as they arrive and wait in `pending`; one flush loop
 * writes and fsyncs everything pending as one batch, then broadcasts the
 * batch in seq order. Messages arriving during an fsync form the next batch.
 */
class Room {
  constructor(file) {
    this.members = new Set();
    this.nextSeq = lastSeq(file) + 1;
    this.fd = fs.openSync(file, 'a');
    this.pending = [];
    this.flushing = false;
  }

  post(sender, message) {
    // Key order matters only for the log line, which matches the Python peer's.
    const msg = { seq: this.nextSeq++, timestamp: Math.floor(Date.now() / 1000), sender, message };
    this.pending.push(msg);
    if (!this.flushing) this.flush();
    return msg.seq;
  }

  async flush() {
    this.flushing = true;
    try {
      while (this.pending.length > 0) {
        const batch = this.pending;
        this.pending = [];
        const lines = batch.map((m) => `${JSON.stringify(m)}\n`).join('');
        await writeAll(this.fd, Buffer.from(lines));
        await fsync(this.fd);
        for (const msg of batch) {
          for (const member of this.members) member.deliver(msg);
        }
      }
    } catch (err) {
      process.stderr.write(`chat log write failed: ${err}\n`);
      for (const member of this.members) member.fail(Status.INTERNAL, 'chat log write failed');
      this.pending = [];
    } finally {
      this.flushing = false;
    }
  }
}

/** One Chat call: our own queue behind the call's buffer, bounded at 1024. */
class Member {
  constructor(call, room) {
    this.call = call;
    this.room = room;
    this.queue = [];
    this.blocked = false; // write() returned false; waiting for 'drain'
    this.closed = false;
    this.sentSeq = 0;
    this.finishAfter = null; // seq of our last message, once we half-closed
  }

  deliver(msg) {
    if (this.closed) return;
    if (!this.blocked) return this.send(msg);
    if (this.queue.length >= CHAT_MAX_QUEUED) {
      const why = `more than ${CHAT_MAX_QUEUED} messages queued for this member`;
      return this.fail(Status.RESOURCE_EXHAUSTED, why);
    }
    this.queue.push(msg);
  }

  send(msg) {
    this.sentSeq = msg.seq;
    if (!this.call.write(msg)) {
      this.blocked = true;
      this.call.once('drain', () => {
        this.blocked = false;
        while (!this.blocked && !this.closed && this.queue.length > 0) {
          this.send(this.queue.shift());
        }
      });
    }
    this.maybeFinish();
  }

  /** After the client half-closed: end once its own last message is echoed. */
  maybeFinish() {
    if (this.closed || this.finishAfter === null || this.sentSeq < this.finishAfter) return;
    this.leave();
    this.call.end(); // OK status after the buffered messages
  }

  fail(code, details) {
    if (this.closed) return;
    this.leave();
    this.call.emit('error', rpcError(code, details));
  }

  leave() {
    this.closed = true;
    this.queue = [];
    this.room.members.delete(this);
  }
}

class Chat {
  constructor(dataDir) {
    this.dir = path.join(dataDir, 'chat');
    fs.mkdirSync(this.dir, { recursive: true });
    this.rooms = new Map(); // room name -> Room
  }

  chat(call) {
    const name = String(call.metadata.get('chat-room')[0] ?? '') || 'lobby';
    if (Buffer.byteLength(name) > MAX_ROOM_BYTES) {
      const why = `chat-room longer than ${MAX_ROOM_BYTES} bytes`;
      return call.emit('error', rpcError(Status.INVALID_ARGUMENT, why));
    }
    let room = this.rooms.get(name);
    if (!room) this.rooms.set(name, (room = new Room(path.join(this.dir, roomFileName(name)))));
    const member = new Member(call, room);
    room.members.add(member);
    // Response headers now tell the client that it is a member: from here on
    // it receives every message posted to the room.
    call.sendMetadata(new grpc.Metadata());
    let lastOwn = 0;
    call.on('data', (m) => {
      if (!member.closed) lastOwn = room.post(m.sender, m.message);
    });
    call.on('end', () => {
      member.finishAfter = lastOwn;
      member.maybeFinish();
    });
    call.on('cancelled', () => member.leave());
  }
}

// ------------------------------------------------------------------- server

function main() {
  const { values } = parseArgs({
    options: { port: { type: 'string', default: '50051' }, 'data-dir': { type: 'string' } },
  });
  const port = Number(values.port);
  const dataDir = values['data-dir'];
  if (!dataDir || !Number.isInteger(port) || port < 0 || port > 65535) {
    process.stderr.write('usage: node server.js --port N --data-dir DIR\n');
    process.exit(2);
  }
  fs.mkdirSync(dataDir, { recursive: true });

  const server = new grpc.Server({
    'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  });
  const telemetry = new Telemetry();
  const upload = new Upload(dataDir);
  const chat = new Chat(dataDir);
  server.addService(proto.telemetry.TelemetryService.service, {
    LiveFeed: (call) => telemetry.liveFeed(call),
    GetSnapshot: (call, cb) => telemetry.getSnapshot(call, cb),
    Subscribe: (call) => telemetry.subscribe(call),
  });
  server.addService(proto.fileupload.FileUploadService.service, {
    Upload: (call, cb) => upload.upload(call, cb),
  });
  server.addService(proto.chat.ChatService.service, {
    Chat: (call) => chat.chat(call),
  });

  server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (err, bound) => {
    if (err) {
      process.stderr.write(`bind failed: ${err.message}\n`);
      process.exit(1);
    }
    process.stdout.write(`listening on 127.0.0.1:${bound}\n`);
  });

  // Graceful stop: let calls finish for up to 1 s, then cancel the rest.
  const stop = () => {
    const force = setTimeout(() => {
      server.forceShutdown();
      process.exit(0);
    }, 1000);
    server.tryShutdown(() => {
      clearTimeout(force);
      process.exit(0);
    });
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
}

main();
