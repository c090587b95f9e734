// The rayctl dashboard: one page, hash routes, polling. Served with a strict CSP
// (script-src 'self', style-src 'self'), so: no inline handlers, no style attributes in
// markup (sizes of bars are SVG attributes), no eval. Every string from the API goes
// through esc() before it reaches innerHTML.
'use strict';

(function () {
  const POLL_MS = 2000;
  const SPARK_SAMPLES = 61; // 60 rates
  const MAX_LOG_CHARS = 2000000;
  const TERMINAL_JOB = new Set(['SUCCEEDED', 'FAILED', 'STOPPED']);

  // ---------------------------------------------------------------- helpers

  const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
  function esc(v) {
    if (v === null || v === undefined) return '';
    return String(v).replace(/[&<>"']/g, (c) => ESC[c]);
  }

  function $(id) {
    return document.getElementById(id);
  }

  // Sets innerHTML only when it changed: no flicker, and a user's selection survives.
  function setHTML(el, html) {
    if (!el) return;
    if (el.__html !== html) {
      el.innerHTML = html;
      el.__html = html;
    }
  }

  function setText(el, text) {
    if (el && el.textContent !== text) el.textContent = text;
  }

  function num(v) {
    const n = Number(v);
    return Number.isFinite(n) ? n : 0;
  }

  function fmtNum(v) {
    const n = num(v);
    if (Number.isInteger(n)) return n.toLocaleString('en-US');
    if (Math.abs(n) >= 100) return Math.round(n).toLocaleString('en-US');
    return String(Math.round(n * 100) / 100);
  }

  function fmtBytes(v) {
    let n = num(v);
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    const digits = i === 0 || n >= 100 ? 0 : 1;
    return n.toFixed(digits) + ' ' + units[i];
  }

  function fmtDur(ms) {
    let s = Math.max(0, num(ms)) / 1000;
    if (s < 1) return Math.round(s * 1000) + ' ms';
    if (s < 60) return (s < 10 ? s.toFixed(1) : Math.round(s)) + ' s';
    s = Math.round(s);
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    const sec = s % 60;
    if (d > 0) return d + 'd ' + h + 'h';
    if (h > 0) return h + 'h ' + m + 'm';
    return m + 'm ' + sec + 's';
  }

  function fmtTime(ms) {
    if (!ms) return '';
    const d = new Date(num(ms));
    if (Number.isNaN(d.getTime())) return '';
    const pad = (x) => String(x).padStart(2, '0');
    return (
      d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' +
      pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds())
    );
  }

  function ago(ms) {
    if (!ms) return '';
    const diff = Date.now() - num(ms);
    if (diff < 0) return 'just now';
    if (diff < 5000) return 'just now';
    return fmtDur(diff) + ' ago';
  }

  // A time cell: relative, with the absolute time on hover.
  function timeHTML(ms) {
    if (!ms) return '<span class="muted">—</span>';
    return '<time title="' + esc(fmtTime(ms)) + '">' + esc(ago(ms)) + '</time>';
  }

  function dash() {
    return '<span class="muted">—</span>';
  }

  function shortId(id, n) {
    const s = String(id || '');
    const len = n || 8;
    return s.length > len ? s.slice(0, len) : s;
  }

  // Actor, task and placement-group ids share their job's prefix and differ at the end:
  // keep both ends.
  function midId(id, n) {
    const s = String(id || '');
    const len = n || 13;
    if (s.length <= len + 1) return s;
    const head = Math.ceil((len - 1) / 2);
    return s.slice(0, head) + '…' + s.slice(s.length - (len - 1 - head));
  }

  // An id in monospace, short (node ids by their start, the way rayctl takes prefixes),
  // the whole id on hover.
  function idHTML(id, n) {
    if (id === null || id === undefined || id === '') return dash();
    return '<span class="mono id" title="' + esc(id) + '">' + esc(shortId(id, n)) + '</span>';
  }

  function midIdHTML(id, n) {
    if (id === null || id === undefined || id === '') return dash();
    return '<span class="mono id" title="' + esc(id) + '">' + esc(midId(id, n)) + '</span>';
  }

  function badgeClass(state) {
    const s = String(state || '').toUpperCase();
    if (['ALIVE', 'RUNNING', 'SUCCEEDED', 'FINISHED', 'CREATED', 'LEADER', 'RAY_RUNNING', 'ENABLED'].includes(s)) return 'ok';
    if (s.startsWith('PENDING') || ['RESTARTING', 'RESCHEDULING', 'SUBMITTED_TO_WORKER', 'QUEUED', 'REQUESTED', 'ALLOCATED', 'CANDIDATE', 'DRAINING', 'DEPENDENCIES_UNREADY'].includes(s)) return 'warn';
    if (['DEAD', 'FAILED', 'ALLOCATION_FAILED', 'ALLOCATION_TIMEOUT', 'TERMINATION_FAILED', 'UNREACHABLE'].includes(s)) return 'bad';
    if (['STOPPED', 'REMOVED', 'TERMINATED', 'NIL', 'SHUTDOWN', 'DISABLED'].includes(s)) return 'off';
    return 'info';
  }

  function badge(state, extraClass) {
    if (state === null || state === undefined || state === '') return dash();
    return '<span class="badge ' + badgeClass(state) + (extraClass ? ' ' + extraClass : '') + '">' + esc(state) + '</span>';
  }

  // A horizontal bar as SVG (no style attributes under the CSP).
  function barSVG(used, total, cls) {
    const t = num(total);
    const u = num(used);
    const pct = t > 0 ? Math.max(0, Math.min(100, (u / t) * 100)) : 0;
    const level = pct >= 90 ? 'hot' : pct >= 70 ? 'warm' : 'cool';
    return (
      '<svg class="bar ' + (cls || '') + '" viewBox="0 0 100 8" preserveAspectRatio="none" aria-hidden="true">' +
      '<rect class="bar-track" x="0" y="0" width="100" height="8" rx="4" ry="4"></rect>' +
      (pct > 0
        ? '<rect class="bar-fill ' + level + '" x="0" y="0" width="' + pct.toFixed(2) + '" height="8" rx="4" ry="4"></rect>'
        : '') +
      '</svg>'
    );
  }

  function isMemoryResource(name) {
    return name === 'memory' || name === 'object_store_memory';
  }

  function fmtRes(name, v) {
    return isMemoryResource(name) ? fmtBytes(v) : fmtNum(v);
  }

  // Resources a placement group's bundles add (CPU_group_0_<pg>, bundle_group_<pg>): shown
  // with the groups, not as the node's own capacity.
  function isGroupResource(name) {
    return /_group_(\d+_)?[0-9a-f]{16,}$/i.test(name);
  }

  function resourceOrder(a, b) {
    const rank = (n) => (n === 'CPU' ? 0 : n === 'GPU' ? 1 : n === 'memory' ? 2 : n === 'object_store_memory' ? 3 : 4);
    return rank(a) - rank(b) || a.localeCompare(b);
  }

  function shapeHTML(shape) {
    const keys = Object.keys(shape || {}).sort(resourceOrder);
    if (!keys.length) return '<span class="muted">{}</span>';
    return keys
      .map((k) => '<span class="chip"><span class="chip-k">' + esc(k) + '</span> ' + esc(fmtRes(k, shape[k])) + '</span>')
      .join(' ');
  }

  function firstLine(s) {
    const t = String(s || '');
    const i = t.indexOf('\n');
    return i >= 0 ? t.slice(0, i) : t;
  }

  function hostOf(addr) {
    const s = String(addr || '');
    const i = s.lastIndexOf(':');
    return i > 0 ? s.slice(0, i) : s;
  }

  function pretty(v) {
    try {
      return JSON.stringify(v, null, 2);
    } catch (_) {
      return String(v);
    }
  }

  function isEmptyValue(v) {
    if (v === null || v === undefined || v === '') return true;
    if (typeof v === 'object' && Object.keys(v).length === 0) return true;
    return false;
  }

  function stateOrder(a, b) {
    const order = [
      'PENDING_ARGS_AVAIL', 'PENDING_NODE_ASSIGNMENT', 'SUBMITTED_TO_WORKER', 'PENDING_CREATION',
      'DEPENDENCIES_UNREADY', 'PENDING', 'RUNNING', 'ALIVE', 'CREATED', 'RESTARTING', 'RESCHEDULING',
      'FINISHED', 'SUCCEEDED', 'FAILED', 'DEAD', 'STOPPED', 'REMOVED',
    ];
    const ia = order.indexOf(a);
    const ib = order.indexOf(b);
    return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || String(a).localeCompare(String(b));
  }

  function countBy(rows, key) {
    const out = {};
    for (const r of rows) {
      const k = r[key] === null || r[key] === undefined ? 'UNKNOWN' : String(r[key]);
      out[k] = (out[k] || 0) + 1;
    }
    return out;
  }

  function qs(params) {
    const parts = [];
    for (const [k, v] of params) parts.push(encodeURIComponent(k) + '=' + encodeURIComponent(v));
    return parts.join('&');
  }

  // ---------------------------------------------------------------- API

  class AuthRequired extends Error {
    constructor(status, msg) {
      super(msg || 'authentication required');
      this.status = status;
    }
  }

  class ApiError extends Error {
    constructor(status, msg) {
      super(msg);
      this.status = status;
    }
  }

  // Thrown when the answer arrives after the user moved on; dropped silently.
  class Stale extends Error {}

  function errorText(status, text) {
    let msg = String(text || '').trim();
    try {
      const j = JSON.parse(msg);
      if (j && typeof j === 'object') msg = j.error || j.msg || msg;
    } catch (_) {
      /* plain text */
    }
    if (msg.length > 500) msg = msg.slice(0, 500) + '…';
    return 'HTTP ' + status + ': ' + (msg || '(no message)');
  }

  async function request(url) {
    let r;
    try {
      r = await fetch(url, { credentials: 'same-origin', cache: 'no-store' });
    } catch (e) {
      throw new ApiError(0, 'cannot reach the dashboard server (' + ((e && e.message) || e) + ')');
    }
    if (r.status === 401 || r.status === 403) {
      let t = '';
      try {
        t = await r.text();
      } catch (_) {
        /* ignore */
      }
      throw new AuthRequired(r.status, t.trim());
    }
    let text;
    try {
      text = await r.text();
    } catch (e) {
      throw new ApiError(r.status, 'reading the answer failed (' + ((e && e.message) || e) + ')');
    }
    if (!r.ok) throw new ApiError(r.status, errorText(r.status, text));
    return text;
  }

  async function getJson(url) {
    const t = await request(url);
    try {
      return JSON.parse(t);
    } catch (_) {
      throw new ApiError(200, 'the answer from ' + url + ' is not JSON');
    }
  }

  // Ray's envelope: {"result": true, "msg": "", "data": {"result": …}}.
  async function getState(url) {
    const j = await getJson(url);
    if (!j || j.result === false || !j.data) {
      throw new ApiError(200, (j && j.msg) || 'no result from ' + url);
    }
    return j.data.result;
  }

  // Waits for every promise; an auth failure anywhere wins (the login page shows).
  async function settle(promises) {
    const rs = await Promise.allSettled(promises);
    for (const r of rs) {
      if (r.status === 'rejected' && r.reason instanceof AuthRequired) throw r.reason;
    }
    return rs.map((r) => (r.status === 'fulfilled' ? { ok: true, value: r.value } : { ok: false, error: r.reason }));
  }

  function errMsg(e) {
    return (e && e.message) || String(e);
  }

  const STATUS_URL = '/api/rayctl/status';
  const NODE_STATS_URL = '/api/rayctl/node_stats';

  // ---------------------------------------------------------------- state

  const S = {
    gen: 0,
    timer: null,
    route: { view: 'overview' },
    authNeeded: false,
    dash: null,
    dashLoading: false,
    status: null,
    samples: [], // {t, done}: finished + failed tasks at time t
    jobs: [],
    jobFilter: '',
    jobStatus: '',
    jobSeen: {}, // job id -> [{status, t}] seen by this page
    actors: [],
    actorState: '',
    actorText: '',
    tasks: [],
    taskState: '',
    taskFunc: '',
    closedTasks: new Set(), // failed tasks whose error the user folded
    pgs: [],
    logs: { node: '', file: '', follow: true, lines: '1000', shownFor: '' },
  };

  function forgetClusterData() {
    S.status = null;
    S.jobs = [];
    S.actors = [];
    S.tasks = [];
    S.pgs = [];
    S.samples = [];
    S.jobSeen = {};
  }

  const viewEl = $('view');

  function fresh(gen) {
    if (gen !== S.gen) throw new Stale();
  }

  // ---------------------------------------------------------------- header

  function setLive(ok, text) {
    const el = $('live');
    if (!el) return;
    el.classList.toggle('ok', ok === true);
    el.classList.toggle('bad', ok === false);
    el.classList.toggle('idle', ok === null);
    const now = new Date();
    if (ok === true) {
      setText($('live-text'), 'live');
      el.title = 'last update ' + now.toLocaleTimeString();
    } else if (ok === false) {
      const t = String(text || 'error');
      setText($('live-text'), t.length > 70 ? t.slice(0, 70) + '…' : t);
      el.title = t + ' (' + now.toLocaleTimeString() + ')';
    } else {
      setText($('live-text'), text || 'signed out');
      el.title = text || '';
    }
  }

  function updateHeader() {
    const st = S.status;
    const info = $('cluster-info');
    if (!info) return;
    if (!st) {
      setHTML(info, '');
      return;
    }
    const leader = st.leader ? esc(st.leader) : '<span class="warn-text">no leader</span>';
    setHTML(
      info,
      '<span class="hdr-k">leader</span> <span class="mono">' + leader + '</span>' +
        '<span class="sep">·</span><span class="hdr-k">term</span> <span class="mono">' + esc(st.term) + '</span>'
    );
  }

  async function loadDash() {
    if (S.dash || S.dashLoading) return;
    S.dashLoading = true;
    try {
      S.dash = await getJson('/api/rayctl/dashboard');
      setText($('version'), S.dash && S.dash.version ? 'v' + S.dash.version : '');
    } catch (_) {
      /* the version is decoration; the poll reports real errors */
    } finally {
      S.dashLoading = false;
    }
  }

  async function fetchStatus() {
    const st = await getState(STATUS_URL);
    S.status = st;
    updateHeader();
    return st;
  }

  // ---------------------------------------------------------------- login

  function showLogin(err) {
    S.authNeeded = true;
    stopPolling();
    forgetClusterData();
    viewEl.innerHTML = '';
    viewEl.__html = undefined;
    delete viewEl.dataset.loaded;
    viewEl.hidden = true;
    updateHeader();
    setText($('version'), '');
    setLive(null, 'signed out');
    document.body.classList.add('logged-out');
    document.body.classList.remove('booting');

    let box = $('login');
    if (!box) {
      box = document.createElement('section');
      box.id = 'login';
      box.className = 'login';
      box.innerHTML =
        '<div class="login-card">' +
        '<svg class="login-mark" viewBox="0 0 32 32" width="44" height="44" aria-hidden="true">' +
        '<circle cx="16" cy="16" r="14" fill="#3b5bdb"></circle>' +
        '<g stroke="#ffffff" stroke-width="2.2" stroke-linecap="round">' +
        '<line x1="16" y1="16" x2="16" y2="6"></line><line x1="16" y1="16" x2="24.7" y2="21"></line>' +
        '<line x1="16" y1="16" x2="7.3" y2="21"></line></g>' +
        '<circle cx="16" cy="16" r="3.6" fill="#ffffff"></circle></svg>' +
        '<h1>Sign in to the cluster</h1>' +
        '<p class="login-lead">This cluster asks for its token before it shows anything.</p>' +
        '<form id="login-form" class="login-form" autocomplete="off" novalidate>' +
        '<input type="text" name="username" value="rayctl" autocomplete="username" hidden>' +
        '<label for="login-token">Cluster token</label>' +
        '<input id="login-token" name="token" type="password" autocomplete="current-password" spellcheck="false" placeholder="paste the token">' +
        '<button id="login-submit" type="submit">Sign in</button>' +
        '<p id="login-error" class="login-error" role="alert" hidden></p>' +
        '</form>' +
        '<p class="login-hint" id="login-hint">Where to find it: the token is in <code>~/.rayctl/auth_token</code> on a head\'s machine.</p>' +
        '</div>';
      document.body.appendChild(box);
      $('login-form').addEventListener('submit', submitLogin);
    }
    const msg = $('login-error');
    if (err && err.status === 403 && /wrong cluster token/i.test(err.message || '')) {
      msg.textContent = 'The saved token is no longer accepted: sign in again.';
      msg.hidden = false;
    } else if (err && err.status === 403 && err.message) {
      msg.textContent = err.message;
      msg.hidden = false;
    }
    const input = $('login-token');
    if (input && document.activeElement !== input) input.focus();
  }

  function hideLogin() {
    const box = $('login');
    if (box) box.remove();
    S.authNeeded = false;
    viewEl.hidden = false;
    document.body.classList.remove('logged-out');
  }

  async function submitLogin(ev) {
    ev.preventDefault();
    const input = $('login-token');
    const button = $('login-submit');
    const msg = $('login-error');
    const token = (input.value || '').trim();
    const say = (text, cls) => {
      msg.textContent = text;
      msg.className = 'login-error' + (cls ? ' ' + cls : '');
      msg.hidden = !text;
    };
    if (!token) {
      say('enter the token first');
      input.focus();
      return;
    }
    button.disabled = true;
    say('checking…', 'pending');
    let r;
    try {
      r = await fetch('/api/authenticate', {
        method: 'POST',
        headers: { Authorization: 'Bearer ' + token },
        credentials: 'same-origin',
        cache: 'no-store',
      });
    } catch (e) {
      button.disabled = false;
      say('cannot reach the server (' + errMsg(e) + ')');
      return;
    }
    let answer = null;
    if (r.ok) {
      try {
        answer = await r.json();
      } catch (_) {
        answer = null;
      }
    }
    if (r.ok && !(answer && answer.authenticated === false)) {
      input.value = '';
      hideLogin();
      navigate();
      return;
    }
    button.disabled = false;
    if (r.ok || r.status === 401 || r.status === 403) {
      say('wrong token');
      input.select();
      return;
    }
    let t = '';
    try {
      t = await r.text();
    } catch (_) {
      /* ignore */
    }
    say(errorText(r.status, t));
  }

  // ---------------------------------------------------------------- routing and polling

  function safeDecode(s) {
    try {
      return decodeURIComponent(s);
    } catch (_) {
      return s;
    }
  }

  function parseRoute() {
    let h = location.hash || '';
    h = h.replace(/^#\/?/, '');
    const q = h.indexOf('?');
    if (q >= 0) h = h.slice(0, q);
    const parts = h.split('/').filter(Boolean);
    const head = parts[0] || '';
    if (!head) return { view: 'overview' };
    if (head === 'jobs' && parts.length > 1) return { view: 'job', id: safeDecode(parts.slice(1).join('/')) };
    if (head !== 'job' && Object.prototype.hasOwnProperty.call(VIEWS, head)) return { view: head };
    return { view: 'overview', unknown: head };
  }

  function stopPolling() {
    if (S.timer) clearTimeout(S.timer);
    S.timer = null;
  }

  function navigate() {
    stopPolling();
    const gen = ++S.gen;
    const route = parseRoute();
    S.route = route;
    const v = VIEWS[route.view];
    viewEl.dataset.view = route.view;
    delete viewEl.dataset.loaded;
    const navKey = route.view === 'job' ? 'jobs' : route.view;
    for (const a of document.querySelectorAll('#nav a')) {
      const on = a.dataset.nav === navKey;
      a.classList.toggle('active', on);
      if (on) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    document.title = (route.view === 'job' ? 'Job ' + route.id : v.title) + ' · rayctl';
    viewEl.__html = undefined;
    viewEl.innerHTML =
      '<div id="view-error" class="alert error" role="alert" hidden></div>' +
      (route.unknown ? '<div class="alert">No page "' + esc(route.unknown) + '": here is the overview.</div>' : '') +
      '<div id="view-body" class="view-body"></div>';
    v.mount($('view-body'), route);
    poll(gen);
  }

  // Polls again now (a filter that the server applies changed), dropping answers in flight.
  function refreshNow() {
    stopPolling();
    const gen = ++S.gen;
    poll(gen);
  }

  function showViewError(text) {
    const el = $('view-error');
    if (!el) return;
    if (text) {
      setText(el, text);
      el.hidden = false;
    } else if (!el.hidden) {
      el.hidden = true;
      setText(el, '');
    }
  }

  const STOP = { stop: true };

  async function poll(gen) {
    const v = VIEWS[S.route.view];
    let again = true;
    try {
      const r = await v.load(gen, S.route);
      if (gen !== S.gen) return;
      if (S.authNeeded) hideLogin();
      document.body.classList.remove('booting');
      setLive(true);
      showViewError('');
      viewEl.dataset.loaded = 'true';
      if (r === STOP) again = false;
      if (!S.dash) loadDash();
    } catch (e) {
      if (e instanceof Stale || gen !== S.gen) return;
      if (e instanceof AuthRequired) {
        showLogin(e);
        return;
      }
      document.body.classList.remove('booting');
      setLive(false, errMsg(e));
      showViewError(errMsg(e));
    }
    if (again && gen === S.gen) S.timer = setTimeout(() => poll(gen), POLL_MS);
  }

  function pageHead(title, subId, extra) {
    return (
      '<div class="page-head"><div><h1>' + esc(title) + '</h1>' +
      (subId ? '<p class="sub" id="' + subId + '"></p>' : '') + '</div>' + (extra || '') + '</div>'
    );
  }

  function warnBox(id) {
    return '<div id="' + id + '" class="alert warn" hidden></div>';
  }

  function setWarn(id, text) {
    const el = $(id);
    if (!el) return;
    setText(el, text || '');
    el.hidden = !text;
  }

  function emptyRow(cols, text) {
    return '<tr class="empty"><td colspan="' + cols + '">' + esc(text) + '</td></tr>';
  }

  // ---------------------------------------------------------------- overview

  function raftSVG(st) {
    const heads = (st.heads || []).slice();
    if (!heads.length) return '<p class="muted">No heads reported.</p>';
    const gap = 190;
    const w = Math.max(heads.length, 1) * gap;
    const h = 176;
    const cy = 58;
    const r = 26;
    const xs = heads.map((_, i) => gap / 2 + i * gap);
    const leaderIdx = heads.findIndex((hd) => String(hd.role).toLowerCase() === 'leader' || hd.address === st.leader);
    let out =
      '<svg class="raft" id="raft-diagram" viewBox="0 0 ' + w + ' ' + h + '" width="' + w + '" height="' + h +
      '" role="img" aria-label="Raft group of ' + heads.length + ' heads">';
    // Replication edges from the leader.
    if (leaderIdx >= 0) {
      heads.forEach((hd, i) => {
        if (i === leaderIdx) return;
        const x1 = xs[leaderIdx];
        const x2 = xs[i];
        const dir = x2 > x1 ? 1 : -1;
        const bend = Math.abs(i - leaderIdx) > 1 ? 30 : 0;
        const mx = (x1 + x2) / 2;
        const role = String(hd.role).toLowerCase();
        out +=
          '<path class="raft-edge' + (role === 'unreachable' ? ' broken' : '') + '" d="M ' + (x1 + dir * r) + ' ' + cy +
          ' Q ' + mx + ' ' + (cy - bend) + ' ' + (x2 - dir * r) + ' ' + cy + '" fill="none"></path>';
      });
    }
    heads.forEach((hd, i) => {
      const x = xs[i];
      const role = String(hd.role || 'unknown').toLowerCase();
      const isLeader = i === leaderIdx;
      out += '<g class="raft-node role-' + esc(role.replace(/[^a-z]/g, '')) + (isLeader ? ' leader' : '') + '">';
      out += '<title>' + esc(hd.address) + ' · raft id ' + esc(hd.raft_id) + ' · ' + esc(role) + '</title>';
      out += '<circle cx="' + x + '" cy="' + cy + '" r="' + r + '"></circle>';
      if (isLeader) {
        const top = cy - r - 6;
        out +=
          '<path class="crown" d="M ' + (x - 13) + ' ' + top + ' L ' + (x - 13) + ' ' + (top - 12) + ' L ' + (x - 6.5) + ' ' + (top - 5) +
          ' L ' + x + ' ' + (top - 15) + ' L ' + (x + 6.5) + ' ' + (top - 5) + ' L ' + (x + 13) + ' ' + (top - 12) + ' L ' + (x + 13) + ' ' + top + ' Z"></path>';
      }
      out += '<text class="raft-num" x="' + x + '" y="' + (cy + 5) + '" text-anchor="middle">' + (i + 1) + '</text>';
      out += '<text class="raft-role" x="' + x + '" y="' + (cy + r + 22) + '" text-anchor="middle">' + esc(role.charAt(0).toUpperCase() + role.slice(1)) + '</text>';
      out += '<text class="raft-addr" x="' + x + '" y="' + (cy + r + 40) + '" text-anchor="middle">' + esc(hd.address) + '</text>';
      out +=
        '<text class="raft-meta" x="' + x + '" y="' + (cy + r + 57) + '" text-anchor="middle">term ' + esc(hd.term) +
        ' · log ' + esc(hd.last_log_index) + ' · applied ' + esc(hd.last_applied) + '</text>';
      out += '</g>';
    });
    out += '</svg>';
    return out;
  }

  function headsCard(st) {
    const heads = st.heads || [];
    const lagging = heads.filter((h) => num(h.last_applied) < num(st.commit_index)).length;
    return (
      '<div class="raft-wrap">' + raftSVG(st) + '</div>' +
      '<dl class="kv inline">' +
      '<div><dt>Leader</dt><dd class="mono">' + (st.leader ? esc(st.leader) : '<span class="bad-text">none</span>') + '</dd></div>' +
      '<div><dt>Term</dt><dd class="mono">' + esc(st.term) + '</dd></div>' +
      '<div><dt>Commit index</dt><dd class="mono">' + esc(st.commit_index) + '</dd></div>' +
      '<div><dt>Heads</dt><dd>' + heads.length + (lagging ? ' <span class="muted">(' + lagging + ' catching up)</span>' : '') + '</dd></div>' +
      '</dl>'
    );
  }

  function nodesCard(st, ns) {
    const nodes = st.nodes || [];
    const alive = nodes.filter((n) => n.state === 'ALIVE');
    const dead = nodes.filter((n) => n.state !== 'ALIVE');
    const draining = alive.filter((n) => n.draining).length;
    const idle = alive.filter((n) => n.idle_ms !== null && n.idle_ms !== undefined).length;
    let workers = 0;
    let drivers = 0;
    let running = 0;
    let unreachable = [];
    if (ns && ns.ok) {
      for (const s of Object.values(ns.value.nodes || {})) {
        workers += num(s.workers);
        drivers += num(s.drivers);
        running += num(s.tasks_running);
      }
      unreachable = ns.value.unreachable || [];
    }
    let html =
      '<div class="stats">' +
      '<a class="stat ok" href="#/nodes"><span class="stat-n">' + alive.length + '</span><span class="stat-l">alive</span></a>' +
      '<a class="stat ' + (dead.length ? 'bad' : 'off') + '" href="#/nodes"><span class="stat-n">' + dead.length + '</span><span class="stat-l">dead</span></a>' +
      '</div>' +
      '<ul class="facts">' +
      '<li><span>head nodes</span><b>' + alive.filter((n) => n.is_head).length + '</b></li>' +
      '<li><span>idle / draining</span><b>' + idle + ' / ' + draining + '</b></li>';
    if (ns && ns.ok) {
      html +=
        '<li><span>workers · drivers</span><b>' + workers + ' · ' + drivers + '</b></li>' +
        '<li><span>tasks running</span><b>' + running + '</b></li>';
    }
    html += '</ul>';
    if (unreachable.length) html += '<p class="warn-text small">Not answering: ' + esc(unreachable.join('; ')) + '</p>';
    if (ns && !ns.ok) html += '<p class="warn-text small">Node stats: ' + esc(errMsg(ns.error)) + '</p>';
    return html;
  }

  function resourcesCard(st, ns) {
    const alive = (st.nodes || []).filter((n) => n.state === 'ALIVE');
    const total = {};
    const avail = {};
    for (const n of alive) {
      for (const [k, v] of Object.entries(n.resources_total || {})) {
        if (isGroupResource(k)) continue;
        total[k] = (total[k] || 0) + num(v);
      }
      for (const [k, v] of Object.entries(n.resources_available || {})) {
        if (isGroupResource(k)) continue;
        avail[k] = (avail[k] || 0) + num(v);
      }
    }
    const rows = [];
    const names = Object.keys(total).sort(resourceOrder);
    for (const k of names) {
      const used = Math.max(0, total[k] - (avail[k] || 0));
      rows.push({ name: k, used, total: total[k], fmt: (v) => fmtRes(k, v) });
    }
    if (ns && ns.ok) {
      let used = 0;
      let cap = 0;
      let spilled = 0;
      for (const s of Object.values(ns.value.nodes || {})) {
        const o = s.object_store || {};
        used += num(o.used_bytes);
        cap += num(o.capacity_bytes);
        spilled += num(o.spilled_bytes);
      }
      rows.splice(names.filter((n) => ['CPU', 'GPU', 'memory', 'object_store_memory'].includes(n)).length, 0, {
        name: 'object store',
        used,
        total: cap,
        fmt: fmtBytes,
        note: spilled ? fmtBytes(spilled) + ' spilled' : '',
      });
    }
    if (!rows.length) return '<p class="muted">No live nodes.</p>';
    return (
      '<div class="res-list">' +
      rows
        .map((r) => {
          const pct = r.total > 0 ? Math.round((r.used / r.total) * 100) : 0;
          return (
            '<div class="res-row">' +
            '<span class="res-name" title="' + esc(r.name) + '">' + esc(r.name) + '</span>' +
            barSVG(r.used, r.total) +
            '<span class="res-val"><b>' + esc(r.fmt(r.used)) + '</b> / ' + esc(r.fmt(r.total)) +
            ' <span class="muted">(' + pct + '%)</span>' + (r.note ? ' <span class="warn-text">' + esc(r.note) + '</span>' : '') +
            '</span></div>'
          );
        })
        .join('') +
      '</div><p class="muted small">Used = total − available over the live nodes; placement-group bundle resources are left out.</p>'
    );
  }

  function jobsCard(jobs) {
    if (!jobs.ok) return '<p class="warn-text">' + esc(errMsg(jobs.error)) + '</p>';
    const list = jobs.value || [];
    const c = countBy(list, 'status');
    const states = ['PENDING', 'RUNNING', 'SUCCEEDED', 'FAILED', 'STOPPED'];
    for (const k of Object.keys(c)) if (!states.includes(k)) states.push(k);
    let html = '<div class="state-counts">';
    for (const s of states) {
      html +=
        '<a class="state-count' + (c[s] ? '' : ' zero') + '" href="#/jobs">' + badge(s) +
        '<span class="count">' + (c[s] || 0) + '</span></a>';
    }
    html += '</div>';
    const latest = list
      .slice()
      .sort((a, b) => num(b.start_time) - num(a.start_time))
      .slice(0, 3);
    if (latest.length) {
      html += '<ul class="mini-list">';
      for (const j of latest) {
        const id = j.submission_id || j.job_id;
        html +=
          '<li><a class="mono" href="#/jobs/' + esc(encodeURIComponent(id)) + '" title="' + esc(id) + '">' + esc(shortId(id, 22)) +
          '</a> ' + badge(j.status) + ' <span class="muted small">' + esc(ago(j.start_time)) + '</span></li>';
      }
      html += '</ul>';
    } else {
      html += '<p class="muted">No jobs submitted yet.</p>';
    }
    return html;
  }

  const PENDING_INSTANCE = new Set(['QUEUED', 'REQUESTED', 'ALLOCATED']);
  const FAILED_INSTANCE = new Set(['ALLOCATION_FAILED', 'ALLOCATION_TIMEOUT', 'TERMINATION_FAILED']);

  function autoscalerCard(a) {
    if (a === null || a === undefined) {
      return '<p class="big-note off">not configured</p><p class="muted small">Heads run an autoscaler when started with an autoscaling config.</p>';
    }
    const inst = a.instances || [];
    const pending = inst.filter((i) => PENDING_INSTANCE.has(i.state));
    const failed = inst
      .filter((i) => FAILED_INSTANCE.has(i.state))
      .sort((x, y) => num(y.updated_ms) - num(x.updated_ms));
    let html = '<div class="row-gap">' + badge(a.enabled ? 'ENABLED' : 'DISABLED') +
      (a.last_round_ms ? ' <span class="muted small">last round ' + esc(ago(a.last_round_ms)) + '</span>' : '') + '</div>';
    html +=
      '<ul class="facts">' +
      '<li><span>instances</span><b>' + inst.length + '</b></li>' +
      '<li><span>pending</span><b>' + pending.length + '</b></li>' +
      '<li><span>recent failures</span><b class="' + (failed.length ? 'bad-text' : '') + '">' + failed.length + '</b></li>' +
      '<li><span>infeasible · held back</span><b>' + (a.infeasible || []).length + ' · ' + (a.held_back || []).length + '</b></li>' +
      '</ul>';
    const byState = countBy(inst, 'state');
    const keys = Object.keys(byState).sort(stateOrder);
    if (keys.length) {
      html += '<div class="chips">' + keys.map((k) => badge(k) + '<span class="count small">' + byState[k] + '</span>').join(' ') + '</div>';
    }
    for (const f of failed.slice(0, 3)) {
      html +=
        '<p class="small"><span class="bad-text">' + esc(f.state) + '</span> ' + esc(f.node_type) + ' ' + idHTML(f.instance_id, 10) +
        ': ' + esc(f.message) + ' <span class="muted">' + esc(ago(f.updated_ms)) + '</span></p>';
    }
    if ((a.infeasible || []).length) {
      html += '<p class="small muted">Infeasible:</p><div class="chips">' +
        a.infeasible.map((d) => shapeHTML(d.shape) + ' <span class="muted small">×' + esc(d.count) + '</span>').join('<br>') + '</div>';
    }
    if ((a.held_back || []).length) {
      html += '<p class="small muted">Held back by limits:</p><div class="chips">' +
        a.held_back.map((d) => shapeHTML(d.shape) + ' <span class="muted small">×' + esc(d.count) + '</span>').join('<br>') + '</div>';
    }
    if (a.last_error) html += '<div class="alert error small">Last error: ' + esc(a.last_error) + '</div>';
    return html;
  }

  function demandCard(st) {
    const d = st.pending_demand || [];
    if (!d.length) return '<p class="muted">Nothing is waiting for resources.</p>';
    let html =
      '<div class="table-wrap short"><table class="table compact" id="demand-table"><thead><tr>' +
      '<th>Shape</th><th>Kind</th><th class="num">Queued</th><th class="num">Infeasible</th></tr></thead><tbody>';
    for (const x of d) {
      html +=
        '<tr><td>' + shapeHTML(x.shape) + '</td><td>' + esc(x.kind) + '</td><td class="num">' + esc(x.queued) +
        '</td><td class="num' + (num(x.infeasible) ? ' bad-text' : '') + '">' + esc(x.infeasible) + '</td></tr>';
    }
    return html + '</tbody></table></div>';
  }

  function sparkCard() {
    const s = S.samples;
    const rates = [];
    for (let i = 1; i < s.length; i++) {
      const dt = (s[i].t - s[i - 1].t) / 1000;
      const dn = s[i].done - s[i - 1].done;
      rates.push(dt > 0 ? Math.max(0, dn / dt) : 0);
    }
    const w = 300;
    const h = 70;
    const pad = 4;
    const peak = Math.max(...rates);
    const max = Math.max(1, peak);
    const n = SPARK_SAMPLES - 1;
    const x0 = w - (rates.length - 1) * (w / (n - 1));
    const pts = rates.map((r, i) => {
      const x = x0 + i * (w / (n - 1));
      const y = h - pad - (r / max) * (h - 2 * pad);
      return x.toFixed(1) + ',' + y.toFixed(1);
    });
    if (rates.length < 2) {
      return (
        '<div class="spark-head"><span class="big-num">…</span><span class="muted"> tasks/s</span></div>' +
        '<svg class="spark" id="tasks-sparkline" viewBox="0 0 ' + w + ' ' + h + '" preserveAspectRatio="none" role="img" aria-label="tasks finished per second">' +
        '<line class="spark-base" x1="0" y1="' + (h - pad) + '" x2="' + w + '" y2="' + (h - pad) + '"></line>' +
        '<polyline class="spark-line" fill="none" points="' + pts.join(' ') + '"></polyline></svg>' +
        '<p class="muted small">Collecting samples: the rate shows after a few updates' +
        (s.length ? ' · ' + esc(fmtNum(s[s.length - 1].done)) + ' tasks done in all' : '') + '.</p>'
      );
    }
    const last = rates[rates.length - 1];
    const avg = rates.reduce((a, b) => a + b, 0) / rates.length;
    const first = pts[0].split(',')[0];
    const lastX = pts[pts.length - 1].split(',')[0];
    const lastY = pts[pts.length - 1].split(',')[1];
    const area = 'M ' + first + ',' + (h - pad) + ' L ' + pts.join(' L ') + ' L ' + lastX + ',' + (h - pad) + ' Z';
    const span = Math.round((s[s.length - 1].t - s[0].t) / 1000);
    return (
      '<div class="spark-head"><span class="big-num">' + esc(last < 10 ? last.toFixed(1) : Math.round(last)) + '</span>' +
      '<span class="muted"> tasks/s now</span></div>' +
      '<svg class="spark" id="tasks-sparkline" viewBox="0 0 ' + w + ' ' + h + '" preserveAspectRatio="none" role="img" aria-label="tasks finished per second">' +
      '<line class="spark-base" x1="0" y1="' + (h - pad) + '" x2="' + w + '" y2="' + (h - pad) + '"></line>' +
      '<path class="spark-area" d="' + area + '"></path>' +
      '<polyline class="spark-line" fill="none" points="' + pts.join(' ') + '"></polyline>' +
      '<circle class="spark-dot" cx="' + lastX + '" cy="' + lastY + '" r="2.5"></circle>' +
      '</svg>' +
      '<p class="muted small">Finished + failed per second over the last ' + esc(fmtDur(span * 1000)) +
      ' · peak ' + esc(fmtNum(peak)) + ' · mean ' + esc(fmtNum(avg)) + ' · ' + esc(fmtNum(s[s.length - 1].done)) + ' done in all</p>'
    );
  }

  function eventsCard(st, jobs) {
    const ev = [];
    for (const n of st.nodes || []) {
      const who = (n.is_head ? 'Head node ' : 'Node ') + idHTML(n.node_id) + ' <span class="muted">(' + esc(n.address) + ')</span>';
      if (n.registered_at_ms) {
        ev.push({ t: n.registered_at_ms, kind: 'ok', html: who + ' registered' + (num(n.incarnation) > 1 ? ' (incarnation ' + esc(n.incarnation) + ')' : '') });
      }
      if (n.state !== 'ALIVE' && n.dead_at_ms) {
        ev.push({ t: n.dead_at_ms, kind: 'bad', html: who + ' died' + (n.death_reason ? ': ' + esc(n.death_reason) : '') });
      }
    }
    if (jobs && jobs.ok) {
      for (const j of jobs.value || []) {
        const id = j.submission_id || j.job_id;
        const link = '<a class="mono" href="#/jobs/' + esc(encodeURIComponent(id)) + '">' + esc(id) + '</a>';
        if (j.start_time) ev.push({ t: j.start_time, kind: 'info', html: 'Job ' + link + ' submitted' });
        if (j.end_time) {
          ev.push({
            t: j.end_time,
            kind: badgeClass(j.status),
            html: 'Job ' + link + ' ended ' + badge(j.status) + (j.message ? ' <span class="muted">' + esc(firstLine(j.message)) + '</span>' : ''),
          });
        }
      }
    }
    const a = st.autoscaler;
    if (a) {
      for (const i of a.instances || []) {
        if (!i.updated_ms) continue;
        ev.push({
          t: i.updated_ms,
          kind: badgeClass(i.state),
          html: 'Instance ' + idHTML(i.instance_id, 10) + ' ' + esc(i.node_type) + ' → ' + badge(i.state) +
            (i.message ? ' <span class="muted">' + esc(i.message) + '</span>' : ''),
        });
      }
    }
    ev.sort((x, y) => num(y.t) - num(x.t));
    if (!ev.length) return '<p class="muted">Nothing has happened yet.</p>';
    return (
      '<ol class="events" id="events">' +
      ev
        .slice(0, 30)
        .map((e) => '<li class="ev ' + e.kind + '"><span class="ev-dot"></span>' + timeHTML(e.t) + '<span class="ev-text">' + e.html + '</span></li>')
        .join('') +
      '</ol>'
    );
  }

  function taskDone(summary) {
    const groups = ((summary.result || {}).node_id_to_summary || {});
    let done = 0;
    for (const g of Object.values(groups)) {
      for (const f of Object.values(g.summary || {})) {
        const c = f.state_counts || {};
        done += num(c.FINISHED) + num(c.FAILED);
      }
    }
    return done;
  }

  const overview = {
    title: 'Overview',
    mount(root) {
      root.innerHTML =
        pageHead('Cluster overview', 'ov-sub') +
        '<div class="grid ov-grid">' +
        '<section class="card span-2" id="card-heads"><h2>Heads <span class="h-note">Raft group</span></h2><div id="ov-heads" class="card-body"></div></section>' +
        '<section class="card" id="card-nodes"><h2>Nodes</h2><div id="ov-nodes" class="card-body"></div></section>' +
        '<section class="card span-2" id="card-resources"><h2>Resources</h2><div id="ov-resources" class="card-body"></div></section>' +
        '<section class="card" id="card-jobs"><h2>Jobs</h2><div id="ov-jobs" class="card-body"></div></section>' +
        '<section class="card" id="card-throughput"><h2>Task throughput</h2><div id="ov-spark" class="card-body"></div></section>' +
        '<section class="card span-2" id="card-demand"><h2>Pending demand</h2><div id="ov-demand" class="card-body"></div></section>' +
        '<section class="card" id="card-autoscaler"><h2>Autoscaler</h2><div id="ov-autoscaler" class="card-body"></div></section>' +
        '<section class="card span-2" id="card-events"><h2>Recent events</h2><div id="ov-events" class="card-body"></div></section>' +
        '</div>';
    },
    async load(gen) {
      const [st, ns, jobs, sum] = await settle([
        fetchStatus(),
        getState(NODE_STATS_URL),
        getJson('/api/jobs/'),
        getState('/api/v0/tasks/summarize?timeout=10'),
      ]);
      fresh(gen);
      if (!st.ok) throw st.error;
      const s = st.value;
      if (sum.ok) {
        S.samples.push({ t: Date.now(), done: taskDone(sum.value) });
        while (S.samples.length > SPARK_SAMPLES) S.samples.shift();
      }
      const alive = (s.nodes || []).filter((n) => n.state === 'ALIVE').length;
      setText(
        $('ov-sub'),
        (s.heads || []).length + ' head' + ((s.heads || []).length === 1 ? '' : 's') + ' · ' + alive + ' live node' + (alive === 1 ? '' : 's') +
          ' · leader ' + (s.leader || 'none') + ' · term ' + s.term + ' · commit index ' + s.commit_index
      );
      setHTML($('ov-heads'), headsCard(s));
      setHTML($('ov-nodes'), nodesCard(s, ns));
      setHTML($('ov-resources'), resourcesCard(s, ns));
      setHTML($('ov-jobs'), jobsCard(jobs));
      setHTML(
        $('ov-spark'),
        sum.ok
          ? sparkCard()
          : '<p class="warn-text">' + esc(errMsg(sum.error)) + '</p>' + (S.samples.length > 2 ? sparkCard() : '')
      );
      setHTML($('ov-autoscaler'), autoscalerCard(s.autoscaler));
      setHTML($('ov-demand'), demandCard(s));
      setHTML($('ov-events'), eventsCard(s, jobs));
    },
  };

  // ---------------------------------------------------------------- nodes

  function nodeResourcesHTML(n) {
    const total = n.resources_total || {};
    const avail = n.resources_available || {};
    const names = Object.keys(total).filter((k) => !isGroupResource(k)).sort(resourceOrder);
    const groups = Object.keys(total).filter(isGroupResource).length;
    if (!names.length) return dash();
    let html = '<div class="mini-res">';
    for (const k of names) {
      const t = num(total[k]);
      const used = Math.max(0, t - num(avail[k] !== undefined ? avail[k] : t));
      html +=
        '<div class="mini-row"><span class="mini-k" title="' + esc(k) + '">' + esc(k) + '</span>' + barSVG(used, t, 'mini') +
        '<span class="mini-v">' + esc(fmtRes(k, used)) + ' / ' + esc(fmtRes(k, t)) + '</span></div>';
    }
    if (groups) html += '<div class="muted small">+ ' + groups + ' placement-group resource' + (groups === 1 ? '' : 's') + '</div>';
    return html + '</div>';
  }

  function objectStoreHTML(s) {
    if (!s) return dash();
    const o = s.object_store || {};
    return (
      '<div class="mini-res"><div class="mini-row">' + barSVG(o.used_bytes, o.capacity_bytes, 'mini') +
      '<span class="mini-v">' + esc(fmtBytes(o.used_bytes)) + ' / ' + esc(fmtBytes(o.capacity_bytes)) + '</span></div>' +
      '<div class="muted small">' + esc(fmtNum(o.objects)) + ' object' + (num(o.objects) === 1 ? '' : 's') +
      (num(o.pinned_bytes) ? ' · ' + esc(fmtBytes(o.pinned_bytes)) + ' pinned' : '') +
      (num(o.spilled_bytes) ? ' · <span class="warn-text">' + esc(fmtBytes(o.spilled_bytes)) + ' spilled</span>' : ' · nothing spilled') +
      '</div></div>'
    );
  }

  const nodes = {
    title: 'Nodes',
    mount(root) {
      root.innerHTML =
        pageHead('Nodes', 'nodes-sub') + warnBox('nodes-warn') +
        '<section class="card flush"><div class="table-wrap">' +
        '<table class="table" id="nodes-table"><thead><tr>' +
        '<th>Node</th><th>State</th><th class="num">Inc.</th><th>Resources (used / total)</th>' +
        '<th>Object store</th><th>Processes</th><th>Death reason</th>' +
        '</tr></thead><tbody id="nodes-body"></tbody></table></div></section>';
    },
    async load(gen) {
      const [st, ns] = await settle([fetchStatus(), getState(NODE_STATS_URL)]);
      fresh(gen);
      if (!st.ok) throw st.error;
      const list = (st.value.nodes || []).slice().sort(
        (a, b) => (a.state === 'ALIVE' ? 0 : 1) - (b.state === 'ALIVE' ? 0 : 1) || (b.is_head ? 1 : 0) - (a.is_head ? 1 : 0) ||
          num(a.registered_at_ms) - num(b.registered_at_ms)
      );
      const stats = ns.ok ? ns.value.nodes || {} : {};
      const warn = [];
      if (!ns.ok) warn.push('Per-node stats are unavailable: ' + errMsg(ns.error));
      else if ((ns.value.unreachable || []).length) warn.push('Not answering: ' + ns.value.unreachable.join('; '));
      setWarn('nodes-warn', warn.join(' '));
      const alive = list.filter((n) => n.state === 'ALIVE').length;
      setText($('nodes-sub'), alive + ' alive · ' + (list.length - alive) + ' dead · ' + list.length + ' in all');
      const rows = list.map((n) => {
        const s = stats[n.node_id];
        const deadNode = n.state !== 'ALIVE';
        const labels = Object.entries(n.labels || {}).filter(([k]) => k !== 'rayctl.io/node-type');
        let idle = '';
        if (!deadNode) {
          if (n.draining) idle += ' ' + badge('DRAINING');
          idle += n.idle_ms !== null && n.idle_ms !== undefined
            ? '<div class="muted small">idle ' + esc(fmtDur(n.idle_ms)) + '</div>'
            : '<div class="muted small">busy</div>';
        }
        const plural = (k, w) => esc(k) + ' ' + w + (num(k) === 1 ? '' : 's');
        const procs = s
          ? '<div class="procs"><div>' + plural(s.workers, 'worker') + '</div><div>' + plural(s.drivers, 'driver') + '</div>' +
            '<div' + (num(s.tasks_running) ? ' class="ok-text"' : ' class="muted"') + '>' + esc(s.tasks_running) + ' running</div></div>'
          : dash();
        return (
          '<tr class="' + (deadNode ? 'dead' : '') + '" data-node-id="' + esc(n.node_id) + '">' +
          '<td><div class="cell-main">' + idHTML(n.node_id, 12) + (n.is_head ? ' <span class="tag head">head</span>' : '') +
          (n.node_type ? ' <span class="tag">' + esc(n.node_type) + '</span>' : '') + '</div>' +
          (labels.length
            ? '<div class="chips small">' + labels.map(([k, v]) => '<span class="chip"><span class="chip-k">' + esc(k) + '</span> ' + esc(v) + '</span>').join(' ') + '</div>'
            : '') +
          '<div class="mono small addr" title="metrics port ' + esc((n.ports || {}).metrics_export_port) + '">' + esc(n.address) + '</div>' +
          '<div class="muted small">registered ' + timeHTML(n.registered_at_ms) + '</div></td>' +
          '<td>' + badge(n.state) + idle + '</td>' +
          '<td class="num mono">' + esc(n.incarnation) + '</td>' +
          '<td>' + (deadNode ? dash() : nodeResourcesHTML(n)) + '</td>' +
          '<td>' + (deadNode ? dash() : objectStoreHTML(s)) + '</td>' +
          '<td>' + (deadNode ? dash() : procs) + '</td>' +
          '<td class="wrap death">' + (deadNode
            ? '<span class="bad-text">' + esc(n.death_reason || 'unknown') + '</span><div class="muted small">' + timeHTML(n.dead_at_ms) + '</div>'
            : dash()) + '</td>' +
          '</tr>'
        );
      });
      setHTML($('nodes-body'), rows.length ? rows.join('') : emptyRow(7, 'No nodes have registered.'));
    },
  };

  // ---------------------------------------------------------------- jobs

  const JOB_STATES = ['PENDING', 'RUNNING', 'SUCCEEDED', 'FAILED', 'STOPPED'];

  function jobHref(j) {
    return '#/jobs/' + encodeURIComponent(j.submission_id || j.job_id);
  }

  function jobDuration(j) {
    if (!j.start_time) return '';
    const end = j.end_time || (TERMINAL_JOB.has(j.status) ? null : Date.now());
    return end ? fmtDur(num(end) - num(j.start_time)) : '';
  }

  function renderJobs() {
    const body = $('jobs-body');
    if (!body) return;
    const f = S.jobFilter.trim().toLowerCase();
    const rows = S.jobs
      .filter((j) => !S.jobStatus || j.status === S.jobStatus)
      .filter((j) => {
        if (!f) return true;
        return [j.job_id, j.submission_id, j.entrypoint, j.message, j.status, j.driver_node_id]
          .some((x) => x && String(x).toLowerCase().includes(f));
      })
      .sort((a, b) => num(b.start_time) - num(a.start_time));
    setText($('jobs-count'), rows.length + ' of ' + S.jobs.length + ' job' + (S.jobs.length === 1 ? '' : 's'));
    const html = rows.map((j) => {
      const id = j.submission_id || j.job_id;
      return (
        '<tr class="clickable" data-href="' + esc(jobHref(j)) + '">' +
        '<td><a class="mono" href="' + esc(jobHref(j)) + '">' + esc(id) + '</a>' +
        (j.job_id && j.job_id !== id ? '<div class="muted small mono">' + esc(j.job_id) + '</div>' : '') + '</td>' +
        '<td>' + badge(j.status) + '</td>' +
        '<td class="mono entry" title="' + esc(j.entrypoint) + '">' + esc(j.entrypoint) + '</td>' +
        '<td>' + timeHTML(j.start_time) + '</td>' +
        '<td>' + (jobDuration(j) ? esc(jobDuration(j)) : dash()) + '</td>' +
        '<td>' + idHTML(j.driver_node_id) + '</td>' +
        '<td class="wrap msg" title="' + esc(j.message) + '">' + esc(firstLine(j.message)) + '</td>' +
        '</tr>'
      );
    });
    setHTML(
      body,
      html.length ? html.join('') : emptyRow(7, S.jobs.length ? 'No job matches the filter.' : 'No jobs yet: submit one with rayctl job submit.')
    );
  }

  function rowLinks(tbody) {
    tbody.addEventListener('click', (ev) => {
      if (ev.target.closest('a, button, input, select, summary, details, pre')) return;
      const sel = window.getSelection && window.getSelection();
      if (sel && String(sel).length) return;
      const tr = ev.target.closest('tr[data-href]');
      if (tr) location.hash = tr.dataset.href;
    });
  }

  const jobs = {
    title: 'Jobs',
    mount(root) {
      root.innerHTML =
        pageHead('Jobs', null) +
        '<div class="toolbar">' +
        '<input id="jobs-filter" type="search" class="grow" placeholder="Filter by id, entrypoint or message" autocomplete="off" spellcheck="false">' +
        '<select id="jobs-status" aria-label="Status"><option value="">All statuses</option>' +
        JOB_STATES.map((s) => '<option value="' + s + '">' + s + '</option>').join('') + '</select>' +
        '<span id="jobs-count" class="muted"></span></div>' +
        '<section class="card flush"><div class="table-wrap">' +
        '<table class="table" id="jobs-table"><thead><tr><th>Submission id</th><th>Status</th><th>Entrypoint</th>' +
        '<th>Submitted</th><th>Duration</th><th>Driver node</th><th>Message</th></tr></thead>' +
        '<tbody id="jobs-body"></tbody></table></div></section>';
      const f = $('jobs-filter');
      const s = $('jobs-status');
      f.value = S.jobFilter;
      s.value = S.jobStatus;
      f.addEventListener('input', () => {
        S.jobFilter = f.value;
        renderJobs();
      });
      s.addEventListener('change', () => {
        S.jobStatus = s.value;
        renderJobs();
      });
      rowLinks($('jobs-body'));
    },
    async load(gen) {
      const [st, list] = await settle([fetchStatus(), getJson('/api/jobs/')]);
      fresh(gen);
      if (!list.ok) throw list.error;
      S.jobs = Array.isArray(list.value) ? list.value : [];
      renderJobs();
      if (!st.ok) throw st.error;
    },
  };

  // ---------------------------------------------------------------- one job

  function kvRow(k, v, cls) {
    return '<div><dt>' + esc(k) + '</dt><dd' + (cls ? ' class="' + cls + '"' : '') + '>' + v + '</dd></div>';
  }

  function jobHistory(id, j) {
    const seen = S.jobSeen[id] || (S.jobSeen[id] = []);
    if (!seen.length || seen[seen.length - 1].status !== j.status) seen.push({ status: j.status, t: Date.now() });
    const items = [];
    // The recorded times: submitted (PENDING), the current attempt's driver started
    // (RUNNING), ended; then what this page saw change in between.
    if (j.start_time) items.push({ t: j.start_time, html: 'Submitted ' + badge('PENDING'), cls: 'info' });
    if (j.run_start_time) {
      const attempt = num(j.attempt) > 0 ? ' <span class="muted">attempt ' + esc(num(j.attempt) + 1) + ' of ' + esc(num(j.max_retries) + 1) + '</span>' : '';
      items.push({ t: j.run_start_time, html: 'Driver started ' + badge('RUNNING') + attempt, cls: badgeClass('RUNNING') });
    }
    seen.forEach((x, i) => {
      if (i === 0) return; // the state at opening is one of the recorded ones
      if (TERMINAL_JOB.has(x.status) && j.end_time) return; // the end is shown already
      items.push({ t: x.t, html: 'became ' + badge(x.status), cls: badgeClass(x.status), seen: true });
    });
    if (j.end_time) items.push({ t: j.end_time, html: 'Ended ' + badge(j.status), cls: badgeClass(j.status) });
    items.sort((a, b) => num(a.t) - num(b.t));
    return (
      '<ol class="timeline">' +
      items.map((x) => '<li class="' + x.cls + '"><span class="tl-dot"></span><span class="tl-text">' + x.html + '</span> <span class="muted small">' +
        esc(fmtTime(x.t)) + '</span></li>').join('') +
      '</ol>'
    );
  }

  function jobDetails(j) {
    const res = [];
    if (j.entrypoint_num_cpus !== null && j.entrypoint_num_cpus !== undefined) res.push(['CPU', j.entrypoint_num_cpus]);
    if (j.entrypoint_num_gpus !== null && j.entrypoint_num_gpus !== undefined) res.push(['GPU', j.entrypoint_num_gpus]);
    if (j.entrypoint_memory !== null && j.entrypoint_memory !== undefined) res.push(['memory', j.entrypoint_memory]);
    for (const [k, v] of Object.entries(j.entrypoint_resources || {})) res.push([k, v]);
    const shape = {};
    for (const [k, v] of res) shape[k] = v;
    let html = '<dl class="kv">';
    html += kvRow('Status', badge(j.status));
    html += kvRow('Entrypoint', '<code class="block">' + esc(j.entrypoint) + '</code>');
    html += kvRow('Message', j.message ? '<span class="pre-wrap">' + esc(j.message) + '</span>' : dash());
    html += kvRow('Submission id', '<span class="mono">' + esc(j.submission_id || '') + '</span>');
    html += kvRow('Job id', '<span class="mono">' + esc(j.job_id || '') + '</span>');
    html += kvRow('Type', esc(j.type || ''));
    html += kvRow('Submitted', j.start_time ? esc(fmtTime(j.start_time)) + ' <span class="muted">(' + esc(ago(j.start_time)) + ')</span>' : dash());
    html += kvRow('Ended', j.end_time ? esc(fmtTime(j.end_time)) + ' <span class="muted">(' + esc(ago(j.end_time)) + ')</span>' : dash());
    html += kvRow('Duration', jobDuration(j) ? esc(jobDuration(j)) : dash());
    html += kvRow('Driver node', j.driver_node_id ? '<span class="mono">' + esc(j.driver_node_id) + '</span>' : dash());
    html += kvRow('Exit code', j.driver_exit_code === null || j.driver_exit_code === undefined ? dash() : '<span class="mono">' + esc(j.driver_exit_code) + '</span>');
    if (j.attempt !== undefined) {
      html += kvRow('Attempt', esc(num(j.attempt) + 1) + ' <span class="muted">of up to ' + esc(num(j.max_retries) + 1) + '</span>');
    }
    if (j.priority !== undefined) html += kvRow('Priority', esc(j.priority));
    html += kvRow('Entrypoint resources', res.length ? shapeHTML(shape) : '<span class="muted">none reserved</span>');
    if (j.error_type) html += kvRow('Error type', esc(j.error_type));
    return html + '</dl>';
  }

  function metadataHTML(md) {
    const e = Object.entries(md || {});
    if (!e.length) return '<p class="muted">No metadata.</p>';
    return (
      '<table class="table compact kv-table"><tbody>' +
      e.map(([k, v]) => '<tr><th class="mono">' + esc(k) + '</th><td class="mono wrap">' + esc(typeof v === 'string' ? v : pretty(v)) + '</td></tr>').join('') +
      '</tbody></table>'
    );
  }

  // Log text with ANSI colours (tracing's output) as spans with classes; other escape
  // sequences are dropped.
  function ansiHTML(text) {
    const t = text.replace(/\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)/g, '');
    const re = /\x1b\[([0-9;?]*)([@-~])/g;
    let out = '';
    let last = 0;
    let fg = null;
    let bold = false;
    let dim = false;
    let italic = false;
    let under = false;
    const wrap = (chunk) => {
      if (!chunk) return '';
      const c = [];
      if (fg) c.push('a-' + fg);
      if (bold) c.push('a-b');
      if (dim) c.push('a-d');
      if (italic) c.push('a-i');
      if (under) c.push('a-u');
      const e = esc(chunk.replace(/\x1b/g, ''));
      return c.length ? '<span class="' + c.join(' ') + '">' + e + '</span>' : e;
    };
    let m;
    while ((m = re.exec(t)) !== null) {
      out += wrap(t.slice(last, m.index));
      last = m.index + m[0].length;
      if (m[2] !== 'm') continue;
      const codes = m[1] === '' ? [0] : m[1].split(';').map((x) => parseInt(x, 10) || 0);
      for (let i = 0; i < codes.length; i++) {
        const c = codes[i];
        if (c === 0) {
          fg = null;
          bold = dim = italic = under = false;
        } else if (c === 1) bold = true;
        else if (c === 2) dim = true;
        else if (c === 3) italic = true;
        else if (c === 4) under = true;
        else if (c === 22) bold = dim = false;
        else if (c === 23) italic = false;
        else if (c === 24) under = false;
        else if (c >= 30 && c <= 37) fg = 'c' + (c - 30);
        else if (c >= 90 && c <= 97) fg = 'c' + (c - 90);
        else if (c === 39) fg = null;
        else if (c === 38 || c === 48) i += codes[i + 1] === 5 ? 2 : 4;
      }
    }
    out += wrap(t.slice(last));
    return out;
  }

  function atBottom(el) {
    return el.scrollHeight - el.scrollTop - el.clientHeight < 8;
  }

  // Replaces a log <pre>'s text, keeping the view at the bottom if the reader was there.
  function setLogText(pre, text, forceBottom) {
    if (!pre) return;
    let t = text;
    if (t.length > MAX_LOG_CHARS) {
      const cut = t.length - MAX_LOG_CHARS;
      const nl = t.indexOf('\n', cut);
      t = '[… ' + fmtBytes(nl > 0 ? nl : cut) + ' earlier output not shown …]\n' + t.slice(nl > 0 ? nl + 1 : cut);
    }
    if (pre.__raw === t) return;
    const stick = forceBottom || atBottom(pre);
    if (t.indexOf('\x1b') >= 0) pre.innerHTML = ansiHTML(t);
    else pre.textContent = t;
    pre.__raw = t;
    if (stick) pre.scrollTop = pre.scrollHeight;
  }

  const job = {
    title: 'Job',
    mount(root, route) {
      const id = route.id;
      root.innerHTML =
        '<div class="page-head"><div><a class="back" href="#/jobs">← All jobs</a>' +
        '<h1 id="job-title">Job <span class="mono">' + esc(id) + '</span> <span id="job-badge"></span></h1></div></div>' +
        '<div id="job-missing" hidden></div>' +
        '<div id="job-main"><div class="grid job-grid">' +
        '<section class="card span-2"><h2>Details</h2><div id="job-details" class="card-body"></div></section>' +
        '<section class="card"><h2>Status history</h2><div id="job-history" class="card-body"></div></section>' +
        '</div>' +
        '<section class="card log-card"><div class="log-head"><h2>Log</h2><span id="job-log-state" class="muted small"></span>' +
        '<label class="check"><input type="checkbox" id="job-log-wrap"> wrap lines</label></div>' +
        '<pre id="job-log" class="log" tabindex="0">Loading the log…</pre></section>' +
        '<div class="grid job-grid after-log">' +
        '<section class="card"><h2>Metadata</h2><div id="job-metadata" class="card-body"></div></section>' +
        '<section class="card span-2"><h2>Runtime environment</h2><div id="job-runtime-env" class="card-body"></div></section>' +
        '</div></div>';
      const wrap = $('job-log-wrap');
      wrap.addEventListener('change', () => $('job-log').classList.toggle('wrap', wrap.checked));
      this.first = true;
    },
    async load(gen, route) {
      const id = route.id;
      const enc = encodeURIComponent(id);
      const [st, jr] = await settle([fetchStatus(), getJson('/api/jobs/' + enc)]);
      fresh(gen);
      if (!jr.ok) {
        if (jr.error instanceof ApiError && jr.error.status === 404) {
          $('job-main').hidden = true;
          const m = $('job-missing');
          m.hidden = false;
          setHTML(m, '<div class="card empty-card"><h2>No such job</h2><p>There is no job <span class="mono">' + esc(id) +
            '</span> (by submission id or job id). <a href="#/jobs">See all jobs</a>.</p><p class="muted small">' + esc(jr.error.message) + '</p></div>');
          return STOP;
        }
        throw jr.error;
      }
      const j = jr.value || {};
      setHTML($('job-badge'), badge(j.status));
      setHTML($('job-details'), jobDetails(j));
      setHTML($('job-history'), jobHistory(id, j));
      setHTML($('job-metadata'), metadataHTML(j.metadata));
      setHTML(
        $('job-runtime-env'),
        isEmptyValue(j.runtime_env) ? '<p class="muted">No runtime environment given.</p>' : '<pre class="json">' + esc(pretty(j.runtime_env)) + '</pre>'
      );
      const terminal = TERMINAL_JOB.has(j.status);
      const pre = $('job-log');
      // A job not yet started on a node has no log to read.
      const notStarted = j.status === 'PENDING' && !j.driver_node_id;
      const [lr] = notStarted
        ? [{ ok: true, value: { logs: '' } }]
        : await settle([getJson('/api/jobs/' + enc + '/logs')]);
      fresh(gen);
      if (notStarted) {
        setLogText(pre, '(the job has not started on a node yet)', true);
        setText($('job-log-state'), 'waiting for the job to start');
      } else if (lr.ok) {
        const text = (lr.value && typeof lr.value.logs === 'string') ? lr.value.logs : '';
        setLogText(pre, text || (terminal ? '(the job wrote no output)' : '(no output yet)'), this.first);
        this.first = false;
        setText($('job-log-state'), terminal ? 'complete · the job has ended' : 'following · updates every 2 s');
      } else {
        setText($('job-log-state'), 'cannot read the log: ' + errMsg(lr.error));
        if (this.first) setLogText(pre, '', false);
      }
      if (!st.ok) throw st.error;
      return terminal && lr.ok ? STOP : undefined;
    },
  };

  // ---------------------------------------------------------------- actors

  const ACTOR_STATES = ['ALIVE', 'PENDING_CREATION', 'DEPENDENCIES_UNREADY', 'RESTARTING', 'DEAD'];

  function deathCause(a) {
    const d = a.death_cause;
    if (!d) return '';
    if (d.actor_died_error_context && d.actor_died_error_context.error_message) return d.actor_died_error_context.error_message;
    return typeof d === 'string' ? d : pretty(d);
  }

  function renderActors() {
    const body = $('actors-body');
    if (!body) return;
    const f = S.actorText.trim().toLowerCase();
    const list = S.actors
      .filter((a) => !S.actorState || a.state === S.actorState)
      .filter((a) => !f || [a.actor_id, a.class_name, a.name, a.node_id, a.job_id, a.pid].some((x) => x !== null && x !== undefined && String(x).toLowerCase().includes(f)))
      .sort((a, b) => stateOrder(a.state, b.state) || String(a.class_name).localeCompare(String(b.class_name)));
    const counts = countBy(S.actors, 'state');
    setHTML(
      $('actors-counts'),
      Object.keys(counts)
        .sort(stateOrder)
        .map((s) => '<button type="button" class="state-chip' + (S.actorState === s ? ' on' : '') + '" data-state="' + esc(s) + '">' + badge(s) +
          '<span class="count">' + counts[s] + '</span></button>')
        .join('')
    );
    setText($('actors-count'), list.length + ' of ' + S.actors.length + ' actor' + (S.actors.length === 1 ? '' : 's'));
    const html = list.map((a) => {
      const cause = deathCause(a);
      return (
        '<tr class="' + (a.state === 'DEAD' ? 'dead' : '') + '">' +
        '<td><span class="mono id-full">' + esc(a.actor_id) + '</span></td>' +
        '<td><span class="mono">' + esc(a.class_name) + '</span>' +
        (isEmptyValue(a.required_resources) ? '' : '<div class="small muted">needs ' + shapeHTML(a.required_resources) + '</div>') + '</td>' +
        '<td>' + (a.name ? esc(a.name) : dash()) + (a.is_detached ? ' <span class="tag">detached</span>' : '') + '</td>' +
        '<td>' + badge(a.state) + '</td>' +
        '<td>' + idHTML(a.node_id) + '</td>' +
        '<td class="num mono">' + (a.pid ? esc(a.pid) : dash()) + '</td>' +
        '<td class="num">' + esc(num(a.num_restarts)) + '</td>' +
        '<td class="wrap cause">' + (cause ? '<span class="bad-text">' + esc(cause) + '</span>' : dash()) + '</td>' +
        '</tr>'
      );
    });
    setHTML(body, html.length ? html.join('') : emptyRow(8, S.actors.length ? 'No actor matches the filter.' : 'No actors.'));
  }

  const actors = {
    title: 'Actors',
    mount(root) {
      root.innerHTML =
        pageHead('Actors', null) + warnBox('actors-warn') +
        '<div class="toolbar">' +
        '<select id="actors-state" aria-label="State"><option value="">All states</option>' +
        ACTOR_STATES.map((s) => '<option value="' + s + '">' + s + '</option>').join('') + '</select>' +
        '<input id="actors-filter" type="search" class="grow" placeholder="Filter by id, class, name, node or pid" autocomplete="off" spellcheck="false">' +
        '<span id="actors-count" class="muted"></span></div>' +
        '<div id="actors-counts" class="state-chips"></div>' +
        '<section class="card flush"><div class="table-wrap">' +
        '<table class="table" id="actors-table"><thead><tr><th>Actor id</th><th>Class</th><th>Name</th><th>State</th><th>Node</th>' +
        '<th class="num">PID</th><th class="num">Restarts</th><th>Death cause</th></tr></thead>' +
        '<tbody id="actors-body"></tbody></table></div></section>';
      const sel = $('actors-state');
      const txt = $('actors-filter');
      sel.value = S.actorState;
      txt.value = S.actorText;
      sel.addEventListener('change', () => {
        S.actorState = sel.value;
        renderActors();
      });
      txt.addEventListener('input', () => {
        S.actorText = txt.value;
        renderActors();
      });
      $('actors-counts').addEventListener('click', (ev) => {
        const b = ev.target.closest('button[data-state]');
        if (!b) return;
        S.actorState = S.actorState === b.dataset.state ? '' : b.dataset.state;
        if (![...sel.options].some((o) => o.value === S.actorState)) {
          const o = document.createElement('option');
          o.value = S.actorState;
          o.textContent = S.actorState;
          sel.appendChild(o);
        }
        sel.value = S.actorState;
        renderActors();
      });
    },
    async load(gen) {
      const [st, r] = await settle([fetchStatus(), getState('/api/v0/actors?detail=true&limit=10000&timeout=10')]);
      fresh(gen);
      if (!r.ok) throw r.error;
      S.actors = r.value.result || [];
      const warn = [];
      if (r.value.partial_failure_warning) warn.push(r.value.partial_failure_warning);
      if (num(r.value.num_filtered) > S.actors.length) warn.push('Showing ' + S.actors.length + ' of ' + r.value.num_filtered + ' actors.');
      setWarn('actors-warn', warn.join(' '));
      renderActors();
      if (!st.ok) throw st.error;
    },
  };

  // ---------------------------------------------------------------- tasks

  const TASK_STATES = ['PENDING_ARGS_AVAIL', 'PENDING_NODE_ASSIGNMENT', 'SUBMITTED_TO_WORKER', 'RUNNING', 'FINISHED', 'FAILED'];
  const TASK_LIMIT = 1000;

  function summaryTable(sum) {
    const groups = ((sum.result || {}).node_id_to_summary || {});
    const rows = [];
    for (const g of Object.values(groups)) for (const f of Object.values(g.summary || {})) rows.push(f);
    if (!rows.length) return '<p class="muted">No tasks have run yet.</p>';
    const states = new Set();
    for (const r of rows) for (const s of Object.keys(r.state_counts || {})) states.add(s);
    const cols = [...states].sort(stateOrder);
    rows.sort((a, b) => String(a.func_or_class_name).localeCompare(String(b.func_or_class_name)));
    const totals = {};
    let html =
      '<div class="table-wrap short"><table class="table compact" id="task-summary-table"><thead><tr><th>Function</th><th>Type</th>' +
      cols.map((c) => '<th class="num">' + badge(c) + '</th>').join('') + '<th class="num">Total</th></tr></thead><tbody>';
    for (const r of rows) {
      let t = 0;
      html +=
        '<tr><td><button type="button" class="linklike mono" data-func="' + esc(r.func_or_class_name) + '" title="show these tasks">' +
        esc(r.func_or_class_name || '(unnamed)') + '</button></td><td class="muted small">' + esc(r.type) + '</td>';
      for (const c of cols) {
        const n = num((r.state_counts || {})[c]);
        t += n;
        totals[c] = (totals[c] || 0) + n;
        html += '<td class="num' + (n ? ' count-' + badgeClass(c) : ' muted') + '">' + (n ? esc(fmtNum(n)) : '·') + '</td>';
      }
      html += '<td class="num"><b>' + esc(fmtNum(t)) + '</b></td></tr>';
    }
    const all = Object.values(totals).reduce((a, b) => a + b, 0);
    html += '</tbody><tfoot><tr><th>All functions</th><th></th>' + cols.map((c) => '<th class="num">' + esc(fmtNum(totals[c])) + '</th>').join('') +
      '<th class="num">' + esc(fmtNum(all)) + '</th></tr></tfoot></table></div>';
    return html;
  }

  function renderTasks() {
    const body = $('tasks-body');
    if (!body) return;
    const f = S.taskFunc.trim().toLowerCase();
    const list = S.tasks
      .filter((t) => !f || [t.func_or_class_name, t.name, t.task_id].some((x) => x && String(x).toLowerCase().includes(f)))
      .sort((a, b) => num(b.creation_time_ms) - num(a.creation_time_ms) || String(b.task_id).localeCompare(String(a.task_id)));
    setText($('tasks-count'), list.length + ' shown');
    let html = '';
    list.forEach((t, i) => {
      const z = i % 2 ? ' alt' : '';
      const failed = t.state === 'FAILED' || t.error_message;
      const dur = t.start_time_ms ? (t.end_time_ms ? num(t.end_time_ms) - num(t.start_time_ms) : t.state === 'RUNNING' ? Date.now() - num(t.start_time_ms) : null) : null;
      html +=
        '<tr class="task' + z + (failed ? ' has-error' : '') + '" data-task-id="' + esc(t.task_id) + '">' +
        '<td>' + midIdHTML(t.task_id) + (num(t.attempt_number) ? ' <span class="tag">attempt ' + esc(t.attempt_number) + '</span>' : '') + '</td>' +
        '<td class="mono">' + esc(t.func_or_class_name || t.name) + '</td>' +
        '<td class="muted small">' + esc(t.type === 'ACTOR_TASK' ? 'actor' : t.type === 'NORMAL_TASK' ? 'task' : t.type) + '</td>' +
        '<td>' + badge(t.state) + '</td>' +
        '<td>' + idHTML(t.node_id) + '</td>' +
        '<td class="mono small">' + (t.worker_id ? esc(t.worker_id) : dash()) + '</td>' +
        '<td>' + timeHTML(t.creation_time_ms) + '</td>' +
        '<td class="num">' + (dur === null ? dash() : esc(fmtDur(dur))) + '</td>' +
        '<td>' + (t.error_type ? '<span class="bad-text small">' + esc(t.error_type) + '</span>' : dash()) + '</td>' +
        '</tr>';
      if (failed && t.error_message) {
        const open = S.closedTasks.has(t.task_id) ? '' : ' open';
        html +=
          '<tr class="detail' + z + '"><td colspan="9"><details class="task-error" data-task-id="' + esc(t.task_id) + '"' + open + '>' +
          '<summary><span class="err-label">' + esc(t.error_type || 'Error') + '</span><span class="first-line bad-text"> ' + esc(firstLine(t.error_message)) + '</span></summary>' +
          '<pre class="err">' + esc(t.error_message) + '</pre></details></td></tr>';
      }
    });
    setHTML(body, html || emptyRow(9, S.tasks.length ? 'No task matches the filter.' : 'No tasks' + (S.taskState ? ' in state ' + S.taskState : '') + '.'));
  }

  const tasks = {
    title: 'Tasks',
    mount(root) {
      root.innerHTML =
        pageHead('Tasks', 'tasks-sub') + warnBox('tasks-warn') +
        '<section class="card"><h2>By function and state</h2><div id="tasks-summary" class="card-body"></div></section>' +
        '<div class="toolbar">' +
        '<select id="tasks-state" aria-label="State"><option value="">All states</option>' +
        TASK_STATES.map((s) => '<option value="' + s + '">' + s + '</option>').join('') + '</select>' +
        '<input id="tasks-func" type="search" class="grow" list="tasks-funcs" placeholder="Filter by function name or task id" autocomplete="off" spellcheck="false">' +
        '<datalist id="tasks-funcs"></datalist>' +
        '<span id="tasks-count" class="muted"></span></div>' +
        '<section class="card flush"><div class="table-wrap">' +
        '<table class="table zebra-js" id="tasks-table"><thead><tr><th>Task id</th><th>Function</th><th>Type</th><th>State</th><th>Node</th>' +
        '<th>Worker</th><th>Created</th><th class="num">Duration</th><th>Error</th></tr></thead>' +
        '<tbody id="tasks-body"></tbody></table></div></section>';
      const sel = $('tasks-state');
      const txt = $('tasks-func');
      sel.value = S.taskState;
      txt.value = S.taskFunc;
      sel.addEventListener('change', () => {
        S.taskState = sel.value;
        setHTML($('tasks-body'), emptyRow(9, 'Loading…'));
        refreshNow();
      });
      txt.addEventListener('input', () => {
        S.taskFunc = txt.value;
        renderTasks();
      });
      $('tasks-summary').addEventListener('click', (ev) => {
        const b = ev.target.closest('button[data-func]');
        if (!b) return;
        S.taskFunc = b.dataset.func;
        txt.value = S.taskFunc;
        renderTasks();
        txt.scrollIntoView({ block: 'nearest', behavior: 'smooth' });
      });
      // <details> toggles do not bubble: listen in the capture phase.
      $('tasks-body').addEventListener(
        'toggle',
        (ev) => {
          const d = ev.target;
          if (!d || !d.dataset || !d.dataset.taskId) return;
          if (d.open !== S.closedTasks.has(d.dataset.taskId)) return;
          if (d.open) S.closedTasks.delete(d.dataset.taskId);
          else S.closedTasks.add(d.dataset.taskId);
          // Keep the cached markup in step, so the next poll does not close it again.
          $('tasks-body').__html = undefined;
        },
        true
      );
    },
    async load(gen) {
      const params = [['detail', 'true'], ['limit', String(TASK_LIMIT)], ['timeout', '10']];
      if (S.taskState) params.push(['filter_keys', 'state'], ['filter_predicates', '='], ['filter_values', S.taskState]);
      const [st, sum, list] = await settle([
        fetchStatus(),
        getState('/api/v0/tasks/summarize?timeout=10'),
        getState('/api/v0/tasks?' + qs(params)),
      ]);
      fresh(gen);
      if (!list.ok) throw list.error;
      S.tasks = list.value.result || [];
      const warn = [];
      if (list.value.partial_failure_warning) warn.push(list.value.partial_failure_warning);
      if (num(list.value.num_filtered) > S.tasks.length) {
        warn.push('Showing the first ' + S.tasks.length + ' of ' + fmtNum(list.value.num_filtered) + ' matching tasks; pick a state to narrow the list.');
      }
      setWarn('tasks-warn', warn.join(' '));
      setText(
        $('tasks-sub'),
        fmtNum(list.value.total) + ' task' + (num(list.value.total) === 1 ? '' : 's') + ' known to the live nodes' +
          (S.taskState ? ' · ' + fmtNum(list.value.num_filtered) + ' ' + S.taskState : '')
      );
      if (sum.ok) {
        setHTML($('tasks-summary'), summaryTable(sum.value));
        const names = new Set();
        const groups = ((sum.value.result || {}).node_id_to_summary || {});
        for (const g of Object.values(groups)) for (const k of Object.keys(g.summary || {})) names.add(k);
        setHTML($('tasks-funcs'), [...names].sort().map((n) => '<option value="' + esc(n) + '"></option>').join(''));
      } else {
        setHTML($('tasks-summary'), '<p class="warn-text">' + esc(errMsg(sum.error)) + '</p>');
      }
      renderTasks();
      if (!st.ok) throw st.error;
    },
  };

  // ---------------------------------------------------------------- placement groups

  function nodeLabel(id) {
    if (!id) return '<span class="muted">not placed</span>';
    const n = ((S.status && S.status.nodes) || []).find((x) => x.node_id === id);
    return idHTML(id) + (n ? ' <span class="muted small">' + esc(n.address) + '</span>' : '');
  }

  const pgsView = {
    title: 'Placement groups',
    mount(root) {
      root.innerHTML =
        pageHead('Placement groups', 'pgs-sub') + warnBox('pgs-warn') +
        '<div id="pgs-counts" class="state-chips static"></div>' +
        '<section class="card flush"><div class="table-wrap">' +
        '<table class="table" id="pgs-table"><thead><tr><th>Placement group</th><th>Name</th><th>State</th><th>Strategy</th>' +
        '<th>Bundles → nodes</th><th>Creator job</th><th>Message</th></tr></thead>' +
        '<tbody id="pgs-body"></tbody></table></div></section>';
    },
    async load(gen) {
      const [st, r] = await settle([fetchStatus(), getState('/api/v0/placement_groups?detail=true&limit=10000&timeout=10')]);
      fresh(gen);
      if (!r.ok) throw r.error;
      const list = (r.value.result || []).slice().sort((a, b) => stateOrder(a.state, b.state) || String(a.name).localeCompare(String(b.name)));
      S.pgs = list;
      setWarn('pgs-warn', r.value.partial_failure_warning || '');
      const counts = countBy(list, 'state');
      setHTML($('pgs-counts'), Object.keys(counts).sort(stateOrder).map((s) => '<span class="state-chip">' + badge(s) + '<span class="count">' + counts[s] + '</span></span>').join(''));
      setText($('pgs-sub'), list.length + ' placement group' + (list.length === 1 ? '' : 's'));
      const html = list.map((p) => {
        const stats = p.stats || {};
        const bundles = (p.bundles || [])
          .map((b, i) =>
            '<div class="bundle"><span class="bundle-idx">#' + i + '</span> ' + shapeHTML(b.unit_resources) + ' <span class="arrow">→</span> ' + nodeLabel(b.node_id) + '</div>'
          )
          .join('');
        return (
          '<tr class="' + (p.state === 'REMOVED' ? 'dead' : '') + '">' +
          '<td>' + midIdHTML(p.placement_group_id) + (p.is_detached ? ' <span class="tag">detached</span>' : '') + '</td>' +
          '<td>' + (p.name ? esc(p.name) : dash()) + '</td>' +
          '<td>' + badge(p.state) + '</td>' +
          '<td class="mono small">' + esc(stats.strategy || '') + '</td>' +
          '<td>' + (bundles || dash()) + '</td>' +
          '<td>' + midIdHTML(p.creator_job_id) + '</td>' +
          '<td class="wrap">' + (stats.message ? esc(stats.message) : dash()) + '</td>' +
          '</tr>'
        );
      });
      setHTML($('pgs-body'), html.length ? html.join('') : emptyRow(7, 'No placement groups.'));
      if (!st.ok) throw st.error;
    },
  };

  // ---------------------------------------------------------------- logs

  const logs = {
    title: 'Logs',
    mount(root) {
      root.innerHTML =
        pageHead('Logs', null) + warnBox('logs-warn') +
        '<div class="logs-layout">' +
        '<section class="card log-side"><h2>Node</h2><select id="log-node" aria-label="Node"></select>' +
        '<div id="log-files" class="log-files"><p class="muted">Loading…</p></div></section>' +
        '<section class="card log-card"><div class="log-head"><h2 id="log-file-name">No file chosen</h2>' +
        '<span id="log-state" class="muted small"></span>' +
        '<select id="log-lines" aria-label="How much"><option value="1000">last 1,000 lines</option><option value="5000">last 5,000 lines</option>' +
        '<option value="-1">the whole file</option></select>' +
        '<label class="check"><input type="checkbox" id="log-follow"> follow</label>' +
        '<label class="check"><input type="checkbox" id="log-wrap"> wrap</label></div>' +
        '<pre id="log-view" class="log" tabindex="0">Choose a log file on the left.</pre></section></div>';
      const L = S.logs;
      const follow = $('log-follow');
      const lines = $('log-lines');
      const wrap = $('log-wrap');
      follow.checked = L.follow;
      lines.value = L.lines;
      L.shownFor = '';
      if (L.file) {
        setText($('log-file-name'), L.file);
        setText($('log-view'), 'Loading ' + L.file + '…');
      }
      follow.addEventListener('change', () => {
        L.follow = follow.checked;
        if (L.follow) refreshNow();
      });
      lines.addEventListener('change', () => {
        L.lines = lines.value;
        L.shownFor = '';
        refreshNow();
      });
      wrap.addEventListener('change', () => $('log-view').classList.toggle('wrap', wrap.checked));
      $('log-node').addEventListener('change', (ev) => {
        L.node = ev.target.value;
        L.file = '';
        L.shownFor = '';
        setText($('log-file-name'), 'No file chosen');
        setText($('log-view'), 'Choose a log file on the left.');
        setHTML($('log-files'), '<p class="muted">Loading…</p>');
        refreshNow();
      });
      $('log-files').addEventListener('click', (ev) => {
        const b = ev.target.closest('button[data-file]');
        if (!b) return;
        L.file = b.dataset.file;
        L.shownFor = '';
        setText($('log-file-name'), L.file);
        setText($('log-view'), 'Loading ' + L.file + '…');
        for (const x of document.querySelectorAll('#log-files button[data-file]')) x.classList.toggle('active', x === b);
        refreshNow();
      });
    },
    async load(gen) {
      const L = S.logs;
      const st = await fetchStatus();
      fresh(gen);
      const alive = (st.nodes || []).filter((n) => n.state === 'ALIVE')
        .sort((a, b) => (b.is_head ? 1 : 0) - (a.is_head ? 1 : 0) || String(a.address).localeCompare(String(b.address)));
      if (!alive.some((n) => n.node_id === L.node)) {
        L.node = alive.length ? alive[0].node_id : '';
        L.file = '';
        L.shownFor = '';
      }
      const sel = $('log-node');
      setHTML(
        sel,
        alive.length
          ? alive.map((n) => '<option value="' + esc(n.node_id) + '">' + esc(shortId(n.node_id, 8)) + ' · ' + esc(n.address) + (n.is_head ? ' · head' : '') + '</option>').join('')
          : '<option value="">no live nodes</option>'
      );
      if (sel.value !== L.node) sel.value = L.node;
      if (!L.node) {
        setHTML($('log-files'), '<p class="muted">No live node to read logs from.</p>');
        return undefined;
      }
      const node = L.node;
      const file = L.file;
      const wantFile = file && (L.follow || L.shownFor !== node + '/' + file);
      const fileUrl = '/api/v0/logs/file?' + qs([['node_id', node], ['filename', file], ['lines', L.lines]]);
      const [files, text] = await settle([
        getState('/api/v0/logs?' + qs([['node_id', node]])),
        wantFile ? request(fileUrl) : Promise.resolve(null),
      ]);
      fresh(gen);
      if (files.ok) {
        const kinds = files.value || {};
        const titles = { job: 'Job drivers', worker: 'Workers', daemon: 'Node daemons' };
        const order = Object.keys(kinds).sort((a, b) => ['daemon', 'job', 'worker'].indexOf(a) - ['daemon', 'job', 'worker'].indexOf(b));
        let html = '';
        for (const k of order) {
          const names = (kinds[k] || []).slice().sort();
          if (!names.length) continue;
          html += '<h3>' + esc(titles[k] || k) + ' <span class="muted small">' + names.length + '</span></h3><ul>';
          for (const n of names) {
            html += '<li><button type="button" class="file' + (n === L.file ? ' active' : '') + '" data-file="' + esc(n) + '" title="' + esc(n) + '">' + esc(n) + '</button></li>';
          }
          html += '</ul>';
        }
        setHTML($('log-files'), html || '<p class="muted">This node has no log files.</p>');
        setWarn('logs-warn', '');
      } else {
        setWarn('logs-warn', 'Cannot list the logs of node ' + node + ': ' + errMsg(files.error));
      }
      if (wantFile) {
        const pre = $('log-view');
        if (text.ok) {
          const first = L.shownFor !== node + '/' + file;
          setLogText(pre, text.value === '' ? '(the file is empty)' : text.value, first);
          L.shownFor = node + '/' + file;
          setText($('log-state'), L.follow ? 'following · updated ' + new Date().toLocaleTimeString() : 'loaded ' + new Date().toLocaleTimeString());
        } else {
          setText($('log-state'), '');
          setLogText(pre, 'Cannot read ' + file + ': ' + errMsg(text.error), true);
          L.shownFor = node + '/' + file;
        }
      }
      return undefined;
    },
  };

  // ---------------------------------------------------------------- metrics

  const PANELS = 8;

  const metrics = {
    title: 'Metrics',
    mount(root) {
      root.innerHTML =
        pageHead('Metrics', 'metrics-sub') +
        '<div id="metrics-grafana"></div>' +
        '<section class="card"><h2>Prometheus endpoints</h2><div id="metrics-links" class="card-body"><p class="muted">Loading…</p></div></section>';
    },
    async load(gen) {
      const [st, d] = await settle([fetchStatus(), S.dash ? Promise.resolve(S.dash) : getJson('/api/rayctl/dashboard')]);
      fresh(gen);
      if (!st.ok) throw st.error;
      if (d.ok) {
        S.dash = d.value;
        setText($('version'), S.dash && S.dash.version ? 'v' + S.dash.version : '');
      }
      const g = d.ok ? d.value.grafana_host : null;
      const uid = (d.ok && d.value.grafana_dashboard_uid) || 'rayctl';
      if (g) {
        const base = String(g).replace(/\/+$/, '');
        let html =
          '<div class="metrics-bar"><span class="muted">Panels from Grafana at <span class="mono">' + esc(base) + '</span></span> ' +
          '<a href="' + esc(base + '/d/' + encodeURIComponent(uid) + '/' + encodeURIComponent(uid) + '?orgId=1') + '" target="_blank" rel="noopener noreferrer">Open in Grafana ↗</a></div>' +
          '<div class="metrics-grid" id="metrics-grid">';
        for (let n = 1; n <= PANELS; n++) {
          const src = base + '/d-solo/' + encodeURIComponent(uid) + '/' + encodeURIComponent(uid) + '?orgId=1&panelId=' + n + '&theme=light&refresh=5s';
          html += '<div class="panel"><iframe src="' + esc(src) + '" title="Grafana panel ' + n + '" loading="lazy" referrerpolicy="no-referrer"></iframe></div>';
        }
        html += '</div>';
        setHTML($('metrics-grafana'), html); // unchanged markup: the frames are not reloaded
        setText($('metrics-sub'), 'Grafana panels, refreshed by Grafana every 5 s');
      } else {
        setHTML(
          $('metrics-grafana'),
          '<div class="alert info">No Grafana is configured. Start the heads with <code>--grafana-host http://GRAFANA:3000</code> ' +
            '(or <code>RAY_GRAFANA_HOST</code>; <code>--grafana-iframe-host</code> when browsers reach it at another address) ' +
            'to see the panels here. Meanwhile, each process serves its raw metrics:</div>'
        );
        setText($('metrics-sub'), 'Raw Prometheus metrics of each head and node');
      }
      const s = st.value;
      let links = '<table class="table compact" id="metrics-table"><thead><tr><th>What</th><th>Address</th><th>Metrics</th></tr></thead><tbody>';
      for (const h of s.heads || []) {
        const port = (h.ports || {}).dashboard_port;
        const url = port ? 'http://' + hostOf(h.address) + ':' + port + '/metrics' : '';
        links +=
          '<tr><td>Head ' + badge(String(h.role || '').toUpperCase()) + '</td><td class="mono">' + esc(h.address) + '</td><td>' +
          (url ? '<a class="mono" href="' + esc(url) + '" target="_blank" rel="noopener noreferrer">' + esc(url) + '</a>' : dash()) + '</td></tr>';
      }
      for (const n of (s.nodes || []).filter((x) => x.state === 'ALIVE')) {
        const port = (n.ports || {}).metrics_export_port;
        const url = port ? 'http://' + hostOf(n.address) + ':' + port + '/metrics' : '';
        links +=
          '<tr><td>Node ' + idHTML(n.node_id) + (n.is_head ? ' <span class="tag head">head</span>' : '') + '</td><td class="mono">' + esc(n.address) + '</td><td>' +
          (url ? '<a class="mono" href="' + esc(url) + '" target="_blank" rel="noopener noreferrer">' + esc(url) + '</a>' : dash()) + '</td></tr>';
      }
      links += '</tbody></table><p class="muted small">Prometheus can find all of them through <span class="mono">/api/prometheus/sd</span> on any head.</p>';
      setHTML($('metrics-links'), links);
      return undefined;
    },
  };

  const VIEWS = {
    overview,
    nodes,
    jobs,
    job,
    actors,
    tasks,
    'placement-groups': pgsView,
    logs,
    metrics,
  };

  // ---------------------------------------------------------------- start

  window.addEventListener('hashchange', navigate);
  window.addEventListener('unhandledrejection', (ev) => {
    // Never let a stray rejection reach the console as an error; show it instead.
    ev.preventDefault();
    setLive(false, errMsg(ev.reason));
  });

  // One probe first, of the public /api/rayctl/session (a yes or no, never a 401): without a
  // good cookie the login page shows before any view asks for cluster data, and no request
  // has failed.
  async function boot() {
    if (!location.hash) history.replaceState(null, '', '#/');
    try {
      const r = await fetch('/api/rayctl/session', { credentials: 'same-origin', cache: 'no-store' });
      const s = r.ok ? await r.json() : null;
      if (s && s.authenticated === false) {
        showLogin(null);
        return;
      }
    } catch (_) {
      /* an old server without the probe: the next request tells */
    }
    try {
      S.dashLoading = true;
      S.dash = await getJson('/api/rayctl/dashboard');
      setText($('version'), S.dash && S.dash.version ? 'v' + S.dash.version : '');
      // A server that says so without refusing (no failed request in the console).
      if (S.dash && S.dash.authenticated === false) {
        S.dash = null;
        S.dashLoading = false;
        showLogin(null);
        return;
      }
    } catch (e) {
      if (e instanceof AuthRequired) {
        S.dashLoading = false;
        showLogin(e);
        return;
      }
      // Anything else: the view's own requests will say what is wrong.
    } finally {
      S.dashLoading = false;
    }
    navigate();
  }

  boot();
})();
