// The netmesh dashboard: reads the read API with the bearer token the user
// typed (kept in sessionStorage: gone with the tab), follows the event stream
// (server-sent events, read with fetch so that the token goes in a header,
// not in a URL), and redraws from the API on every event.
"use strict";

const TOKEN_KEY = "netmesh.token";
const SVG_NS = "http://www.w3.org/2000/svg";
const MAX_EVENTS_SHOWN = 200;
let lastSeq = 0;
let stream = null; // AbortController of the event stream
let refreshTimer = null;
let statusTimer = null;

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? "-"));
  return node;
}

class Unauthorized extends Error {}

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: "Bearer " + token() } });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (response.status === 401) throw new Unauthorized(body.error);
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function showAuthError(message) {
  stopAll();
  const box = document.getElementById("auth-error");
  box.textContent = "Not signed in: " + message + " (401). Enter a valid token.";
  box.hidden = false;
  document.getElementById("dashboard").hidden = true;
  document.getElementById("whoami").textContent = "";
}

function stopAll() {
  if (stream) stream.abort();
  stream = null;
  clearInterval(statusTimer);
  clearTimeout(refreshTimer);
}

async function start() {
  stopAll();
  document.getElementById("auth-error").hidden = true;
  if (!token()) { showAuthError("no token given"); return; }
  let me;
  try { me = await api("/api/whoami"); } catch (exc) {
    if (exc instanceof Unauthorized) { showAuthError(exc.message); return; }
    throw exc;
  }
  document.getElementById("whoami").textContent =
    `token ${me.name} (${me.role}${me.networks.length ? " of " + me.networks.join(", ") : ""})`;
  document.getElementById("dashboard").hidden = false;
  document.getElementById("events").replaceChildren();
  lastSeq = 0;
  await refresh();
  follow();
  statusTimer = setInterval(refresh, 5000); // agents' reports are not events
}

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, 150); // a burst of events: one redraw
}

async function refresh() {
  try {
    const [networks, nodes, status, policies] = await Promise.all(
      ["/api/networks", "/api/nodes", "/api/status", "/api/policies"].map(api));
    render(networks, nodes, status, policies);
  } catch (exc) {
    if (exc instanceof Unauthorized) showAuthError(exc.message);
    else console.error(exc);
  }
}

function nodeState(s) {
  if (!s || s.state === "never reported") return ["never", "never reported"];
  if (s.state === "error") return ["error", "error"];
  if (!s.online) return ["offline", "offline"];
  return s.state === "in sync" ? ["in-sync", "in sync"] : ["behind", "behind"];
}

function lastHandshake(s) {
  const times = (s ? s.peers : []).map((p) => p.last_handshake).filter((t) => t > 0);
  if (!times.length) return "never";
  const ago = Math.max(0, Math.round(Date.now() / 1000 - Math.max(...times)));
  return ago < 120 ? `${ago} s ago` : `${Math.round(ago / 60)} min ago`;
}

function render(networks, nodes, status, policies) {
  const statusOf = Object.fromEntries(status.map((s) => [s.id, s]));
  const policyOf = Object.fromEntries(policies.map((p) => [p.network, p]));
  document.querySelector("#networks tbody").replaceChildren(...networks.map((n) => el("tr",
    { "data-network": n.name }, el("td", {}, n.name), el("td", { class: "mono" }, n.cidr),
    el("td", {}, n.nodes), el("td", {}, n.listen_port), el("td", {}, n.mtu),
    el("td", {}, policyOf[n.name] && policyOf[n.name].policy ? "yes" : "allow all"))));
  document.querySelector("#nodes tbody").replaceChildren(...nodes.map((n) => {
    const s = statusOf[n.id];
    const [cls, label] = nodeState(s);
    return el("tr", { "data-node-id": n.id, "data-state": cls },
      el("td", {}, n.network), el("td", { class: "name" }, n.name),
      el("td", { class: "mono address" }, n.address), el("td", { class: "mono" }, n.endpoint),
      el("td", {}, n.tags.join(", ") || "-"),
      el("td", {}, el("span", { class: "state " + cls }, label)),
      el("td", {}, s ? `${s.applied_revision ?? "-"} / ${s.desired_revision ?? "-"}` : "-"),
      el("td", {}, lastHandshake(s)));
  }));
  drawTopology(networks, nodes, statusOf);
  document.getElementById("policies").replaceChildren(...policies.map((p) => el("div",
    { class: "policy", "data-network": p.network },
    el("h3", {}, `${p.network}: ${p.policy ? "policy (event #" + p.revision + ")" : "no policy: everyone reaches everyone"}`),
    ...(p.error ? [el("p", { class: "error" }, p.error)] : []),
    ...(p.document ? [el("pre", {}, p.document)] : []))));
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// Each network a circle of its nodes; a line joins two nodes when either
// one's agent reports the other as a WireGuard peer (under an access policy
// not every pair is), green when a handshake between them is recent.
function drawTopology(networks, nodes, statusOf) {
  const picture = document.getElementById("topology");
  const width = 800, height = 360;
  const columns = Math.max(networks.length, 1);
  const parts = [];
  networks.forEach((network, i) => {
    const members = nodes.filter((n) => n.network === network.name);
    const cx = (width / columns) * (i + 0.5), cy = height / 2 + 10;
    const r = Math.min(width / columns / 2 - 50, height / 2 - 50);
    parts.push(svg("text", { x: cx, y: 20, "text-anchor": "middle", class: "net" },
      `${network.name} ${network.cidr}`));
    const at = members.map((n, k) => {
      const angle = (2 * Math.PI * k) / Math.max(members.length, 1) - Math.PI / 2;
      return members.length === 1 ? [cx, cy] : [cx + r * Math.cos(angle), cy + r * Math.sin(angle)];
    });
    const peer = (a, b) => (statusOf[a.id] || { peers: [] }).peers
      .find((p) => p.public_key === b.public_key);
    for (let a = 0; a < members.length; a++) for (let b = a + 1; b < members.length; b++) {
      const ends = [peer(members[a], members[b]), peer(members[b], members[a])].filter(Boolean);
      if (!ends.length) continue;
      parts.push(svg("line", { x1: at[a][0], y1: at[a][1], x2: at[b][0], y2: at[b][1],
        class: ends.some((p) => p.connected) ? "up" : "peer" }));
    }
    members.forEach((n, k) => {
      const [cls] = nodeState(statusOf[n.id]);
      parts.push(svg("circle", { cx: at[k][0], cy: at[k][1], r: 9, class: "node " + cls,
        "data-node-id": n.id }));
      parts.push(svg("text", { x: at[k][0], y: at[k][1] + 24, "text-anchor": "middle" },
        `${n.name} ${n.address}`));
    });
  });
  picture.replaceChildren(...parts);
}

function showEvent(event) {
  const fields = Object.entries(event.data)
    .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`).join(" ");
  const list = document.getElementById("events");
  list.prepend(el("li", { value: event.seq, "data-seq": event.seq },
    el("span", { class: "type" }, event.type), " ", new Date(event.time * 1000).toISOString(),
    " ", el("span", { class: "mono" }, fields), ` [${event.actor}]`));
  while (list.children.length > MAX_EVENTS_SHOWN) list.lastChild.remove();
}

// Server-sent events over fetch: `id: <seq>` and `data: <event JSON>` per
// message; on a break, follow again from the last sequence seen.
async function follow() {
  const controller = new AbortController();
  stream = controller;
  const state = document.getElementById("stream-state");
  try {
    // The first time, only the newest events: a long log is not replayed into the page.
    const from = lastSeq ? "since=" + lastSeq : "tail=" + MAX_EVENTS_SHOWN;
    const response = await fetch("/api/events/stream?" + from, {
      headers: { Authorization: "Bearer " + token() }, signal: controller.signal });
    if (response.status === 401) {
      showAuthError((await response.json()).error);
      return;
    }
    state.textContent = "(live)";
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += value;
      let end;
      while ((end = pending.indexOf("\n\n")) >= 0) {
        const message = pending.slice(0, end);
        pending = pending.slice(end + 2);
        const lines = message.split("\n");
        const data = lines.filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (!data) continue; // a keepalive
        if (lines.includes("event: unauthorized")) { // revoked or expired meanwhile
          showAuthError(JSON.parse(data).error);
          return;
        }
        const event = JSON.parse(data);
        lastSeq = Math.max(lastSeq, event.seq);
        showEvent(event);
        scheduleRefresh();
      }
    }
  } catch (exc) {
    if (controller.signal.aborted) return;
    console.error(exc);
  }
  if (stream !== controller) return;
  state.textContent = "(reconnecting)";
  setTimeout(() => { if (stream === controller) follow(); }, 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
    document.getElementById("token").value = "";
    start();
  });
  document.getElementById("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showAuthError("token forgotten");
  });
  if (token()) start(); else showAuthError("no token given");
});
