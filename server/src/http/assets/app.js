// padlock dashboard: follows /v1/events and re-reads /v1/locks whenever
// something changes. No framework, no build step, nothing from the
// internet. Every value from the server is put in the page as text
// (textContent), never as HTML: lock names and owners are anyone's input.
'use strict';

const EVENT_TYPES = ['queued', 'granted', 'released', 'lost', 'abandoned'];
const PAGE = 1000;
const MAX_PAGES = 5;
const FEED_LENGTH = 60;

const state = {
  locks: [],
  truncated: false,
  // server clock minus this browser's clock, so ages are the server's
  skew: 0,
  filter: '',
  kind: '',
  // holder key (kind|name|id) awaiting a second click to revoke
  confirming: null,
  confirmTimer: null,
  loaded: false,
  // The server wants a token (--client-token-file) and has none it accepts.
  needToken: null,
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

// ---- time ----------------------------------------------------------------

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

function tickAges() {
  const now = serverNow();
  for (const node of document.querySelectorAll('[data-since]')) {
    node.textContent = age(now - Number(node.dataset.since));
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

// ---- drawing -------------------------------------------------------------

function holderKey(lock, id) {
  return `${lock.kind}|${lock.name}|${id}`;
}

function visible(lock) {
  if (state.kind && lock.kind !== state.kind) return false;
  return !state.filter || lock.name.toLowerCase().includes(state.filter);
}

// Lists show the first holders and waiters of each lock; the totals count all.
const holdersOf = (lock) => lock.holders_total ?? lock.holders.length;
const waitersOf = (lock) => lock.waiters_total ?? lock.waiters.length;

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
    el('th', { colspan: 8, scope: 'rowgroup' },
      el('span', { class: `kind k-${lock.kind}`, text: lock.kind }),
      el('span', { class: 'name', text: lock.name }),
      lock.mode && lock.kind !== 'semaphore' ? el('span', { class: `mode m-${lock.mode}`, text: lock.mode }) : null,
      summary(lock)));
}

function revokeButton(lock, holder) {
  const key = holderKey(lock, holder.id);
  const confirming = state.confirming === key;
  return el('button', {
    type: 'button',
    class: confirming ? 'revoke confirm' : 'revoke',
    'data-holder-id': holder.id,
    title: 'Revoke: the holder is told its lock is lost and the next waiter is granted',
    onclick: () => onRevoke(lock, holder),
  }, confirming ? 'Confirm revoke' : 'Revoke');
}

function holderRow(lock, holder) {
  // Semaphore slots are always exclusive: the slot is what tells them apart.
  const mode = holder.slot === null ? holder.mode : `slot ${holder.slot}`;
  return el('tr', { class: 'holder', 'data-lock': lock.name, 'data-kind': lock.kind, 'data-holder-id': holder.id },
    el('td', {}, el('span', { class: 'role r-holder', text: 'holder' })),
    el('td', { class: 'id', text: `#${holder.id}` }),
    el('td', { class: 'owner', text: holder.owner || '—', title: labelsText(holder.labels) }),
    el('td', { class: 'peer', text: holder.peer }),
    el('td', { class: 'num fence', text: String(holder.fence) }),
    el('td', { class: 'mode-cell', text: mode }),
    el('td', { class: 'num age', 'data-since': holder.since_unix_ms, title: `held since ${holder.since}` },
      age(serverNow() - holder.since_unix_ms)),
    el('td', { class: 'action' }, revokeButton(lock, holder)));
}

function waiterRow(lock, waiter) {
  return el('tr', { class: 'waiter', 'data-lock': lock.name, 'data-kind': lock.kind, 'data-waiter-id': waiter.id },
    el('td', {}, el('span', { class: 'role r-waiter', text: `waiting ${waiter.position}` })),
    el('td', { class: 'id', text: `#${waiter.id}` }),
    el('td', { class: 'owner', text: waiter.owner || '—', title: labelsText(waiter.labels) }),
    el('td', { class: 'peer', text: waiter.peer }),
    el('td', { class: 'num fence', text: '' }),
    el('td', { class: 'mode-cell', text: waiter.mode }),
    el('td', { class: 'num age', 'data-since': waiter.since_unix_ms, title: `waiting since ${waiter.since}` },
      age(serverNow() - waiter.since_unix_ms)),
    el('td', {}));
}

function labelsText(labels) {
  const entries = Object.entries(labels || {});
  return entries.length ? entries.map(([k, v]) => `${k}=${v}`).join('\n') : undefined;
}

function render() {
  const table = $('locks');
  for (const body of table.querySelectorAll('tbody')) body.remove();
  const shown = state.locks.filter(visible);
  for (const lock of shown) {
    const body = el('tbody', { 'data-lock': lock.name, 'data-kind': lock.kind }, lockHeader(lock));
    for (const holder of lock.holders) body.append(holderRow(lock, holder));
    for (const waiter of lock.waiters) body.append(waiterRow(lock, waiter));
    const unlisted = holdersOf(lock) - lock.holders.length + waitersOf(lock) - lock.waiters.length;
    if (unlisted > 0) {
      body.append(el('tr', { class: 'more' },
        el('td', { colspan: 8, text: `… and ${unlisted} more (padlock show ${lock.name})` })));
    }
    table.append(body);
  }
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
  switch (event.type) {
    case 'granted': return `#${event.id} fence ${event.fence}${event.slot !== undefined ? ` slot ${event.slot}` : ''}`;
    case 'queued': return `#${event.id} at ${event.position}`;
    case 'released': return `#${event.id} after ${age(event.held_ms)}`;
    case 'lost': return `#${event.id} ${event.reason}`;
    case 'abandoned': return `#${event.id} after ${age(event.waited_ms)}`;
    default: return `#${event.id}`;
  }
}

function pushEvent(event) {
  const list = $('events');
  const item = el('li', { class: `ev e-${event.type}` },
    el('span', { class: 'when', text: clock(event.at_unix_ms) }),
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
}

const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function connect() {
  for (;;) {
    try {
      const response = await fetch('/v1/events', { cache: 'no-store', headers: authHeaders() });
      if (response.status === 401 || response.status === 403) {
        const body = await response.json().catch(() => ({}));
        needToken(body.error ? body.error.message : response.statusText);
        await new Promise((resolve) => tokenWaiters.push(resolve));
        continue;
      }
      if (response.ok) await readEvents(response.body);
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
  } else if (EVENT_TYPES.includes(type)) {
    try {
      pushEvent(JSON.parse(data));
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
    if (!state.needToken && tokenWaiters.length === 0) return;
    for (const resolve of tokenWaiters.splice(0)) resolve();
    scheduleRefresh();
  }, 300);
}

// ---- revoke --------------------------------------------------------------

function lockPath(name) {
  return name.split('/').map(encodeURIComponent).join('/');
}

async function onRevoke(lock, holder) {
  const key = holderKey(lock, holder.id);
  const token = $('token').value.trim();
  if (!token) {
    const input = $('token');
    input.focus();
    input.classList.add('wanted');
    setTimeout(() => input.classList.remove('wanted'), 1500);
    toast('Type the admin token first (padlockd --admin-token-file).', 'error');
    return;
  }
  if (state.confirming !== key) {
    state.confirming = key;
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
  const url = `/v1/locks/${lockPath(lock.name)}/holders/${encodeURIComponent(holder.id)}?kind=${lock.kind}`;
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
  $('filter').addEventListener('input', (e) => {
    state.filter = e.target.value.trim().toLowerCase();
    render();
  });
  $('kind').addEventListener('change', (e) => {
    state.kind = e.target.value;
    render();
  });
  // Set once per page load: tests check that updates come without a reload.
  window.padlockLoadedAt = Date.now();
  setInterval(tickAges, 1000);
  connect();
  refresh();
}

start();
