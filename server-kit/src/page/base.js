// The helpers every qbus monitor page shares (spliced in by qbus_server_kit::page).
const REFRESH_MS = 1000;
const $ = (id) => document.getElementById(id);
const intFmt = new Intl.NumberFormat("en-US");
function fmtInt(n) { return intFmt.format(n); }
function fmtBytes(b) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return (i === 0 ? b : b.toFixed(b >= 100 ? 0 : 1)) + " " + units[i];
}
function fmtDuration(ms) {
  const s = Math.floor(ms / 1000), d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600);
  const m = Math.floor(s % 3600 / 60);
  if (d) return d + "d " + h + "h";
  if (h) return h + "h " + m + "m";
  if (m) return m + "m " + (s % 60) + "s";
  return s + "s";
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
// Fills `cell` with a chip per consumer group (name · consumers · lag), `title(g)` its
// tooltip; `extra(chip, g)`, if given, adds to it.
function renderGroupChips(cell, groups, title, extra) {
  cell.replaceChildren();
  if (!groups.length) { cell.appendChild(el("span", "none", "no consumer group")); return; }
  const chips = el("div", "chips");
  for (const g of groups) {
    const chip = el("span", "chip");
    chip.dataset.group = g.name;
    chip.appendChild(el("b", "", g.name));
    chip.appendChild(document.createTextNode("· " + g.consumers + " ·"));
    chip.appendChild(el("span", "lag", "lag " + fmtInt(g.lag)));
    chip.title = title(g);
    if (extra) extra(chip, g);
    chips.appendChild(chip);
  }
  cell.appendChild(chips);
}
// Fills `cell` with the followers of a broker's copy of an MQ with `replicas` copies:
// one chip per follower with its lag in records and bytes, marked in sync or behind.
function renderReplicaChips(cell, replicas, followers) {
  cell.replaceChildren();
  if (!replicas || replicas <= 1) { cell.appendChild(el("span", "none", "no replicas")); return; }
  const chips = el("div", "chips");
  chips.appendChild(el("span", "chip", "×" + replicas));
  if (!followers.length) chips.appendChild(el("span", "chip behind", "no follower yet"));
  for (const f of followers) {
    const chip = el("span", "chip " + (f.in_sync ? "in-sync" : "behind"));
    chip.dataset.follower = f.id;
    chip.appendChild(el("b", "", f.id));
    chip.appendChild(el("span", "lag", "lag " + fmtInt(f.lag) + " · " + fmtBytes(f.lag_bytes)));
    chip.appendChild(el("span", "state", f.in_sync ? "in sync" : "behind"));
    chip.title = "durable on the follower below offset " + fmtInt(f.acked);
    chips.appendChild(chip);
  }
  cell.appendChild(chips);
}
// Sizes `canvas` for the screen (`height` until laid out), clears it and draws its baseline;
// returns what the chart functions below draw with.
function chartCanvas(canvas, height) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 180, h = canvas.clientHeight || height;
  if (canvas.width !== w * ratio) { canvas.width = w * ratio; canvas.height = h * ratio; }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const style = getComputedStyle(document.documentElement);
  ctx.strokeStyle = style.getPropertyValue("--line");
  ctx.beginPath(); ctx.moveTo(0, h - 1.5); ctx.lineTo(w, h - 1.5); ctx.stroke();
  // Values up to `max` map onto the chart's height above the baseline.
  const y = (v, max) => h - 2 - (v / max) * (h - 6);
  return { ctx, w, h, style, y };
}
// A line through `points` ([x, y] pairs) in the colour of CSS variable `color`.
function drawLine(chart, points, color) {
  const { ctx, style } = chart;
  ctx.beginPath();
  points.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
  ctx.strokeStyle = style.getPropertyValue(color);
  ctx.lineWidth = 1.5;
  ctx.stroke();
}
// `points` as an accent line over a soft area down to the baseline.
function drawArea(chart, points) {
  const { ctx, h, style } = chart;
  ctx.beginPath();
  ctx.moveTo(points[0][0], h - 2);
  for (const [px, py] of points) ctx.lineTo(px, py);
  ctx.lineTo(points[points.length - 1][0], h - 2);
  ctx.closePath();
  ctx.fillStyle = style.getPropertyValue("--accent-soft");
  ctx.fill();
  drawLine(chart, points, "--accent");
}
// Marks the header's live indicator up or down.
function setLive(up, text) {
  $("live").classList.toggle("down", !up);
  $("live-text").textContent = text;
}
// Calls `refresh` now and then every REFRESH_MS after it finishes.
async function refreshForever(refresh) {
  for (;;) {
    await refresh();
    await new Promise((done) => setTimeout(done, REFRESH_MS));
  }
}
