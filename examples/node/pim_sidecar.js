'use strict';
/**
 * A pim.plugin.v1 sidecar client for Node.js, written from docs/PROTOCOL.md.
 *
 * A plugin is an object with
 *
 *   name                      the plugin name (Register.plugin_name)
 *   payloadKinds              the kinds it claims (Register.payload_kinds)
 *   start(host, dataDir, granted)        optional; after the first Register
 *   handlePayload(src, kind, body, info) an inbound payload (src, body: Buffer)
 *   onPeerForgotten(node, info)          optional; the daemon forgot a peer
 *   shutdown()                           optional clean-up before exit 0
 *   applied()                            optional, for effects once: returns
 *                                        {hostInstance, seq} of the last event
 *                                        whose effect is stored (or null)
 *
 * Every method may be async. `info` is {seq: BigInt, hostInstance: string};
 * `currentEvent()` returns the same while a handler runs. A handler that
 * throws counts as handled (logged, acked); one that throws `Retry` gets the
 * same event again, up to 5 more times, 50 ms doubling.
 *
 * `host` (the ports) has lookupName(node), lookupX25519(node),
 * sendRouted(dst, frame), sendDirect(peer, frame), signingSeed() and watch();
 * `pluginPayload(kind, body)` makes a ControlFrame for the two sends.
 *
 * `main(plugin)` runs it and exits the process with the status the spec asks
 * for (0; 78 = refused, do not restart; 1 = spawned and the host is gone).
 */

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOCOL_VERSION = 1;
const SDK_NAME = 'pim-sidecar-node';
const SDK_VERSION = readSdkVersion();
const PROTO_ROOT = path.join(__dirname, '../../proto');
const PROTO_FILES = [
  'pim/plugin/v1/session.proto',
  'pim/plugin/v1/peer_directory.proto',
  'pim/plugin/v1/control_sender.proto',
  'pim/plugin/v1/identity_secrets.proto',
];

const EXIT_OK = 0;
const EXIT_HOST_GONE = 1; // a spawned client whose host is gone for 5 s
const EXIT_REFUSED = 78;
const EXIT_FAILURE = 1; // any other failure of the sidecar itself

const CALL_DEADLINE_MS = 30_000; // §1: a call must produce its response within 30 s
const HOST_GONE_MS = 5_000; // §5: a spawned client retries for 5 s, then exits 1
const MAX_MESSAGE_BYTES = 4 * 1024 * 1024; // §1
const RETRY_LIMIT = 5; // §5 handler failure: up to 5 more times
const RETRY_FIRST_PAUSE_MS = 50;
const STREAM_BACKOFF_FIRST_MS = 20; // §5: 20 ms doubling to 2 s while streams last under 1 s
const STREAM_BACKOFF_MAX_MS = 2_000;
const SHORT_STREAM_MS = 1_000;
const ACK_INTERVAL_MS = 1_000; // within a long batch, ack at least this often
const WAIT_BACKOFF_FIRST_MS = 50; // ALREADY_EXISTS: backoff up to 1 s
const WAIT_BACKOFF_MAX_MS = 1_000;

const status = grpc.status;

function readSdkVersion() {
  try {
    return require('./package.json').version || '0';
  } catch (_) {
    return '0';
  }
}

// ---------------------------------------------------------------------------
// Logging: one line per message on stderr, starting with the level (§2).

const LEVELS = new Set(['ERROR', 'WARN', 'INFO', 'DEBUG', 'TRACE']);

// After the host is gone, writes to stdout/stderr fail with EPIPE; a sidecar
// must not die of that (§2). Node turns a failed write into an 'error' event,
// which kills the process when nobody listens.
process.stdout.on('error', () => {});
process.stderr.on('error', () => {});

function log(level, message) {
  let lvl = String(level).toUpperCase();
  if (!LEVELS.has(lvl)) lvl = 'INFO';
  if (lvl === 'DEBUG' && !process.env.PIM_SIDECAR_DEBUG) return;
  if (lvl === 'TRACE') return;
  const text = String(message).replace(/\r?\n/g, ' \\n ');
  try {
    process.stderr.write(`${lvl} ${text}\n`);
  } catch (_) {
    // EPIPE or a closed stream: nothing left to tell.
  }
}

// ---------------------------------------------------------------------------
// Errors and helpers.

/** Thrown by a handler that wants the same event again (§5). */
class Retry extends Error {
  constructor(message = 'retry') {
    super(message);
    this.name = 'Retry';
  }
}

/** A configuration problem that must end in exit 78. */
class Refused extends Error {
  constructor(message, { malformed = false } = {}) {
    super(message);
    this.malformed = malformed; // perhaps a file caught mid-write: worth another read
  }
}

/** Internal: unwinds the session loop with an exit status. */
class Exit extends Error {
  constructor(code, reason) {
    super(reason);
    this.code = code;
    this.reason = reason;
  }
}

function codeName(code) {
  for (const [k, v] of Object.entries(status)) if (v === code) return k;
  return String(code);
}

function describe(err) {
  if (err && typeof err.code === 'number') return `${codeName(err.code)}: ${err.details || err.message}`;
  return err && err.stack ? err.stack : String(err);
}

function isSuperseded(err) {
  if (!err || err.code !== status.ABORTED || !err.metadata) return false;
  return err.metadata.get('pim-session-end').some((v) => String(v).trim() === 'superseded');
}

function toBuffer(bytes, what) {
  if (Buffer.isBuffer(bytes)) return bytes;
  if (bytes instanceof Uint8Array) return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (typeof bytes === 'string') return Buffer.from(bytes, 'utf8');
  throw new TypeError(`${what} must be a Buffer, Uint8Array or string`);
}

function toBigInt(v) {
  if (typeof v === 'bigint') return v;
  if (v === undefined || v === null || v === '') return 0n;
  return BigInt(v); // strings (longs: String) and safe numbers
}

/** A ControlFrame holding a PluginPayload (body: Buffer, Uint8Array or string). */
function pluginPayload(kind, body) {
  return { plugin_payload: { kind: String(kind), body: toBuffer(body, 'body') } };
}

// ---------------------------------------------------------------------------
// Environment (§2).

const TOKEN_RE = /^[0-9a-fA-F]{64}$/;

function checkToken(raw, from) {
  const token = String(raw).trim();
  if (!TOKEN_RE.test(token)) {
    throw new Refused(`malformed token from ${from}: expected 64 hex digits, got ${token.length} characters`, {
      malformed: true,
    });
  }
  return token;
}

/** Reads the token file, refusing one that group or others may read. */
function readTokenFile(file) {
  const fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOCTTY);
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile()) throw new Refused(`PIM_PLUGIN_TOKEN_FILE ${file} is not a regular file`);
    if (st.mode & 0o044) {
      throw new Refused(
        `PIM_PLUGIN_TOKEN_FILE ${file} is readable by group or others (mode ${(st.mode & 0o777).toString(8)}); ` +
          'its token may have leaked: refusing it',
      );
    }
    return checkToken(fs.readFileSync(fd, 'utf8'), `PIM_PLUGIN_TOKEN_FILE ${file}`);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Reads PIM_PLUGIN_SOCKET and the token. Throws Refused (exit 78) when they
 * are missing or malformed. Removes PIM_PLUGIN_TOKEN_FD and PIM_PLUGIN_TOKEN
 * from the environment so that children do not inherit them.
 */
function readConfig(env = process.env) {
  const socket = env.PIM_PLUGIN_SOCKET;
  const fdText = env.PIM_PLUGIN_TOKEN_FD;
  const tokenEnv = env.PIM_PLUGIN_TOKEN;
  delete env.PIM_PLUGIN_TOKEN_FD;
  delete env.PIM_PLUGIN_TOKEN;
  const cfg = { socket, token: null, tokenFile: null, spawned: false, tokenPending: false };

  if (fdText !== undefined) {
    // Preferred over PIM_PLUGIN_TOKEN when both are set (§2).
    if (!/^[0-9]+$/.test(fdText)) throw new Refused(`PIM_PLUGIN_TOKEN_FD is not a descriptor number: ${JSON.stringify(fdText)}`);
    const fd = Number(fdText);
    let raw;
    try {
      raw = fs.readFileSync(fd, 'utf8'); // once, to end of file
    } catch (e) {
      throw new Refused(`cannot read the token from descriptor ${fd} (PIM_PLUGIN_TOKEN_FD): ${e.message}`);
    } finally {
      try {
        fs.closeSync(fd);
      } catch (_) {
        /* already closed or never open */
      }
    }
    cfg.token = checkToken(raw, 'PIM_PLUGIN_TOKEN_FD');
    cfg.spawned = true;
  } else if (tokenEnv !== undefined) {
    cfg.token = checkToken(tokenEnv, 'PIM_PLUGIN_TOKEN');
    cfg.spawned = true;
  } else if (env.PIM_PLUGIN_TOKEN_FILE) {
    cfg.tokenFile = env.PIM_PLUGIN_TOKEN_FILE;
    try {
      cfg.token = readTokenFile(cfg.tokenFile);
    } catch (e) {
      if (e instanceof Refused) throw e;
      if (e.code !== 'ENOENT') throw new Refused(`cannot read PIM_PLUGIN_TOKEN_FILE ${cfg.tokenFile}: ${e.message}`);
      // No file yet: a daemon that is not running. A client on its own waits for it.
      cfg.tokenPending = true;
    }
  } else {
    throw new Refused('no token: none of PIM_PLUGIN_TOKEN_FD, PIM_PLUGIN_TOKEN, PIM_PLUGIN_TOKEN_FILE is set');
  }
  if (!socket) throw new Refused('PIM_PLUGIN_SOCKET is not set');
  return cfg;
}

// ---------------------------------------------------------------------------
// gRPC plumbing.

let packageCache = null;
function loadPackage() {
  if (!packageCache) {
    const def = protoLoader.loadSync(PROTO_FILES, {
      includeDirs: [PROTO_ROOT],
      keepCase: true, // field names as in the .proto files: session_id, acked_seq, …
      longs: String, // uint64 seq, acked_seq, nonce: decimal strings (§5)
      enums: String,
      defaults: true, // proto3 `optional` fields stay absent when unset
      oneofs: true, // Event.event, WatchResponse.event name the member that is set
    });
    packageCache = grpc.loadPackageDefinition(def).pim.plugin.v1;
  }
  return packageCache;
}

function channelTarget(socket) {
  return `unix:${socket}`;
}

// ---------------------------------------------------------------------------
// The ports a plugin uses.

class Host {
  constructor(runner) {
    this._r = runner;
  }

  /** The session id from the latest Register. */
  get sessionId() {
    return this._r.sessionId;
  }
  get hostInstance() {
    return this._r.hostInstance;
  }
  get dataDir() {
    return this._r.reg ? this._r.reg.data_dir : null;
  }
  get granted() {
    return this._r.reg ? this._r.reg.granted : [];
  }
  get limits() {
    return this._r.reg ? this._r.reg.limits : null;
  }

  /** The peer's friendly name: a string ('' = known, no name), or null = unknown peer. */
  async lookupName(node) {
    const r = await this._r.port('directory', 'LookupName', { node: toBuffer(node, 'node') });
    return r.name === undefined || r.name === null ? null : r.name;
  }

  /** The peer's X25519 key (32-byte Buffer), or null = unknown peer. */
  async lookupX25519(node) {
    const r = await this._r.port('directory', 'LookupX25519', { node: toBuffer(node, 'node') });
    return r.x25519 === undefined || r.x25519 === null ? null : Buffer.from(r.x25519);
  }

  /** Sends through the routing table; false when no route exists. */
  async sendRouted(dst, frame) {
    const r = await this._r.port('sender', 'SendRouted', { dst: toBuffer(dst, 'dst'), frame });
    return Boolean(r.attempted);
  }

  /** Sends to a direct neighbour; best effort. */
  async sendDirect(peer, frame) {
    await this._r.port('sender', 'SendDirect', { peer: toBuffer(peer, 'peer'), frame });
  }

  /** The node's Ed25519 signing seed (needs CAPABILITY_SIGNING_SEED). */
  async signingSeed() {
    const r = await this._r.port('secrets', 'SigningSeed', {});
    return Buffer.from(r.seed);
  }

  /**
   * Opens PeerDirectory.Watch: a readable stream of WatchResponse objects
   * ({event: 'seen'|'forgotten'|'lagged', seen|forgotten|lagged}). The caller
   * cancels it (`.cancel()`) when done; it ends when the session ends.
   */
  watch() {
    const call = this._r.clients.directory.Watch({ session_id: this._r.sessionId }, this._r.metadata());
    call.on('error', (err) => {
      if (isSuperseded(err)) this._r.markSuperseded();
    });
    return call;
  }
}

let currentInfo = null;
/** {seq: BigInt, hostInstance: string} of the event being handled, or null. */
function currentEvent() {
  return currentInfo;
}

// ---------------------------------------------------------------------------
// The session loop (§5).

class Runner {
  constructor(plugin, env = process.env) {
    this.plugin = plugin;
    this.env = env;
    this.cfg = null;
    this.channel = null;
    this.clients = null;
    this.host = new Host(this);
    this.reg = null;
    this.sessionId = null;
    this.hostInstance = null;
    this.lastHandled = 0n; // highest seq handled in this process (for hostInstance)
    this.ackedOnHost = 0n; // the host's acked position as last reported
    this.started = false;
    this.superseded = false;
    this.stopRequested = null; // the signal's name once asked to stop
    this.call = null; // the open Events stream
    this.handling = false; // an event is in hand
    this.lastAckAt = 0;
    this.wakers = new Set();
  }

  metadata() {
    const md = new grpc.Metadata();
    md.set('authorization', `Bearer ${this.cfg.token}`);
    return md;
  }

  unary(client, method, request, deadlineMs = CALL_DEADLINE_MS) {
    return new Promise((resolve, reject) => {
      this.clients[client][method](
        request,
        this.metadata(),
        { deadline: Date.now() + deadlineMs },
        (err, res) => (err ? reject(err) : resolve(res)),
      );
    });
  }

  /** A port call with the current session id; notes a takeover. */
  async port(client, method, request) {
    try {
      return await this.unary(client, method, { session_id: this.sessionId, ...request });
    } catch (err) {
      if (isSuperseded(err)) this.markSuperseded();
      throw err;
    }
  }

  markSuperseded() {
    this.superseded = true;
  }

  /** Sleeps, or returns early when asked to stop. */
  sleep(ms) {
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer);
        this.wakers.delete(wake);
        resolve();
      };
      const timer = setTimeout(wake, ms);
      this.wakers.add(wake);
    });
  }

  onSignal(name) {
    if (this.stopRequested) return;
    this.stopRequested = name;
    log('INFO', `${name}: finishing the event in hand, then stopping`);
    for (const wake of [...this.wakers]) wake();
    // Waiting for events: end the stream now. With an event in hand, keep the
    // stream open until that event is finished and acked: closing it ends the
    // session's liveness, and a waiting client's Register would then make this
    // session stale, failing the handler's port calls and the Ack.
    if (this.call && !this.handling) this.call.cancel();
  }

  connect() {
    const pkg = loadPackage();
    const options = {
      'grpc.default_authority': 'localhost', // §1: not the socket path
      'grpc.initial_reconnect_backoff_ms': 100,
      'grpc.max_reconnect_backoff_ms': 1000,
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    };
    const creds = grpc.credentials.createInsecure();
    // One channel, one connection, for every call (§1).
    this.channel = new grpc.Channel(channelTarget(this.cfg.socket), creds, options);
    const opt = { channelOverride: this.channel };
    this.clients = {
      session: new pkg.PluginSession(channelTarget(this.cfg.socket), creds, opt),
      directory: new pkg.PeerDirectory(channelTarget(this.cfg.socket), creds, opt),
      sender: new pkg.ControlSender(channelTarget(this.cfg.socket), creds, opt),
      secrets: new pkg.IdentitySecrets(channelTarget(this.cfg.socket), creds, opt),
    };
  }

  async run() {
    const p = this.plugin;
    if (!p || typeof p.name !== 'string' || !Array.isArray(p.payloadKinds) || typeof p.handlePayload !== 'function') {
      throw new TypeError('a plugin needs name (string), payloadKinds (array) and handlePayload()');
    }
    try {
      this.cfg = readConfig(this.env);
    } catch (e) {
      if (e instanceof Refused) {
        log('ERROR', e.message);
        return EXIT_REFUSED;
      }
      throw e;
    }
    const envName = this.env.PIM_PLUGIN_NAME;
    if (envName !== undefined && envName !== p.name) {
      // §5: register with our own name; the host refuses the mismatch.
      log('WARN', `PIM_PLUGIN_NAME is ${JSON.stringify(envName)} but this plugin is ${JSON.stringify(p.name)}; registering as ${JSON.stringify(p.name)}`);
    }
    const envVersion = this.env.PIM_PLUGIN_PROTOCOL_VERSION;
    if (envVersion !== undefined && envVersion !== String(PROTOCOL_VERSION)) {
      log('WARN', `PIM_PLUGIN_PROTOCOL_VERSION is ${JSON.stringify(envVersion)}; this client speaks ${PROTOCOL_VERSION}`);
    }
    this.takeover = this.env.PIM_PLUGIN_TAKEOVER === '1';

    this.connect();
    const onTerm = () => this.onSignal('SIGTERM');
    const onInt = () => this.onSignal('SIGINT');
    process.on('SIGTERM', onTerm);
    process.on('SIGINT', onInt);
    let code;
    try {
      code = await this.loop();
    } catch (e) {
      if (!(e instanceof Exit)) throw e;
      code = await this.finish(e);
    } finally {
      process.removeListener('SIGTERM', onTerm);
      process.removeListener('SIGINT', onInt);
      try {
        this.channel.close();
      } catch (_) {
        /* closing anyway */
      }
    }
    return code;
  }

  /** Clean-up on every way out: the plugin's shutdown() once it started. */
  async finish(exit) {
    log(exit.code === EXIT_OK ? 'INFO' : 'ERROR', `stopping (${exit.reason}); exit ${exit.code}`);
    if (this.started && typeof this.plugin.shutdown === 'function') {
      try {
        await this.plugin.shutdown();
      } catch (e) {
        log('ERROR', `plugin shutdown failed: ${describe(e)}`);
      }
    }
    return exit.code;
  }

  async loop() {
    let first = true;
    let streamBackoff = 0;
    let lostAt = null;
    for (;;) {
      if (this.stopRequested) throw new Exit(EXIT_OK, this.stopRequested);
      const reg = await this.register(first, lostAt);
      first = false;
      await this.adopt(reg);
      if (!this.started) {
        this.started = true;
        if (typeof this.plugin.start === 'function') {
          try {
            await this.plugin.start(this.host, reg.data_dir, reg.granted || []);
          } catch (e) {
            log('ERROR', `plugin start failed: ${describe(e)}`);
            this.started = false;
            throw new Exit(EXIT_FAILURE, 'plugin start failed');
          }
        }
      }
      // Events skipped by applied() count as handled: ack them.
      await this.ackHandled();
      const opened = Date.now();
      await this.events();
      lostAt = Date.now();
      if (this.stopRequested) throw new Exit(EXIT_OK, this.stopRequested);
      // §5: a stream that dies right after a successful Register: back off.
      if (lostAt - opened < SHORT_STREAM_MS) {
        streamBackoff = streamBackoff ? Math.min(streamBackoff * 2, STREAM_BACKOFF_MAX_MS) : STREAM_BACKOFF_FIRST_MS;
        await this.sleep(streamBackoff);
      } else {
        streamBackoff = 0;
      }
    }
  }

  /**
   * Register, retried as §5 asks: ALREADY_EXISTS waits (backoff up to 1 s)
   * for as long as it takes; transport errors retry (a spawned client for
   * 5 s, then exit 1; one on its own forever, re-reading the token file);
   * FAILED_PRECONDITION / INVALID_ARGUMENT (and, spawned, UNAUTHENTICATED /
   * PERMISSION_DENIED) exit 78.
   */
  async register(first, lostAt) {
    let goneSince = lostAt;
    let backoff = 0;
    let waiting = false;
    let warned = 0;
    let attempt = 0;
    for (;;) {
      if (this.stopRequested) throw new Exit(EXIT_OK, this.stopRequested);
      let failure = null;
      if (this.cfg.tokenFile && (attempt > 0 || !first || this.cfg.tokenPending)) {
        try {
          this.cfg.token = readTokenFile(this.cfg.tokenFile);
          this.cfg.tokenPending = false;
        } catch (e) {
          if (e instanceof Refused && !e.malformed) {
            log('ERROR', e.message);
            throw new Exit(EXIT_REFUSED, 'token file refused');
          }
          failure = `token file: ${e.message}`;
        }
      }
      attempt += 1;
      if (!failure) {
        const takeover = first && this.takeover; // only on the process's first Register
        try {
          return await this.unary('session', 'Register', {
            protocol_version: PROTOCOL_VERSION,
            plugin_name: this.plugin.name,
            payload_kinds: this.plugin.payloadKinds,
            sdk_name: SDK_NAME,
            sdk_version: SDK_VERSION,
            takeover,
          });
        } catch (err) {
          const code = err.code;
          if (code === status.FAILED_PRECONDITION || code === status.INVALID_ARGUMENT) {
            log('ERROR', `Register refused: ${describe(err)}`);
            throw new Exit(EXIT_REFUSED, 'Register refused');
          }
          if (code === status.ALREADY_EXISTS) {
            // Another client's session is live: wait, do not give up (§5).
            if (!waiting) log('INFO', `another client is live; waiting for it to end (${err.details})`);
            waiting = true;
            goneSince = null;
            backoff = backoff ? Math.min(backoff * 2, WAIT_BACKOFF_MAX_MS) : WAIT_BACKOFF_FIRST_MS;
            await this.sleep(backoff);
            continue;
          }
          if ((code === status.UNAUTHENTICATED || code === status.PERMISSION_DENIED) && this.cfg.spawned) {
            log('ERROR', `Register refused: ${describe(err)}`);
            throw new Exit(EXIT_REFUSED, 'Register refused');
          }
          failure = `Register failed: ${describe(err)}`;
        }
      }
      // The host is not there (or, on our own, does not know our token yet).
      waiting = false;
      const now = Date.now();
      if (goneSince === null || goneSince === undefined) goneSince = now;
      if (this.cfg.spawned && now - goneSince >= HOST_GONE_MS) {
        log('ERROR', `${failure}; the host has been gone for ${HOST_GONE_MS / 1000} s`);
        throw new Exit(EXIT_HOST_GONE, 'host gone');
      }
      if (now - warned >= 5000) {
        log('WARN', `${failure}; retrying`);
        warned = now;
      }
      backoff = backoff ? Math.min(backoff * 2, this.cfg.spawned ? 1000 : 2000) : 50;
      // A spawned client tries once more right at its 5 s, not after it.
      await this.sleep(this.cfg.spawned ? Math.max(1, Math.min(backoff, goneSince + HOST_GONE_MS - now)) : backoff);
    }
  }

  async adopt(reg) {
    this.reg = reg;
    this.sessionId = reg.session_id;
    const acked = toBigInt(reg.acked_seq);
    if (reg.host_instance !== this.hostInstance) {
      if (this.hostInstance !== null) log('INFO', `new host instance ${reg.host_instance}; starting over from seq ${acked}`);
      this.hostInstance = reg.host_instance;
      this.lastHandled = acked;
    } else if (acked > this.lastHandled) {
      this.lastHandled = acked;
    }
    this.ackedOnHost = acked;
    // Effects once (§5): skip what the plugin's store says is applied.
    if (typeof this.plugin.applied === 'function') {
      let a;
      try {
        a = await this.plugin.applied();
      } catch (e) {
        log('ERROR', `plugin applied() failed: ${describe(e)}`);
        throw new Exit(EXIT_FAILURE, 'applied() failed');
      }
      const inst = a && (a.hostInstance !== undefined ? a.hostInstance : a.host_instance);
      if (a && inst === this.hostInstance) {
        const seq = toBigInt(a.seq);
        if (seq > this.lastHandled) {
          log('INFO', `events up to seq ${seq} are already applied; skipping them`);
          this.lastHandled = seq;
        }
      }
    }
    log('INFO', `registered as ${this.plugin.name} (host instance ${this.hostInstance}, acked ${acked})`);
  }

  /** Acks everything handled that the host has not acked yet. */
  async ackHandled(deadlineMs = CALL_DEADLINE_MS, stopping = false) {
    if (this.lastHandled <= this.ackedOnHost) return;
    const seq = this.lastHandled;
    this.lastAckAt = Date.now();
    try {
      const r = await this.unary('session', 'Ack', { session_id: this.sessionId, seq: seq.toString() }, deadlineMs);
      const acked = toBigInt(r.acked_seq);
      if (acked > this.ackedOnHost) this.ackedOnHost = acked;
    } catch (err) {
      if (isSuperseded(err)) {
        this.markSuperseded();
        if (!stopping) throw new Exit(EXIT_OK, 'superseded by another client');
        return;
      }
      log(stopping ? 'INFO' : 'WARN', `Ack ${seq} failed: ${describe(err)}`);
    }
  }

  /** Runs one Events stream until it ends; throws Exit to stop the process. */
  async events() {
    const call = this.clients.session.Events({ session_id: this.sessionId }, this.metadata());
    call.on('error', () => {}); // the iterator below reports it
    this.call = call;
    if (this.stopRequested) call.cancel();
    let outcome = null;
    try {
      for await (const batch of call) {
        for (const ev of batch.events || []) {
          if (this.stopRequested) break;
          this.handling = true;
          let r;
          try {
            r = await this.handleEvent(ev);
          } finally {
            this.handling = false;
          }
          if (this.superseded) throw new Exit(EXIT_OK, 'superseded by another client');
          if (r === 'shutdown') {
            const grace = Number(ev.shutdown.grace_ms) || 5000;
            await this.ackHandled(Math.max(100, Math.min(1000, grace / 2)), true);
            throw new Exit(EXIT_OK, `Shutdown event (grace ${grace} ms)`);
          }
          // A long batch of slow events: ack as it goes, well within the
          // host's stuck timeout (§5 Shutdown: 30 s without an ack).
          if (Date.now() - this.lastAckAt >= ACK_INTERVAL_MS) await this.ackHandled();
        }
        if (this.stopRequested) {
          // SIGTERM: the event in hand is finished; ack what was handled
          // while the stream (and so the session) is still ours.
          await this.ackHandled(1000, true);
          throw new Exit(EXIT_OK, this.stopRequested);
        }
        await this.ackHandled();
      }
      outcome = this.stopRequested ? null : 'the host closed the event stream';
    } catch (err) {
      if (err instanceof Exit) throw err;
      if (!this.stopRequested) {
        if (isSuperseded(err)) throw new Exit(EXIT_OK, 'superseded by another client');
        outcome = `event stream lost: ${describe(err)}`;
      }
    } finally {
      this.call = null;
      call.cancel();
    }
    if (this.stopRequested) {
      // Asked to stop while waiting for events: every handled event is acked
      // already (after each batch); try once more for good measure.
      await this.ackHandled(1000, true);
      throw new Exit(EXIT_OK, this.stopRequested);
    }
    log('WARN', `${outcome}; registering again`);
  }

  /** Handles one event; returns 'shutdown' for a Shutdown event. */
  async handleEvent(ev) {
    const seq = toBigInt(ev.seq);
    if (seq <= this.lastHandled) {
      log('DEBUG', `skipping seq ${seq}: already handled`);
      return 'duplicate';
    }
    if (seq > this.lastHandled + 1n) {
      log('WARN', `seq ${this.lastHandled + 1n}..${seq - 1n}: ${seq - this.lastHandled - 1n} payload(s) dropped by the host (queue overflow)`);
    }
    const info = Object.freeze({ seq, hostInstance: this.hostInstance });
    let handled = true;
    switch (ev.event) {
      case 'payload': {
        const p = ev.payload;
        handled = await this.invoke(() => this.plugin.handlePayload(Buffer.from(p.src), p.kind, Buffer.from(p.body), info), info, `payload ${p.kind}`);
        break;
      }
      case 'peer_forgotten': {
        if (typeof this.plugin.onPeerForgotten === 'function') {
          const node = Buffer.from(ev.peer_forgotten.node);
          handled = await this.invoke(() => this.plugin.onPeerForgotten(node, info), info, 'peer_forgotten');
        }
        break;
      }
      case 'shutdown':
        this.lastHandled = seq;
        return 'shutdown';
      default:
        // §5: an event this client does not know: skip it and ack it.
        log('INFO', `seq ${seq}: an event of a kind this client does not know; skipping it`);
    }
    if (handled) this.lastHandled = seq;
    return 'handled';
  }

  /**
   * Calls a handler. A failure counts as handled (logged); Retry gets up to 5
   * more tries, 50 ms doubling. Returns false only when the event must not be
   * acked (asked to stop between tries, or the session was taken over).
   */
  async invoke(fn, info, what) {
    let pause = RETRY_FIRST_PAUSE_MS;
    for (let attempt = 0; ; attempt++) {
      currentInfo = info;
      try {
        await fn();
        return true;
      } catch (err) {
        if (this.superseded) return false;
        if (err instanceof Retry) {
          if (attempt < RETRY_LIMIT) {
            log('DEBUG', `seq ${info.seq} (${what}): retry ${attempt + 1} in ${pause} ms: ${err.message}`);
            await this.sleep(pause);
            if (this.stopRequested) return false; // the next process gets it again
            pause *= 2;
            continue;
          }
          log('ERROR', `seq ${info.seq} (${what}): still failing after ${RETRY_LIMIT} retries; moving on: ${err.message}`);
          return true;
        }
        log('ERROR', `seq ${info.seq} (${what}): handler failed; counted as handled: ${describe(err)}`);
        return true;
      } finally {
        currentInfo = null;
      }
    }
  }
}

/** Runs the plugin; resolves to the exit status. */
function run(plugin, env = process.env) {
  return new Runner(plugin, env).run();
}

/** Runs the plugin and exits the process with the status the spec asks for. */
function main(plugin) {
  run(plugin).then(
    (code) => process.exit(code),
    (err) => {
      log('ERROR', `sidecar failed: ${describe(err)}`);
      process.exit(EXIT_FAILURE);
    },
  );
}

module.exports = {
  main,
  run,
  log,
  pluginPayload,
  currentEvent,
  Retry,
  PROTOCOL_VERSION,
  SDK_NAME,
  SDK_VERSION,
  EXIT_REFUSED,
  EXIT_HOST_GONE,
  MAX_MESSAGE_BYTES,
  // for tests
  readConfig,
  Refused,
  loadPackage,
};
