// Gateway dashboard: an operator client of the gateway's own WebSocket
// protocol (v4). No framework, no network build step; every value from the
// server is inserted as text, never as HTML.
'use strict';

const POLL_MS = 2000;
const LOG_LINES = 300;
const $ = (id) => document.getElementById(id);

// ---- tiny DOM helpers -------------------------------------------------------
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'title') el.title = v;
    else el.setAttribute(k, v);
  }
  for (const kid of kids.flat()) {
    if (kid === undefined || kid === null || kid === false) continue;
    el.append(kid instanceof Node ? kid : String(kid));
  }
  return el;
}
function setText(id, v) { const el = $(id); if (el.textContent !== String(v)) el.textContent = v; }
function fill(tbody, rows) { tbody.replaceChildren(...rows); }
function tags(list, cls) { return (list || []).map((m) => h('span', { class: 'tag ' + (cls || '') }, m)); }

function fmtDuration(ms) {
  if (ms === undefined || ms === null || isNaN(ms)) return '–';
  if (ms < 1000) return Math.round(ms) + ' ms';
  const s = Math.floor(ms / 1000);
  if (s < 60) return (ms / 1000).toFixed(1) + ' s';
  const d = Math.floor(s / 86400), hr = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  return d ? `${d}d ${hr}h` : hr ? `${hr}h ${m}m` : `${m}m ${s % 60}s`;
}
function fmtAgo(ts) {
  if (!ts) return '–';
  const ms = Date.now() - ts;
  return ms < 1500 ? 'just now' : fmtDuration(ms) + ' ago';
}
function fmtTime(ts) {
  if (!ts) return '–';
  const d = new Date(ts);
  return d.toLocaleTimeString([], { hour12: false }) + (Date.now() - ts > 86400000 ? ' ' + d.toLocaleDateString() : '');
}
function fmtBytes(b) {
  if (b === undefined || b === null || isNaN(b)) return '–';
  const u = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return (i ? b.toFixed(1) : b) + ' ' + u[i];
}

// ---- the token: URL fragment (never sent to the server) or the form --------
function takeFragmentToken() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (!m) return null;
  history.replaceState(null, '', location.pathname + location.search);
  try { return decodeURIComponent(m[1]); } catch (e) { return m[1]; }
}
const store = {
  get() { try { return sessionStorage.getItem('gateway.token'); } catch (e) { return null; } },
  set(t) { try { sessionStorage.setItem('gateway.token', t); } catch (e) { /* private mode */ } },
  clear() { try { sessionStorage.removeItem('gateway.token'); } catch (e) { /* private mode */ } },
};

// ---- the protocol client ----------------------------------------------------
class Gateway {
  constructor(token, handlers) {
    this.token = token;
    this.handlers = handlers;
    this.pending = new Map();
    this.nextId = 1;
    this.ws = null;
    this.hello = null;
  }
  open() {
    const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/';
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.onmessage = (ev) => this.onFrame(ev.data);
    ws.onclose = (ev) => {
      for (const p of this.pending.values()) p.reject(new Error('connection closed'));
      this.pending.clear();
      if (this.ws === ws) this.handlers.closed(ev, this.hello !== null);
    };
  }
  close() { if (this.ws) { const ws = this.ws; this.ws = null; ws.close(1000); } }
  onFrame(text) {
    let f;
    try { f = JSON.parse(text); } catch (e) { return; }
    if (f.type === 'event') {
      if (f.event === 'connect.challenge') this.connect();
      else this.handlers.event(f.event, f.payload);
    } else if (f.type === 'res') {
      const p = this.pending.get(f.id);
      if (!p) return;
      this.pending.delete(f.id);
      if (f.ok) p.resolve(f.payload);
      else { const e = new Error((f.error && f.error.message) || 'request failed'); e.error = f.error; p.reject(e); }
    }
  }
  request(method, params) {
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== 1) { reject(new Error('not connected')); return; }
      const id = 'd' + this.nextId++;
      this.pending.set(id, { resolve, reject });
      this.ws.send(JSON.stringify({ type: 'req', id, method, params: params || {} }));
    });
  }
  async connect() {
    try {
      this.hello = await this.request('connect', {
        minProtocol: 4, maxProtocol: 4,
        client: { id: 'gateway-dashboard', version: '1', platform: 'web', mode: 'ui', displayName: 'Dashboard' },
        role: 'operator', scopes: ['operator.admin'], auth: { token: this.token },
      });
      this.handlers.ready(this.hello);
    } catch (e) {
      this.hello = null;
      this.handlers.refused(e);
    }
  }
}

// ---- state and rendering ----------------------------------------------------
const state = {
  gw: null, admin: false, timer: null, backoff: 500, logCursor: null,
  lastMetrics: null, localHistory: [], methods: [], methodScopes: {}, busy: false, pluginRss: {},
};

function showSignin(message) {
  $('main').hidden = true;
  $('signout').hidden = true;
  $('signin').hidden = false;
  setText('signin-error', message || '');
  setLink('signed out', '');
  $('token').focus();
}
function setLink(text, cls) { const el = $('link'); el.textContent = text; el.className = 'pill ' + cls; }

function start(token) {
  stop();
  store.set(token);
  state.logCursor = null;
  $('logs').replaceChildren();
  const gw = new Gateway(token, {
    ready(hello) {
      state.gw = gw;
      state.backoff = 500;
      const scopes = (hello.auth && hello.auth.scopes) || [];
      state.admin = scopes.includes('operator.admin');
      for (const el of document.querySelectorAll('.admin')) el.hidden = !state.admin;
      $('signin').hidden = true;
      $('main').hidden = false;
      $('signout').hidden = false;
      setLink('live', 'live');
      setText('server', `server ${hello.server && hello.server.version} · connection ${hello.server && hello.server.connId} · protocol ${hello.protocol}`);
      refresh();
      state.timer = setInterval(() => { if (!document.hidden) refresh(); }, POLL_MS);
    },
    refused(e) {
      const code = e.error && e.error.details && e.error.details.code;
      gw.close();
      if (code && /^AUTH_/.test(code)) { store.clear(); showSignin('Sign-in refused: ' + e.message); }
      else retry(token, e.message);
    },
    closed(ev, wasReady) {
      clearInterval(state.timer);
      state.gw = null;
      if (ev.code === 1008 && !wasReady) { store.clear(); showSignin('Sign-in refused (' + (ev.reason || 'policy') + ')'); return; }
      retry(token, ev.reason || 'connection lost');
    },
    event(name, payload) {
      if (name === 'gateway.generation') {
        setText('generation', payload.generation);
        refresh();
      } else if (name === 'shutdown') {
        setLink('gateway stopping', 'down');
      }
    },
  });
  state.current = gw;
  gw.open();
}
function retry(token, why) {
  setLink('reconnecting: ' + why, 'down');
  const wait = state.backoff;
  state.backoff = Math.min(state.backoff * 2, 10000);
  state.retryTimer = setTimeout(() => start(token), wait);
}
function stop() {
  clearInterval(state.timer);
  clearTimeout(state.retryTimer);
  if (state.current) state.current.close();
  state.current = null;
  state.gw = null;
}

async function call(method, params) {
  if (!state.gw) throw new Error('not connected');
  return state.gw.request(method, params);
}
function has(method) { return state.methods.includes(method); }

async function refresh() {
  if (!state.gw || state.busy) return;
  state.busy = true;
  try {
    const jobs = [
      call('status').then(renderStatus),
      call('health').then(renderHealth),
      call('system-presence').then(renderClients),
      fetch('/metrics', { cache: 'no-store' }).then((r) => r.text()).then(renderMetrics),
    ];
    if (has('bncr.diagnostics')) jobs.push(call('bncr.diagnostics').then(renderBncr));
    if (state.admin && has('logs.tail')) jobs.push(call('logs.tail', { cursor: state.logCursor, limit: 200 }).then(renderLogs));
    const results = await Promise.allSettled(jobs);
    const failed = results.find((r) => r.status === 'rejected');
    if (failed && state.gw) setLink('live (' + failed.reason.message + ')', 'live');
    else if (state.gw) setLink('live', 'live');
  } finally {
    state.busy = false;
  }
}

function renderStatus(s) {
  setText('generation', s.generation);
  setText('uptime', fmtDuration(s.uptimeMs));
  setText('inflight', s.inFlight === undefined ? '–' : s.inFlight);
  state.methods = s.methods || [];
  state.methodScopes = s.methodScopes || {};
  renderHistory(s);
  renderPlugins(s.plugins || []);
  renderMethods();
}

// Restart history: `status.restartHistory` (newest first) when the server
// keeps one; otherwise the last restart plus what this page saw.
function renderHistory(s) {
  let rows = Array.isArray(s.restartHistory) ? s.restartHistory.slice() : null;
  if (!rows) {
    rows = state.localHistory.slice();
    const last = s.lastRestart;
    if (last && !rows.some((r) => r.generation === last.generation && r.ok === last.ok && Math.abs((r.atMs || 0) - (last.at || 0)) < 5000)) {
      rows.unshift({ generation: last.generation, ok: last.ok, error: last.error, durationMs: last.durationMs, atMs: last.at, trigger: '–' });
    }
    rows.sort((a, b) => (b.atMs || 0) - (a.atMs || 0));
  }
  $('history-empty').hidden = rows.length > 0;
  fill($('history').tBodies[0], rows.map((r) => {
    const phases = r.phasesMs || r.phases || {};
    const order = ['build', 'handover', 'stopOld', 'startNew'];
    const rank = (k) => { const i = order.indexOf(k.replace(/Ms$/, '')); return i < 0 ? order.length : i; };
    const phaseText = Object.entries(phases).sort((a, b) => rank(a[0]) - rank(b[0]))
      .map(([k, v]) => `${k.replace(/Ms$/, '')} ${fmtDuration(v)}`).join(' · ');
    const changed = r.pluginsChanged || r.methodsChanged || [];
    return h('tr', { 'data-generation': r.generation, 'data-ok': String(!!r.ok) },
      h('td', { class: 'num', title: r.atMs ? new Date(r.atMs).toISOString() : '' }, fmtTime(r.atMs)),
      h('td', { class: 'num' }, r.generation),
      h('td', {}, r.ok ? h('span', { class: 'ok' }, 'ok') : h('span', { class: 'bad', title: r.error || '' }, 'failed: ' + (r.error || '?')),
        r.pendingProcessSettings && r.pendingProcessSettings.length ? h('div', { class: 'warn' }, 'needs process restart: ' + [].concat(r.pendingProcessSettings).join(', ')) : null),
      h('td', {}, r.trigger || '–'),
      h('td', { class: 'num' }, fmtDuration(r.durationMs)),
      h('td', { class: 'muted' }, phaseText || '–'),
      h('td', {}, tags(r.methodsAdded, 'add'), tags(r.methodsRemoved, 'del'),
        changed.length ? h('span', { class: 'tag' }, 'changed: ' + changed.map((c) => (typeof c === 'string' ? c : c.id)).join(', ')) : null,
        !(r.methodsAdded || []).length && !(r.methodsRemoved || []).length && !changed.length ? h('span', { class: 'muted' }, 'no change') : null));
  }));
}

function renderPlugins(plugins) {
  fill($('plugins').tBodies[0], plugins.map((p) => {
    const proc = [];
    if (p.pid) proc.push('pid ' + p.pid);
    const rss = p.rssBytes !== undefined ? p.rssBytes : p.pid ? state.pluginRss[p.id] : undefined;
    if (rss !== undefined) proc.push(fmtBytes(rss));
    const crashes = p.crashes !== undefined ? p.crashes : p.restarts;
    if (crashes !== undefined && (p.pid || p.lastExit || crashes > 0)) proc.push(crashes + ' restart' + (crashes === 1 ? '' : 's'));
    if (p.lastExit) proc.push('last exit ' + (typeof p.lastExit === 'string' ? p.lastExit : JSON.stringify(p.lastExit)));
    const cls = p.state === 'running' ? 'ok' : p.state === 'failed' ? 'bad' : 'warn';
    return h('tr', { 'data-plugin': p.id },
      h('td', { title: p.source || '' }, p.name && p.name !== p.id ? `${p.name} (${p.id})` : p.id),
      h('td', {}, h('span', { class: cls, title: p.error || '' }, p.state || '–'), p.error ? h('div', { class: 'bad' }, p.error) : null),
      h('td', {}, p.kind || (p.source ? String(p.source).split(':')[0] : '–')),
      h('td', {}, p.version || '–'),
      h('td', { title: p.codeHash || '' }, h('code', {}, (p.codeHash || '–').slice(0, 12))),
      h('td', { class: 'muted' }, proc.join(' · ') || '–'));
  }));
}

function renderMethods() {
  const q = $('method-filter').value.trim().toLowerCase();
  const list = state.methods.filter((m) => !q || m.toLowerCase().includes(q));
  setText('method-count', `(${state.methods.length})`);
  const key = q + '|' + list.join(',') + '|' + JSON.stringify(state.methodScopes);
  if ($('methods').dataset.key === key) return;
  $('methods').dataset.key = key;
  $('methods').replaceChildren(...list.map((m) => {
    const sc = state.methodScopes[m];
    return h('li', {}, h('code', {}, m), h('span', { class: 'tag' }, sc === undefined ? '?' : sc === null ? 'none' : sc.replace(/^operator\./, '')));
  }));
}

function renderHealth(hl) {
  const errs = (hl.plugins && hl.plugins.errors) || [];
  const el = $('health');
  el.textContent = hl.ok ? 'ok' : `${errs.length} failing`;
  el.className = 'v ' + (hl.ok ? 'ok' : 'bad');
  el.title = errs.map((e) => `${e.id}: ${e.error}`).join('\n');
}

function renderClients(list) {
  const clients = (Array.isArray(list) ? list : []).filter((e) => e.connId !== undefined);
  setText('clients-count', clients.length);
  const me = state.gw && state.gw.hello && state.gw.hello.server && state.gw.hello.server.connId;
  fill($('clients').tBodies[0], clients.map((c) => h('tr', {},
    h('td', { title: [c.clientId, c.version, c.platform].filter(Boolean).join(' ') }, c.displayName || [c.clientId, c.version].filter(Boolean).join(' ') || '?', String(c.connId) === String(me) ? h('span', { class: 'tag' }, 'this page') : null),
    h('td', {}, c.mode || '–'),
    h('td', { title: (c.scopes || []).join(' ') }, c.role || '–'),
    h('td', { class: 'num' }, fmtAgo(c.connectedAtMs)),
    h('td', { class: 'num' }, fmtAgo(c.lastActivityAtMs)),
    h('td', { class: 'num muted' }, c.connId))));
}

// Request rate and errors from the Prometheus text at /metrics.
function renderMetrics(text) {
  let total = 0, errors = 0, rss;
  for (const line of text.split('\n')) {
    if (line.startsWith('gateway_requests_total{')) {
      const v = Number(line.slice(line.lastIndexOf(' ') + 1));
      total += v;
      if (!line.includes('outcome="ok"')) errors += v;
    } else if (line.startsWith('gateway_process_resident_memory_bytes ')) {
      rss = Number(line.split(' ')[1]);
    } else if (line.startsWith('gateway_plugin_process_resident_memory_bytes{')) {
      const m = /plugin="([^"]*)"\} (\S+)/.exec(line);
      if (m) state.pluginRss[m[1]] = Number(m[2]);
    }
  }
  const now = Date.now();
  const prev = state.lastMetrics;
  if (prev && now > prev.at) {
    const dt = (now - prev.at) / 1000;
    setText('rate', ((total - prev.total) / dt).toFixed(1));
    setText('errors', ((errors - prev.errors) / dt).toFixed(1));
  }
  state.lastMetrics = { at: now, total, errors };
  setText('rss', fmtBytes(rss));
}

function renderBncr(d) {
  $('bncr').hidden = false;
  const accounts = d.accounts || [];
  setText('bncr-summary', `· ${accounts.length} account${accounts.length === 1 ? '' : 's'} · outbox ${d.outbox} · dead ${d.deadLetter}`);
  fill($('bncr-accounts').tBodies[0], accounts.map((a) => h('tr', {},
    h('td', {}, a.accountId),
    h('td', {}, a.online ? h('span', { class: 'ok' }, 'online') : h('span', { class: 'muted' }, 'offline')),
    h('td', { class: 'num' }, a.lease ? `conn ${a.lease.connId ?? '–'} · epoch ${a.lease.connectionEpoch}` : '–'),
    h('td', { class: 'num' }, a.outbox ? a.outbox.pending : '–'),
    h('td', { class: 'num' }, a.outbox ? a.outbox.inFlight : '–'),
    h('td', { class: 'num' }, a.deadLetter))));
}

function renderLogs(t) {
  const box = $('logs');
  const atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  if (t.reset) box.replaceChildren();
  for (const l of t.entries || []) {
    box.append(h('div', { class: l.level }, `${new Date(l.ts).toLocaleTimeString([], { hour12: false })} ${l.level} ${l.target}: ${l.message}`));
  }
  while (box.childElementCount > LOG_LINES) box.firstElementChild.remove();
  state.logCursor = t.cursor;
  if (atEnd) box.scrollTop = box.scrollHeight;
}

// ---- actions ----------------------------------------------------------------
function result(node, cls) {
  const el = $('action-result');
  el.className = 'result ' + (cls || '');
  el.replaceChildren(node);
}

async function restart() {
  const btn = $('restart-btn');
  btn.disabled = true;
  result('Restarting…');
  const asked = Date.now();
  try {
    const r = await call('gateway.restart');
    state.localHistory.unshift({
      generation: r.generation, ok: true, trigger: 'dashboard', atMs: Date.now(), durationMs: r.durationMs,
      phases: r.phases, methodsAdded: r.methodsAdded, methodsRemoved: r.methodsRemoved,
    });
    result(h('span', {}, `Generation ${r.generation} serving after ${fmtDuration(r.durationMs)}. `,
      tags(r.methodsAdded, 'add'), tags(r.methodsRemoved, 'del')), 'ok');
  } catch (e) {
    const d = (e.error && e.error.details) || {};
    state.localHistory.unshift({ generation: d.generation, ok: false, trigger: 'dashboard', atMs: Date.now(), durationMs: Date.now() - asked, error: d.error || e.message });
    result('Restart failed: ' + (d.error || e.message), 'bad');
  } finally {
    btn.disabled = false;
    refresh();
  }
}

async function validate() {
  const btn = $('validate-btn');
  btn.disabled = true;
  result('Validating…');
  try {
    const r = await call('gateway.validate');
    if (r.ok) {
      const same = !(r.methodsAdded || []).length && !(r.methodsRemoved || []).length;
      result(h('span', {}, `Config is valid: a restart would serve ${r.methodCount} methods${same ? ', the same set as now.' : '. '}`,
        tags(r.methodsAdded, 'add'), tags(r.methodsRemoved, 'del')), 'ok');
    } else {
      result('Config is not valid (a restart would keep generation ' + r.generation + '): ' + r.error, 'bad');
    }
  } catch (e) {
    result('Validation failed: ' + e.message, 'bad');
  } finally {
    btn.disabled = false;
  }
}

async function inspectDead() {
  const pre = $('dead');
  pre.hidden = false;
  pre.textContent = 'Loading…';
  try {
    const r = await call('bncr.deadLetter.inspect', { limit: 20 });
    pre.textContent = r.total ? `${r.total} dead letter(s), newest ${r.entries.length}:\n` + JSON.stringify(r.entries, null, 2) : 'No dead letters.';
  } catch (e) {
    pre.textContent = 'Cannot inspect: ' + e.message;
  }
}

// ---- wiring -----------------------------------------------------------------
document.addEventListener('DOMContentLoaded', () => {
  $('signin-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const t = $('token').value.trim();
    $('token').value = '';
    if (t) start(t);
  });
  $('signout').addEventListener('click', () => { stop(); store.clear(); showSignin(''); });
  $('restart-btn').addEventListener('click', restart);
  $('validate-btn').addEventListener('click', validate);
  $('dead-btn').addEventListener('click', inspectDead);
  $('method-filter').addEventListener('input', renderMethods);
  document.addEventListener('visibilitychange', () => { if (!document.hidden) refresh(); });
  const token = takeFragmentToken() || store.get();
  if (token) start(token); else showSignin('');
});
