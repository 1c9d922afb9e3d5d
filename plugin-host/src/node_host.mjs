// The gateway's Node.js host for OpenClaw-style plugins.
//
// Embedded in the gateway binary and run as `node -e <this file> -- <entry>`
// in the plugin's directory, one process per plugin per generation. It
// speaks the gateway's plugin wire protocol (JSON-RPC 2.0 shaped JSON lines)
// on stdin/stdout, loads the plugin's entry module and implements the subset
// of the OpenClaw plugin API documented in docs/plugins.md. stdout carries
// protocol messages only: console.* goes to stderr, which is the plugin's
// log. No npm dependencies.

import { Console } from "node:console";
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { isAbsolute, join } from "node:path";
import { pathToFileURL } from "node:url";
import { format } from "node:util";

// 1. Before any plugin code runs: console.* to stderr.
const errConsole = new Console({ stdout: process.stderr, stderr: process.stderr });
for (const key of Object.keys(console)) {
  if (typeof errConsole[key] === "function") console[key] = errConsole[key].bind(errConsole);
}

const PROTOCOL_VERSION = 1;
const entryPath = process.argv[process.argv.length - 1];
const rootDir = process.cwd();
const stdout = process.stdout;

function send(msg) {
  stdout.write(JSON.stringify({ jsonrpc: "2.0", ...msg }) + "\n");
}
function notify(method, params) {
  send({ method, params });
}

let pluginId = "?";
function hostLog(level, args) {
  notify("log", { level, message: format(...args) });
}
const logger = {
  debug: (...a) => hostLog("debug", a),
  info: (...a) => hostLog("info", a),
  warn: (...a) => hostLog("warn", a),
  error: (...a) => hostLog("error", a),
};

function readJson(file) {
  try {
    return JSON.parse(readFileSync(join(rootDir, file), "utf8"));
  } catch (e) {
    if (e && e.code === "ENOENT") return {};
    throw new Error(`${file}: ${e.message}`);
  }
}

// 2. The plugin's declarations, filled by register(api).
const methods = new Map();
const services = [];
const hooks = { gateway_start: [], gateway_stop: [] };
let declaredEvents = new Set();
let registering = false;
let config = {};
let stateDir = "";

function errorMessage(e) {
  if (e instanceof Error) return e.message;
  if (e && typeof e === "object" && typeof e.message === "string") return e.message;
  return String(e);
}

function normalizeError(error) {
  if (error instanceof Error) return { code: "UNAVAILABLE", message: error.message };
  if (error && typeof error === "object") {
    const out = {
      code: typeof error.code === "string" ? error.code : "UNAVAILABLE",
      message: typeof error.message === "string" ? error.message : JSON.stringify(error),
    };
    if (error.details !== undefined) out.details = error.details;
    if (typeof error.retryable === "boolean") out.retryable = error.retryable;
    if (Number.isInteger(error.retryAfterMs)) out.retryAfterMs = error.retryAfterMs;
    return out;
  }
  return { code: "UNAVAILABLE", message: error === undefined ? "failed" : String(error) };
}

function checkEvent(event) {
  if (!declaredEvents.has(event)) {
    throw new Error(
      `event \`${event}\` is not declared; list it in openclaw.plugin.json "events" to emit it`,
    );
  }
}

const context = {
  broadcast(event, payload) {
    checkEvent(event);
    notify("emit", { event, payload: payload ?? null });
  },
  broadcastToConnIds(event, payload, connIds) {
    checkEvent(event);
    const ids = [...(connIds ?? [])].map((c) => Number(c));
    notify("emit", { event, payload: payload ?? null, connIds: ids });
  },
};

function duringRegister(what) {
  if (!registering) {
    throw new Error(`${what} must be called synchronously inside register(api)`);
  }
}

function makeApi(manifest, pkg) {
  const api = {
    id: pluginId,
    name: manifest.name ?? pkg.name ?? pluginId,
    version: manifest.version ?? pkg.version ?? "0.0.0",
    description: manifest.description ?? pkg.description ?? "",
    source: entryPath,
    rootDir,
    registrationMode: "full",
    pluginConfig: config,
    logger,
    resolvePath: (p) => (isAbsolute(p) ? p : join(rootDir, p)),
    registerGatewayMethod(name, handler, opts) {
      duringRegister("registerGatewayMethod");
      if (typeof name !== "string" || name.length === 0) {
        throw new Error("registerGatewayMethod: the method name must be a non-empty string");
      }
      if (typeof handler !== "function") {
        throw new Error(`registerGatewayMethod(${name}): the handler must be a function`);
      }
      if (methods.has(name)) throw new Error(`method ${name} registered twice`);
      methods.set(name, { handler, scope: opts && opts.scope });
    },
    registerService(service) {
      duringRegister("registerService");
      if (!service || typeof service.id !== "string" || typeof service.start !== "function") {
        throw new Error("registerService: expected {id, start(ctx), stop?(ctx)}");
      }
      services.push(service);
    },
    on(event, fn) {
      duringRegister("api.on");
      if (!(event in hooks)) {
        throw new Error(
          `api.on("${event}") is not implemented by this gateway (supported: gateway_start, gateway_stop)`,
        );
      }
      hooks[event].push(fn);
    },
  };
  return new Proxy(api, {
    get(target, prop) {
      if (prop in target) return target[prop];
      if (typeof prop === "symbol" || prop === "then" || prop === "toJSON") return undefined;
      throw new Error(
        `plugin ${pluginId} uses the OpenClaw plugin API \`api.${String(prop)}\`, which this gateway does not implement`,
      );
    },
  });
}

async function initialize(params) {
  if (!params.protocolVersions || !params.protocolVersions.includes(PROTOCOL_VERSION)) {
    throw new Error(`the host speaks protocol ${params.protocolVersions}; this host speaks ${PROTOCOL_VERSION}`);
  }
  pluginId = params.pluginId;
  config = params.config ?? {};
  stateDir = params.stateDir;
  const manifest = readJson("openclaw.plugin.json");
  const pkg = readJson("package.json");
  declaredEvents = new Set(Array.isArray(manifest.events) ? manifest.events : []);
  let mod;
  try {
    mod = await import(pathToFileURL(entryPath).href);
  } catch (e) {
    console.error(e);
    throw new Error(`cannot load ${entryPath}: ${errorMessage(e)}`);
  }
  const def = mod.default ?? mod;
  let register;
  if (typeof def === "function") register = def;
  else if (def && typeof def.register === "function") register = def.register.bind(def);
  else if (def && typeof def.activate === "function") register = def.activate.bind(def);
  else if (typeof mod.register === "function") register = mod.register;
  else if (typeof mod.activate === "function") register = mod.activate;
  else {
    throw new Error(
      `${entryPath} exports neither {id, register(api)}, {activate(api)} nor a function as its default export`,
    );
  }
  const api = makeApi(manifest, pkg);
  registering = true;
  try {
    const r = register(api);
    if (r && typeof r.then === "function") {
      r.then(undefined, (e) => logger.error(`register's promise rejected: ${errorMessage(e)}`));
    }
  } catch (e) {
    console.error(e);
    throw new Error(`register(api) of plugin ${pluginId} threw: ${errorMessage(e)}`);
  } finally {
    registering = false;
  }
  return {
    protocolVersion: PROTOCOL_VERSION,
    name: api.name,
    version: api.version,
    methods: [...methods].map(([name, m]) => (m.scope ? { name, scope: m.scope } : { name })),
    events: [...declaredEvents],
    services: services.map((s) => s.id),
  };
}

// 3. Calls.
const inflight = new Set();

async function call(id, p) {
  const m = methods.get(p.method);
  if (!m) {
    send({ id, result: { ok: false, error: { code: "INVALID_REQUEST", message: `unknown method: ${p.method}` } } });
    return;
  }
  inflight.add(id);
  let done = false;
  const respond = (ok, payload, error) => {
    if (done) {
      logger.warn(`respond() called again for ${p.method}; ignored`);
      return;
    }
    done = true;
    if (!inflight.delete(id)) return; // cancelled: the host no longer waits
    const result = ok ? { ok: true, payload: payload ?? null } : { ok: false, error: normalizeError(error) };
    try {
      send({ id, result });
    } catch (e) {
      send({ id, result: { ok: false, error: { code: "UNAVAILABLE", message: `cannot encode the answer: ${errorMessage(e)}` } } });
    }
  };
  const c = p.client ?? {};
  const client = {
    connId: String(c.connId),
    connect: { role: c.role, scopes: c.scopes ?? [], client: c.client ?? {} },
  };
  const req = { type: "req", id: String(id), method: p.method, params: p.params };
  try {
    const value = await m.handler({ req, params: p.params ?? {}, client, respond, context });
    if (!done && value !== undefined) respond(true, value);
  } catch (e) {
    if (!done) respond(false, undefined, { code: "UNAVAILABLE", message: errorMessage(e) });
    else logger.error(`${p.method} threw after answering: ${errorMessage(e)}`);
  }
}

async function runHooks(name) {
  for (const fn of hooks[name]) await fn({ config, stateDir, logger });
}

async function startServices() {
  for (const s of services) await s.start({ config, stateDir, logger });
  await runHooks("gateway_start");
  return {};
}

async function stopServices() {
  const errors = [];
  try {
    await runHooks("gateway_stop");
  } catch (e) {
    errors.push(`gateway_stop: ${errorMessage(e)}`);
  }
  for (const s of [...services].reverse()) {
    try {
      if (typeof s.stop === "function") await s.stop({ config, stateDir, logger });
    } catch (e) {
      errors.push(`${s.id}: ${errorMessage(e)}`);
    }
  }
  if (errors.length) throw new Error(`services failed to stop: ${errors.join("; ")}`);
  return {};
}

async function answer(id, work) {
  try {
    send({ id, result: await work() });
  } catch (e) {
    send({ id, error: { code: -32603, message: errorMessage(e) } });
  }
}

// 4. The protocol loop. Calls and service requests wait for the handshake.
let markReady;
const ready = new Promise((resolve) => {
  markReady = resolve;
});
const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on("line", (line) => {
  if (!line) return;
  let msg;
  try {
    msg = JSON.parse(line);
  } catch {
    console.error(`gateway sent a line that is not JSON: ${line.slice(0, 120)}`);
    return;
  }
  const { id, method, params } = msg;
  if (method === undefined) return; // answers to our notifications: none expected
  switch (method) {
    case "initialize":
      return void answer(id, () => initialize(params ?? {}).finally(markReady));
    case "initialized":
      return;
    case "call":
      return void ready.then(() => call(id, params ?? {}));
    case "cancel":
      inflight.delete(params && params.id);
      return;
    case "ping":
      return void send({ id, result: {} });
    case "start":
      return void ready.then(() => answer(id, startServices));
    case "stop":
      return void ready.then(() => answer(id, stopServices));
    case "shutdown":
      process.exit(0);
      return;
    default:
      if (id !== undefined) send({ id, error: { code: -32601, message: `unknown method ${method}` } });
  }
});
rl.on("close", () => process.exit(0));
