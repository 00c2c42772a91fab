// usbpt dashboard: reads the JSON API, follows /v1/events (Server-Sent Events) and re-reads the
// tables an event affects. Plain DOM, no framework, no build step. Every string that comes from
// the API goes into the page as text (textContent / createTextNode / setAttribute), never as HTML.
'use strict';

(function () {
  // Every event kind the stream names (schemas::Event::kind), plus `undecodable`.
  const KINDS = [
    'HostAgentStarted', 'DeviceDiscovered', 'DeviceInvalidated', 'FlavorCreated',
    'FlavorDeleted', 'ServerBootRequested', 'ServerScheduled', 'ServerScheduleFailed',
    'DeviceClaimed', 'DeviceAttached', 'DeviceReattached', 'DeviceReleased',
    'ServerStateChanged', 'ServerResized', 'ServerMigrationRefused', 'ServerDeleted',
    'ServerActionRequested', 'DeviceAttachFailed', 'DeviceClashDetected', 'ServerMigrated',
    'FlavorUsbSet', 'FlavorSized', 'ServerUpdated', 'ServerResizeVerifying',
    'ServerResizeConfirmed', 'ServerResizeReverted', 'DeviceDiscoveredV2', 'LineageLabeled',
    'PortFlapping', 'PortFlappingCleared', 'LineageConflictResolved', 'FingerprintAccepted',
    'DeviceReattachHeld', 'FlavorFingerprintPolicySet',
  ];
  const FEED_MAX = 300; // feed entries kept in the page
  const HISTORY_ON_LOAD = 50; // past events shown when the page opens
  const DEBOUNCE_MS = 120; // a burst of events costs one re-read
  const RETRY_MS = 3000; // reconnect delay when the stream was refused

  const state = {
    hosts: [],
    devices: [],
    servers: [],
    flavors: [],
    showAll: false,
    loadedSeq: 0, // the view's position when the tables were first read
    lastSeq: 0, // the newest sequence in the feed
    seenChange: -1, // the newest last_change_seq already shown (to mark what changed)
    lineage: null, // the lineage (or device) id open in the drawer
    lineageId: null, // that lineage's id, once read
    names: new Map(), // server id -> name, also learnt from events
    deviceNames: new Map(), // device id -> "name (vendor:product)", also learnt from events
    feedCount: 0,
  };

  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- DOM helpers (text only)

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = String(v);
      else if (k === 'on') for (const [ev, f] of Object.entries(v)) e.addEventListener(ev, f);
      else e.setAttribute(k, v === true ? '' : String(v));
    }
    append(e, children);
    return e;
  }

  function append(parent, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false || c === '') continue;
      parent.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return parent;
  }

  // Replaces a node's children (arrays are flattened, strings become text nodes).
  const fill = (node, ...children) => {
    node.replaceChildren();
    return append(node, children);
  };

  const mono = (text, title) => el('span', { class: 'mono', title }, text);
  const muted = (text) => el('span', { class: 'muted' }, text);
  const dash = () => muted('—');

  // ---------------------------------------------------------------- formatting

  const shortId = (id) => (id ? '…' + String(id).slice(-8) : '');
  const idChip = (id) => mono(shortId(id), String(id));
  const vp = (x) => `${x.vendor_id}:${x.product_id}`;
  const addr = (a) => (a ? `usb_${a.bus}_${a.devnum}` : '');
  // "HostRebooted" -> "host rebooted"; "released: GraceExpired" -> "released: grace expired".
  const words = (s) =>
    String(s ?? '').replace(/([a-z0-9])([A-Z])/g, '$1 $2').toLowerCase();

  function parseTime(iso) {
    if (!iso) return null;
    // Event times carry microseconds; Date reads milliseconds.
    const d = new Date(String(iso).replace(/(\.\d{3})\d+/, '$1'));
    return Number.isNaN(d.getTime()) ? null : d;
  }
  const pad = (n, w = 2) => String(n).padStart(w, '0');
  function fmtTime(iso) {
    const d = parseTime(iso);
    if (!d) return String(iso ?? '');
    const hms = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    const now = new Date();
    if (d.toDateString() === now.toDateString()) return hms;
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${hms}`;
  }
  const timeEl = (iso) => el('time', { datetime: iso, title: iso }, fmtTime(iso));
  // A view stamp: {seq, at}.
  const stamp = (s) => (s ? [timeEl(s.at), ' ', muted(`#${s.seq}`)] : dash());

  function deviceName(d) {
    const name = d.product || d.model_db;
    const maker = d.manufacturer || d.vendor_db;
    return { name: name || 'USB device', maker: maker || '' };
  }

  const serverName = (id) => {
    if (!id) return '';
    const s = state.servers.find((x) => x.id === id);
    return (s && s.name) || state.names.get(id) || shortId(id);
  };
  const flavorName = (id) => {
    const f = state.flavors.find((x) => x.id === id);
    return f ? f.name : shortId(id);
  };
  const rememberDevice = (d) => state.deviceNames.set(d.id || d.device_id, `${deviceName(d).name} (${vp(d)})`);
  const deviceLabel = (id) => state.deviceNames.get(id) || `device ${shortId(id)}`;

  function pill(kind, text, title) {
    return el('span', { class: `pill pill-${kind}`, title }, text);
  }
  const statusPill = (status) => pill(String(status).toLowerCase(), status);

  // ---------------------------------------------------------------- token

  // The API token (ADR 0006). `usbpt up` and `usbpt demo` print the dashboard's address with
  // `/#token=…` after it: a URL fragment never reaches a server, a proxy or a log. It moves
  // into sessionStorage (this tab only, gone when it closes) and out of the address bar, and is
  // sent as a header with every request; no cookie, so another site's page cannot make the
  // browser send it.
  const TOKEN_KEY = 'usbpt-api-token';
  function takeToken() {
    const m = /^#token=([^&]+)$/.exec(location.hash);
    if (!m) return;
    try {
      sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    } catch (_) {
      /* storage disabled: requests go without a token and say so */
    }
    history.replaceState(null, '', location.pathname + location.search);
  }
  function authHeaders(extra) {
    const h = Object.assign({}, extra);
    let t = null;
    try {
      t = sessionStorage.getItem(TOKEN_KEY);
    } catch (_) {
      /* no storage */
    }
    if (t) h.authorization = `Bearer ${t}`;
    return h;
  }
  const TOKEN_HINT =
    ' — open the address `usbpt up` or `usbpt demo` printed (…/#token=…); the token is in <data-dir>/api-token';

  // ---------------------------------------------------------------- API

  async function getJSON(path) {
    let resp;
    try {
      resp = await fetch(path, { headers: authHeaders({ accept: 'application/json' }), cache: 'no-store' });
    } catch (e) {
      throw new Error(`the API is unreachable (${path}): ${e.message}`);
    }
    let body = null;
    try {
      body = await resp.json();
    } catch (_) {
      /* not JSON */
    }
    if (!resp.ok) {
      const msg = body && body.error ? body.error.message : resp.statusText;
      const hint = resp.status === 401 || resp.status === 403 ? TOKEN_HINT : '';
      throw new Error(`${path}: ${resp.status} ${msg}${hint}`);
    }
    return body;
  }

  // A command (ADR 0006: the same token header as every read). Resolves to the reply's JSON;
  // a refusal throws with the API's message, which names the field.
  async function postJSON(path, body) {
    let resp;
    try {
      resp = await fetch(path, {
        method: 'POST',
        headers: authHeaders({ accept: 'application/json', 'content-type': 'application/json' }),
        body: JSON.stringify(body || {}),
        cache: 'no-store',
      });
    } catch (e) {
      throw new Error(`the API is unreachable (${path}): ${e.message}`);
    }
    let reply = null;
    try {
      reply = await resp.json();
    } catch (_) {
      /* not JSON */
    }
    if (!resp.ok) {
      const msg = reply && reply.error ? reply.error.message : resp.statusText;
      const hint = resp.status === 401 || resp.status === 403 ? TOKEN_HINT : '';
      throw new Error(`${path}: ${resp.status} ${msg}${hint}`);
    }
    return reply;
  }

  function showError(e) {
    const b = $('banner');
    b.textContent = String(e && e.message ? e.message : e);
    b.hidden = false;
  }
  const clearError = () => {
    $('banner').hidden = true;
  };

  const RESOURCES = {
    hosts: async () => {
      state.hosts = (await getJSON('/v1/hosts')).hosts || [];
    },
    devices: async () => {
      const q = state.showAll ? '?all=true' : '';
      state.devices = (await getJSON('/v1/devices' + q)).devices || [];
      for (const d of state.devices) rememberDevice(d);
    },
    servers: async () => {
      state.servers = (await getJSON('/v2.1/servers/detail')).servers || [];
      for (const s of state.servers) state.names.set(s.id, s.name);
    },
    flavors: async () => {
      state.flavors = (await getJSON('/v2.1/flavors')).flavors || [];
    },
    alarms: async () => {
      state.alarms = (await getJSON('/v1/alarms')).alarms || [];
    },
  };

  async function refresh(names) {
    await Promise.all([...names].map((n) => RESOURCES[n]()));
    render();
    if (state.lineage) await showLineage(state.lineage, { quiet: true });
  }

  // Which tables an event can change.
  function affected(kind) {
    switch (kind) {
      case 'HostAgentStarted':
        return ['hosts'];
      case 'FlavorCreated':
      case 'FlavorDeleted':
      case 'FlavorUsbSet':
      case 'FlavorSized':
      case 'FlavorFingerprintPolicySet':
        return ['flavors', 'servers'];
      // Identity alarms are raised and cleared by these (ADR 0011).
      case 'PortFlapping':
      case 'PortFlappingCleared':
      case 'LineageConflictResolved':
      case 'FingerprintAccepted':
      case 'DeviceReattachHeld':
        return ['devices', 'servers', 'alarms'];
      case 'DeviceDiscovered':
      case 'DeviceDiscoveredV2':
      case 'DeviceInvalidated':
      case 'DeviceClashDetected':
      case 'LineageConflictResolved':
      case 'FingerprintAccepted':
        return ['hosts', 'devices', 'servers', 'alarms'];
      case 'undecodable':
        return [];
      default:
        return ['devices', 'servers'];
    }
  }

  // Debounced re-reads: collect what the events touched, wait until the view has applied the
  // newest of them (read your writes), then read each table once.
  // The delay grows with the cost of a re-read, so a storm of events cannot keep the page busy.
  const pending = { names: new Set(), seq: 0, timer: null, running: false, delay: DEBOUNCE_MS };

  function schedule(names, seq) {
    for (const n of names) pending.names.add(n);
    pending.seq = Math.max(pending.seq, seq);
    if (!pending.timer) pending.timer = setTimeout(flush, pending.delay);
  }

  async function flush() {
    pending.timer = null;
    if (pending.running) {
      pending.timer = setTimeout(flush, pending.delay);
      return;
    }
    const names = pending.names;
    const seq = pending.seq;
    pending.names = new Set();
    pending.running = true;
    const began = performance.now();
    try {
      if (seq > 0) {
        const st = await getJSON(`/v1/status?min_seq=${seq}&timeout_ms=5000`);
        showPosition(st);
      }
      if (names.size) await refresh(names);
      clearError();
    } catch (e) {
      showError(e);
    } finally {
      pending.running = false;
      pending.delay = Math.min(5000, Math.max(DEBOUNCE_MS, 2 * (performance.now() - began)));
    }
  }

  // ---------------------------------------------------------------- header

  function showPosition(st) {
    const lag = st.lag ? ` · lag ${st.lag}` : '';
    $('seq').textContent = `view #${st.last_applied_seq}${lag}`;
    $('seq').title = `stream #${st.stream_last_seq ?? '?'}; quarantined ${st.quarantined ?? 0}`;
  }

  function setConn(s, text) {
    $('conn').dataset.state = s;
    $('conn-text').textContent = text;
  }

  function renderStats() {
    const current = state.devices.filter((d) => d.current);
    const count = (st) => current.filter((d) => d.status === st).length;
    const hosts = hostNames().length;
    const active = state.servers.filter((s) => s.status === 'ACTIVE').length;
    const items = [
      ['hosts', hosts, 'hosts'],
      ['devices', current.length, 'devices'],
      ['available', count('available'), 'available'],
      ['claimed', count('claimed'), 'claimed'],
      ['attached', count('attached'), 'attached'],
      ['invalidated', count('invalidated'), 'invalidated'],
      ['servers', state.servers.length, `servers · ${active} active`],
    ];
    $('stats').replaceChildren(
      ...items.map(([k, n, label]) =>
        el('li', { class: `stat stat-${k}`, 'data-stat': k }, el('b', {}, n), ' ', label),
      ),
    );
  }

  // ---------------------------------------------------------------- hosts and devices

  function hostNames() {
    const names = new Set(state.hosts.map((h) => h.name));
    for (const d of state.devices) names.add(d.host);
    return [...names].sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
  }

  const STATUS_ORDER = { attached: 0, claimed: 1, available: 2, invalidated: 3 };
  function byPort(a, b) {
    return (
      (a.current === b.current ? 0 : a.current ? -1 : 1) ||
      a.port_path.localeCompare(b.port_path, undefined, { numeric: true }) ||
      (STATUS_ORDER[a.status] ?? 9) - (STATUS_ORDER[b.status] ?? 9) ||
      (a.discovered?.seq ?? 0) - (b.discovered?.seq ?? 0)
    );
  }

  function renderHosts() {
    const names = hostNames();
    const root = $('hosts');
    if (!names.length) {
      root.replaceChildren(
        el('p', { class: 'empty' },
          'No hosts yet. Start an agent (', mono('usbpt agent --host NAME'), ') or run ',
          mono('usbpt demo'), '.'),
      );
      return;
    }
    root.replaceChildren(...names.map(hostCard));
  }

  function hostCard(name) {
    const h = state.hosts.find((x) => x.name === name);
    const devices = state.devices.filter((d) => d.host === name).sort(byPort);
    const current = devices.filter((d) => d.current);
    const counts = ['attached', 'claimed', 'available', 'invalidated']
      .map((st) => [st, current.filter((d) => d.status === st).length])
      .filter(([, n]) => n > 0)
      .map(([st, n]) => pill(st, `${n} ${st}`));
    const meta = h
      ? [
          el('span', { title: 'hypervisor' }, h.hypervisor_uri),
          el('span', { title: `boot id ${h.boot_id}` }, 'boot ', mono(String(h.boot_id).slice(0, 8))),
          el('span', {}, 'agent ', h.agent_version),
          h.last_seen ? el('span', {}, 'seen ', timeEl(h.last_seen.at)) : null,
          h.clashes && h.clashes.length
            ? el('span', { class: 'warn' }, `${h.clashes.length} serial clash(es)`)
            : null,
        ]
      : [muted('no agent has reported yet; devices came from events')];
    return el('article', { class: 'host', 'data-host': name },
      el('header', { class: 'host-head' },
        el('h3', {}, el('span', { class: 'host-icon', 'aria-hidden': 'true' }), name),
        el('div', { class: 'counts' }, counts),
      ),
      el('div', { class: 'host-meta' }, meta),
      devices.length
        ? deviceTable(devices)
        : el('p', { class: 'empty small' }, 'No USB devices on this host.'),
    );
  }

  function deviceTable(devices) {
    const head = ['Status', 'Device', 'Serial', 'Address', 'Port', 'Lineage', 'Holder'];
    return el('table', { class: 'devices' },
      el('thead', {}, el('tr', {}, head.map((h) => el('th', { scope: 'col', class: `c-${h.toLowerCase()}` }, h)))),
      el('tbody', {}, devices.map(deviceRow)),
    );
  }

  function deviceRow(d) {
    const { name, maker } = deviceName(d);
    const changed = state.seenChange >= 0 && d.last_change_seq > state.seenChange;
    const reason = d.invalidation && d.invalidation.reason;
    const open = () => openLineage(d.id);
    return el('tr', {
      class: ['device', `st-${d.status}`, d.current ? '' : 'superseded', changed ? 'changed' : '',
        state.lineageId === d.lineage_id ? 'selected' : ''].filter(Boolean).join(' '),
      'data-device-id': d.id,
      'data-lineage-id': d.lineage_id,
      'data-status': d.status,
      tabindex: 0,
      title: 'Show this device\u2019s lineage',
      on: { click: open, keydown: (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); open(); } } },
    },
      el('td', { class: 'c-status' }, statusPill(d.status),
        reason ? el('div', { class: 'sub' }, words(reason)) : null,
        d.current ? null : el('div', { class: 'sub' }, 'superseded')),
      el('td', { class: 'c-device' },
        el('div', { class: 'dev-name' }, name),
        d.label ? el('div', { class: 'label', 'data-label': d.label }, el('b', {}, d.label)) : null,
        el('div', { class: 'sub' }, maker ? `${maker} · ` : '', mono(vp(d))),
        d.attach_error
          ? el('div', { class: 'sub error' }, 'attach failed: ', d.attach_error.error)
          : null),
      el('td', { class: 'c-serial' }, d.serial ? mono(d.serial) : dash()),
      el('td', { class: 'c-address' }, mono(d.address, `bus ${d.bus}, device ${d.devnum}`)),
      el('td', { class: 'c-port' }, mono(d.port_path)),
      el('td', { class: 'c-lineage' }, idChip(d.lineage_id), ' ',
        el('span', { class: `kind kind-${d.lineage_kind}` }, d.lineage_kind)),
      el('td', { class: 'c-holder' }, d.holder
        ? el('span', { class: 'holder', title: d.holder }, serverName(d.holder))
        : dash()),
    );
  }

  // ---------------------------------------------------------------- servers

  function renderServers() {
    const root = $('servers');
    if (!state.servers.length) {
      root.replaceChildren(el('p', { class: 'empty' }, 'No servers. Boot one with ',
        mono('usbpt server boot NAME --flavor FLAVOR'), '.'));
      return;
    }
    const servers = [...state.servers].sort((a, b) => a.name.localeCompare(b.name, undefined, { numeric: true }));
    const head = ['Server', 'Status', 'Host', 'Flavor', 'USB devices', 'Problems'];
    root.replaceChildren(el('table', { class: 'servers' },
      el('thead', {}, el('tr', {}, head.map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', {}, servers.map(serverRow)),
    ));
  }

  function serverRow(s) {
    const changed = state.seenChange >= 0 && s.last_change_seq > state.seenChange;
    const usb = (s.usb_devices || []).map((u) =>
      el('li', {
        class: `usb st-${u.status || 'unknown'}`,
        'data-device-id': u.device_id,
        tabindex: 0,
        title: `lineage ${u.lineage_id} · ${u.controller}, follow ${u.follow}`,
        on: { click: () => openLineage(u.lineage_id) },
      },
        el('span', { class: `dot dot-${u.status || 'unknown'}`, 'aria-hidden': 'true' }),
        mono(u.address || shortId(u.device_id)), ' ',
        muted(u.host || ''), ' ',
        u.held ? null : el('span', { class: 'warn' }, 'not held'),
      ));
    const problems = [];
    if (s.fault) {
      problems.push(el('div', { class: 'error' },
        `schedule failed${s.schedule_failures_total > 1 ? ` ×${s.schedule_failures_total}` : ''}: `,
        s.fault.message));
      for (const r of s.fault.details || []) {
        problems.push(el('div', { class: 'sub' }, mono(r.host), ': ', r.reason));
      }
    }
    const refusal = (s.migration_refusals || []).slice(-1)[0];
    if (refusal) {
      problems.push(el('div', { class: 'warn' },
        `${refusal.live ? 'live' : 'cold'} migration refused: `, refusal.reason));
    }
    const faultText = s.fault ? String(s.fault.message) : '';
    if (s.status === 'ERROR' && s.state_detail && !faultText.includes(s.state_detail)) {
      problems.push(el('div', { class: 'error' }, s.state_detail));
    }
    return el('tr', {
      class: `server ${changed ? 'changed' : ''}`,
      'data-server-id': s.id,
      'data-status': s.status,
    },
      el('td', {}, el('div', { class: 'dev-name' }, s.name), el('div', { class: 'sub' }, idChip(s.id))),
      el('td', {}, statusPill(s.status),
        s.state_detail && s.status !== 'ERROR' ? el('div', { class: 'sub' }, s.state_detail) : null),
      el('td', {}, s.host ? mono(s.host) : dash(),
        s.requested_host ? el('div', { class: 'sub' }, 'asked for ', s.requested_host) : null),
      el('td', {}, (s.flavor && s.flavor.name) || shortId(s.flavor && s.flavor.id)),
      el('td', {}, usb.length ? el('ul', { class: 'usb-list' }, usb) : dash()),
      el('td', { class: 'c-problems' }, problems.length ? problems : dash()),
    );
  }

  // The operator's way out of an alarm: keep one host of a conflict, accept a new fingerprint.
  async function alarmCommand(path, body, question) {
    if (!window.confirm(question)) return;
    try {
      await postJSON(path, body);
      clearError();
      await refresh(['alarms', 'devices', 'servers']);
    } catch (e) {
      showError(e);
    }
  }

  function alarmActions(a) {
    const lineage = encodeURIComponent(a.lineage_id);
    if (a.kind === 'lineage_conflict') {
      return el('div', { class: 'alarm-actions' }, (a.hosts || []).map((h) => el('button', {
        type: 'button',
        'data-action': 'keep',
        'data-host': h,
        on: {
          click: () => alarmCommand(`/v1/lineages/${lineage}/conflict/resolve`, { keep: h },
            `Keep the copy on ${h}? The other copy is set aside until it is unplugged.`),
        },
      }, 'Keep on ', h)));
    }
    if (a.kind === 'fingerprint_changed') {
      return el('div', { class: 'alarm-actions' }, el('button', {
        type: 'button',
        'data-action': 'accept',
        on: {
          click: () => alarmCommand(`/v1/lineages/${lineage}/fingerprint/accept`, {},
            'Accept the new fingerprint as this device\'s own? A server holding it gets it re-attached.'),
        },
      }, 'Accept new fingerprint'));
    }
    return null;
  }

  // Identity alarms (GET /v1/alarms): each with its reason, which says what to do, and a button
  // for the command that clears it.
  function renderAlarms() {
    const list = state.alarms || [];
    const root = $('alarms');
    $('alarms-panel').hidden = !list.length;
    root.replaceChildren(...list.map((a) => el('li', {
      class: `alarm alarm-${a.kind}`,
      'data-lineage-id': a.lineage_id,
      'data-kind': a.kind,
    },
      el('b', {}, words(a.kind)), ' · ', mono(`${a.vendor_id}:${a.product_id}`),
      a.serial ? [' serial ', mono(a.serial)] : null,
      ' on ', (a.hosts || []).map((h) => mono(h)).reduce((acc, x) => (acc.length ? [...acc, ', ', x] : [x]), []),
      ' · raised ', stamp(a.raised),
      el('div', { class: 'sub' }, a.reason),
      a.active ? alarmActions(a) : null)));
  }

  function render() {
    renderAlarms();
    renderStats();
    renderHosts();
    renderServers();
    const seqs = state.devices.map((d) => d.last_change_seq)
      .concat(state.servers.map((s) => s.last_change_seq));
    state.seenChange = Math.max(state.seenChange, 0, ...seqs);
    document.body.dataset.ready = 'true';
  }

  // ---------------------------------------------------------------- where is it (GET /v1/find)

  // The query for what the operator typed: `vp` takes `VENDOR:PRODUCT` (or a vendor alone).
  function findQuery(key, text) {
    const q = new URLSearchParams();
    if (key === 'vp') {
      const [vendor, product] = text.split(':').map((x) => x.trim());
      q.set('vendor', vendor);
      if (product) q.set('product', product);
    } else {
      q.set(key, text);
    }
    return q;
  }

  async function find(ev) {
    ev.preventDefault();
    const key = $('find-key').value;
    const text = $('find-text').value.trim();
    const out = $('find-results');
    if (!text) return;
    try {
      const doc = await getJSON(`/v1/find?${findQuery(key, text)}`);
      const list = doc.devices || [];
      fill(out, list.length ? list.map(found)
        : el('li', { class: 'empty' }, `no device has ${key === 'vp' ? 'vendor:product' : key} `, mono(text)));
    } catch (e) {
      fill(out, el('li', { class: 'error' }, String(e && e.message ? e.message : e)));
    }
  }

  // One device `find` returned: where it is now, or where it was last.
  function found(f) {
    const open = () => openLineage(f.lineage_id);
    return el('li', {
      class: `found ${f.present ? 'present' : 'gone'}`,
      'data-lineage-id': f.lineage_id,
      tabindex: '0',
      on: { click: open, keydown: (e) => { if (e.key === 'Enter') open(); } },
    },
      f.label ? [el('b', { class: 'label' }, f.label), ' · '] : null,
      mono(`${f.vendor_id}:${f.product_id}`), f.serial ? [' serial ', mono(f.serial)] : null,
      ' ', statusPill(f.status), ' ',
      f.present ? 'on ' : 'gone; last seen on ', mono(f.host), ' port ', mono(f.port_path),
      ' at ', mono(f.address),
      f.holder ? [' · held by ', el('b', {}, f.holder_name || serverName(f.holder))] : null,
      !f.present && f.gone_reason ? [' · ', words(f.gone_reason)] : null,
      ' · ', stamp(f.last_seen));
  }

  // ---------------------------------------------------------------- lineage drawer

  async function openLineage(id) {
    try {
      await showLineage(id, {});
      history.replaceState(null, '', `#lineage=${encodeURIComponent(state.lineageId || id)}`);
    } catch (e) {
      showError(e);
    }
  }

  function closeLineage() {
    state.lineage = null;
    state.lineageId = null;
    $('lineage').hidden = true;
    $('drawer-backdrop').hidden = true;
    history.replaceState(null, '', location.pathname);
    for (const r of document.querySelectorAll('tr.device.selected')) r.classList.remove('selected');
  }

  async function showLineage(id, { quiet }) {
    const doc = await getJSON(`/v1/devices/${encodeURIComponent(id)}/history`);
    state.lineage = id;
    const l = doc.lineage;
    state.lineageId = l.id;
    const enums = doc.enumerations || [];
    for (const d of enums) rememberDevice(d);
    const newest = enums[enums.length - 1] || {};
    const { name, maker } = deviceName(newest);
    $('lineage-title').textContent = name;
    fill($('lineage-sub'),
      maker ? `${maker} · ` : '', mono(vp(l)),
      l.serial ? [' · serial ', mono(l.serial)] : ' · no serial',
    );
    const claim = doc.claim;
    const facts = [
      ['Lineage', [idChip(l.id), ' ', el('span', { class: `kind kind-${l.kind}` }, l.kind)]],
      ['Label', l.label ? el('b', { class: 'label' }, l.label) : muted('none (usbpt label LINEAGE TEXT)')],
      ['Identity', l.kind === 'serial' ? 'vendor, product and serial: follows the device anywhere'
        : 'host, port path, vendor and product: the device has no usable serial'],
      ['Enumerations', String(l.enumerations)],
      ['Now', [mono(l.current_host), ' · ', idChip(l.current_device_id)]],
      ['First seen', stamp(l.first_seen)],
      ['Claim', claim
        ? [el('b', {}, serverName(claim.server_id)), ` · ${claim.follow} · ${claim.controller} · since `,
            stamp(claim.claimed), claim.awaiting ? [' · awaiting ', idChip(claim.awaiting)] : null]
        : muted('free')],
    ];
    $('lineage-facts').replaceChildren(...facts.flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]));
    $('lineage-timeline').replaceChildren(...enums.slice().reverse().map(enumeration));
    const custody = await getJSON(`/v1/lineages/${encodeURIComponent(l.id)}/custody`);
    const intervals = custody.intervals || [];
    fill($('lineage-custody'), intervals.length
      ? intervals.slice().reverse().map(interval)
      : el('li', { class: 'empty' }, muted('no server has held it')));
    $('lineage').dataset.lineageId = l.id;
    $('lineage').hidden = false;
    $('drawer-backdrop').hidden = false;
    for (const r of document.querySelectorAll('tr.device')) {
      r.classList.toggle('selected', r.dataset.lineageId === l.id);
    }
    if (!quiet) $('lineage-close').focus();
  }

  // Who asked: a command's origin (`started_by`, `ended_by`), when the history records one.
  const askedBy = (o) => (o ? [' by ', el('b', {}, o.principal || o.via || '?'),
    o.via ? muted(` (${o.via}${o.address ? ` ${o.address}` : ''})`) : null] : null);

  // One custody interval (GET /v1/lineages/{id}/custody): which server held the device, where,
  // from when to when, why it began and ended.
  function interval(c) {
    return el('li', { 'data-server-id': c.server_id, 'data-started': c.started },
      el('b', {}, c.server_name || serverName(c.server_id)), ' on ', mono(c.host), ' · ',
      words(c.started), askedBy(c.started_by), ' ', stamp(c.from), ' → ',
      c.to ? [stamp(c.to), ' ', words(c.ended || 'released'), askedBy(c.ended_by)]
        : el('span', { class: 'ok' }, 'holding'),
      c.segments && c.segments.length > 1 ? muted(` · ${c.segments.length} enumerations`) : null);
  }

  function enumeration(d) {
    const inv = d.invalidation;
    const holders = (d.holders || []).map((h) => {
      const parts = [el('b', {}, serverName(h.server_id)), ` ${words(h.how)} `, stamp(h.from)];
      if (h.attached) parts.push(' · attached ', stamp(h.attached));
      if (h.ended) parts.push(' · ', words(h.ended.reason), ' ', timeEl(h.ended.at), ' ', muted(`#${h.ended.seq}`));
      else parts.push(' · ', el('span', { class: 'ok' }, 'holding'));
      return el('li', {}, parts);
    });
    return el('li', {
      class: `tl st-${d.status}${d.current ? ' current' : ''}`,
      'data-device-id': d.id,
      'data-status': d.status,
    },
      el('span', { class: `tl-dot dot-${d.status}`, 'aria-hidden': 'true' }),
      el('div', { class: 'tl-body' },
        el('div', { class: 'tl-head' },
          el('b', {}, `#${d.ordinal}`), ' ', statusPill(d.status),
          d.current ? el('span', { class: 'tag' }, 'current') : null,
          ' ', idChip(d.id)),
        el('div', { class: 'tl-where' },
          mono(d.host), ' · ', mono(d.address), ' · port ', mono(d.port_path),
          d.speed ? muted(` · ${d.speed} Mbit/s`) : null),
        el('div', { class: 'tl-line' }, 'discovered ', stamp(d.discovered),
          d.supersedes ? [' · after ', idChip(d.supersedes)] : null),
        el('div', { class: 'tl-line fingerprint', title: 'SHA-256 of name, ids, serial and descriptors (USBGuard\u2019s hash)' },
          'fingerprint ', d.fingerprint ? mono(d.fingerprint) : muted('none reported')),
        inv
          ? el('div', { class: 'tl-line ended' }, 'ended ', timeEl(inv.at), ' ', muted(`#${inv.seq}`), ': ',
              el('b', {}, inv.reason ? words(inv.reason) : 'superseded'),
              inv.superseded_by ? [' → ', idChip(inv.superseded_by)] : null)
          : null,
        d.attachment
          ? el('div', { class: 'tl-line' }, 'in ', el('b', {}, serverName(d.attachment.server_id)),
              ` (${words(d.attachment.method)}) `, timeEl(d.attachment.at))
          : null,
        d.attach_error
          ? el('div', { class: 'tl-line error' }, 'attach failed: ', d.attach_error.error)
          : null,
        holders.length ? el('ul', { class: 'tl-holders' }, holders) : null,
      ),
    );
  }

  // ---------------------------------------------------------------- live event feed

  function summarize(kind, b, env) {
    if (!b) return '';
    const srv = (id) => serverName(id) || shortId(id);
    switch (kind) {
      case 'HostAgentStarted':
        return `agent ${b.agent_version} started on ${b.host} · ${b.hypervisor_uri} · boot ${String(b.boot_id).slice(0, 8)}`;
      case 'DeviceDiscovered':
      case 'DeviceDiscoveredV2': {
        // V2 is the discovery followed by the descriptor fingerprint (ADR 0011).
        const fp = kind === 'DeviceDiscoveredV2' ? b.fingerprint : null;
        if (fp) b = b.discovery;
        rememberDevice(b);
        const { name } = deviceName(b);
        const again = b.supersedes ? ` (re-enumeration of ${shortId(b.supersedes)})` : '';
        const print = fp ? ` · fingerprint ${fp.slice(0, 12)}\u2026` : '';
        return `${name} ${vp(b)} on ${b.host} at ${addr(b.address)}, port ${b.port_path}${again}${print}`;
      }
      case 'DeviceInvalidated':
        return `${deviceLabel(b.device_id)} on ${b.host} is gone: ${words(b.reason)}` +
          (b.superseded_by ? ` → ${shortId(b.superseded_by)}` : '');
      case 'FlavorCreated':
        return `flavor ${b.name} with ${(b.usb || []).map(request).join(', ') || 'no USB devices'}`;
      case 'FlavorDeleted':
        return `flavor ${b.name} deleted`;
      case 'FlavorUsbSet':
        return `flavor ${b.name} now asks for ${(b.usb || []).map(request).join(', ') || 'no USB devices'}`;
      case 'ServerBootRequested':
        state.names.set(b.server_id, b.name);
        return `boot ${b.name} with flavor ${flavorName(b.flavor_id)}` +
          (b.requested_host ? ` on ${b.requested_host}` : '');
      case 'ServerScheduled':
        return `${srv(b.server_id)} placed on ${b.host} with ${b.devices.length} device(s)`;
      case 'ServerScheduleFailed':
        return `${srv(b.server_id)} cannot be placed: ${b.reason}`;
      case 'DeviceClaimed':
        return `${deviceLabel(b.device_id)} on ${b.host} claimed for ${srv(b.server_id)} (${b.controller}, follow ${b.follow})`;
      case 'DeviceAttached':
        return `${deviceLabel(b.device_id)} attached to ${srv(b.server_id)} at ${addr(b.address)} on ${b.host} (${words(b.method)})`;
      case 'DeviceReattached':
        return `${srv(b.server_id)} kept its device: ${shortId(b.old_device_id)} → ${shortId(b.new_device_id)} at ${addr(b.address)} on ${b.host}`;
      case 'DeviceReleased':
        return `${deviceLabel(b.device_id)} released by ${srv(b.server_id)}: ${words(b.reason)}`;
      case 'ServerStateChanged':
        return `${srv(b.server_id)} ${b.state}${b.host ? ` on ${b.host}` : ''}` +
          (b.detail ? ` — ${b.detail}` : '') + (b.reported_by_agent ? ' (observed)' : '');
      case 'ServerResized':
        return `${srv(b.server_id)} resized ${flavorName(b.from_flavor)} → ${flavorName(b.to_flavor)}` +
          (b.from_host !== b.host ? `, moved ${b.from_host} → ${b.host}` : '');
      case 'ServerMigrationRefused':
        return `${b.live ? 'live' : 'cold'} migration of ${srv(b.server_id)} refused: ${b.reason}`;
      case 'ServerDeleted':
        return `${srv(b.server_id)} deleted`;
      case 'ServerActionRequested':
        return `${b.action} ${srv(b.server_id)} on ${b.host}`;
      case 'DeviceAttachFailed':
        return `${deviceLabel(b.device_id)} could not be attached to ${srv(b.server_id)}: ${b.error}`;
      case 'DeviceClashDetected':
        return `serial clash on ${b.host}: ${vp(b)} serial ${b.serial} on ports ${(b.port_paths || []).join(', ')}`;
      case 'ServerMigrated':
        return `${srv(b.server_id)} migrated ${b.from_host} → ${b.host}`;
      case 'FlavorSized':
        return `flavor ${b.name}: ${b.ram_mb} MB RAM, ${b.vcpus} vCPU(s), ${b.disk_gb} GB disk`;
      case 'ServerUpdated': {
        const was = srv(b.server_id);
        state.names.set(b.server_id, b.name);
        return `${was} is now ${b.name}` + (b.description ? ` — ${b.description}` : '');
      }
      case 'ServerResizeVerifying':
        return `${srv(b.server_id)} awaits confirmation of its resize; its old devices stay reserved`;
      case 'ServerResizeConfirmed':
        return `resize of ${srv(b.server_id)} confirmed`;
      case 'ServerResizeReverted':
        return `resize of ${srv(b.server_id)} reverted`;
      case 'LineageConflictResolved':
        return `lineage ${shortId(b.lineage_id)}: operator kept host ${b.keep_host}; device ${shortId(b.dropped_device)} set aside`;
      case 'FingerprintAccepted':
        return `lineage ${shortId(b.lineage_id)}: new fingerprint accepted ${b.by_policy ? 'by flavor policy' : 'by operator'}`;
      case 'LineageLabeled':
        return b.label === null
          ? `lineage ${shortId(b.lineage_id)} label removed`
          : `lineage ${shortId(b.lineage_id)} labelled \u201c${b.label}\u201d`;
      case 'PortFlapping':
        return `${deviceLabel(b.device_id)} on ${b.host} port ${b.port_path} is flapping: ` +
          `${b.enumerations} enumerations within ${b.window_secs} s; re-attach paused`;
      case 'PortFlappingCleared':
        return `lineage ${shortId(b.lineage_id)} on ${b.host} quiet for ${b.quiet_secs} s: flapping over`;
      case 'LineageConflictResolved':
        return `conflict on lineage ${shortId(b.lineage_id)} resolved: kept ${b.keep_host} ` +
          `(${shortId(b.kept_device)}), set aside ${shortId(b.dropped_device)}`;
      case 'FingerprintAccepted':
        return `new fingerprint of lineage ${shortId(b.lineage_id)} accepted` +
          (b.by_policy ? ' by flavor policy' : ' by an operator') +
          (b.server_id ? `; ${srv(b.server_id)} gets it re-attached` : '');
      case 'DeviceReattachHeld':
        return `${srv(b.server_id)} did not get ${deviceLabel(b.device_id)} back on ${b.host}: ` +
          'its fingerprint changed; waiting for an accept';
      case 'FlavorFingerprintPolicySet':
        return `flavor ${b.name}: on fingerprint change, ${b.on_fingerprint_change}`;
      default:
        return JSON.stringify(b).slice(0, 240);
    }
  }

  function request(r) {
    const s = r.selector || {};
    if (s.match) {
      const m = s.match;
      return `${m.vendor_id}:${m.product_id}${m.serial ? ` serial ${m.serial}` : ''} ×${m.count}`;
    }
    if (s.lineage) return `lineage ${shortId(s.lineage)}`;
    if (s.enumeration) return `device ${shortId(s.enumeration)}`;
    return JSON.stringify(s);
  }

  const CATEGORY = {
    HostAgentStarted: 'host',
    DeviceDiscovered: 'device',
    DeviceDiscoveredV2: 'device',
    DeviceInvalidated: 'gone',
    DeviceClashDetected: 'bad',
    FlavorCreated: 'flavor',
    FlavorDeleted: 'flavor',
    FlavorUsbSet: 'flavor',
    FlavorSized: 'flavor',
    ServerScheduleFailed: 'bad',
    ServerMigrationRefused: 'bad',
    DeviceAttachFailed: 'bad',
    DeviceClaimed: 'claim',
    DeviceReleased: 'claim',
    DeviceAttached: 'attach',
    DeviceReattached: 'attach',
    undecodable: 'bad',
  };

  function addFeed(kind, data, historic) {
    const env = data.event;
    const body = env && env.body ? env.body[kind] : null;
    const text = data.undecodable ? `undecodable: ${data.undecodable}` : summarize(kind, body, env);
    const at = env ? env.occurred_at : null;
    const item = el('li', {
      class: `ev cat-${CATEGORY[kind] || (kind.startsWith('Server') ? 'server' : 'other')}${historic ? '' : ' fresh'}`,
      'data-seq': data.seq,
      'data-kind': kind,
      'data-device-id': body && (body.device_id || body.new_device_id),
      'data-host': (env && env.host) || (body && body.host),
    },
      el('div', { class: 'ev-head' },
        el('span', { class: 'ev-kind' }, kind),
        el('span', { class: 'ev-seq' }, `#${data.seq}`),
        at ? timeEl(at) : null),
      el('div', { class: 'ev-text' }, text),
      el('div', { class: 'ev-subject mono' }, data.subject || ''),
    );
    const feed = $('feed');
    feed.insertBefore(item, feed.firstChild);
    while (feed.childElementCount > FEED_MAX) feed.lastElementChild.remove();
    state.feedCount += 1;
    $('feed-count').textContent = `${state.feedCount} received`;
  }

  function onEvent(e) {
    let data;
    try {
      data = JSON.parse(e.data);
    } catch (err) {
      return;
    }
    const seq = Number(data.seq) || 0;
    if (seq && seq <= state.lastSeq) return; // a reconnect replayed it
    state.lastSeq = Math.max(state.lastSeq, seq);
    const historic = seq <= state.loadedSeq;
    addFeed(e.type, data, historic);
    if (!historic) schedule(affected(e.type), seq);
  }

  // One Server-Sent Events message (`event:`, `data:` lines) to its handler.
  function dispatch(frame) {
    let type = 'message';
    const data = [];
    for (const line of frame.split('\n')) {
      if (line.startsWith(':')) continue; // keep-alive comment
      const c = line.indexOf(':');
      const field = c < 0 ? line : line.slice(0, c);
      let value = c < 0 ? '' : line.slice(c + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') type = value;
      else if (field === 'data') data.push(value);
    }
    if (!data.length) return;
    const e = { type, data: data.join('\n') };
    if (type === 'subscribed') {
      try {
        $('conn').title = `subscribed at stream #${JSON.parse(e.data).last_seq}`;
      } catch (_) {
        /* ignore */
      }
      setConn('live', 'live');
    } else if (type === 'error') {
      showError(`event stream: ${e.data}`);
    } else if (type === 'undecodable' || KINDS.includes(type)) {
      onEvent(e);
    }
  }

  // The live stream, read with fetch (EventSource cannot send the token header); after a drop it
  // resumes after the last event seen.
  function connect(from) {
    const again = (label) => {
      setConn('down', label);
      setTimeout(() => connect(state.lastSeq > 0 ? state.lastSeq + 1 : from), RETRY_MS);
    };
    const url = '/v1/events' + (from > 0 ? `?from=${from}` : '');
    setConn('connecting', 'connecting…');
    fetch(url, { headers: authHeaders({ accept: 'text/event-stream' }), cache: 'no-store' })
      .then(async (resp) => {
        if (!resp.ok || !resp.body) {
          let msg = resp.statusText;
          try {
            const b = await resp.json();
            if (b && b.error) msg = b.error.message;
          } catch (_) {
            /* not JSON */
          }
          if (resp.status === 401 || resp.status === 403) {
            showError(`event stream: ${resp.status} ${msg}${TOKEN_HINT}`);
            setConn('down', 'no valid token');
            return;
          }
          again('disconnected, retrying…');
          return;
        }
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value.replace(/\r\n?/g, '\n');
          let end;
          while ((end = buf.indexOf('\n\n')) >= 0) {
            dispatch(buf.slice(0, end));
            buf = buf.slice(end + 2);
          }
        }
        again('reconnecting…');
      })
      .catch(() => again('disconnected, retrying…'));
  }

  // ---------------------------------------------------------------- start

  async function start() {
    takeToken();
    $('show-all').addEventListener('change', async (e) => {
      state.showAll = e.target.checked;
      try {
        await refresh(['devices']);
      } catch (err) {
        showError(err);
      }
    });
    $('find').addEventListener('submit', find);
    $('lineage-close').addEventListener('click', closeLineage);
    $('drawer-backdrop').addEventListener('click', closeLineage);
    document.addEventListener('keydown', (e) => {
      if (e.key === 'Escape' && !$('lineage').hidden) closeLineage();
    });

    let from = 1;
    try {
      const st = await getJSON('/v1/status');
      showPosition(st);
      state.loadedSeq = st.last_applied_seq || 0;
      const head = Math.max(st.stream_last_seq || 0, state.loadedSeq);
      from = Math.max(1, head - HISTORY_ON_LOAD + 1);
      await refresh(Object.keys(RESOURCES));
      state.seenChange = state.loadedSeq;
    } catch (e) {
      showError(e);
    }
    connect(from);
    const m = /^#lineage=(.+)$/.exec(location.hash);
    if (m) openLineage(decodeURIComponent(m[1]));
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
