// padlock dashboard: follows /v1/events (opening with the recent ones),
// re-reads /v1/locks whenever something changes, and polls /v1/server and
// /v1/stats for the server panel, the charts and the contention table. No
// framework, no build step, nothing from the internet; the charts are SVG
// drawn here. Every value from the server is put in the page as text
// (textContent), never as HTML: lock names and owners are anyone's input.
'use strict';

const EVENT_TYPES = ['queued', 'granted', 'released', 'lost', 'abandoned'];
const PAGE = 1000;
const MAX_PAGES = 5;
const FEED_LENGTH = 60;
const POLL_MS = 2000;

const state = {
  locks: [],
  truncated: false,
  // server clock minus this browser's clock, so ages are the server's
  skew: 0,
  filter: '',
  kind: '',
  // holder id awaiting a second click to revoke
  confirming: null,
  confirmTimer: null,
  loaded: false,
  // The server wants a token (--client-token-file) and has none it accepts.
  needToken: null,
  // /v1/server and /v1/stats, once read
  server: null,
  // whether the table was drawn with revoke buttons
  drawnRevoke: false,
  stats: null,
  // How the lock table and the contention table are sorted.
  sort: { key: 'name', dir: 1 },
  csort: { key: 'wait_total_ms', dir: -1 },
};

const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key.startsWith('data-')) node.setAttribute(key, value);
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// ---- time and numbers -----------------------------------------------------

function serverNow() {
  return Date.now() + state.skew;
}

function age(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  const pad = (n) => String(n).padStart(2, '0');
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${pad(s % 60)}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${pad(Math.floor((s % 3600) / 60))}m`;
  return `${Math.floor(s / 86400)}d${pad(Math.floor((s % 86400) / 3600))}h`;
}

// A duration in milliseconds, as people read it: 0.28 ms, 12 ms, 1.4 s, 4m05s.
function duration(ms) {
  if (ms === null || ms === undefined) return '–';
  if (ms < 1) return `${ms.toFixed(2)} ms`;
  if (ms < 10) return `${ms.toFixed(1)} ms`;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return age(ms);
}

function tickAges() {
  const now = serverNow();
  for (const node of document.querySelectorAll('[data-since]')) {
    node.textContent = age(now - Number(node.dataset.since));
  }
  for (const node of document.querySelectorAll('[data-until]')) {
    const left = Number(node.dataset.until) - now;
    node.textContent = left > 0 ? age(left) : 'now';
  }
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

// ---- reading the state ---------------------------------------------------

let inflight = false;
let again = false;
let timer = null;

// Coalesces bursts of events into one read.
function scheduleRefresh() {
  if (timer) return;
  timer = setTimeout(() => {
    timer = null;
    refresh();
  }, 50);
}

async function refresh() {
  if (inflight) {
    again = true;
    return;
  }
  inflight = true;
  try {
    const locks = [];
    let cursor = null;
    let pages = 0;
    let body;
    do {
      const url = `/v1/locks?limit=${PAGE}` + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : '');
      const response = await fetch(url, { cache: 'no-store', headers: authHeaders() });
      body = await response.json();
      if (response.status === 401 || response.status === 403) {
        needToken(body.error ? body.error.message : response.statusText);
        return;
      }
      if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
      locks.push(...body.locks);
      cursor = body.next_cursor;
      pages += 1;
    } while (cursor && pages < MAX_PAGES);
    state.skew = body.now_unix_ms - Date.now();
    state.locks = locks;
    state.truncated = Boolean(cursor);
    state.loaded = true;
    state.needToken = null;
    render();
    renderContended();
  } catch (err) {
    toast(`Cannot read locks: ${err.message}`, 'error');
  } finally {
    inflight = false;
    if (again) {
      again = false;
      scheduleRefresh();
    }
  }
}

// /v1/server and /v1/stats: every POLL_MS while the page is visible, and
// at once when something says the server changed (a backend loss).
async function readJson(url) {
  const response = await fetch(url, { cache: 'no-store', headers: authHeaders() });
  if (response.status === 401 || response.status === 403) return null;
  if (!response.ok) throw new Error(response.statusText);
  return response.json();
}

async function pollServer() {
  try {
    const server = await readJson('/v1/server');
    if (server) {
      state.server = server;
      state.skew = server.now_unix_ms - Date.now();
    }
  } catch (err) {
    state.server = state.server && { ...state.server, unreachable: true };
  }
  renderServer();
}

async function pollStats() {
  try {
    const stats = await readJson('/v1/stats');
    if (stats) state.stats = stats;
  } catch (err) {
    return; // the status dot says the server is away
  }
  renderCharts();
  renderContended();
}

function poll() {
  if (document.hidden) return;
  pollServer();
  pollStats();
}

// ---- the server panel ----------------------------------------------------

function renderServer() {
  const s = state.server;
  const ready = $('ready');
  const kinds = $('kinds');
  if (!s) {
    ready.textContent = state.needToken ? 'token needed' : '…';
    ready.dataset.ready = '';
    updateTokenField();
    return;
  }
  const down = s.kinds.filter((k) => !k.serving);
  if (s.unreachable) {
    ready.textContent = 'unreachable';
    ready.dataset.ready = 'false';
  } else if (s.draining) {
    ready.textContent = 'shutting down';
    ready.dataset.ready = 'false';
  } else {
    ready.textContent = s.ready ? 'ready' : `not ready: ${down.map((k) => k.kind).join(', ')} down`;
    ready.dataset.ready = String(s.ready);
  }
  ready.title = s.ready ? 'Grants every kind it serves (/readyz is 200)' : down.map((k) => `${k.kind}: ${k.detail}`).join('\n');
  kinds.replaceChildren(...s.kinds.map((k) => el('span', {
    class: `kind-state ${k.serving ? 'up' : 'down'}`,
    'data-kind-state': k.kind,
    'data-serving': String(k.serving),
    title: k.serving ? `${k.kind} locks are granted` : `${k.kind}: ${k.detail}`,
  }, el('span', { class: 'dot' }), k.kind, k.serving ? null : el('span', { class: 'why', text: ' down' }))));
  $('version').textContent = s.version;
  const uptime = $('uptime');
  uptime.dataset.since = s.started_unix_ms;
  uptime.textContent = age(serverNow() - s.started_unix_ms);
  uptime.title = `since ${s.started}`;
  $('connections').textContent = s.connections === null ? '–' : String(s.connections);
  const dir = $('lock-dir');
  dir.textContent = s.lock_dir === null ? '(not shown to this token)' : s.lock_dir;
  dir.title = dir.textContent;
  const revoke = $('revoke');
  revoke.textContent = s.revoke_enabled ? 'enabled' : 'off';
  revoke.title = s.revoke_enabled
    ? 'An admin token is configured: type it in the token box to revoke holders'
    : 'Start padlockd with --admin-token-file to revoke holders from here';
  revoke.dataset.enabled = String(s.revoke_enabled);
  updateTokenField();
  // Revoke buttons come and go with the setting.
  if (state.drawnRevoke !== s.revoke_enabled) {
    state.drawnRevoke = s.revoke_enabled;
    render();
  }
}

function revokeEnabled() {
  return Boolean(state.server && state.server.revoke_enabled);
}

// The token box: shown when the server takes tokens, named for what it is.
function updateTokenField() {
  const s = state.server;
  const field = $('token-field');
  const wanted = Boolean(state.needToken) || Boolean(s && (s.revoke_enabled || s.client_tokens)) || $('token').value !== '';
  field.hidden = !wanted;
  const clients = state.needToken || (s && s.client_tokens);
  $('token-label').textContent = clients ? 'Token' : 'Admin token';
  $('token').placeholder = clients ? 'client or admin token' : 'needed to revoke';
}

// ---- charts --------------------------------------------------------------

const SVG = 'http://www.w3.org/2000/svg';

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// 1, 2, 5 × 10^n at or above v.
function niceCeil(v) {
  if (v <= 1) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// Draws `series` ([{name, cls, values}]) over time into figure `id`:
// point i is at start + i * step (ms). `log`: a log scale (values <= 0 are
// left out). `fill`: the first series is drawn as an area.
function drawChart(id, { series, start, step, log = false, fill = false, format = String }) {
  const fig = $(id);
  const plot = fig.querySelector('.plot');
  const width = Math.max(240, plot.clientWidth || 320);
  const height = 130;
  const m = { left: 54, right: 10, top: 8, bottom: 20 };
  const w = width - m.left - m.right;
  const h = height - m.top - m.bottom;
  const n = Math.max(...series.map((s) => s.values.length), 2);
  const all = series.flatMap((s) => s.values).filter((v) => v !== null && v !== undefined && (!log || v > 0));
  let y;
  const ticks = [];
  if (log) {
    const lo = all.length ? 10 ** Math.floor(Math.log10(Math.min(...all))) : 1;
    const hi = all.length ? 10 ** Math.ceil(Math.log10(Math.max(...all))) : 10;
    const top = hi > lo ? hi : lo * 10;
    y = (v) => m.top + h * (1 - (Math.log10(v) - Math.log10(lo)) / (Math.log10(top) - Math.log10(lo)));
    for (let t = lo; t <= top * 1.0001; t *= 10) ticks.push(t);
  } else {
    const max = niceCeil(all.length ? Math.max(...all) : 1);
    y = (v) => m.top + h * (1 - v / max);
    ticks.push(0, max / 2, max);
  }
  const x = (i) => m.left + (n === 1 ? 0 : (w * i) / (n - 1));
  const root = svg('svg', { viewBox: `0 0 ${width} ${height}`, width, height, role: 'img' });
  for (const t of ticks) {
    root.append(
      svg('line', { class: 'grid', x1: m.left, x2: width - m.right, y1: y(t), y2: y(t) }),
      svg('text', { class: 'tick', x: m.left - 6, y: y(t) + 4, 'text-anchor': 'end' }, format(t)));
  }
  // Minutes ago along the bottom.
  const span = (n - 1) * step;
  for (const ago of [10, 5, 0]) {
    const at = start + span - ago * 60000;
    if (at < start - 1) continue;
    const i = (at - start) / step;
    root.append(svg('text', { class: 'tick', x: x(i), y: height - 5, 'text-anchor': ago === 0 ? 'end' : 'middle' },
      ago === 0 ? 'now' : `-${ago}m`));
  }
  series.forEach((s, k) => {
    let d = '';
    let pen = false;
    let sum = 0;
    let points = 0;
    s.values.forEach((v, i) => {
      if (v === null || v === undefined || (log && v <= 0)) {
        pen = false;
        return;
      }
      sum += v;
      points += 1;
      d += `${pen ? 'L' : 'M'}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    });
    if (fill && k === 0 && points > 0) {
      const area = `M${x(0)},${y(0)}` + s.values.map((v, i) => `L${x(i).toFixed(1)},${y(v || 0).toFixed(1)}`).join('') + `L${x(n - 1)},${y(0)}Z`;
      root.append(svg('path', { class: `area ${s.cls}`, d: area }));
    }
    const path = svg('path', { class: `series ${s.cls}`, d: d || 'M0,0', 'data-series': s.name, 'data-sum': sum, 'data-points': points });
    path.append(svg('title', {}, s.name));
    root.append(path);
  });
  // The value under the pointer, in the caption's hint.
  const hint = fig.querySelector('.hint');
  if (!hint.dataset.text) hint.dataset.text = hint.textContent;
  const cover = svg('rect', { class: 'cover', x: m.left, y: m.top, width: w, height: h });
  cover.addEventListener('mousemove', (e) => {
    const box = root.getBoundingClientRect();
    const i = Math.round(((e.clientX - box.left) * (width / box.width) - m.left) / (w / (n - 1)));
    if (i < 0 || i >= n) return;
    hint.textContent = `${clock(start + i * step)}: ` + series.map((s) => `${s.name} ${s.values[i] === null || s.values[i] === undefined ? '–' : format(s.values[i])}`).join(', ');
  });
  cover.addEventListener('mouseleave', () => { hint.textContent = hint.dataset.text; });
  root.append(cover);
  plot.replaceChildren(root);
  const legend = el('div', { class: 'legend' }, ...series.map((s) => el('span', { class: `key ${s.cls}` }, el('i'), s.name)));
  plot.append(legend);
  fig.dataset.drawn = 'true';
}

function renderCharts() {
  const st = state.stats;
  if (!st) return;
  const scoped = !st.per_second;
  for (const fig of document.querySelectorAll('.chart')) fig.classList.toggle('scoped', scoped);
  if (scoped) return;
  const ps = st.per_second;
  drawChart('chart-grants', {
    series: [{ name: 'grants/s', cls: 's-grants', values: ps.grants }],
    start: ps.start_unix_ms, step: 1000, fill: true,
  });
  drawChart('chart-load', {
    series: [
      { name: 'holders', cls: 's-holders', values: ps.holders },
      { name: 'waiters', cls: 's-waiters', values: ps.waiters },
    ],
    start: ps.start_unix_ms, step: 1000,
  });
  // Minutes: one point each over the last 15, empty where nothing happened.
  const first = ps.start_unix_ms - (ps.start_unix_ms % 60000);
  const minutes = Array.from({ length: 16 }, (_, i) => first + i * 60000);
  const at = new Map((st.per_minute || []).map((mm) => [mm.start_unix_ms, mm]));
  const pick = (what, p) => minutes.map((t) => (at.has(t) ? at.get(t)[what][p] : null));
  const ms = (v) => duration(v);
  drawChart('chart-wait', {
    series: [
      { name: 'p50', cls: 's-p50', values: pick('wait', 'p50_ms') },
      { name: 'p99', cls: 's-p99', values: pick('wait', 'p99_ms') },
    ],
    start: first, step: 60000, log: true, format: ms,
  });
  drawChart('chart-hold', {
    series: [
      { name: 'p50', cls: 's-p50', values: pick('hold', 'p50_ms') },
      { name: 'p99', cls: 's-p99', values: pick('hold', 'p99_ms') },
    ],
    start: first, step: 60000, log: true, format: ms,
  });
  const summary = (p, noun) => (p.count === 0
    ? `no ${noun} in the last 15 minutes`
    : `p50 ${duration(p.p50_ms)} · p90 ${duration(p.p90_ms)} · p99 ${duration(p.p99_ms)} · max ${duration(p.max_ms)} · ${p.count} ${noun}`);
  $('wait-percentiles').textContent = summary(st.wait, 'grants');
  $('hold-percentiles').textContent = summary(st.hold, 'releases');
}

// ---- the most contended locks --------------------------------------------

// The stats count waits that ended; the waits going on now are added from
// the lock table, and locks with waiters now are listed even without
// stats.
function contendedRows() {
  const rows = new Map();
  const key = (name, kind) => `${kind}|${name}`;
  for (const c of state.stats ? state.stats.contended : []) {
    rows.set(key(c.name, c.kind), { ...c, waiting_now: 0 });
  }
  const now = serverNow();
  for (const lock of state.locks) {
    const waiting = waitersOf(lock);
    if (waiting === 0) continue;
    const k = key(lock.name, lock.kind);
    if (!rows.has(k)) {
      rows.set(k, { name: lock.name, kind: lock.kind, queued: 0, granted_after_wait: 0, gave_up: 0, wait_total_ms: 0, max_wait_ms: 0, peak_waiters: waiting });
    }
    const row = rows.get(k);
    row.waiting_now = waiting;
    row.peak_waiters = Math.max(row.peak_waiters, waiting);
    for (const w of lock.waiters) {
      const ms = Math.max(0, now - w.since_unix_ms);
      row.wait_total_ms += ms;
      row.max_wait_ms = Math.max(row.max_wait_ms, ms);
    }
  }
  return [...rows.values()];
}

function renderContended() {
  const body = $('contended').querySelector('tbody');
  const rows = contendedRows();
  const { key, dir } = state.csort;
  rows.sort((a, b) => dir * compare(a[key], b[key]) || compare(a.name, b.name));
  body.replaceChildren(...rows.map((c) => el('tr', { 'data-lock': c.name, 'data-kind': c.kind },
    el('td', { class: 'c-name' }, el('span', { class: `kind k-${c.kind}`, text: c.kind }), ' ', el('span', { class: 'mono', text: c.name })),
    el('td', { class: 'num total-wait', text: duration(c.wait_total_ms), title: `longest wait ${duration(c.max_wait_ms)}; ${c.queued} queued, ${c.granted_after_wait} granted after a wait, ${c.gave_up} gave up (with the waits going on now)` }),
    el('td', { class: 'num', text: String(c.peak_waiters) }),
    el('td', { class: `num${c.waiting_now > 0 ? ' waiting-count' : ''}`, text: String(c.waiting_now) }))));
  $('contended-none').hidden = rows.length > 0;
  markSorted($('contended'), state.csort);
}

// ---- the lock table ------------------------------------------------------

function compare(a, b) {
  if (a === b) return 0;
  if (a === null || a === undefined) return 1;
  if (b === null || b === undefined) return -1;
  return typeof a === 'number' && typeof b === 'number' ? a - b : String(a).localeCompare(String(b));
}

// Each column's value for a holder or waiter row, and for a lock (its
// rows' first value in the column's order).
const COLUMN = {
  name: null,
  id: (r) => Number(r.id),
  owner: (r) => r.owner,
  peer: (r) => r.peer,
  fence: (r) => (r.fence === undefined ? null : r.fence),
  mode: (r) => (r.slot === undefined || r.slot === null ? r.mode : `slot ${r.slot}`),
  age: (r) => -r.since_unix_ms,
  deadline: (r) => (r.deadline_unix_ms === undefined ? null : r.deadline_unix_ms),
};
// The first click sorts these largest first.
const DESCENDING = new Set(['fence', 'age']);

function sortedRows(rows) {
  const { key, dir } = state.sort;
  const value = COLUMN[key];
  if (!value) return rows;
  return [...rows].sort((a, b) => dir * compare(value(a), value(b)));
}

function sortedLocks(locks) {
  const { key, dir } = state.sort;
  const value = COLUMN[key];
  const byName = (a, b) => compare(a.name, b.name) || compare(a.kind, b.kind);
  if (!value) return [...locks].sort((a, b) => dir * byName(a, b));
  const first = (lock) => {
    const values = [...lock.holders, ...lock.waiters].map(value).filter((v) => v !== null && v !== undefined);
    if (values.length === 0) return null;
    return values.sort((a, b) => dir * compare(a, b))[0];
  };
  return [...locks].sort((a, b) => {
    const va = first(a);
    const vb = first(b);
    if (va === null || vb === null) return compare(va, vb) || byName(a, b);
    return dir * compare(va, vb) || byName(a, b);
  });
}

function markSorted(table, sort) {
  for (const button of table.querySelectorAll('button.sort')) {
    const th = button.closest('th');
    if (button.dataset.sort === sort.key) th.setAttribute('aria-sort', sort.dir > 0 ? 'ascending' : 'descending');
    else th.removeAttribute('aria-sort');
  }
}

function onSort(sort, key, rerender) {
  if (sort.key === key) sort.dir = -sort.dir;
  else {
    sort.key = key;
    sort.dir = DESCENDING.has(key) || key.endsWith('_ms') || key.startsWith('peak') || key === 'waiting_now' ? -1 : 1;
  }
  rerender();
}

function visible(lock) {
  if (state.kind && lock.kind !== state.kind) return false;
  return !state.filter || lock.name.toLowerCase().includes(state.filter);
}

// Lists show the first holders and waiters of each lock; the totals count all.
const holdersOf = (lock) => lock.holders_total ?? lock.holders.length;
const waitersOf = (lock) => lock.waiters_total ?? lock.waiters.length;
const COLUMNS = 9;

function summary(lock) {
  const holders = holdersOf(lock);
  const held = lock.kind === 'semaphore'
    ? `${holders}/${lock.limit} slots`
    : `${holders} holder${holders === 1 ? '' : 's'}`;
  const waiting = waitersOf(lock);
  return el('span', { class: 'summary' }, held, ' · ',
    el('span', { class: waiting > 0 ? 'waiting-count' : '', text: `${waiting} waiting` }));
}

function lockHeader(lock) {
  const busy = waitersOf(lock) > 0 ? ' busy' : '';
  return el('tr', { class: `lock${busy}` },
    el('th', { colspan: COLUMNS, scope: 'rowgroup' },
      el('span', { class: `kind k-${lock.kind}`, text: lock.kind }),
      el('span', { class: 'name', text: lock.name }),
      lock.mode && lock.kind !== 'semaphore' ? el('span', { class: `mode m-${lock.mode}`, text: lock.mode }) : null,
      summary(lock)));
}

function revokeButton(lock, holder) {
  const confirming = state.confirming === holder.id;
  return el('button', {
    type: 'button',
    class: confirming ? 'revoke confirm' : 'revoke',
    'data-holder-id': holder.id,
    title: 'Revoke: the holder is told its lock is lost and the next waiter is granted',
    onclick: () => onRevoke(lock, holder),
  }, confirming ? 'Confirm revoke' : 'Revoke');
}

function ownerCell(who) {
  const labels = Object.entries(who.labels || {});
  return el('td', { class: 'owner-cell' },
    el('span', { class: 'owner', text: who.owner || '—' }),
    labels.length ? el('span', { class: 'labels' }, ...labels.map(([k, v]) => el('span', { class: 'label-chip', text: `${k}=${v}` }))) : null);
}

function holderRow(lock, holder) {
  // Semaphore slots are always exclusive: the slot is what tells them apart.
  const mode = holder.slot === null ? holder.mode : `slot ${holder.slot}`;
  return el('tr', { class: 'holder', 'data-lock': lock.name, 'data-kind': lock.kind, 'data-holder-id': holder.id },
    el('td', {}, el('span', { class: 'role r-holder', text: 'holder' })),
    el('td', { class: 'id', text: `#${holder.id}` }),
    ownerCell(holder),
    el('td', { class: 'peer', text: holder.peer }),
    el('td', { class: 'num fence', text: String(holder.fence) }),
    el('td', { class: 'mode-cell', text: mode }),
    el('td', { class: 'num age', 'data-since': holder.since_unix_ms, title: `held since ${holder.since}` },
      age(serverNow() - holder.since_unix_ms)),
    el('td', { class: 'num deadline' }),
    el('td', { class: 'action' }, revokeEnabled() ? revokeButton(lock, holder) : null));
}

function waiterRow(lock, waiter) {
  const until = waiter.deadline_unix_ms;
  return el('tr', { class: 'waiter', 'data-lock': lock.name, 'data-kind': lock.kind, 'data-waiter-id': waiter.id },
    el('td', {}, el('span', { class: 'role r-waiter', text: `waiting ${waiter.position}` })),
    el('td', { class: 'id', text: `#${waiter.id}` }),
    ownerCell(waiter),
    el('td', { class: 'peer', text: waiter.peer }),
    el('td', { class: 'num fence', text: '' }),
    el('td', { class: 'mode-cell', text: waiter.mode }),
    el('td', { class: 'num age', 'data-since': waiter.since_unix_ms, title: `waiting since ${waiter.since}` },
      age(serverNow() - waiter.since_unix_ms)),
    until === null || until === undefined
      ? el('td', { class: 'num deadline', title: 'waits as long as it takes', text: '–' })
      : el('td', { class: 'num deadline', 'data-until': until, title: `gives up at ${waiter.deadline}` },
        age(until - serverNow())),
    el('td', {}));
}

function render() {
  const table = $('locks');
  for (const body of table.querySelectorAll('tbody')) body.remove();
  const shown = sortedLocks(state.locks.filter(visible));
  for (const lock of shown) {
    const body = el('tbody', { 'data-lock': lock.name, 'data-kind': lock.kind }, lockHeader(lock));
    for (const holder of sortedRows(lock.holders)) body.append(holderRow(lock, holder));
    for (const waiter of sortedRows(lock.waiters)) body.append(waiterRow(lock, waiter));
    const unlisted = holdersOf(lock) - lock.holders.length + waitersOf(lock) - lock.waiters.length;
    if (unlisted > 0) {
      body.append(el('tr', { class: 'more' },
        el('td', { colspan: COLUMNS, text: `… and ${unlisted} more (padlock show ${lock.name})` })));
    }
    table.append(body);
  }
  markSorted(table, state.sort);
  table.hidden = shown.length === 0;
  $('empty').hidden = !(state.loaded && state.locks.length === 0) || Boolean(state.needToken);
  $('auth').hidden = !state.needToken;
  $('auth-reason').textContent = state.needToken || '';

  const note = $('note');
  const filtered = state.locks.length - shown.length;
  const notes = [];
  if (state.locks.length > 0 && shown.length === 0) notes.push('No lock matches the filter.');
  else if (filtered > 0) notes.push(`${filtered} lock${filtered === 1 ? '' : 's'} hidden by the filter.`);
  if (state.truncated) notes.push(`Showing the first ${state.locks.length} locks only.`);
  note.textContent = notes.join(' ');
  note.hidden = notes.length === 0;

  const holders = state.locks.reduce((n, l) => n + holdersOf(l), 0);
  const waiters = state.locks.reduce((n, l) => n + waitersOf(l), 0);
  const totals = $('totals');
  totals.replaceChildren(
    stat(state.locks.length, state.locks.length === 1 ? 'lock' : 'locks'),
    stat(holders, holders === 1 ? 'holder' : 'holders'),
    stat(waiters, 'waiting'));
}

function stat(n, label) {
  return el('span', { class: 'stat' }, el('b', { text: String(n) }), ` ${label}`);
}

// ---- live events ---------------------------------------------------------

function setStatus(kind, text) {
  const node = $('status');
  node.dataset.state = kind;
  $('status-text').textContent = text;
}

function describe(event) {
  const who = event.owner ? ` ${event.owner}` : '';
  switch (event.type) {
    case 'granted': return `#${event.id}${who} fence ${event.fence}${event.slot !== undefined ? ` slot ${event.slot}` : ''}${event.waited_ms ? ` after ${duration(event.waited_ms)}` : ''}`;
    case 'queued': return `#${event.id}${who} at ${event.position}`;
    case 'released': return `#${event.id} after ${age(event.held_ms)}`;
    case 'lost': return `#${event.id} ${event.reason}`;
    case 'abandoned': return `#${event.id} after ${duration(event.waited_ms)}`;
    default: return `#${event.id}`;
  }
}

function pushEvent(event) {
  const list = $('events');
  const item = el('li', { class: `ev e-${event.type}`, 'data-seq': event.seq },
    el('span', { class: 'when', text: clock(event.at_unix_ms), title: event.at }),
    el('span', { class: 'what', text: event.type }),
    el('span', { class: 'ev-name', text: event.name, title: `${event.kind} lock ${event.name}` }),
    el('span', { class: 'detail', text: describe(event) }));
  list.prepend(item);
  while (list.children.length > FEED_LENGTH) list.lastChild.remove();
}

// The event stream is read with fetch rather than EventSource, so that it
// can carry the token when the server asks for one.
let tokenWaiters = [];

function authHeaders() {
  const token = $('token').value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function needToken(message) {
  state.needToken = message;
  state.locks = [];
  setStatus('auth', 'token needed');
  render();
  renderServer();
}

const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function connect() {
  for (;;) {
    try {
      // Each connection opens with the recent events: the feed is rebuilt
      // from them, so nothing shows twice after a reconnect.
      const response = await fetch(`/v1/events?replay=${FEED_LENGTH}`, { cache: 'no-store', headers: authHeaders() });
      if (response.status === 401 || response.status === 403) {
        const body = await response.json().catch(() => ({}));
        needToken(body.error ? body.error.message : response.statusText);
        await new Promise((resolve) => tokenWaiters.push(resolve));
        continue;
      }
      if (response.ok) {
        $('events').replaceChildren();
        await readEvents(response.body);
      }
    } catch (err) {
      // The server went away; try again.
    }
    setStatus('down', 'reconnecting…');
    await delay(1000);
  }
}

async function readEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      onEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
    }
  }
}

function onEvent(block) {
  let type = 'message';
  let data = '';
  for (const line of block.split('\n')) {
    if (line.startsWith('event:')) type = line.slice(6).trim();
    else if (line.startsWith('data:')) data += line.slice(5).trimStart();
  }
  if (type === 'ready') {
    setStatus('live', 'live');
    poll();
  } else if (EVENT_TYPES.includes(type)) {
    try {
      const event = JSON.parse(data);
      pushEvent(event);
      // A backend failing takes its holders' locks: the panel says so now.
      if (type === 'lost' && event.reason !== 'revoked') pollServer();
    } catch (err) {
      // A malformed event still means something changed.
    }
  } else if (type !== 'lagged') {
    return; // keep-alive comments and unknown events
  }
  scheduleRefresh();
}

// A new token: if the server refused the old one, try again with it.
let tokenTimer = null;
function onTokenInput() {
  sessionStorage.setItem('padlock.token', $('token').value);
  clearTimeout(tokenTimer);
  tokenTimer = setTimeout(() => {
    poll();
    if (!state.needToken && tokenWaiters.length === 0) return;
    for (const resolve of tokenWaiters.splice(0)) resolve();
    scheduleRefresh();
  }, 300);
}

// ---- revoke --------------------------------------------------------------

async function onRevoke(lock, holder) {
  const token = $('token').value.trim();
  if (!token) {
    const input = $('token');
    input.focus();
    input.classList.add('wanted');
    setTimeout(() => input.classList.remove('wanted'), 1500);
    toast('Type the admin token first (padlockd --admin-token-file).', 'error');
    return;
  }
  if (state.confirming !== holder.id) {
    state.confirming = holder.id;
    clearTimeout(state.confirmTimer);
    state.confirmTimer = setTimeout(() => {
      state.confirming = null;
      render();
    }, 5000);
    render();
    return;
  }
  state.confirming = null;
  clearTimeout(state.confirmTimer);
  // Holder ids are unique in a server: no name or kind needed.
  const url = `/v1/holders/${encodeURIComponent(holder.id)}`;
  try {
    const response = await fetch(url, { method: 'DELETE', headers: { Authorization: `Bearer ${token}` } });
    const body = await response.json().catch(() => ({}));
    if (response.ok) {
      toast(`Revoked holder #${holder.id} of ${lock.name}.`, 'ok');
    } else {
      const message = body.error ? body.error.message : response.statusText;
      toast(response.status === 401 ? `Not revoked: ${message}. Check the admin token.` : `Not revoked: ${message}`, 'error');
    }
  } catch (err) {
    toast(`Not revoked: ${err.message}`, 'error');
  }
  scheduleRefresh();
}

// ---- little things -------------------------------------------------------

function toast(text, kind) {
  const node = el('div', { class: `toast t-${kind}`, role: kind === 'error' ? 'alert' : 'status', text });
  $('toasts').append(node);
  setTimeout(() => node.remove(), kind === 'error' ? 6000 : 3500);
}

function start() {
  $('host').textContent = location.host;
  const token = $('token');
  token.value = sessionStorage.getItem('padlock.token') || '';
  token.addEventListener('input', onTokenInput);
  updateTokenField();
  $('filter').addEventListener('input', (e) => {
    state.filter = e.target.value.trim().toLowerCase();
    render();
  });
  $('kind').addEventListener('change', (e) => {
    state.kind = e.target.value;
    render();
  });
  for (const button of $('locks').querySelectorAll('button.sort')) {
    button.addEventListener('click', () => onSort(state.sort, button.dataset.sort, render));
  }
  for (const button of $('contended').querySelectorAll('button.sort')) {
    button.addEventListener('click', () => onSort(state.csort, button.dataset.sort, renderContended));
  }
  // Charts fit their width: redraw when it changes.
  window.addEventListener('resize', () => renderCharts());
  document.addEventListener('visibilitychange', poll);
  // Set once per page load: tests check that updates come without a reload.
  window.padlockLoadedAt = Date.now();
  setInterval(tickAges, 1000);
  setInterval(poll, POLL_MS);
  connect();
  refresh();
  poll();
}

start();
